"""Can the bundled Switch configuration learn to read its source? A synthetic probe of the
training recipe, with the relative position biases' learning-rate multiplier as the variable.

    python -m benchmarks.source_probe       # about 5 min; writes benchmarks/results/RESULTS-source-probe.md

The task: the source is 20 random tokens with a marker somewhere in the first 16; the target is
the 3 tokens after the marker, then EOS. Only a model that finds the marker in its source and
reads past it gets well below the floor where it has learned nothing but the EOS
(3/4 of ln(number of token values)). The model, parameter groups and training loop are those of
``swapmoe.models.training.train_switch``; only the data differ.
"""

from __future__ import annotations

import argparse
import math
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from transformers import SwitchTransformersForConditionalGeneration

from swapmoe.models.tokenizer import EOS_ID
from swapmoe.models.training.loop import TrainConfig, train
from swapmoe.models.training.train_switch import BATCH, LR, model_config, parameter_groups

HERE = Path(__file__).resolve().parent
REPORT = HERE / "results" / "RESULTS-source-probe.md"
VOCAB = 4096
MARKER = 5
FIRST_TOKEN = 10  # values below are special tokens and the marker
SOURCE_LEN, READ = 20, 3


def marker_batches(seed: int):
    """``batch_for(step)`` for ``swapmoe.models.training.loop.train``: a pure function of the step."""
    def batch_for(step: int) -> dict:
        rng = np.random.default_rng([seed, step])
        source = torch.from_numpy(rng.integers(FIRST_TOKEN, VOCAB, (BATCH, SOURCE_LEN)))
        at = rng.integers(0, SOURCE_LEN - READ, BATCH)
        source[torch.arange(BATCH), torch.from_numpy(at)] = MARKER
        target = torch.stack([source[i, a + 1:a + 1 + READ] for i, a in enumerate(at)])
        eos = torch.full((BATCH, 1), EOS_ID)
        source, target = torch.cat([source, eos], 1), torch.cat([target, eos], 1)
        return dict(input_ids=source, attention_mask=torch.ones_like(source), labels=target,
                    output_router_logits=True)

    return batch_for


def probe(bias_lr_scale: float, steps: int, threads: int, seed: int = 0) -> list[tuple[int, float]]:
    """(step, mean training loss of the last 50 steps) every 125 steps, trained by the training
    scripts' own loop."""
    torch.manual_seed(seed)
    model = SwitchTransformersForConditionalGeneration(model_config(VOCAB))
    config = TrainConfig(steps=steps, lr=LR, seed=seed, threads=threads, checkpoint_every=steps)
    with tempfile.TemporaryDirectory() as work_dir:
        losses = train(model, marker_batches(seed), config, Path(work_dir), resume=False, log=lambda _: None,
                       param_groups=parameter_groups(model, bias_lr_scale))
    return [(step, float(np.mean(losses[step - 50:step]))) for step in range(125, steps + 1, 125)]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--scales", type=lambda s: [float(x) for x in s.split(",")], default=[1.0, 100.0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--report", type=Path, default=REPORT)
    args = parser.parse_args(argv)
    floor = READ / (READ + 1) * math.log(VOCAB - FIRST_TOKEN)
    threads = args.threads
    started = time.monotonic()
    curves = {scale: probe(scale, args.steps, args.threads) for scale in args.scales}
    steps = [s for s, _ in curves[args.scales[0]]]
    header = "| relative-bias lr multiplier | " + " | ".join(f"step {s}" for s in steps) + " |"
    rows = [header, "|---" * (len(steps) + 1) + "|"]
    rows += [f"| x{scale:g} | " + " | ".join(f"{loss:.2f}" for _, loss in curve) + " |" for scale, curve in curves.items()]
    report = "\n".join([
        "# Source probe: does the Switch recipe learn to read its input?", "",
        f"`python -m benchmarks.source_probe` on {platform.machine()}, {threads} thread{'s' * (threads != 1)}, "
        f"torch {torch.__version__}; {time.monotonic() - started:.0f} s.", "",
        f"Synthetic task: copy the {READ} tokens after a marker in {SOURCE_LEN} random tokens "
        f"({VOCAB - FIRST_TOKEN} values). Training loss (mean of the last 50 steps); a model that "
        f"ignores its source stays at about {floor:.2f} (it learns only the EOS).", "",
        *rows, "",
        "Same model configuration, parameter groups, seed and training loop (AdamW, peak lr "
        f"{LR:g}, warm-up and cosine decay) as `swapmoe.models.training.train_switch`; only the data and the "
        "learning-rate multiplier of the relative position biases differ.", "",
    ])
    print(report)
    args.report.write_text(report)
    print(f"wrote {args.report}")


if __name__ == "__main__":
    main()
