"""What a generation asks for: its prompt, how many tokens, how to sample them, where to stop.
Pure data, checked on construction (InvalidField names the field)."""

from __future__ import annotations

from dataclasses import dataclass, field

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
