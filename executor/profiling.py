"""On-device measurements for the profiler: expert load time, compute time, memory per expert.

The skeleton measures loads from host memory (a copy of the expert's tensors);
the runtime issue measures its real tier (disk or pinned host memory).
"""

from __future__ import annotations

import statistics
import time
from typing import Iterator

import torch
from torch import nn

from executor.adapters import adapter_for, find_moe_blocks
from swapmoe.v1 import executor_pb2 as epb


def _median_ns(fn, repeats: int) -> int:
    times = []
    for _ in range(repeats):
        start = time.perf_counter_ns()
        fn()
        times.append(time.perf_counter_ns() - start)
    return int(statistics.median(times))


def _expert_forward(block, tokens: int):
    """One expert's forward over ``tokens`` random tokens, through the model's own experts module."""
    dtype = next(block.module.parameters()).dtype
    if isinstance(block.experts, nn.ModuleDict):  # per-expert modules (Switch)
        expert = block.experts["expert_0"]
        x = torch.randn(tokens, expert.wi.in_features, dtype=dtype)
        return lambda: expert(x)
    x = torch.randn(tokens, block.experts.gate_up_proj.shape[-1], dtype=dtype)
    index = torch.zeros(tokens, 1, dtype=torch.long)
    weights = torch.ones(tokens, 1, dtype=dtype)
    return lambda: block.experts(x, index, weights)


@torch.inference_mode()
def profile(engine, token_counts: tuple[int, ...], repeats: int) -> Iterator[epb.ProfileProgress]:
    adapter = adapter_for(engine.model)
    block = find_moe_blocks(engine.model)[0]
    steps = 1 + len(token_counts)
    yield epb.ProfileProgress(fraction=0.0, stage="expert load")
    tensors = adapter.expert_tensors(block.experts, 0)
    nbytes = sum(t.numel() * t.element_size() for t in tensors)
    load_ns = max(1, _median_ns(lambda: [t.clone() for t in tensors], repeats))
    result = epb.ProfileResult(
        expert_load_ns=load_ns,
        load_bytes_per_second=nbytes / (load_ns / 1e9),
        load_tier="host-memory",
        bytes_per_expert=[l.bytes_per_expert for l in engine.layout.layers],
        dense_bytes=engine.layout.dense_bytes,
    )
    for n, tokens in enumerate(token_counts, start=1):
        yield epb.ProfileProgress(fraction=n / steps, stage=f"expert compute, {tokens} tokens")
        forward = _expert_forward(block, tokens)
        forward()  # warm-up
        result.compute.add(tokens=tokens, expert_forward_ns=_median_ns(forward, repeats))
    yield epb.ProfileProgress(fraction=1.0, stage="done", result=result)
