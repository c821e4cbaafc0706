"""Train the bundled Switch Transformers summarizer: a Python function's code -> the first
line of its docstring (held-out functions come from held-out modules).

    python -m models.training.train_switch            # ~16 min on 2 CPU cores; resumes if interrupted
    python -m models.training.train_switch --fresh    # start over

Writes ``models/swapmoe-switch`` (safetensors, HF layout, tokenizer).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from transformers import AutoModelForCausalLM, SwitchTransformersConfig, SwitchTransformersForConditionalGeneration

from models.corpus import CACHE, extra_summary_pairs, summary_pairs
from models.tokenizer import EOS_ID, PAD_ID, train_tokenizer
from models.training.loop import TrainConfig, arguments, save_checkpoint, train

OUTPUT = Path(__file__).resolve().parents[1] / "swapmoe-switch"
LM_DIR = Path(__file__).resolve().parents[1] / "swapmoe-lm"
WORK = CACHE.parent / "train" / "switch"
MAX_SOURCE = 96
MAX_TARGET = 40
BATCH = 24


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


def encode_pairs(tokenizer, pairs) -> tuple[list[list[int]], list[list[int]]]:
    sources = [tokenizer(p.body, add_special_tokens=False)["input_ids"][:MAX_SOURCE - 1] + [EOS_ID] for p in pairs]
    targets = [tokenizer(p.summary, add_special_tokens=False)["input_ids"][:MAX_TARGET - 1] + [EOS_ID] for p in pairs]
    return sources, targets


def pad(rows: list[list[int]], value: int) -> torch.Tensor:
    width = max(len(r) for r in rows)
    return torch.tensor([r + [value] * (width - len(r)) for r in rows])


def batch_maker(sources, targets, seed: int):
    def batch_for(step: int) -> dict:
        rng = np.random.default_rng([seed, step])
        picks = rng.integers(0, len(sources), BATCH)
        input_ids = pad([sources[i] for i in picks], PAD_ID)
        return dict(input_ids=input_ids, attention_mask=(input_ids != PAD_ID).long(),
                    labels=pad([targets[i] for i in picks], -100),
                    output_router_logits=True)  # adds the load-balancing and z losses; without them routing collapses

    return batch_for


def main(argv=None) -> None:
    parser = arguments(__doc__, steps=5000, output=OUTPUT)
    parser.add_argument("--embeddings-from", type=Path, default=LM_DIR,
                        help="initialize token embeddings from this LM (same tokenizer); empty to skip")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    tokenizer = train_tokenizer(seed=args.seed)
    train_pairs, held_out = summary_pairs()
    extra = extra_summary_pairs(held_out)
    print(f"{len(train_pairs)} training pairs from CPython and {len(extra)} from other Python packages; "
          f"{len(held_out)} held out")
    train_pairs += extra
    sources, targets = encode_pairs(tokenizer, train_pairs)
    torch.manual_seed(args.seed)
    model = SwitchTransformersForConditionalGeneration(model_config(len(tokenizer)))
    if args.embeddings_from:
        # Same tokenizer and width: start from the LM's token embeddings rather than noise.
        lm = AutoModelForCausalLM.from_pretrained(args.embeddings_from, local_files_only=True)
        with torch.no_grad():
            model.shared.weight.copy_(lm.get_input_embeddings().weight)
        del lm
    print(f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters")
    train(model, batch_maker(sources, targets, args.seed),
          TrainConfig(steps=args.steps, lr=3e-3, threads=args.threads, seed=args.seed), WORK,
          resume=not args.fresh)
    model.generation_config.decoder_start_token_id = PAD_ID
    save_checkpoint(model, tokenizer, args.output, EOS_ID, PAD_ID)


if __name__ == "__main__":
    main()
