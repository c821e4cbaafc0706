"""On-device measurements for the profiler: expert load time, compute time, memory per expert.

Loads are timed on the tier the executor really loads from: one expert read from
the expert store (``O_DIRECT`` from disk on a CPU device).
"""

from __future__ import annotations

import itertools
import statistics
import time
from typing import Iterator

import torch
from torch import nn

from executor.adapters import find_moe_blocks
from swapmoe.v1 import executor_pb2 as epb


def _median_ns(fn, repeats: int) -> int:
    times = []
    for _ in range(repeats):
        start = time.perf_counter_ns()
        fn()
        times.append(time.perf_counter_ns() - start)
    return int(statistics.median(times))


def _expert_forward(block, tokens: int):
    """One expert's forward over ``tokens`` random tokens, through the model's own experts
    module (slot 0 of the block's virtual experts)."""
    inner = block.experts.inner
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
def profile(engine, token_counts: tuple[int, ...], repeats: int) -> Iterator[epb.ProfileProgress]:
    block = find_moe_blocks(engine.model)[0]
    steps = 1 + len(token_counts)
    yield epb.ProfileProgress(fraction=0.0, stage="expert load")
    store = engine.runtime.store
    buffer = store.buffer(0)
    experts = itertools.cycle(range(store.manifest.layers[0].num_experts))  # a different expert each read
    nbytes = store.manifest.layers[0].expert_bytes
    load_ns = max(1, _median_ns(lambda: store.read_into(0, next(experts), buffer), repeats))
    result = epb.ProfileResult(
        expert_load_ns=load_ns,
        load_bytes_per_second=nbytes / (load_ns / 1e9),
        load_tier=engine.runtime.tier,
        bytes_per_expert=[l.bytes_per_expert for l in engine.layout.layers],
        dense_bytes=engine.layout.dense_bytes,
    )
    for n, tokens in enumerate(token_counts, start=1):
        yield epb.ProfileProgress(fraction=n / steps, stage=f"expert compute, {tokens} tokens")
        forward = _expert_forward(block, tokens)
        forward()  # warm-up
        result.compute.add(tokens=tokens, expert_forward_ns=_median_ns(forward, repeats))
    yield epb.ProfileProgress(fraction=1.0, stage="done", result=result)
