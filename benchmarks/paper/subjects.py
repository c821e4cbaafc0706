"""One configuration of the paper's comparisons, loaded and measured: the unmodified model, or
the executor's runtime (``VirtualExperts``) with a residency per layer and the knobs the
ablations turn. Speed goes through the serving step (``executor.step``), the one decode path.

A ``Setup`` names what differs; ``Subject`` holds it loaded; the ``measure_*`` functions return
plain numbers (JSON), each from this run.
"""

from __future__ import annotations

import statistics
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

from benchmarks import runtime
from swapmoe.core.plan import Strategy
from swapmoe.executor.checkpoint import load_checkpoint
from swapmoe.executor.model_runner import ModelRunner
from swapmoe.executor.requests import GenerationRequest, SamplingParams
from swapmoe.executor.step import generate_offline
from swapmoe.executor.virtual_experts import VirtualExperts

MG, ON_DEMAND = Strategy.MASKED_GATING, Strategy.ON_DEMAND


@dataclass(frozen=True)
class Setup:
    """What a configuration keeps and how it moves; ``experts`` None: the unmodified model."""

    name: str
    experts: tuple[int, ...] | None = None  # resident experts per MoE layer
    strategy: Strategy = MG
    update_frequency: int = 4  # tokens between a layer's updates (0: never: pruning)
    importance: str = "gate"  # Eq. 1 ("gate"), token counts ("count") or "random"
    loads_per_update: int = 1  # amortized (1) or the whole difference at once (a layer's capacity)
    synchronous: bool = False  # wait for an update's loads before the next pass
    decay: float = 0.5  # of the importance carried from one update to the next
    prefetch: bool = False  # on-demand: guess the next layer's experts and load them ahead
    bandwidth: float | None = None  # bytes/s of the slow tier (None: as the disk reads)

    def at(self, **changes) -> "Setup":
        return replace(self, **changes)


class Subject(runtime.Subject):
    """A ``Setup`` loaded from ``checkpoint`` (the runtime benchmark's subject, with the knobs)."""

    tokens_per_pass = 1  # a pass of several tokens (perplexity) takes a layer's turn as often per token

    def __init__(self, setup: Setup, checkpoint: Path, store_root: Path):
        self.setup = self.config = setup
        self.runtime = None
        if setup.experts is None:
            self.model = load_checkpoint(checkpoint, experts_implementation=None).model
            return
        self.runtime = VirtualExperts(checkpoint, store_root=store_root, load_bandwidth=setup.bandwidth,
                                      max_loads_per_update=setup.loads_per_update, decay=setup.decay,
                                      importance=setup.importance, prefetch=setup.prefetch, log=lambda _: None)
        self.runtime.resize(list(setup.experts))
        self.runtime.set_strategy(setup.strategy)
        self.model = self.runtime.model

    def between(self) -> None:
        """A pass's end: the runtime's update turn (and, synchronous, its loads awaited). A layer's
        turn comes every ``update_frequency`` tokens, however many tokens a pass carries."""
        if self.runtime:
            f = self.setup.update_frequency
            self.runtime.between_passes(max(1, round(f / self.tokens_per_pass)) if f else 0)
            if self.setup.synchronous:
                self.runtime.wait_for_loads()

    def close(self) -> None:
        if self.runtime:
            self.runtime.close()


def measure_speed(subject: Subject, prompts: list[list[int]], new_tokens: int,
                  sampling: SamplingParams = SamplingParams()) -> dict:
    """Generation of each prompt through the serving step (greedy unless ``sampling`` says
    otherwise): time to first token (the prefill), decode tokens/s, inter-token gaps, and the
    expert I/O it caused."""
    s = subject.setup
    runner = ModelRunner(subject.model, subject.runtime, 1, s.update_frequency, settle_loads=s.synchronous)
    ttft, gaps, decode_ns, decoded, peak, decode_bytes = [], [], 0, 0, 0.0, 0
    before = subject.io()
    for prompt in prompts:
        times, read = [time.perf_counter_ns()], [subject.io().nbytes]
        for e in generate_offline(runner, [GenerationRequest(tuple(prompt), new_tokens, sampling)]):
            times.append(e.computed_ns)
            read.append(subject.io().nbytes)
        ttft.append(times[1] - times[0])
        gaps += [b - a for a, b in zip(times[1:], times[2:])]
        # bytes read in a gap over the gap: the bandwidth a token's updates drew at most
        peak = max([peak] + [(r1 - r0) / (t1 - t0) * 1e9 for r0, r1, t0, t1 in zip(read[1:], read[2:], times[1:], times[2:])])
        decode_ns += times[-1] - times[1]
        decode_bytes += read[-1] - read[1]  # after the first token: the prefill's loads are not decode's
        decoded += len(times) - 2
    io = subject.io() - before
    tokens = decoded + len(prompts)
    return dict(ttft_ms=statistics.median(ttft) / 1e6, tokens_per_second=decoded / (decode_ns / 1e9),
                itl_p50_ms=statistics.median(gaps) / 1e6, itl_max_ms=max(gaps) / 1e6,
                loads_per_token=io.loads / tokens, mib_per_token=io.nbytes / 2**20 / tokens,
                drawn_mib_per_s=decode_bytes / 2**20 / (decode_ns / 1e9), peak_drawn_mib_per_s=peak / 2**20,
                read_mib_per_s=io.nbytes / 2**20 / io.seconds if io.seconds else 0.0,
                load_seconds=io.seconds, tokens=tokens)


def measure_perplexity(subject: Subject, texts: list[list[int]], chunk: int = 4) -> float:
    """Perplexity with the resident set moving as each text streams by, ``chunk`` tokens per
    forward pass, a layer's update turn every ``update_frequency`` tokens as in serving."""
    subject.tokens_per_pass = chunk
    try:
        return runtime.streaming_perplexity(subject, texts, chunk)
    finally:
        subject.tokens_per_pass = 1


def interleaved_speed(subjects: dict[str, Subject], prompts: list[list[int]], new_tokens: int, rounds: int = 3,
                      desc: str = "speed") -> dict[str, dict]:
    """``measure_speed`` of each subject, warmed up first (a first generation's one-time costs
    untimed), in ``rounds`` rounds that take the subjects in turn so load from elsewhere on the
    machine falls on all alike; per number, the median over rounds."""
    from tqdm import tqdm

    runs: dict[str, list[dict]] = {key: [] for key in subjects}
    for subject in subjects.values():
        measure_speed(subject, prompts[:1], 2)
    for _ in tqdm(range(rounds), desc=desc, unit="round", file=sys.stderr):
        for key, subject in subjects.items():
            runs[key].append(measure_speed(subject, prompts, new_tokens))
    return {key: {m: statistics.median(r[m] for r in rs) for m in rs[0]} for key, rs in runs.items()}


def measure_rouge2(subject: Subject, tokenizer, pairs: list[dict]) -> float:
    """Mean Rouge-2 of the Switch summarizer's greedy summaries, the runtime's update turn after
    every forward pass of ``generate`` (one function at a time, so each input moves the set)."""
    from swapmoe.models.summarization import rouge2_scores, summarize

    hook = subject.model.register_forward_hook(lambda *_: subject.between())
    try:
        predictions = []
        for p in pairs:
            subject.begin_input()
            predictions += summarize(subject.model, tokenizer, [p["body"]], batch=1)
    finally:
        hook.remove()
    return float(rouge2_scores(predictions, [p["summary"] for p in pairs]).mean())
