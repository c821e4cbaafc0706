"""The Switch summarizer's task: a function's code in, the first line of its docstring out.

How a function becomes the model's input, batches of token rows, greedy summaries, and the
Rouge-2 metric (the paper's, for this model family). Training and evaluation both use these,
so the model is always measured on the input it was trained with.
"""

from __future__ import annotations

import functools

import numpy as np
import torch
from tokenizers import Tokenizer

from swapmoe.models.corpus import SummaryPair, code_as_words
from swapmoe.models.tokenizer import EOS_ID, PAD_ID

MAX_SOURCE = 96
MAX_TARGET = 40


def source_ids(tokenizer, code: str) -> list[int]:
    """The model's input for a function: its code as words, cut to ``MAX_SOURCE`` tokens with EOS.
    (The bundled checkpoint's tokenizer applies ``code_as_words`` itself; it is idempotent.)"""
    return tokenizer(code_as_words(code), add_special_tokens=False)["input_ids"][:MAX_SOURCE - 1] + [EOS_ID]


def target_ids(tokenizer, summary: str) -> list[int]:
    """A summary as the model writes it. The checkpoint's tokenizer prepares *inputs* (its normalizer
    is ``code_as_words``), so targets are encoded without that normalizer."""
    return without_normalizer(tokenizer).encode(summary, add_special_tokens=False).ids[:MAX_TARGET - 1] + [EOS_ID]


@functools.cache
def without_normalizer(tokenizer) -> Tokenizer:
    """``tokenizer``'s backend with no normalizer: text is encoded as given."""
    plain = Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())
    plain.normalizer = None
    return plain


def encode_pairs(tokenizer, pairs) -> tuple[list[list[int]], list[list[int]]]:
    return [source_ids(tokenizer, p.body) for p in pairs], [target_ids(tokenizer, p.summary) for p in pairs]


def pad(rows: list[list[int]], value: int) -> torch.Tensor:
    width = max(len(r) for r in rows)
    return torch.tensor([r + [value] * (width - len(r)) for r in rows])


@torch.inference_mode()
def summarize(model, tokenizer, bodies: list[str], batch: int = 16, max_new_tokens: int = 40) -> list[str]:
    out = []
    for start in range(0, len(bodies), batch):
        input_ids = pad([source_ids(tokenizer, body) for body in bodies[start:start + batch]], PAD_ID)
        ids = model.generate(input_ids=input_ids, attention_mask=(input_ids != PAD_ID).long(),
                             max_new_tokens=max_new_tokens, do_sample=False, num_beams=1)
        out += tokenizer.batch_decode(ids, skip_special_tokens=True)
    return [o.strip() for o in out]


@torch.inference_mode()
def source_losses(model, tokenizer, bodies: list[str], summaries: list[str]) -> tuple[float, float]:
    """Loss of the summaries given each function's own code, and given the next function's code:
    the gap is what the model reads from its input (none, for a decoder that ignores its source)."""
    sources, targets = encode_pairs(tokenizer, [SummaryPair("", "", b, s) for b, s in zip(bodies, summaries)])
    labels = pad(targets, -100)

    def loss(rows) -> float:
        input_ids = pad(rows, PAD_ID)
        return model(input_ids=input_ids, attention_mask=(input_ids != PAD_ID).long(), labels=labels).loss.item()

    return loss(sources), loss(sources[1:] + sources[:1])


def rouge2_scores(predictions: list[str], references: list[str]) -> np.ndarray:
    """Rouge-2 F1 of each prediction (the `rouge-score` package, stemmed)."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rouge2"], use_stemmer=True)
    return np.array([scorer.score(r, p)["rouge2"].fmeasure for p, r in zip(predictions, references)])


def rouge2(predictions: list[str], references: list[str]) -> float:
    return float(rouge2_scores(predictions, references).mean())
