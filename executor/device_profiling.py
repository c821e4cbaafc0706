"""On-device measurements for the profiler: the device profile of paper section 3.3 and
appendix A, and the update-frequency sweep of section 3.4.1.

Per MoE layer: bytes and activation bytes of one expert and its compute time against token
counts. Per tier an expert load goes through: the load time (the store's tier, ``O_DIRECT``
from disk on a CPU device; on an accelerator also the pinned host -> device copy). One decode
step through the executor's real model, and generation at each update frequency through the
executor's own generation path, also at each intra-op thread count with an expert load beside it
(``swapmoe.executor.intra_op``). The pure part (which update frequency is the inflection point)
comes first; results are plain data (``swapmoe.core.device_profile``); the server turns them
into protobuf.
"""

from __future__ import annotations

import contextlib
import itertools
import statistics
import time
from dataclasses import dataclass
from typing import Callable, ContextManager, Iterator, Sequence

import numpy as np
import torch
from torch import nn

from swapmoe.core.device_profile import (BatchDecodePoint, ComputeSample, DeviceProfile, LayerProfile, LoadSample,
                                         OnDemandPoint, SweepPoint, ThreadPoint)
from swapmoe.core.layout import DeviceInfo
from swapmoe.core.plan import Strategy
from swapmoe.executor.intra_op import THREADS_TOLERANCE, choose_threads, loads_beside, thread_counts, usable_cores
from swapmoe.executor.serving_loop import Cancelled
from swapmoe.executor.requests import GenerationRequest
from swapmoe.executor.model_runner import ModelRunner
from swapmoe.executor.precision_passes import measure_precisions
from swapmoe.executor.step import generate_offline

DEFAULT_TOKEN_COUNTS = (1, 4, 16, 64)
DEFAULT_REPEATS = 5
DEFAULT_UPDATE_FREQUENCIES = (0, 64, 32, 16, 8, 4, 2, 1)  # 0 (never update) is the baseline
DEFAULT_SWEEP_TOKENS = 48
SWEEP_PROMPT = (1, 5, 9, 13, 17, 21, 25, 29)  # fixed token ids (taken modulo the vocabulary)
LATENCY_TOLERANCE = 0.05  # updates "cost nothing" within 5% of the baseline (or its own noise)


@dataclass(frozen=True, slots=True)
class ProfileSpec:
    """What to measure; bounds are checked by the server (``convert.check_profile_request``),
    residency by the engine."""

    token_counts: tuple[int, ...] = DEFAULT_TOKEN_COUNTS
    repeats: int = DEFAULT_REPEATS
    update_frequencies: tuple[int, ...] = DEFAULT_UPDATE_FREQUENCIES
    sweep_tokens: int = DEFAULT_SWEEP_TOKENS
    experts_per_layer: tuple[int, ...] = ()  # the sweep's residency; empty: the plan in force

    @property
    def frequencies(self) -> tuple[int, ...]:
        """The baseline 0 first, then descending (least frequent updates first), no repeats."""
        return (0, *sorted({f for f in self.update_frequencies if f}, reverse=True))


@dataclass(frozen=True, slots=True)
class Identity:
    """Who measures what: stamped on the profile."""

    node_id: str
    device: DeviceInfo
    model_fingerprint: str


@dataclass(frozen=True, slots=True)
class ProfileProgress:
    fraction: float
    stage: str
    result: DeviceProfile | None = None


# --- the inflection point (pure) ----------------------------------------------------------
def inflection(points: Sequence[SweepPoint], tolerance: float = LATENCY_TOLERANCE) -> int:
    """The most frequent updates that cost no latency (section 3.4.1): the smallest nonzero
    update frequency whose median inter-token time is within ``tolerance`` (relative) of the
    baseline's (frequency 0), such that every less frequent one is within too. When even the
    least frequent one costs latency, the least frequent one; with no baseline or no nonzero
    frequency, 0."""
    baseline = next((p.inter_token_ns for p in points if p.update_frequency == 0), None)
    updating = sorted((p for p in points if p.update_frequency), key=lambda p: -p.update_frequency)
    if baseline is None or not updating:
        return 0
    chosen = updating[0].update_frequency
    for point in updating:
        if point.inter_token_ns > baseline * (1 + tolerance):
            break
        chosen = point.update_frequency
    return chosen


def relative_spread(samples: Sequence[int]) -> float:
    """Median absolute deviation / median: how much repeats of one measurement differ, robust to
    the one repeat a busy device slows down (the range would let that one set the tolerance)."""
    middle = statistics.median(samples)
    return statistics.median(abs(x - middle) for x in samples) / middle if middle else 0.0


# --- measurements -------------------------------------------------------------------------
def _median_ns(fn, repeats: int, cancelled: Callable[[], bool],
               measurement: Callable[[], ContextManager] = contextlib.nullcontext) -> int:
    """The median time of ``repeats`` calls of ``fn``, each inside ``measurement()``."""
    times = []
    for _ in range(repeats):
        if cancelled():
            raise Cancelled()
        with measurement():
            start = time.perf_counter_ns()
            fn()
            times.append(time.perf_counter_ns() - start)
    return max(1, int(statistics.median(times)))


def _expert_forward(inner: nn.Module, tokens: int):
    """One expert's forward over ``tokens`` random tokens, through the model's own experts
    module ``inner`` (slot 0 of a layer's virtual experts)."""
    model = getattr(inner, "base", inner)  # slots at a lower precision: the model's module, emptied, has the shapes
    dtype, device = next(model.parameters()).dtype, next(inner.parameters()).device
    if isinstance(inner, nn.ModuleDict):  # per-expert modules (Switch)
        expert = inner["expert_0"]
        x = torch.randn(tokens, expert.wi.in_features, dtype=dtype, device=device)
        return lambda: expert(x)
    x = torch.randn(tokens, model.gate_up_proj.shape[-1], dtype=dtype, device=device)
    index = torch.zeros(tokens, 1, dtype=torch.long, device=device)
    weights = torch.ones(tokens, 1, dtype=dtype, device=device)
    return lambda: inner(x, index, weights)


def activation_bytes_per_token(inner: nn.Module) -> int:
    """One expert's intermediate activations for one token: gate_up packed experts keep the
    2I gate/up output and the I product; Switch's wi/wo keep I."""
    inner = getattr(inner, "base", inner)  # slots at a lower precision: activations are the model's own
    if isinstance(inner, nn.ModuleDict):
        wi = inner["expert_0"].wi
        return wi.out_features * wi.weight.element_size()
    intermediate = inner.down_proj.shape[-1]  # down_proj: [slots, hidden, I]
    return 3 * intermediate * inner.down_proj.element_size()


def _sync(device: torch.device) -> None:
    if device.type != "cpu":
        getattr(torch, device.type).synchronize(device)


def _load_samples(runtime, repeats: int, cancelled, measurement) -> list[LoadSample]:
    """The store's tier (a different expert each read, of the layer with the largest experts),
    then, off the CPU, the copy of one expert from pinned host memory to the device; each read
    and copy a measurement of its own."""
    store = runtime.store
    layer = max(range(len(store.manifest.layers)), key=lambda i: store.manifest.layers[i].expert_bytes)
    spec = store.manifest.layers[layer]
    buffer = store.buffer(layer)
    experts = itertools.cycle(range(spec.num_experts))
    load_ns = _median_ns(lambda: store.read_into(layer, next(experts), buffer), repeats, cancelled, measurement)
    samples = [LoadSample(store.tier, load_ns, spec.expert_bytes / (load_ns / 1e9))]
    device = runtime.device
    if device.type != "cpu":
        host = torch.empty(spec.expert_bytes, dtype=torch.uint8, pin_memory=True)
        target = torch.empty(spec.expert_bytes, dtype=torch.uint8, device=device)

        def copy():
            target.copy_(host, non_blocking=True)
            _sync(device)

        with measurement():
            copy()  # warm-up
        copy_ns = _median_ns(copy, repeats, cancelled, measurement)
        samples.append(LoadSample(f"pinned host memory -> {device.type}", copy_ns,
                                  spec.expert_bytes / (copy_ns / 1e9)))
    return samples


def _compute_sample(inner: nn.Module, tokens: int, repeats: int, cancelled, device) -> ComputeSample:
    forward = _expert_forward(inner, tokens)

    def run():
        forward()
        _sync(device)

    run()  # warm-up
    return ComputeSample(tokens, _median_ns(run, repeats, cancelled))


def _prompt(vocab_size: int, row: int = 0) -> tuple[int, ...]:
    """The sweep's prompt; for each other row of a batch, other tokens (seeded by the row): requests
    that route alike would run fewer distinct experts in a pass than a batch of real ones does."""
    if row:
        return tuple(int(t) for t in np.random.default_rng(row).integers(0, vocab_size or 32, len(SWEEP_PROMPT)))
    return tuple(t % vocab_size for t in SWEEP_PROMPT) if vocab_size else SWEEP_PROMPT


def _pass_stamps(runtime, frequency: int, rows: int, count: int, cancelled, at_first=lambda: None) -> list[int]:
    """When each forward pass of ``rows`` greedy generations of ``count`` tokens ended, run through
    the serving step as a request would be (``begin_input`` at its prefill, the experts' work between
    passes every ``frequency`` passes): the ``rows`` prefills, then the decode passes of them all.
    ``at_first`` runs once the first token exists (after the prefills)."""
    runner = ModelRunner(runtime.model, runtime, rows, frequency)
    requests = [GenerationRequest(_prompt(runtime.layout.vocab_size, row), count) for row in range(rows)]
    stamps: list[int] = []
    made = generate_offline(runner, requests, joins_per_pass=rows)
    with contextlib.closing(made):
        for emitted in made:
            if stamps and stamps[-1] == emitted.computed_ns:
                continue  # another row of the same pass
            stamps.append(emitted.computed_ns)
            if len(stamps) == rows:
                at_first()
            if cancelled():
                raise Cancelled()
    return stamps


def _decode_step_ns(runtime, repeats: int, cancelled, rows: int = 1) -> int:
    """One decode pass of ``rows`` sequences (each with the KV cache of a short prompt), no updates:
    the median of the serving step's passes after the prefills and a warm-up pass."""
    stamps = _pass_stamps(runtime, 0, rows, repeats + 2, cancelled)[rows - 1:]
    return int(statistics.median(b - a for a, b in itertools.islice(zip(stamps, stamps[1:]), 1, None)))


def measure_threads(runtime, counts: Sequence[int], rounds: int, passes: int, cancelled=lambda: False,
                    measurement: Callable[[], ContextManager] = contextlib.nullcontext,
                    prepare=lambda: None) -> tuple[tuple[ThreadPoint, ...], int]:
    """One decode pass at each intra-op thread count of ``counts``, on the calling thread, with an
    expert load beside it (``intra_op.loads_beside``): ``rounds`` rounds (one at least), counts
    interleaved so drift hits all alike, each the median of ``passes`` passes inside ``measurement()``
    after ``prepare()``. Returns the median per count and the count chosen within the fastest one's
    noise (the spread of its rounds); the calling thread's count is restored."""
    samples: dict[int, list[int]] = {n: [] for n in counts}
    previous = torch.get_num_threads()
    try:
        for _ in range(max(1, rounds)):
            for threads in counts:
                with measurement():
                    prepare()
                    _settle(runtime)
                    torch.set_num_threads(threads)
                    with loads_beside(runtime):
                        samples[threads].append(_decode_step_ns(runtime, passes, cancelled))
    finally:
        torch.set_num_threads(previous)
    points = tuple(ThreadPoint(n, max(1, int(statistics.median(s)))) for n, s in samples.items())
    fastest = min(points, key=lambda p: p.step_ns).threads
    return points, choose_threads(points, max(THREADS_TOLERANCE, relative_spread(samples[fastest])))


def _generate_once(runtime, frequency: int, count: int, cancelled, counter=None) -> tuple[list[int], int]:
    """Generate ``count`` greedy tokens with updates every ``frequency`` passes, as a request
    would; returns the times between tokens and the loads started (or, given ``counter``, how
    far it moved after the first token: the prefill's loads aside)."""
    count_now = counter or (lambda: runtime.stats.loads_started)
    started = [count_now()]
    stamps = _pass_stamps(runtime, frequency, 1, count, cancelled,
                          at_first=(lambda: started.__setitem__(0, count_now())) if counter is not None else lambda: None)
    return [b - a for a, b in zip(stamps, stamps[1:])], count_now() - started[0]


def _generate_on_demand(runtime, count: int, cancelled) -> tuple[list[int], int]:
    """``_generate_once`` with every miss loaded synchronously (the exact strategy); returns the
    times between tokens and the misses after the first token."""
    previous = runtime.strategy
    runtime.set_strategy(Strategy.ON_DEMAND)
    try:
        return _generate_once(runtime, 0, count, cancelled, counter=lambda: runtime.stats.on_demand_loads)
    finally:
        runtime.set_strategy(previous)


def _settle(runtime) -> None:
    """Loads a previous measurement started land before the next one starts."""
    runtime.wait_for_loads()
    runtime.poll()


@torch.inference_mode()
def profile(runtime, spec: ProfileSpec, identity: Identity, sweep_residency: Callable[..., tuple[int, ...] | None],
            cancelled: Callable[[], bool] = lambda: False,
            measurement: Callable[[], ContextManager] = contextlib.nullcontext,
            max_rows: int = 1, threads: int = 0) -> Iterator[ProfileProgress]:
    """Measure ``runtime`` (a ``VirtualExperts``), reporting progress. The work is a series of
    short measurements, each inside ``measurement()`` (the engine's exclusive step: no pass of a
    generation runs and no plan resizes a slot meanwhile; generations may run between two): the
    decode passes at one thread count, one expert read or copy, one token count of one layer's
    expert, the decode step, one generation of the sweep. ``cancelled()`` is checked before every
    repeat (raises Cancelled). The thread counts come first; the rest runs (and the calling thread
    stays) at the count the executor serves with (``threads``, an explicit ``--threads``; 0: the
    count chosen). The decode steps and the sweep run with ``sweep_residency()`` experts per layer, asked
    at each step (a plan or budget change may land between two); the caller puts the plan's slots
    back afterwards."""
    layers, frequencies = runtime.layers, spec.frequencies
    steps = 3 + len(layers) + (len(frequencies) + 1) * spec.repeats  # + an on-demand run per round
    device = runtime.device
    decode_steps = max(1, min(spec.repeats, spec.sweep_tokens))
    yield ProfileProgress(0.0, "intra-op threads")
    thread_points, chosen = measure_threads(runtime, thread_counts(usable_cores()), spec.repeats, decode_steps,
                                            cancelled, measurement, lambda: _resize(runtime, sweep_residency()))
    torch.set_num_threads(threads or chosen)
    yield ProfileProgress(1 / steps, "expert load")
    loads = _load_samples(runtime, spec.repeats, cancelled, measurement)
    profiles = []
    for i, (layer, layout) in enumerate(zip(layers, runtime.layout.layers)):
        yield ProfileProgress((2 + i) / steps, f"expert compute, layer {i}")
        compute = []
        for tokens in spec.token_counts:
            with measurement():
                compute.append(_compute_sample(layer.experts.inner, tokens, spec.repeats, cancelled, device))
        profiles.append(LayerProfile(layout.bytes_per_expert, activation_bytes_per_token(layer.experts.inner),
                                     tuple(compute)))
    sweep_capacities = sweep_residency()
    yield ProfileProgress((2 + len(layers)) / steps, "decode step")
    with measurement():
        _resize(runtime, sweep_capacities)
        _settle(runtime)
        decode_ns = _decode_step_ns(runtime, decode_steps, cancelled)
    batch_decode = [BatchDecodePoint(1, decode_ns)]
    for rows in batch_sizes(max_rows)[1:]:
        with measurement():
            _resize(runtime, sweep_residency())
            batch_decode.append(BatchDecodePoint(rows, _decode_step_ns(runtime, decode_steps, cancelled, rows)))
    precision_points = measure_precisions(runtime, sweep_residency, lambda: _decode_step_ns(runtime, decode_steps,
                                                                                         cancelled), measurement)
    with measurement():  # warm-up: the first generation after a resize runs slower
        _resize(runtime, sweep_residency())
        _generate_once(runtime, 0, spec.sweep_tokens, cancelled)
    gaps = {f: [] for f in frequencies}
    medians = {f: [] for f in frequencies}
    loads_started = dict.fromkeys(frequencies, 0)
    on_demand_medians, on_demand_misses, on_demand_gaps = [], 0, 0
    for repeat in range(spec.repeats):  # frequencies interleaved: drift on the device hits all alike
        yield ProfileProgress((3 + len(layers) + repeat * (len(frequencies) + 1)) / steps,
                              f"update-frequency sweep, round {repeat + 1} of {spec.repeats}")
        for frequency in frequencies:
            if cancelled():
                raise Cancelled()
            with measurement():
                _resize(runtime, sweep_residency())  # a generation or a budget cut meanwhile changed it
                _settle(runtime)
                times, started = _generate_once(runtime, frequency, spec.sweep_tokens, cancelled)
            gaps[frequency] += times
            medians[frequency].append(int(statistics.median(times)) if times else 0)
            loads_started[frequency] += started
        with measurement():  # and what a synchronous miss costs
            _resize(runtime, sweep_residency())
            _settle(runtime)
            times, misses = _generate_on_demand(runtime, spec.sweep_tokens, cancelled)
        on_demand_medians.append(int(statistics.median(times)) if times else 0)
        on_demand_misses += misses
        on_demand_gaps += len(times)
    baseline_medians = medians[0]
    sweep = [SweepPoint(f, max(1, int(statistics.median(medians[f]))),
                        len(gaps[f]) / (sum(gaps[f]) / 1e9) if sum(gaps[f]) else 0.0,
                        loads_started[f] / (spec.sweep_tokens * spec.repeats)) for f in frequencies]
    experts_ns = sum(l.top_k * _at_one_token(p.compute) for l, p in zip(runtime.layout.layers, profiles))
    tolerance = max(LATENCY_TOLERANCE, relative_spread(baseline_medians) if baseline_medians else 0.0)
    result = DeviceProfile(
        node_id=identity.node_id,
        device=identity.device,
        model_fingerprint=identity.model_fingerprint,
        layout=runtime.layout,
        layers=tuple(profiles),
        loads=tuple(loads),
        dense_forward_ns=max(0, decode_ns - experts_ns),
        decode_step_ns=decode_ns,
        sweep_experts_per_layer=sweep_capacities,
        sweep=tuple(sweep),
        inflection_update_frequency=inflection(sweep, tolerance),
        on_demand=OnDemandPoint(max(1, int(statistics.median(on_demand_medians))),
                                on_demand_misses / max(1, on_demand_gaps)) if on_demand_medians else None,
        batch_decode=tuple(batch_decode),
        thread_points=thread_points,
        threads=chosen,
        precision_points=precision_points, sweep_precision=runtime.precisions if any(runtime.precisions) else (),
    )
    yield ProfileProgress(1.0, "done", result)


def batch_sizes(max_rows: int) -> tuple[int, ...]:
    """The batch sizes a profile measures decode at: powers of two up to ``max_rows``, and it."""
    sizes = [1]
    while sizes[-1] * 2 < max_rows:
        sizes.append(sizes[-1] * 2)
    return tuple(sizes + [max_rows]) if max_rows > 1 else (1,)


def _resize(runtime, capacities: tuple[int, ...]) -> None:
    if runtime.capacities != capacities:
        runtime.resize(capacities)


def _at_one_token(samples: Sequence[ComputeSample]) -> int:
    """One expert's time at one token: measured, or the smallest count measured, scaled down."""
    smallest = min(samples, key=lambda s: s.tokens)
    return smallest.expert_forward_ns // smallest.tokens
