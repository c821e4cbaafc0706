"""Which domain does a text read like? A character-trigram naive Bayes over the shipped
held-out sets: independent of any model's tokenizer, used to check generated text."""

from __future__ import annotations

import math
from collections import Counter
from functools import lru_cache

from swapmoe.models.corpus import DOMAINS, load_eval


def _trigrams(text: str) -> list[str]:
    return [text[i:i + 3] for i in range(len(text) - 2)]


@lru_cache(maxsize=1)
def _model() -> dict[str, tuple[Counter, int]]:
    """Per-domain trigram counts over the same number of characters, so that no domain's
    smoothing is looser than another's just because it has less text."""
    texts = {d: "\n".join(row["text"] for row in load_eval(d)) for d in DOMAINS}
    size = min(len(t) for t in texts.values())
    return {d: (counts := Counter(_trigrams(t[:size])), sum(counts.values())) for d, t in texts.items()}


def domain_scores(text: str) -> dict[str, float]:
    """Log-likelihood of ``text`` under each domain's add-one-smoothed trigram model."""
    model = _model()
    vocabulary = len(set().union(*(c for c, _ in model.values())))
    return {d: sum(math.log((counts[t] + 1) / (total + vocabulary)) for t in _trigrams(text))
            for d, (counts, total) in model.items()}


def classify(text: str) -> str:
    scores = domain_scores(text)
    return max(scores, key=scores.get)
