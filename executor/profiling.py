"""On-device measurements for the profiler: expert load time, compute time, memory per expert.

Loads are timed on the tier the executor really loads from: one expert read from the
expert store (``O_DIRECT`` from disk on a CPU device). Results are plain data; the server
turns them into protobuf.
"""

from __future__ import annotations

import contextlib
import itertools
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable, ContextManager, Iterator

import torch
from torch import nn

from swapmoe.executor.admission import Cancelled


@dataclass(frozen=True, slots=True)
class ComputeSample:
    tokens: int
    expert_forward_ns: int


@dataclass(slots=True)
class ProfileResult:
    expert_load_ns: int
    load_bytes_per_second: float
    load_tier: str
    bytes_per_expert: list[int]
    dense_bytes: int
    compute: list[ComputeSample] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class ProfileProgress:
    fraction: float
    stage: str
    result: ProfileResult | None = None


def _median_ns(fn, repeats: int, cancelled: Callable[[], bool]) -> int:
    times = []
    for _ in range(repeats):
        if cancelled():
            raise Cancelled()
        start = time.perf_counter_ns()
        fn()
        times.append(time.perf_counter_ns() - start)
    return int(statistics.median(times))


def _expert_forward(inner: nn.Module, tokens: int):
    """One expert's forward over ``tokens`` random tokens, through the model's own experts
    module ``inner`` (slot 0 of a layer's virtual experts)."""
    dtype = next(inner.parameters()).dtype
    device = next(inner.parameters()).device
    if isinstance(inner, nn.ModuleDict):  # per-expert modules (Switch)
        expert = inner["expert_0"]
        x = torch.randn(tokens, expert.wi.in_features, dtype=dtype, device=device)
        return lambda: expert(x)
    x = torch.randn(tokens, inner.gate_up_proj.shape[-1], dtype=dtype, device=device)
    index = torch.zeros(tokens, 1, dtype=torch.long, device=device)
    weights = torch.ones(tokens, 1, dtype=dtype, device=device)
    return lambda: inner(x, index, weights)


@torch.inference_mode()
def profile(runtime, token_counts: tuple[int, ...], repeats: int, cancelled: Callable[[], bool] = lambda: False,
            between_passes: ContextManager = contextlib.nullcontext()) -> Iterator[ProfileProgress]:
    """Measure ``runtime`` (a ``VirtualExperts``) on its first MoE layer, reporting progress. Each
    measurement holds ``between_passes`` (no plan resizes the slot it times); ``cancelled()``
    is checked before every repeat (raises Cancelled)."""
    steps = 1 + len(token_counts)
    yield ProfileProgress(0.0, "expert load")
    store = runtime.store
    buffer = store.buffer(0)
    experts = itertools.cycle(range(store.manifest.layers[0].num_experts))  # a different expert each read
    nbytes = store.manifest.layers[0].expert_bytes
    with between_passes:
        load_ns = max(1, _median_ns(lambda: store.read_into(0, next(experts), buffer), repeats, cancelled))
    result = ProfileResult(
        expert_load_ns=load_ns,
        load_bytes_per_second=nbytes / (load_ns / 1e9),
        load_tier=runtime.tier,
        bytes_per_expert=[l.bytes_per_expert for l in runtime.layout.layers],
        dense_bytes=runtime.layout.dense_bytes,
    )
    for n, tokens in enumerate(token_counts, start=1):
        yield ProfileProgress(n / steps, f"expert compute, {tokens} tokens")
        with between_passes:
            forward = _expert_forward(runtime.layers[0].experts.inner, tokens)
            forward()  # warm-up
            result.compute.append(ComputeSample(tokens, _median_ns(forward, repeats, cancelled)))
    yield ProfileProgress(1.0, "done", result)
