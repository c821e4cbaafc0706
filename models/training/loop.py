"""A small, resumable training loop shared by the bundled models' training scripts.

Batches are a pure function of the step number (``batch_for(step)`` seeds its own RNG), so a
run resumed from a checkpoint sees exactly the batches an uninterrupted run would have seen.
"""

from __future__ import annotations

import argparse
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from tqdm import tqdm


@dataclass(frozen=True, slots=True)
class TrainConfig:
    steps: int
    lr: float = 2e-3
    warmup: int = 100
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.05
    clip: float = 1.0
    seed: int = 0
    checkpoint_every: int = 100
    threads: int = 2


def learning_rate(config: TrainConfig, step: int) -> float:
    """Linear warm-up, then cosine decay to ``min_lr_ratio`` of the peak."""
    if step < config.warmup:
        return config.lr * (step + 1) / config.warmup
    progress = (step - config.warmup) / max(1, config.steps - config.warmup)
    return config.lr * (config.min_lr_ratio + (1 - config.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def train(model: torch.nn.Module, batch_for: Callable[[int], dict], config: TrainConfig, work_dir: Path,
          resume: bool = True, log: Callable[[str], None] = print,
          param_groups: list[dict] | None = None, on_checkpoint: Callable[[int], None] | None = None) -> list[float]:
    """Train ``model`` in place for ``config.steps`` steps; returns the loss of every step run.

    ``param_groups`` (default: one group of all parameters) may set ``lr_scale``, a multiplier of the
    scheduled learning rate, and their own ``weight_decay``. ``on_checkpoint(step)`` runs after each
    checkpoint is saved (a validation pass, say)."""
    torch.set_num_threads(config.threads)
    torch.manual_seed(config.seed)
    work_dir.mkdir(parents=True, exist_ok=True)
    state_path = work_dir / "state.pt"
    optimizer = torch.optim.AdamW(param_groups or model.parameters(), lr=config.lr,
                                  weight_decay=config.weight_decay, betas=(0.9, 0.95))
    start = 0
    if resume and state_path.exists():
        state = torch.load(state_path, weights_only=False)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["rng"])
        start = state["step"]
        log(f"resumed from {state_path} at step {start}")
    model.train()
    losses = []
    began = time.monotonic()
    with tqdm(range(start, config.steps), initial=start, total=config.steps, desc="training", unit="step") as bar:
        for step in bar:
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(config, step) * group.get("lr_scale", 1.0)
            loss = model(**batch_for(step)).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), config.clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
            bar.set_postfix(loss=f"{sum(losses[-20:]) / len(losses[-20:]):.3f}")
            if (step + 1) % config.checkpoint_every == 0 or step + 1 == config.steps:
                tmp = state_path.with_suffix(".tmp")
                torch.save(dict(model=model.state_dict(), optimizer=optimizer.state_dict(),
                                rng=torch.get_rng_state(), step=step + 1), tmp)
                tmp.replace(state_path)
                if on_checkpoint:
                    on_checkpoint(step + 1)
    model.eval()
    if losses:
        log(f"trained steps {start}..{config.steps} in {time.monotonic() - began:.0f} s, "
            f"final loss {sum(losses[-50:]) / len(losses[-50:]):.3f}")
    return losses


def arguments(description: str, steps: int, output: Path) -> argparse.ArgumentParser:
    """The command-line options every training script shares."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=steps)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--fresh", action="store_true", help="ignore an existing checkpoint")
    parser.add_argument("--output", type=Path, default=output)
    return parser


def save_checkpoint(model, tokenizer, output: Path, eos_id: int, pad_id: int) -> None:
    """Save in the Hugging Face layout (safetensors + tokenizer), ready for the Auto classes."""
    model.generation_config.eos_token_id = eos_id
    model.generation_config.pad_token_id = pad_id
    model.save_pretrained(output)
    tokenizer.save_pretrained(output)
    print(f"saved {output}")
