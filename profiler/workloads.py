"""The labeled profiling sets (paper section 3.4.2): per domain and their mix, kept apart from
the texts later used to judge plans.

Each shipped held-out row goes to profiling or to judging by a hash of its source, so the two
never share a document and the split does not change when rows are added.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from swapmoe.models.corpus import DOMAINS, load_eval

MIX = "mix"  # every domain, equally weighted
LM_WORKLOADS = DOMAINS + (MIX,)
SUMMARIZATION = "summarization"  # the Switch model's code -> summary pairs


def for_profiling(source: str) -> bool:
    """Half the documents profile, the other half judge plans."""
    return hashlib.sha256(f"profiling:{source}".encode()).digest()[0] % 2 == 0


def rows(name: str, purpose: str) -> list[dict]:
    """The shipped rows of ``name`` (a domain or ``summarization``) set aside for ``purpose``
    ("profiling" or "judging"), in file order."""
    if purpose not in ("profiling", "judging"):
        raise ValueError(f"purpose must be 'profiling' or 'judging', not {purpose!r}")
    want = purpose == "profiling"
    return [r for r in load_eval(name) if for_profiling(r["source"]) == want]


@dataclass(frozen=True, slots=True)
class ProfilingSet:
    """What a configuration is scored on: the first ``texts`` profiling rows of each domain, each
    cut to ``tokens`` tokens (decoder LMs), or the first ``pairs`` profiling pairs (Switch)."""

    kind: str  # "lm" (perplexity per domain) or "summarization" (Rouge-2)
    texts: int = 3
    tokens: int = 256
    pairs: int = 32
    purpose: str = "profiling"

    def __post_init__(self):
        if self.kind not in ("lm", SUMMARIZATION):
            raise ValueError(f"kind must be 'lm' or '{SUMMARIZATION}', not {self.kind!r}")
        if min(self.texts, self.tokens, self.pairs) < 1:
            raise ValueError("texts, tokens and pairs must be at least 1")

    @property
    def name(self) -> str:
        """The directory name of profiles made on this set."""
        size = f"{self.texts}x{self.tokens}" if self.kind == "lm" else f"{self.pairs}"
        return f"{self.purpose}-{self.kind}-{size}"

    @property
    def workloads(self) -> tuple[str, ...]:
        return LM_WORKLOADS if self.kind == "lm" else (SUMMARIZATION,)

    def check_fits(self, encoder_decoder: bool, model: str) -> None:
        """Raise ValueError unless this set scores ``model``: summaries for an encoder-decoder,
        perplexity for a decoder-only model."""
        if (self.kind == SUMMARIZATION) != encoder_decoder:
            kind = "an encoder-decoder" if encoder_decoder else "a decoder-only"
            raise ValueError(f"{model} is {kind} model; profiling set '{self.kind}' does not fit it")

    def texts_by_domain(self) -> dict[str, list[str]]:
        return {d: [r["text"] for r in rows(d, self.purpose)[:self.texts]] for d in DOMAINS}

    def summary_pairs(self) -> list[dict]:
        return rows(SUMMARIZATION, self.purpose)[:self.pairs]
