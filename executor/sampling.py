"""How a generation's next token is chosen from its logits (greedy, temperature, top-k, top-p),
with the request's own seeded random generator. The forward passes that make the logits are
``executor.model_runner``'s."""

from __future__ import annotations

import torch

from swapmoe.executor.requests import SamplingParams


def choose_token(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    """Next token from last-position logits [V]."""
    if params.temperature == 0:
        return int(torch.argmax(logits))
    logits = logits.float() / params.temperature
    if params.top_k:
        kth = torch.topk(logits, min(params.top_k, logits.numel())).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if 0 < params.top_p < 1:
        sorted_probs, order = torch.sort(probs, descending=True)
        keep = torch.cumsum(sorted_probs, dim=-1) - sorted_probs < params.top_p  # always keeps the first
        probs = torch.zeros_like(probs).scatter_(0, order[keep], sorted_probs[keep])
    return int(torch.multinomial(probs, 1, generator=generator))


def generator_for(sampling: SamplingParams) -> torch.Generator | None:
    """The request's own random generator for sampling (seeded as it says), None when greedy."""
    if sampling.temperature == 0:
        return None
    generator = torch.Generator()
    generator.manual_seed(sampling.seed if sampling.seed is not None else torch.seed())
    return generator
