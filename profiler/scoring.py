"""Scoring one configuration on the profiling set with the executor's own runtime.

The model runs as ``VirtualExperts`` under the configuration's slots, each layer's at the
configuration's precision: masked gating, importance (Eq. 1) and resident-set updates between
forward passes, as the executor serves.
Two things differ, both so that a score is a function of the configuration alone:

- each workload starts from a freshly filled runtime (``VirtualExperts.restart``);
- the loads an update starts are waited for before the next pass, as if they landed within
  one pass (on the executor they land when the device's storage delivers them; the cost of
  that is E_latency's concern, section 3.4.1).

Decoder LMs: perplexity by teacher forcing, one pass of ``update_frequency`` tokens (with the
KV cache) then an update of every layer, so each layer's resident set moves every
``update_frequency`` tokens, as in the executor's decode where layers take turns. The Switch
model: each pair summarized by the executor's own generation loop, scored by Rouge-2.

Under a cap on expert bytes (``profiler.residency``) the full model, which would not fit, runs
on demand in fewer slots: the same routing and outputs (up to the order of a sum), so the same
score and activation counts.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from swapmoe.core.plan import Strategy
from swapmoe.executor.requests import GenerationRequest
from swapmoe.executor.model_runner import ModelRunner
from swapmoe.executor.step import tokens_offline
from swapmoe.executor.virtual_experts import VirtualExperts
from swapmoe.profiler.configs import Configuration
from swapmoe.profiler.residency import check_cap, scoring_residency
from swapmoe.profiler.workloads import MIX, SUMMARIZATION, ProfilingSet

STATIC_CHUNK = 32  # tokens per pass when nothing is updated (update_frequency 0)


@dataclass(frozen=True, slots=True)
class Score:
    """A configuration's accuracy per workload (perplexity for LMs, Rouge-2 for summaries), the
    sums behind it, and per workload and layer how often tokens wanted each expert."""

    key: str
    accuracy: dict[str, float]
    totals: dict[str, list[float]]  # workload -> [summed NLL, tokens] or [summed Rouge-2, pairs]
    activations: dict[str, list[list[int]]] = field(default_factory=dict)
    seconds: float = 0.0


def mix_perplexity(totals: dict[str, list[float]]) -> float:
    """Every domain weighs the same: exp of the mean over domains of the mean token NLL."""
    return math.exp(float(np.mean([nll / tokens for nll, tokens in totals.values()])))


class Scorer:
    """Holds one runtime for a checkpoint and scores configurations on it, one at a time."""

    def __init__(self, checkpoint: Path, profiling_set: ProfilingSet, store_root: Path | None = None,
                 threads: int = 1, log=lambda *_: None, max_resident_bytes: int = 0):
        from transformers import AutoTokenizer

        torch.set_num_threads(threads)
        self.set = profiling_set
        self.max_resident_bytes = max_resident_bytes  # expert slot bytes; 0: no cap (see profiler.residency)
        self.experts = VirtualExperts(Path(checkpoint), "cpu", store_root, log=log)
        try:
            self._prepare(checkpoint, AutoTokenizer)
        except BaseException:
            self.experts.close()  # a set that does not fit the model: leave no loader thread
            raise

    def _prepare(self, checkpoint: Path, tokenizers) -> None:
        profiling_set = self.set
        self.experts.set_strategy(Strategy.MASKED_GATING)
        self.tokenizer = tokenizers.from_pretrained(checkpoint, local_files_only=True)
        self.layout = self.experts.layout
        check_cap(self.layout, self.max_resident_bytes)
        profiling_set.check_fits(self.layout.encoder_decoder, str(checkpoint))
        if profiling_set.kind == "lm":
            self.inputs = {d: [self._ids(t) for t in texts] for d, texts in profiling_set.texts_by_domain().items()}
        else:
            from swapmoe.models.summarization import source_ids

            pairs = profiling_set.summary_pairs()
            self.inputs = {SUMMARIZATION: [source_ids(self.tokenizer, p["body"]) for p in pairs]}
            self.references = [p["summary"] for p in pairs]

    def _ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"][:self.set.tokens]

    def score(self, config: Configuration) -> Score:
        start = time.perf_counter()
        totals, activations = {}, {}
        capacities, strategy = scoring_residency(self.layout, config.experts_per_layer, self.max_resident_bytes,
                                                 config.precision)
        if strategy is not self.experts.strategy:  # on demand for the capped reference only
            self.experts.set_strategy(strategy)
        if config.precisions != self.experts.precisions:  # one slot per layer at it: the restart fills the rest
            self.experts.resize((1,) * len(capacities), config.precisions)
        for workload, inputs in self.inputs.items():
            self.experts.restart(capacities)
            before = [a.activations for a in self.experts.activity()]
            run = self._perplexity if self.set.kind == "lm" else self._summaries
            totals[workload] = run(inputs, config.update_frequency)
            after = [a.activations for a in self.experts.activity()]
            activations[workload] = [[y - x for x, y in zip(b, a)] for b, a in zip(before, after)]
        if self.set.kind == "lm":
            accuracy = {w: math.exp(nll / n) for w, (nll, n) in totals.items()}
            accuracy[MIX] = mix_perplexity(totals)
            activations[MIX] = np.sum([activations[d] for d in totals], axis=0).tolist()
        else:
            accuracy = {w: s / n for w, (s, n) in totals.items()}
        return Score(config.key, accuracy, totals, activations, time.perf_counter() - start)

    @torch.inference_mode()
    def _perplexity(self, texts: list[list[int]], update_frequency: int) -> list[float]:
        """[summed NLL, predicted tokens] over ``texts`` read one after another (one stream)."""
        chunk = update_frequency or STATIC_CHUNK
        # Between chunks, the runner's work between passes (one chunk is one update turn), settled.
        between = ModelRunner(self.experts.model, self.experts, 1, 1 if update_frequency else 0, settle_loads=True)
        nll, count = 0.0, 0
        for ids in texts:
            past = None
            self.experts.begin_input()
            for start in range(0, len(ids) - 1, chunk):
                x = torch.tensor([ids[start:start + chunk]])
                y = torch.tensor(ids[start + 1:start + chunk + 1])
                out = self.experts.model(input_ids=x, past_key_values=past, use_cache=True)
                past = out.past_key_values
                nll += F.cross_entropy(out.logits[0, :len(y)].float(), y, reduction="sum").item()
                count += len(y)
                between.after_pass()
        return [nll, count]

    def _summaries(self, sources: list[list[int]], update_frequency: int) -> list[float]:
        """[summed Rouge-2, pairs]: each source summarized greedily as the executor generates."""
        from swapmoe.models.summarization import MAX_TARGET, rouge2_scores
        from swapmoe.models.tokenizer import EOS_ID

        predictions, self.generated = [], []  # the last configuration's output ids, for inspection
        runner = ModelRunner(self.experts.model, self.experts, 1, update_frequency, settle_loads=True)
        for ids in sources:
            made = tokens_offline(runner, GenerationRequest(tuple(ids), MAX_TARGET), eos=frozenset({EOS_ID}))
            out = made[:-1] if made and made[-1] == EOS_ID else made
            self.generated.append(out)
            predictions.append(self.tokenizer.decode(out, skip_special_tokens=True).strip())
        return [float(rouge2_scores(predictions, self.references).sum()), len(predictions)]

    def close(self) -> None:
        self.experts.close()
