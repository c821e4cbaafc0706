"""Train the bundled decoder-only MoE language model (Mixtral family) on the three domains.

    python -m swapmoe.models.training.train_lm            # ~40 min on 2 CPU cores; resumes if interrupted
    python -m swapmoe.models.training.train_lm --fresh    # start over

Writes ``models/swapmoe-lm`` (safetensors, HF layout, tokenizer) loadable with the Auto classes.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from transformers import MixtralConfig, MixtralForCausalLM

from swapmoe.models.corpus import CACHE, DOMAINS, split
from swapmoe.models.tokenizer import BOS_ID, EOS_ID, PAD_ID, train_tokenizer
from swapmoe.models.training.loop import TrainConfig, arguments, save_checkpoint, train

OUTPUT = Path(__file__).resolve().parents[1] / "swapmoe-lm"
WORK = CACHE.parent / "train" / "lm"
SEQ_LEN = 256
BATCH = 16


def model_config(vocab_size: int) -> MixtralConfig:
    """6 layers x 16 experts, top-2: a real search space for the planner, ~22 MB in float32."""
    return MixtralConfig(
        vocab_size=vocab_size, hidden_size=128, intermediate_size=128, num_hidden_layers=6,
        num_attention_heads=4, num_key_value_heads=2, num_local_experts=16, num_experts_per_tok=2,
        max_position_embeddings=512, tie_word_embeddings=True, rope_theta=10000.0,
        router_aux_loss_coef=0.01, output_router_logits=True, router_jitter_noise=0.0,
        bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID,
    )


def domain_tokens(tokenizer, work: Path) -> dict[str, np.ndarray]:
    """Each domain's training documents as one token stream (documents end with </s>), cached."""
    streams = {}
    for domain in DOMAINS:
        path = work / f"{domain}.tokens.npy"
        if not path.exists():
            ids = []
            for doc in split(domain)[0]:
                ids += tokenizer(doc.text, add_special_tokens=False)["input_ids"] + [EOS_ID]
            np.save(path, np.asarray(ids, dtype=np.uint16))
        streams[domain] = np.load(path)
    return streams


def batch_maker(streams: dict[str, np.ndarray], seed: int):
    """Each row: a domain chosen uniformly (so the small prose domain is not drowned), then a window."""
    names = sorted(streams)

    def batch_for(step: int) -> dict:
        rng = np.random.default_rng([seed, step])
        rows = []
        for _ in range(BATCH):
            stream = streams[names[rng.integers(len(names))]]
            start = rng.integers(0, len(stream) - SEQ_LEN - 1)
            rows.append(stream[start:start + SEQ_LEN].astype(np.int64))
        ids = torch.from_numpy(np.stack(rows))
        return dict(input_ids=ids, labels=ids)

    return batch_for


def main(argv=None) -> None:
    args = arguments(__doc__, steps=2400, output=OUTPUT).parse_args(argv)
    torch.set_num_threads(args.threads)
    WORK.mkdir(parents=True, exist_ok=True)
    tokenizer = train_tokenizer(seed=args.seed)
    streams = domain_tokens(tokenizer, WORK)
    print({d: len(s) for d, s in streams.items()}, "training tokens per domain")
    torch.manual_seed(args.seed)
    config = model_config(len(tokenizer))
    config._experts_implementation = "grouped_mm"  # ~1.5x faster than eager on CPU for training
    model = MixtralForCausalLM(config)
    print(f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters")
    train(model, batch_maker(streams, args.seed), TrainConfig(steps=args.steps, threads=args.threads,
                                                              seed=args.seed), WORK, resume=not args.fresh)
    model.config.output_router_logits = False
    model.config._experts_implementation = None
    save_checkpoint(model, tokenizer, args.output, EOS_ID, PAD_ID)


if __name__ == "__main__":
    main()
