"""Token-by-token generation with a KV cache: sampling parameters, the next token, the loop.

Pure helpers first (sampling parameters, next-token choice), then the loop that
drives a transformers model one forward pass at a time so a caller can stream each
token as soon as it exists. Turning tokens into text is ``swapmoe.executor.text``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch
from transformers import DynamicCache

from swapmoe.core.errors import InvalidField
from swapmoe.core.limits import MAX_TEMPERATURE, MIN_TEMPERATURE, check_range


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """temperature 0 is greedy, else between ``MIN_TEMPERATURE`` and ``MAX_TEMPERATURE`` (below,
    logits / T overflows and sampling turns to NaN); top_p 1 and top_k 0 disable those filters."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None

    def __post_init__(self):
        if self.temperature != 0:
            check_range("sampling.temperature", self.temperature, MIN_TEMPERATURE, MAX_TEMPERATURE)
        if not 0 <= self.top_p <= 1:
            raise InvalidField("sampling.top_p", f"must be between 0 and 1, got {self.top_p}")
        if self.top_k < 0:
            raise InvalidField("sampling.top_k", f"must be >= 0, got {self.top_k}")


@dataclass(frozen=True, slots=True)
class GenerationRequest:
    prompt_ids: tuple[int, ...]
    max_new_tokens: int = 64
    sampling: SamplingParams = field(default_factory=SamplingParams)
    stop: tuple[str, ...] = ()

    def __post_init__(self):
        if not self.prompt_ids:
            raise InvalidField("prompt", "is empty: give text or at least one token id")
        if self.max_new_tokens < 1:
            raise InvalidField("max_new_tokens", f"must be >= 1, got {self.max_new_tokens}")
        if any(not s for s in self.stop):
            raise InvalidField("stop", "stop sequences must not be empty strings")


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


def last_logits(model, ids: torch.Tensor, cache: DynamicCache, **inputs) -> torch.Tensor:
    """Last-position logits [B, V] for ids [B, T], appending T columns to ``cache``."""
    return model(input_ids=ids, cache=cache, use_cache=True, logits_to_keep=1, **inputs).logits[:, -1]


@torch.inference_mode()
def generate_ids(
    model,
    prompt_ids: tuple[int, ...],
    max_new_tokens: int,
    sampling: SamplingParams,
    between_steps: Callable[[], None] = lambda: None,
) -> Iterator[int]:
    """Yields generated token ids one by one (prefill, then one decode step per token).

    ``between_steps`` runs between forward passes: the engine applies plans and
    resident-set updates there, never inside one.
    """
    generator = generator_for(sampling)
    device = next(model.parameters()).device
    prompt = torch.tensor([list(prompt_ids)], device=device)
    step = seq2seq_step(model, prompt) if model.config.is_encoder_decoder else causal_step(model, prompt)
    logits = step(None)
    for n in range(max_new_tokens):
        token = choose_token(logits, sampling, generator)
        yield token
        if n + 1 == max_new_tokens:
            return  # no forward pass for a token nobody will read
        between_steps()
        logits = step(token)


def causal_step(model, prompt: torch.Tensor):
    """Decoder-only models: prefill the prompt, then feed one token at a time."""
    cache = DynamicCache(config=model.config)

    def step(token: int | None) -> torch.Tensor:
        ids = prompt if token is None else prompt.new_tensor([[token]])
        return last_logits(model, ids, cache)[0]

    return step


def seq2seq_step(model, prompt: torch.Tensor):
    """Encoder-decoder models: encode once, then decode from the start token."""
    encoded = model.get_encoder()(input_ids=prompt)
    past = None
    start = model.config.decoder_start_token_id or 0

    def step(token: int | None) -> torch.Tensor:
        nonlocal past
        ids = torch.tensor([[start if token is None else token]], device=prompt.device)
        out = model(encoder_outputs=encoded, decoder_input_ids=ids, past_key_values=past, use_cache=True)
        past = out.past_key_values
        return out.logits[0, -1]

    return step
