"""A damaged expert store is detected, named and repaired, never served (issue 12, finding 6)."""

from __future__ import annotations

import json
import shutil
import struct

import pytest
import torch
from safetensors.torch import load_file, save_file

from swapmoe.core.errors import Corrupted
from swapmoe.core.plan import Strategy
from swapmoe.executor.engine import Engine, EngineConfig
from swapmoe.executor.store import DAMAGED, ExpertStore, Manifest, check_store, verify_store
from swapmoe.executor.store_build import build_store, ensure_store
from swapmoe.executor.virtual_experts import VirtualExperts
from swapmoe.models.tiny import sample_logits


@pytest.fixture
def store(checkpoint_dirs, tmp_path):
    """A fresh store of the tiny Mixtral under its own root: (checkpoint, root, store directory)."""
    checkpoint = checkpoint_dirs("mixtral")
    root = tmp_path / "stores"
    return checkpoint, root, ensure_store(checkpoint, root, log=lambda _: None)


def overwrite(path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def expert_offset(directory, layer: int, expert: int) -> int:
    return Manifest.load(directory).layers[layer].expert_offset(expert)


@pytest.mark.parametrize("damage", ["flipped bytes", "NaN"])
def test_a_damaged_expert_fails_its_load_by_name_and_the_next_start_repairs_it(store, damage):
    checkpoint, root, directory = store
    offset = expert_offset(directory, 1, 3) + 100
    overwrite(directory / "experts.bin", offset, b"\xff\x00\x13" if damage == "flipped bytes" else
              struct.pack("<4f", *[float("nan")] * 4))
    reader = ExpertStore(directory)
    with pytest.raises(Corrupted, match=r"experts.bin: expert 3 of layer 1 \(model.layers.1.mlp.*\) fails its checksum"):
        reader.read_into(1, 3, reader.buffer(1))
    reader.read_into(1, 2, reader.buffer(1))  # its neighbours still read
    reader.close()
    with pytest.raises(Corrupted, match="marked damaged"):
        check_store(directory)
    assert ensure_store(checkpoint, root, log=lambda _: None) == directory
    verify_store(directory)
    assert not (directory / DAMAGED).exists()


def test_an_executor_never_serves_a_damaged_expert_and_a_restart_serves_the_repaired_store(store):
    checkpoint, root, directory = store
    with Engine(EngineConfig(checkpoint, budget_bytes=1 << 30, store_root=root)) as healthy:
        want = healthy.model(torch.tensor([[1, 2, 3, 4]])).logits
    overwrite(directory / "experts.bin", expert_offset(directory, 0, 5), b"\x7f" * 64)
    with pytest.raises(Corrupted, match="expert 5 of layer 0"):
        Engine(EngineConfig(checkpoint, budget_bytes=1 << 30, store_root=root))
    with Engine(EngineConfig(checkpoint, budget_bytes=1 << 30, store_root=root)) as repaired:
        torch.testing.assert_close(repaired.model(torch.tensor([[1, 2, 3, 4]])).logits, want, rtol=0, atol=0)


def test_a_shifted_manifest_offset_is_named_and_repaired(store):
    checkpoint, root, directory = store
    raw = json.loads((directory / "manifest.json").read_text())
    raw["layers"][1]["offset"] += 4096
    (directory / "manifest.json").write_text(json.dumps(raw))
    with pytest.raises(Corrupted, match=r"manifest.json: layers\[1\] .*offset"):
        Manifest.load(directory)
    ensure_store(checkpoint, root, log=lambda _: None)
    assert Manifest.load(directory).layers[1].offset == raw["layers"][1]["offset"] - 4096


def test_a_flipped_byte_in_the_dense_weights_is_named_and_repaired(store):
    checkpoint, root, directory = store
    dense = directory / "dense.safetensors"
    overwrite(dense, dense.stat().st_size - 10, b"\x01")
    with pytest.raises(Corrupted, match="dense.safetensors: fails its checksum"):
        check_store(directory)
    ensure_store(checkpoint, root, log=lambda _: None)
    check_store(directory)


def test_a_missing_manifest_is_rebuilt_and_the_rebuilt_store_is_the_one_used(store):
    checkpoint, root, directory = store
    (directory / "manifest.json").unlink()
    messages = []
    assert ensure_store(checkpoint, root, log=messages.append) == directory
    assert "damaged" in messages[0]
    check_store(directory)
    assert not list(root.glob(".*")), "no private or damaged copies are left behind"


def test_a_checkpoint_with_a_nan_weight_is_refused_naming_the_tensor(checkpoint_dirs, tmp_path):
    source = checkpoint_dirs("mixtral")
    bad = tmp_path / "bad"
    shutil.copytree(source, bad)
    weights = load_file(bad / "model.safetensors")
    name = next(k for k in weights if "experts" in k)
    weights[name][0, 0] = float("nan")
    save_file(weights, bad / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=f"{name}.*NaN or infinite"):
        build_store(bad, tmp_path / "store")


def test_a_store_of_an_older_format_is_rebuilt_not_crashed_on(store):
    checkpoint, root, directory = store
    raw = json.loads((directory / "manifest.json").read_text())
    raw["format"] = 2  # before checksums: no "checksums", no "dense_checksum"
    del raw["dense_checksum"]
    for layer in raw["layers"]:
        del layer["checksums"]
    (directory / "manifest.json").write_text(json.dumps(raw))
    messages = []
    assert ensure_store(checkpoint, root, log=messages.append) == directory
    assert "format 2 is not" in messages[0]
    assert Manifest.load(directory).layers[0].checksums


@pytest.mark.parametrize("edit, named", [
    (lambda raw: raw["layers"][0].pop("parts"), r"unreadable manifest \(KeyError: 'parts'\)"),
    (lambda raw: raw["layers"][0]["parts"][0]["shape"].append(2), r"layers\[0\] .*part .* of shape"),
    (lambda raw: raw["layers"][1]["checksums"].pop(), r"layers\[1\] .*7 checksums for 8 experts"),
    (lambda raw: raw.update(dtype="os"), "dtype 'os' is not a torch dtype"),
])
def test_a_manifest_that_disagrees_with_itself_is_named(store, edit, named):
    _, _, directory = store
    raw = json.loads((directory / "manifest.json").read_text())
    edit(raw)
    (directory / "manifest.json").write_text(json.dumps(raw))
    with pytest.raises(Corrupted, match=f"manifest.json: .*{named}"):
        Manifest.load(directory)


@pytest.mark.parametrize("text", ["[]", '{"format": 3, "layers": [', ""])
def test_a_manifest_that_is_not_a_json_object_is_named(store, text):
    _, _, directory = store
    (directory / "manifest.json").write_text(text)
    with pytest.raises(Corrupted, match="manifest.json: unreadable manifest"):
        Manifest.load(directory)


def test_a_damaged_expert_found_while_serving_is_never_routed_to_and_its_slot_goes_to_another(store):
    checkpoint, root, directory = store
    runtime = VirtualExperts(checkpoint, store_root=root, log=lambda _: None)
    try:
        runtime.resize([4] * runtime.layout.num_layers)
        layer = runtime.layers[0]
        damaged = next(e for e in range(8) if e not in layer.pool.ready)
        overwrite(directory / "experts.bin", expert_offset(directory, 0, damaged), b"\x7f" * 64)
        layer.scores[damaged] = 1e9  # the most important expert: the next update loads it
        for _ in range(3):  # a damaged expert is not retried: later updates refill its slot
            runtime.update(max_loads=1, layers=[0])
            assert runtime.loader.wait_idle(5)
            runtime.poll()
        assert runtime.stats.failed_loads == 1 and layer.pool.damaged == {damaged}
        assert damaged not in layer.pool.ready and not layer.router.resident[damaged]
        assert len(layer.pool.ready) == 4
        sample_logits(runtime.model, "mixtral")  # serving goes on
        assert (directory / DAMAGED).exists()  # and the next start rebuilds the store
    finally:
        runtime.close()


def test_on_demand_a_damaged_expert_fails_the_pass_by_name_and_leaves_the_runtime_serving(store):
    checkpoint, root, directory = store
    runtime = VirtualExperts(checkpoint, store_root=root, log=lambda _: None)
    try:
        runtime.resize([1] * runtime.layout.num_layers)
        runtime.set_strategy(Strategy.ON_DEMAND)
        for expert in range(8):
            if expert not in runtime.layers[1].pool.ready:
                overwrite(directory / "experts.bin", expert_offset(directory, 1, expert) + 8, b"\x00\x01")
        with pytest.raises(Corrupted, match=r"expert \d of layer 1"):
            sample_logits(runtime.model, "mixtral")
        assert all(len(l.pool.ready) + len(l.pool.free) == l.pool.capacity for l in runtime.layers)
        runtime.set_strategy(Strategy.MASKED_GATING)  # an inexact strategy serves without the damaged experts
        sample_logits(runtime.model, "mixtral")
    finally:
        runtime.close()


def test_a_reader_of_a_store_repaired_meanwhile_does_not_mark_the_repaired_store(store):
    checkpoint, root, directory = store
    reader = ExpertStore(directory)
    overwrite(directory / "experts.bin", expert_offset(directory, 0, 2), b"\x7f" * 64)
    (directory / DAMAGED).write_text("found by another reader\n")
    ensure_store(checkpoint, root, log=lambda _: None)  # rebuilt: new files in the same place
    with pytest.raises(Corrupted, match="expert 2 of layer 0"):
        reader.read_into(0, 2, reader.buffer(0))  # the old file, still open
    reader.close()
    check_store(directory)
