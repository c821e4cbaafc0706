"""Paper-scale random checkpoints (models.paper_scale): a shape-scaled fixture of each family goes
through the same code as the full-size model, so what holds for it holds at 14 GB."""

import json
from collections import namedtuple

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

from swapmoe.executor.store_build import build_store
from swapmoe.models import paper_scale
from swapmoe.models.paper_scale import (NotEnoughSpace, main, parse_scale, plan, tokenizer,
                                        write_checkpoint)

FAMILIES = {"olmoe-1b-7b": (AutoModelForCausalLM, torch.bfloat16),
            "switch-base-16": (AutoModelForSeq2SeqLM, torch.float32)}
GiB, GB = 1 << 30, 10**9


def tiny(name: str) -> dict:
    return parse_scale("tiny", name)


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    """Each family's tiny fixture, sharded (small shards), written once."""
    made = {}

    def get(name):
        if name not in made:
            made[name] = tmp_path_factory.mktemp(name) / "ckpt"
            write_checkpoint(name, made[name], tiny(name), max_shard_size="40KB")
        return made[name]

    return get


def file_tensors(path) -> dict[str, torch.Tensor]:
    files = set(json.loads((path / "model.safetensors.index.json").read_text())["weight_map"].values())
    tensors = {}
    for file in files:
        with safe_open(path / file, "pt") as f:
            tensors.update({k: f.get_tensor(k) for k in f.keys()})
    return tensors


def expected_runtime_tensor(key: str, disk: dict[str, torch.Tensor]) -> torch.Tensor:
    """What transformers makes of the disk tensors: OLMoE's per-expert gate/up/down fused into
    gate_up_proj [E, 2I, H] and down_proj [E, H, I]; Switch's tied embeddings = shared.weight."""
    if key in disk:
        return disk[key]
    if key.endswith(".mlp.experts.gate_up_proj"):
        block = key.removesuffix(".gate_up_proj")
        count = sum(1 for k in disk if k.startswith(block + ".") and k.endswith(".gate_proj.weight"))
        return torch.stack([torch.cat([disk[f"{block}.{e}.gate_proj.weight"], disk[f"{block}.{e}.up_proj.weight"]])
                            for e in range(count)])
    if key.endswith(".mlp.experts.down_proj"):
        block = key.removesuffix(".down_proj")
        count = sum(1 for k in disk if k.startswith(block + ".") and k.endswith(".down_proj.weight"))
        return torch.stack([disk[f"{block}.{e}.down_proj.weight"] for e in range(count)])
    if key in ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight", "lm_head.weight"):
        return disk["shared.weight"]
    raise KeyError(key)


@pytest.mark.slow
@pytest.mark.parametrize("name", FAMILIES)
def test_transformers_loads_the_fixture_with_every_key_and_the_files_values(name, written):
    auto, dtype = FAMILIES[name]
    path = written(name)
    model, info = auto.from_pretrained(path, dtype="auto", local_files_only=True, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    disk = file_tensors(path)
    state = model.state_dict()
    for key, value in state.items():
        assert torch.equal(value, expected_runtime_tensor(key, disk)), key
    assert {p.dtype for p in model.parameters()} == {dtype}  # the family's published dtype is kept
    assert all(t.dtype == dtype for t in disk.values())


@pytest.mark.slow
@pytest.mark.parametrize("name", FAMILIES)
def test_files_index_and_names_are_what_save_pretrained_writes(name, tmp_path):
    """The shard plan and disk names equal save_pretrained's for a model of the same config."""
    auto, _ = FAMILIES[name]
    layout = plan(name, tiny(name), max_shard_size="40KB")
    reference = auto.from_config(layout.config, dtype=layout.dtype)
    reference.save_pretrained(tmp_path / "ref", max_shard_size="40KB")
    index = json.loads((tmp_path / "ref" / "model.safetensors.index.json").read_text())
    ours = write_checkpoint(name, tmp_path / "ours", tiny(name), max_shard_size="40KB").path
    assert json.loads((ours / "model.safetensors.index.json").read_text()) == index
    for file in ["generation_config.json", *sorted(set(index["weight_map"].values()))]:
        assert (ours / file).exists(), file
    assert json.loads((ours / "generation_config.json").read_text()) == \
        json.loads((tmp_path / "ref" / "generation_config.json").read_text())


@pytest.mark.slow
def test_disk_names_are_per_expert_as_the_adapters_read_them(written):
    olmoe, switch = file_tensors(written("olmoe-1b-7b")), file_tensors(written("switch-base-16"))
    assert "model.layers.0.mlp.experts.7.gate_proj.weight" in olmoe  # not the fused gate_up_proj
    assert "model.layers.1.mlp.experts.0.up_proj.weight" in olmoe and "model.layers.1.mlp.gate.weight" in olmoe
    assert not any("gate_up_proj" in k for k in olmoe)
    assert "encoder.block.1.layer.1.mlp.experts.expert_1.wi.weight" in switch
    assert "decoder.block.1.layer.2.mlp.router.classifier.weight" in switch
    assert "shared.weight" in switch and "lm_head.weight" not in switch  # tied: saved once


@pytest.mark.slow
@pytest.mark.parametrize("name", FAMILIES)
def test_the_expert_store_builder_accepts_the_fixture(name, written, tmp_path):
    manifest = build_store(written(name), tmp_path / "store")
    config = plan(name, tiny(name)).config
    assert all(layer.num_experts == config.num_experts for layer in manifest.layers)
    assert len(manifest.layers) == 2  # OLMoE: both layers; Switch: one encoder and one decoder layer


@pytest.mark.slow
@pytest.mark.parametrize("name", FAMILIES)
def test_the_fixture_generates_text(name, written):
    auto, _ = FAMILIES[name]
    path = written(name)
    model, tok = auto.from_pretrained(path, dtype="auto"), AutoTokenizer.from_pretrained(path)
    inputs = tok("a bit of text", return_tensors="pt")
    out = model.generate(**inputs, max_new_tokens=4, min_new_tokens=4, do_sample=False)
    assert isinstance(tok.decode(out[0]), str) and out.shape[1] >= 4


@pytest.mark.slow
@pytest.mark.parametrize("name", FAMILIES)
def test_the_tokenizer_decodes_every_id_and_agrees_with_the_config(name, written):
    path = written(name)
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    config = json.loads((path / "config.json").read_text())
    assert len(tok) == config["vocab_size"]
    assert all(isinstance(tok.decode([i]), str) for i in range(config["vocab_size"]))
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == \
        (config["pad_token_id"], config["bos_token_id"], config["eos_token_id"])
    assert tok.decode(tok("a bit of text").input_ids).strip() == "a bit of text"


@pytest.mark.slow
@pytest.mark.parametrize("name, pad, eos, size", [("olmoe-1b-7b", 1, 50279, 50304), ("switch-base-64", 0, 1, 32128)])
def test_full_size_tokenizers_cover_the_vocabulary_at_the_published_special_ids(name, pad, eos, size):
    config = plan(name).config
    assert (config.pad_token_id, config.eos_token_id, config.vocab_size) == (pad, eos, size)
    tok = tokenizer(name, config.vocab_size)
    assert (tok.pad_token_id, tok.eos_token_id, len(tok)) == (pad, eos, size)
    decoded = tok.batch_decode([[i] for i in range(size)])
    assert len(decoded) == size and decoded[-1] == f"<unused_{size - 1}>"


@pytest.mark.slow
def test_full_size_weights_are_the_papers():
    switch = {n: plan(f"switch-base-{n}").total_size for n in (16, 32, 64)}  # from the meta model: nothing written
    assert switch[64] == pytest.approx(14.2 * GiB, rel=0.02)
    assert switch[16] < switch[32] < switch[64]
    assert plan("olmoe-1b-7b").total_size == pytest.approx(13.8 * GB, rel=0.03)
    assert plan("olmoe-1b-7b").dtype == torch.bfloat16 and plan("switch-base-64").dtype == torch.float32


def test_shards_hold_at_most_max_shard_size():
    layout = plan("olmoe-1b-7b")
    assert layout.sharded and all(sum(t.nbytes for t in ts) <= 2 * GB for ts in layout.shards.values())


def test_weights_depend_on_the_tensor_name_and_seed_only(tmp_path):
    a = write_checkpoint("olmoe-1b-7b", tmp_path / "a", tiny("olmoe-1b-7b")).path
    b = write_checkpoint("olmoe-1b-7b", tmp_path / "b", tiny("olmoe-1b-7b"), max_shard_size="20KB").path
    c = write_checkpoint("olmoe-1b-7b", tmp_path / "c", tiny("olmoe-1b-7b"), seed=1).path
    with safe_open(a / "model.safetensors", "pt") as f:
        one = {k: f.get_tensor(k) for k in f.keys()}
    assert all(torch.equal(one[k], v) for k, v in file_tensors(b).items())
    with safe_open(c / "model.safetensors", "pt") as f:
        assert not torch.equal(f.get_tensor("model.embed_tokens.weight"), one["model.embed_tokens.weight"])
        assert torch.equal(f.get_tensor("model.norm.weight"), torch.ones_like(one["model.norm.weight"]))


def test_too_little_disk_space_is_refused_naming_the_bytes(tmp_path, monkeypatch):
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(paper_scale.shutil, "disk_usage", lambda path: usage(10**6, 10**6 - 1000, 1000))
    with pytest.raises(NotEnoughSpace, match=r"needs [\d,]+ bytes .* 1,000 bytes \(1000 B\) free"):
        write_checkpoint("switch-base-64", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_an_existing_directory_is_refused_unless_forced(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="exists and is not empty.*--force"):
        write_checkpoint("switch-base-16", out, tiny("switch-base-16"))
    assert (out / "keep.txt").read_text() == "mine"
    write_checkpoint("switch-base-16", out, tiny("switch-base-16"), force=True)
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # nothing left beside it


def test_an_interrupted_run_leaves_no_checkpoint_behind(tmp_path, monkeypatch):
    import safetensors.torch

    calls = []

    def failing(tensors, filename, metadata=None):
        calls.append(filename)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(tensors, filename, metadata)

    real = safetensors.torch.save_file
    monkeypatch.setattr(safetensors.torch, "save_file", failing)
    with pytest.raises(KeyboardInterrupt):
        write_checkpoint("olmoe-1b-7b", tmp_path / "out", tiny("olmoe-1b-7b"), max_shard_size="40KB")
    assert list(tmp_path.iterdir()) == []


def test_scale_overrides_are_checked():
    assert parse_scale("tiny,num_experts=4", "olmoe-1b-7b")["num_experts"] == 4
    with pytest.raises(ValueError, match="no field 'num_expert'"):
        plan("olmoe-1b-7b", {"num_expert": 4})
    with pytest.raises(ValueError, match="too small"):
        plan("olmoe-1b-7b", {**tiny("olmoe-1b-7b"), "vocab_size": 100})


@pytest.mark.slow
def test_command_line(tmp_path, capsys):
    assert main(["switch-base-32", str(tmp_path / "s"), "--scale", "tiny", "--max-shard-size", "100KB"]) == 0
    line = capsys.readouterr().out
    assert "parameters" in line and "float32" in line and str(tmp_path / "s") in line
    assert main(["switch-base-32", str(tmp_path / "s"), "--scale", "tiny"]) == 1
    assert "--force" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "random weights say nothing about accuracy" in help_text and "never commit" in help_text
