"""Train the bundled Switch Transformers summarizer: a Python function's code -> the first
line of its docstring (held-out functions come from held-out modules).

    python -m swapmoe.models.training.train_switch            # about 45 min on 2 CPU cores; resumes if interrupted
    python -m swapmoe.models.training.train_switch --fresh    # start over

Writes ``models/swapmoe-switch`` (safetensors, HF layout, the LM's tokenizer). Every 500 steps it
logs the validation loss with each function's own code and with another function's code (the gap
is what the model reads from its input) and the validation Rouge-2.
"""

from __future__ import annotations

import hashlib
from typing import Callable

import numpy as np
import torch
from transformers import AutoTokenizer, SwitchTransformersConfig, SwitchTransformersForConditionalGeneration

from swapmoe.models.bundled import LM_DIR, SWITCH_DIR
from swapmoe.models.corpus import (CACHE, code_as_words, code_normalizer, extra_summary_pairs, name_baseline,
                                   summary_pairs)
from swapmoe.models.summarization import MAX_SOURCE, encode_pairs, pad, rouge2, source_losses, summarize
from swapmoe.models.tokenizer import EOS_ID, PAD_ID
from swapmoe.models.training.loop import TrainConfig, arguments, save_checkpoint, train

OUTPUT = SWITCH_DIR
WORK = CACHE.parent / "train" / "switch"
BATCH = 24
STEPS = 4000
LR = 1e-3
RELATIVE_BIAS_LR_SCALE = 100.0
NAME_SHARE = 0.2
NAME_WARMUP = 600
VALIDATION_PAIRS = 160


def model_config(vocab_size: int) -> SwitchTransformersConfig:
    """4+4 layers, every other one sparse with 16 top-1 experts (the paper's model family)."""
    return SwitchTransformersConfig(
        vocab_size=vocab_size, d_model=128, d_kv=32, d_ff=256, num_heads=4,
        num_layers=4, num_decoder_layers=4, num_sparse_encoder_layers=2, num_sparse_decoder_layers=2,
        num_experts=16, expert_capacity=MAX_SOURCE,  # capacity = longest input: no token is dropped
        router_aux_loss_coef=0.01, router_z_loss_coef=0.001, router_jitter_noise=0.0,
        dropout_rate=0.0, pad_token_id=PAD_ID, eos_token_id=EOS_ID, decoder_start_token_id=PAD_ID,
        tie_word_embeddings=True,
    )


def parameter_groups(model: torch.nn.Module, bias_lr_scale: float = RELATIVE_BIAS_LR_SCALE) -> list[dict]:
    """The relative position biases learn ``bias_lr_scale`` times faster, without weight decay.

    T5-family attention knows where a token is only through these biases: scalars added straight to
    the attention logits. Under AdamW a parameter moves about one learning rate per step, so the few
    logit units that a positional pattern needs ("look at the token after ``def``") take thousands
    of steps at the rate the matrices want, and until then the decoder cannot find anything in its
    source: it learns the summaries' language and ignores the code. ``benchmarks/source_probe.py``
    measures this on a synthetic copy task."""
    biases = [p for n, p in model.named_parameters() if "relative_attention_bias" in n]
    rest = [p for n, p in model.named_parameters() if "relative_attention_bias" not in n]
    return [dict(params=rest), dict(params=biases, lr_scale=bias_lr_scale, weight_decay=0.0)]


def name_targets(tokenizer, pairs) -> list[list[int]]:
    """The auxiliary task's targets: each function's name as words (``getFileName`` -> ``get file name``)."""
    return [tokenizer(code_as_words(name_baseline(p.name)), add_special_tokens=False)["input_ids"] + [EOS_ID]
            for p in pairs]


def batch_maker(sources, targets, names, seed: int, name_share: float = NAME_SHARE, name_warmup: int = NAME_WARMUP):
    """Batches of ``BATCH`` random functions. A ``name_share`` of them (all of them for the first
    ``name_warmup`` steps) ask for the function's name instead of its summary: a task the decoder
    can only do by finding the name in its source, which is the skill a summary needs first (most
    summaries reuse the function's words), with a far stronger signal than the summaries give."""
    def batch_for(step: int) -> dict:
        rng = np.random.default_rng([seed, step])
        share = 1.0 if step < name_warmup else name_share
        rows = [(sources[i], names[i]) if rng.random() < share else (sources[i], targets[i])
                for i in rng.integers(0, len(sources), BATCH)]
        input_ids = pad([source for source, _ in rows], PAD_ID)
        return dict(input_ids=input_ids, attention_mask=(input_ids != PAD_ID).long(),
                    labels=pad([target for _, target in rows], -100),
                    output_router_logits=True)  # adds the load-balancing and z losses; without them routing collapses

    return batch_for


def split_validation(pairs: list, percent: int = 5) -> tuple[list, list]:
    """(train, validation): the functions of a hashed ``percent`` of the training modules are kept
    out of training to watch generalization (the held-out test modules are never looked at)."""
    def validation(pair) -> bool:
        module = pair.source.rsplit(":", 1)[0]
        return int.from_bytes(hashlib.sha256(f"validation:{module}".encode()).digest()[:4], "big") % 100 < percent
    return [p for p in pairs if not validation(p)], [p for p in pairs if validation(p)]


def validator(model, tokenizer, pairs: list, every: int, log: Callable[[str], None] = print) -> Callable[[int], None]:
    """Logs the validation loss with each function's own source and with another's (the gap is
    what the model takes from its input) and greedy Rouge-2."""
    bodies, summaries = [p.body for p in pairs], [p.summary for p in pairs]

    def validate(step: int) -> None:
        if step % every:
            return
        model.eval()
        own, other = source_losses(model, tokenizer, bodies, summaries)
        score = rouge2(summarize(model, tokenizer, bodies), summaries)
        model.train()
        log(f"step {step}: validation loss {own:.3f} (another function's source {other:.3f}), Rouge-2 {score:.4f}")

    return validate


def main(argv=None) -> None:
    parser = arguments(__doc__, steps=STEPS, output=OUTPUT)
    parser.add_argument("--lr", type=float, default=LR, help="peak learning rate")
    parser.add_argument("--bias-lr-scale", type=float, default=RELATIVE_BIAS_LR_SCALE,
                        help="learning-rate multiplier of the relative position biases")
    parser.add_argument("--name-share", type=float, default=NAME_SHARE,
                        help="share of the examples that ask for the function's name instead of its summary")
    parser.add_argument("--name-warmup", type=int, default=NAME_WARMUP,
                        help="steps at the start in which every example asks for the name")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    tokenizer = AutoTokenizer.from_pretrained(LM_DIR, local_files_only=True)  # one tokenizer for both models
    cpython, held_out = summary_pairs()
    cpython, validation = split_validation(cpython)
    extra = extra_summary_pairs(held_out)
    print(f"{len(cpython)} training pairs from CPython and {len(extra)} from other Python packages; "
          f"{len(validation)} for validation, {len(held_out)} held out")
    sources, targets = encode_pairs(tokenizer, cpython + extra)
    names = name_targets(tokenizer, cpython + extra)
    torch.manual_seed(args.seed)
    model = SwitchTransformersForConditionalGeneration(model_config(len(tokenizer)))
    print(f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters")
    train(model, batch_maker(sources, targets, names, args.seed, args.name_share, args.name_warmup),
          TrainConfig(steps=args.steps, lr=args.lr, threads=args.threads, seed=args.seed), WORK, resume=not args.fresh,
          param_groups=parameter_groups(model, args.bias_lr_scale),
          on_checkpoint=validator(model, tokenizer, validation[:VALIDATION_PAIRS], every=500))
    model.generation_config.decoder_start_token_id = PAD_ID
    tokenizer.backend_tokenizer.normalizer = code_normalizer()  # the checkpoint prepares its own input
    save_checkpoint(model, tokenizer, args.output, EOS_ID, PAD_ID)


if __name__ == "__main__":
    main()
