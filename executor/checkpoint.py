"""Load a Hugging Face MoE checkpoint directory with transformers' own loading code."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

from swapmoe.executor.adapters import ADAPTERS, UnsupportedModel, not_supported


class CheckpointError(ValueError):
    """The directory is not a loadable checkpoint."""


@dataclass
class Checkpoint:
    path: Path
    model: object
    tokenizer: object


def read_config(path: Path):
    """The checkpoint's config, if it is a layout the executor supports (else UnsupportedModel)."""
    if not (path / "config.json").is_file():
        raise CheckpointError(f"{path} is not a checkpoint directory (no config.json)")
    try:
        config = AutoConfig.from_pretrained(path, local_files_only=True)
    except (ValueError, KeyError) as error:
        raise UnsupportedModel(f"cannot read the model config in {path}: {error}") from error
    if config.model_type not in ADAPTERS:
        raise not_supported(", ".join(getattr(config, "architectures", None) or [config.model_type]), config.model_type)
    return config


def auto_class(config):
    return AutoModelForSeq2SeqLM if config.is_encoder_decoder else AutoModelForCausalLM


def load_checkpoint(path: str | Path, device: str = "cpu", experts_implementation: str | None = "eager") -> Checkpoint:
    """The whole model as transformers loads it. The eager experts forward (the default here)
    skips the index E that masked gating uses for "no resident expert", so masked routers can
    wrap this model; None: transformers' default (``grouped_mm`` for packed experts), which
    masks E only under expert parallelism."""
    path = Path(path)
    auto = auto_class(read_config(path))
    model = auto.from_pretrained(path, local_files_only=True, dtype="auto",
                                 experts_implementation=experts_implementation).to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    return Checkpoint(path, model, tokenizer)
