"""What every section of the paper benchmark shares: the run's settings and its inputs (the
bundled checkpoints, held-out texts per domain, prompts), read once."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
OUT = ROOT / "benchmarks" / "results" / "paper"


@dataclass(frozen=True)
class Sizes:
    """How much of each input the sections measure with: a full run's, or a quick one's."""

    prompts: int  # per measurement of speed
    new_tokens: int  # per prompt
    text_tokens: int  # of each held-out text scored for perplexity
    texts_per_domain: int
    summaries: int  # held-out functions the Switch summarizer summarizes for Rouge-2


FULL = Sizes(prompts=6, new_tokens=48, text_tokens=256, texts_per_domain=4, summaries=48)
QUICK = Sizes(prompts=2, new_tokens=12, text_tokens=64, texts_per_domain=1, summaries=4)


@dataclass
class Context:
    quick: bool = False
    threads: int = 1
    store_root: Path = field(default_factory=lambda: Path(os.environ.get("SWAPMOE_BENCH_STORES",
                                                                          ROOT / ".bench-stores")))
    shares: tuple[float, ...] = (0.25, 0.5, 0.75)  # of all experts: the budgets between minimum and full
    update_frequency: int = 4  # tokens between a layer's updates where a section fixes it

    @property
    def sizes(self) -> Sizes:
        return QUICK if self.quick else FULL

    @cached_property
    def lm(self) -> Path:
        from swapmoe.models.bundled import LM_DIR
        return LM_DIR

    @cached_property
    def switch(self) -> Path:
        from swapmoe.models.bundled import SWITCH_DIR
        return SWITCH_DIR

    @cached_property
    def tokenizer(self):
        from transformers import AutoTokenizer
        return AutoTokenizer.from_pretrained(self.lm)

    @cached_property
    def switch_tokenizer(self):
        from transformers import AutoTokenizer
        return AutoTokenizer.from_pretrained(self.switch)

    @cached_property
    def texts(self) -> dict[str, list[list[int]]]:
        """Held-out texts per domain as token ids (the bundled LM's eval sets, never trained on)."""
        from swapmoe.models.corpus import DOMAINS, load_eval
        out = {}
        for domain in DOMAINS:
            rows = load_eval(domain)[: self.sizes.texts_per_domain]
            out[domain] = [self.tokenizer(r["text"], add_special_tokens=False)["input_ids"][: self.sizes.text_tokens]
                           for r in rows]
        return out

    @cached_property
    def prompt_ids(self) -> list[list[int]]:
        """Prompts for speed: the first 32 tokens of held-out texts, domains taking turns."""
        from swapmoe.models.corpus import DOMAINS, load_eval
        per = -(-self.sizes.prompts // len(DOMAINS))
        rows = [r["text"] for i in range(per) for d in DOMAINS for r in load_eval(d)[-(i + 1):][:1]]
        return [self.tokenizer(t, add_special_tokens=False)["input_ids"][:32] for t in rows][: self.sizes.prompts]

    @cached_property
    def pairs(self) -> list[dict]:
        """Held-out (code, summary) pairs for the Switch summarizer."""
        from swapmoe.models.corpus import load_eval
        return load_eval("summarization")[: self.sizes.summaries]
