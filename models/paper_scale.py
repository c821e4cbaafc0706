"""Shape-exact random checkpoints of the paper's models, written on demand.

The paper measures SwapMoE on Switch Transformers (switch-base-16/32/64) and on a model of
OLMoE-1B-7B's size. Memory, time and I/O at those sizes depend on tensor shapes, dtypes and
the on-disk layout only, so a checkpoint with random weights and the published shapes
measures them exactly while saying nothing about accuracy. No model hub is reachable here,
and the checkpoints are 4 to 15 GB: they are written on demand, outside the repository
(default ``~/.cache/swapmoe/checkpoints/NAME``), and never committed.

How, and why so:

- Shapes come from transformers' own config and model classes, instantiated on the meta
  device (no memory). The disk names and the shard plan are what ``save_pretrained`` computes
  from that model: tied weights left out, transformers 5's fused experts reverted to the
  per-expert layout (``revert_weight_conversion``), then ``huggingface_hub``'s shard split. So
  every name matches what ``from_pretrained`` and the expert-store builder expect.
- Tensors are generated a shard at a time, each from a generator seeded by its name (the same
  bytes for any shard size), normal with about the std of the model's ``_init_weights``, norms
  one. Peak memory is one shard (``max_shard_size``, 2 GB by default).
- The tokenizer is the bundled one of the same family (``models/swapmoe-lm`` for OLMoE,
  ``models/swapmoe-switch`` for Switch): real text encodes to real ids. Its vocabulary is padded
  with ``<unused_N>`` tokens up to the model's vocab size (or cut to it), so every id the model
  can produce decodes. Its special tokens are moved to the published model's ids where they
  fit (Switch: pad 0, eos 1; OLMoE: pad 1, eos 50279), and the config's pad/bos/eos ids are the
  tokenizer's, so generation stops on the token the tokenizer calls EOS.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import secrets
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from swapmoe.core.files import fsync_path
from swapmoe.core.sizes import format_size, parse_size
from swapmoe.models.bundled import LM_DIR, SWITCH_DIR
from swapmoe.models.padded_tokenizer import padded_tokenizer, token_list

HEADROOM = 64 << 20  # disk needed beyond the weights: tokenizer, configs, safetensors headers


def default_out(name: str, scaled: bool = False) -> Path:
    return Path.home() / ".cache" / "swapmoe" / "checkpoints" / (name + ("-scaled" if scaled else ""))


def _olmoe_std(config, name: str) -> float | None:
    """OLMoE's ``_init_weights``: every matrix normal(0, initializer_range), RMSNorm weights one."""
    if name.endswith("norm.weight"):
        return None
    if name.endswith(("proj.weight", "gate.weight", "embed_tokens.weight", "lm_head.weight")):
        return config.initializer_range
    raise KeyError(f"no initialisation rule for OLMoE tensor {name!r}")


def _switch_std(config, name: str) -> float | None:
    """Switch Transformers' ``_init_weights`` (T5's Mesh-TensorFlow scaling), layer norms one."""
    d, f = config.d_model, config.initializer_factor
    rules = ((r"layer_norm\.weight$", None), (r"^(shared|lm_head)\.weight$", 1.0),
             (r"router\.classifier\.weight$", 1.0), (r"experts\.expert_\d+\.w[io]\.weight$", d ** -0.5),
             (r"mlp\.wi\.weight$", d ** -0.5), (r"mlp\.wo\.weight$", config.d_ff ** -0.5),
             (r"\.q\.weight$", (d * config.d_kv) ** -0.5), (r"\.[kv]\.weight$", d ** -0.5),
             (r"\.o\.weight$", (config.num_heads * config.d_kv) ** -0.5),
             (r"relative_attention_bias\.weight$", d ** -0.5))
    for pattern, std in rules:
        if re.search(pattern, name):
            return None if std is None else f * std
    raise KeyError(f"no initialisation rule for Switch Transformers tensor {name!r}")


@dataclass(frozen=True)
class Spec:
    """One published model: its config class and fields, and what the checkpoint adds to them."""

    name: str
    config_class: str  # a transformers config class
    fields: dict
    tokenizer: Path  # bundled tokenizer of the same family
    specials: dict  # token -> the published model's id for it
    init_std: Callable  # (config, disk name) -> std, None for ones
    tiny: dict  # the ``--scale tiny`` overrides: same code, a few hundred KB
    model_max_length: int = 512


def _switch(experts: int) -> Spec:
    fields = dict(d_model=768, d_ff=3072, d_kv=64, num_heads=12, num_layers=12, num_decoder_layers=12,
                  num_sparse_encoder_layers=6, num_sparse_decoder_layers=6, num_experts=experts,
                  expert_capacity=64, vocab_size=32128, relative_attention_num_buckets=32,
                  relative_attention_max_distance=128, dense_act_fn="relu", tie_word_embeddings=True,
                  dtype="float32")
    tiny = dict(d_model=32, d_ff=64, d_kv=8, num_heads=4, num_layers=2, num_decoder_layers=2,
                num_sparse_encoder_layers=1, num_sparse_decoder_layers=1, num_experts=experts // 8,
                vocab_size=512)
    return Spec(f"switch-base-{experts}", "SwitchTransformersConfig", fields, SWITCH_DIR,
                {"<pad>": 0, "</s>": 1}, _switch_std, tiny)


SPECS: dict[str, Spec] = {s.name: s for s in (
    _switch(16), _switch(32), _switch(64),
    Spec("olmoe-1b-7b", "OlmoeConfig",
         dict(hidden_size=2048, intermediate_size=1024, num_hidden_layers=16, num_attention_heads=16,
              num_key_value_heads=16, num_experts=64, num_experts_per_tok=8, vocab_size=50304,
              max_position_embeddings=4096, rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
              clip_qkv=None, norm_topk_prob=False, rms_norm_eps=1e-5, initializer_range=0.02,
              tie_word_embeddings=False, dtype="bfloat16"),
         LM_DIR, {"<pad>": 1, "</s>": 50279}, _olmoe_std,
         dict(hidden_size=32, intermediate_size=16, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=4, num_experts=8, num_experts_per_tok=2, vocab_size=512,
              max_position_embeddings=128),
         model_max_length=4096),
)}


def _spec(name: str) -> Spec:
    if name not in SPECS:
        raise ValueError(f"unknown model {name!r}; known: {', '.join(SPECS)}")
    return SPECS[name]


def parse_scale(text: str, name: str) -> dict:
    """``tiny`` and/or ``key=value`` pairs, comma-separated (values as JSON, else strings)."""
    overrides: dict = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        if item == "tiny":
            overrides.update(_spec(name).tiny)
            continue
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"malformed --scale item {item!r}: expected 'tiny' or key=value")
        try:
            overrides[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            overrides[key.strip()] = value.strip()
    return overrides


def tokenizer(name: str, vocab_size: int):
    """The checkpoint's tokenizer (see ``models.padded_tokenizer``)."""
    spec = _spec(name)
    return padded_tokenizer(spec.tokenizer, vocab_size, spec.specials, spec.model_max_length)


# --- the plan: config, disk names, shards ----------------------------------------------------

def make_config(name: str, scale: dict | None = None):
    """The published config (``scale`` overrides applied), with the tokenizer's special ids."""
    import transformers

    spec = _spec(name)
    config_class = getattr(transformers, spec.config_class)
    known = config_class()
    unknown = [key for key in scale or {} if not hasattr(known, key)]
    if unknown:
        raise ValueError(f"{spec.config_class} has no field {', '.join(map(repr, unknown))}")
    fields = {**spec.fields, **(scale or {})}
    tokens = token_list(spec.tokenizer, fields["vocab_size"], spec.specials)
    ids = dict(pad_token_id=tokens.index("<pad>"), bos_token_id=tokens.index("<s>"),
               eos_token_id=tokens.index("</s>"))
    if known.is_encoder_decoder:
        ids["decoder_start_token_id"] = ids["pad_token_id"]  # T5's convention
    return config_class(**{**fields, **ids})


@dataclass(frozen=True)
class TensorPlan:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return self.dtype.itemsize * int(torch.Size(self.shape).numel())


@dataclass
class Plan:
    """What ``save_pretrained`` would write for this model: files, tensors, index metadata."""

    name: str
    config: object
    meta_model: object
    shards: dict[str, list[TensorPlan]]
    total_size: int
    total_parameters: int
    dtype: torch.dtype

    @property
    def sharded(self) -> bool:
        return len(self.shards) > 1


def plan(name: str, scale: dict | None = None, max_shard_size: int | str = "2GB") -> Plan:
    """The checkpoint's layout, computed on a meta-device model the way ``save_pretrained`` does."""
    from huggingface_hub.serialization import split_state_dict_into_shards_factory
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM
    from transformers.core_model_loading import revert_weight_conversion
    from transformers.modeling_utils import remove_tied_weights_from_state_dict

    config = make_config(name, scale)
    dtype = getattr(torch, config.dtype) if isinstance(config.dtype, str) else config.dtype
    auto = AutoModelForSeq2SeqLM if config.is_encoder_decoder else AutoModelForCausalLM
    with torch.device("meta"):
        model = auto.from_config(config, dtype=dtype)
    state = remove_tied_weights_from_state_dict(model.state_dict(), model)
    state = revert_weight_conversion(model, state)  # per-expert disk layout: views of the fused tensors

    def base(t):  # save_pretrained sizes and groups views by their storage: the fused tensor
        return t._base if t._base is not None else t

    split = split_state_dict_into_shards_factory(
        state, get_storage_size=lambda t: base(t).nbytes, get_storage_id=lambda t: id(base(t)),
        filename_pattern="model{suffix}.safetensors", max_shard_size=max_shard_size)
    shards = {file: [TensorPlan(k, tuple(state[k].shape), state[k].dtype) for k in keys]
              for file, keys in split.filename_to_tensors.items()}
    return Plan(name, model.config, model, shards, split.metadata["total_size"], model.num_parameters(), dtype)


# --- writing ---------------------------------------------------------------------------------

def _seed(name: str, seed: int) -> int:
    return int.from_bytes(hashlib.blake2b(f"{seed}:{name}".encode(), digest_size=8).digest(), "little") >> 1


def random_tensor(plan_: Plan, tensor: TensorPlan, seed: int = 0) -> torch.Tensor:
    """The tensor ``tensor.name`` of the checkpoint: a function of its name and ``seed`` only."""
    std = _spec(plan_.name).init_std(plan_.config, tensor.name)
    if std is None:
        return torch.ones(tensor.shape, dtype=tensor.dtype)
    generator = torch.Generator().manual_seed(_seed(tensor.name, seed))
    return torch.empty(tensor.shape, dtype=tensor.dtype).normal_(0.0, std, generator=generator)


class NotEnoughSpace(OSError):
    """The disk cannot hold the checkpoint."""


@dataclass(frozen=True)
class Summary:
    name: str
    path: Path
    parameters: int
    nbytes: int
    dtype: str
    shards: int
    seconds: float

    def __str__(self) -> str:
        return (f"{self.name}: {self.parameters:,} parameters, {self.nbytes:,} bytes ({format_size(self.nbytes)}, "
                f"{self.nbytes / 1e9:.2f} GB) {self.dtype} in {self.shards} shard(s), {self.seconds:.1f} s -> {self.path}")


def _check_target(out: Path, needed: int, force: bool) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not force:
        raise FileExistsError(f"{out} exists and is not empty; pass --force (force=True) to replace it")
    probe = out.parent
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if free < needed:
        raise NotEnoughSpace(f"not enough disk space for {out}: needs {needed:,} bytes ({format_size(needed)}), "
                             f"{free:,} bytes ({format_size(free)}) free on {probe}")


def write_checkpoint(name: str, out: str | Path, scale: dict | None = None, *, force: bool = False,
                     max_shard_size: int | str = "2GB", seed: int = 0) -> Summary:
    """Write the checkpoint directory ``out``: built beside it, renamed into place when complete."""
    from safetensors.torch import save_file
    from tqdm import tqdm

    start, out = time.monotonic(), Path(out).expanduser().absolute()
    layout = plan(name, scale, max_shard_size)
    _check_target(out, layout.total_size + HEADROOM, force)
    out.parent.mkdir(parents=True, exist_ok=True)
    work = out.parent / f".{out.name}.partial-{os.getpid()}-{secrets.token_hex(4)}"
    work.mkdir()  # (not mkdtemp: the directory gets the umask's permissions, as save_pretrained's)
    try:
        layout.config.architectures = [type(layout.meta_model).__name__]
        layout.config.save_pretrained(work)
        layout.meta_model.generation_config.save_pretrained(work)
        tokenizer(name, layout.config.vocab_size).save_pretrained(work)
        progress = tqdm(total=layout.total_size, unit="B", unit_scale=True, unit_divisor=1024,
                        desc=f"writing {name}", disable=None)  # disabled when stderr is not a terminal
        with progress:
            for file, tensors in layout.shards.items():
                shard = {}
                for tensor in tensors:
                    shard[tensor.name] = random_tensor(layout, tensor, seed)
                    progress.update(tensor.nbytes)
                save_file(shard, work / file, metadata={"format": "pt"})
                del shard
                fsync_path(work / file)
        if layout.sharded:
            index = {"metadata": {"total_parameters": layout.total_parameters, "total_size": layout.total_size},
                     "weight_map": {t.name: file for file, ts in layout.shards.items() for t in ts}}
            (work / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        _replace_dir(work, out)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return Summary(name, out, layout.total_parameters, layout.total_size, str(layout.dtype).removeprefix("torch."),
                   len(layout.shards), time.monotonic() - start)


def _replace_dir(work: Path, out: Path) -> None:
    """``out`` becomes ``work``; an old ``out`` is moved aside first and removed after."""
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        out.rename(old)
    work.rename(out)
    if old is not None and old.is_dir():
        shutil.rmtree(old)
    elif old is not None:
        old.unlink()


# --- command line ----------------------------------------------------------------------------

DESCRIPTION = """\
Write a Hugging Face checkpoint with random weights and the exact shapes, dtype and on-disk
layout of one of the paper's models. It is for measuring memory, time and I/O at the paper's
sizes (loading, building the expert store, swapping experts, serving); random weights say
nothing about accuracy. The checkpoints are large (switch-base-64 about 14.1 GiB, olmoe-1b-7b
about 13.8 GB): write them outside the repository (the default) and never commit them."""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m swapmoe.models.paper_scale", description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("name", nargs="?", choices=list(SPECS), metavar="NAME",
                        help=f"the model: {', '.join(SPECS)}")
    parser.add_argument("out", nargs="?", type=Path, metavar="OUT_DIR",
                        help="where to write it (default: ~/.cache/swapmoe/checkpoints/NAME[-scaled])")
    parser.add_argument("--scale", default=None, metavar="OVERRIDES",
                        help="shrink it for tests: 'tiny' (a few hundred KB, same code) and/or comma-separated "
                             "config overrides, e.g. 'tiny,num_experts=4' or 'num_layers=2,d_model=64'")
    parser.add_argument("--force", action="store_true", help="replace OUT_DIR if it exists and is not empty")
    parser.add_argument("--max-shard-size", default="2GB", help="largest shard, as save_pretrained's (default 2GB)")
    parser.add_argument("--seed", type=int, default=0, help="another seed, other weights (default 0)")
    parser.add_argument("--list", action="store_true", help="print every model's parameters and bytes; write nothing")
    args = parser.parse_args(argv)
    if args.list:
        for name in SPECS:
            layout = plan(name)
            print(f"{name}: {layout.total_parameters:,} parameters, {layout.total_size:,} bytes "
                  f"({format_size(layout.total_size)}, {layout.total_size / 1e9:.2f} GB), {len(layout.shards)} shards")
        return 0
    if args.name is None:
        parser.error("NAME is required (or --list)")
    try:
        scale = parse_scale(args.scale, args.name) if args.scale else None
        out = args.out or default_out(args.name, scaled=bool(scale))
        print(write_checkpoint(args.name, out, scale, force=args.force,
                               max_shard_size=parse_size(args.max_shard_size), seed=args.seed))
    except (ValueError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
