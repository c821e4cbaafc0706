"""What ``benchmarks.scale`` runs in a fresh process per measurement: a store build, or an
executor engine serving two requests under one budget, method and storage tier.

Memory is read with ``executor.memory``: after the libraries are imported and warmed up the
peak is reset (``clear_refs``), so VmHWM afterwards is the peak of what the measured work
made, and VmRSS at that moment is "the libraries". Each function returns a JSON-able dict.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from swapmoe.executor.memory import process_peak_rss, reset_peak_rss

MiB = 2**20
CONTEXT = 1024  # the engine's context (its KV reserve, the same for every method), at most the model's
LM_PROMPT_TOKENS = 64
SUMMARY_SOURCE_TOKENS = 384


def context(checkpoint: str | Path) -> int:
    """The engine's context for ``checkpoint``: ``CONTEXT``, at most the model's positions."""
    config = json.loads((Path(checkpoint) / "config.json").read_text())
    return min(CONTEXT, config.get("max_position_embeddings") or CONTEXT)


def build(checkpoint: str, store_root: str) -> dict:
    """Build the expert store from scratch; its time and peak RSS above the libraries."""
    from swapmoe.executor.store_build import ensure_store, meta_model

    meta_model(Path(checkpoint))  # transformers' lazy imports belong to the libraries
    libraries = reset_peak_rss()
    start = time.perf_counter()
    store = ensure_store(Path(checkpoint), Path(store_root), log=lambda _: None)
    seconds = time.perf_counter() - start
    size = sum(p.stat().st_size for p in store.iterdir() if p.is_file())
    return dict(seconds=seconds, peak_above_libraries=process_peak_rss() - libraries, libraries=libraries,
                store_bytes=size)


def _prompt(engine, encoder_decoder: bool) -> list[tuple[int, ...]]:
    """Two prompts from the shipped held-out text: a first (start-up to first token) and a measured one."""
    from swapmoe.models.corpus import load_eval

    if encoder_decoder:
        texts = [r["body"] for r in load_eval("summarization") if len(r["body"]) > 4 * SUMMARY_SOURCE_TOKENS][:2]
        length = SUMMARY_SOURCE_TOKENS
    else:
        texts = [r["text"] for r in load_eval("prose")[:2]]
        length = LM_PROMPT_TOKENS
    return [engine.tokenize(t)[:length] for t in texts]


def serve(checkpoint: str, store_root: str, budget: int, method: str, bandwidth: int, tokens: int,
          plan: list[int] | None = None, update_frequency: int = 4, state_dir: str | None = None) -> dict:
    """Start an engine under ``budget``, switch it to ``method``, and serve two requests of
    ``tokens`` new tokens: start-up to the first token, then time to first token, tokens/s
    (or, for an encoder-decoder, the summary's latency), expert loads and memory."""
    import torch

    from benchmarks.memory import import_libraries
    from swapmoe.core.plan import Plan, Strategy
    from swapmoe.executor.engine import Engine, EngineConfig
    from swapmoe.executor.requests import GenerationRequest

    import_libraries(Path(checkpoint))
    libraries = reset_peak_rss()
    start = time.perf_counter()
    engine = Engine(EngineConfig(Path(checkpoint), budget, max_batch=1, max_context=context(checkpoint),
                                 store_root=Path(store_root), load_bandwidth=bandwidth,
                                 state_dir=Path(state_dir) if state_dir else None))
    constructed = time.perf_counter() - start
    try:
        layers = [l.num_experts for l in engine.layout.layers]
        # The planner's plan is for virtual experts; the baselines keep the even split (an LRU cache
        # or a pruned model does best with the same number of slots in every layer).
        kept = tuple(plan) if plan and method == "virtual experts" else engine.plan.experts_per_layer
        chosen = {
            "virtual experts": Plan(engine.plan.version + 1, kept, update_frequency, origin="benchmark"),
            "pruning": Plan(engine.plan.version + 1, kept, 0, origin="benchmark"),
            "on-demand": Plan(engine.plan.version + 1, kept, 0, Strategy.ON_DEMAND, origin="benchmark"),
            "full model": Plan(engine.plan.version + 1, tuple(layers), 0, origin="benchmark"),
        }[method]
        if method != "virtual experts" or plan:  # else the executor's own plan, as it started
            result = engine.apply_plan(chosen)
            if not result.accepted:
                raise RuntimeError(f"{method}: plan refused: {result.reason}")
        encoder_decoder = engine.layout.encoder_decoder
        prompts = _prompt(engine, encoder_decoder)
        first = _timed(engine, GenerationRequest(prompts[0], tokens))
        startup_to_first_token = constructed + first["ttft"]
        before = engine.load_counters()
        measured = _timed(engine, GenerationRequest(prompts[1], tokens))
        loads = engine.load_counters() - before
        report = engine.memory()
        return dict(
            method=method, budget=budget, bandwidth=bandwidth, plan=list(engine.plan.experts_per_layer),
            update_frequency=engine.plan.update_frequency, strategy=engine.plan.strategy.value,
            constructed=constructed, startup_to_first_token=startup_to_first_token,
            ttft=measured["ttft"], tokens=measured["tokens"], seconds=measured["seconds"],
            tokens_per_s=measured["tokens_per_s"], prompt_tokens=len(prompts[1]),
            loads=loads.loads, read_bytes=loads.nbytes, read_seconds=loads.seconds,
            accounted=report.accounted_bytes, dense=report.dense_bytes, experts=report.expert_bytes,
            peak_above_libraries=process_peak_rss() - libraries, libraries=libraries,
            threads=torch.get_num_threads(), tier=engine.load_tier,
        )
    finally:
        engine.close()


def _timed(engine, request) -> dict:
    """One request: time to its first token, tokens, whole latency, decode tokens/s."""
    start = time.perf_counter()
    stamps = []
    for chunk in engine.generate(request):
        stamps.extend([time.perf_counter()] * len(chunk.token_ids))
    if not stamps:
        raise RuntimeError("the engine produced no token")
    decode = stamps[-1] - stamps[0]
    return dict(ttft=stamps[0] - start, tokens=len(stamps), seconds=stamps[-1] - start,
                tokens_per_s=(len(stamps) - 1) / decode if decode > 0 else 0.0)


def min_budget(checkpoint: str, store_root: str) -> dict:
    """The executor's own minimum budget for ``checkpoint`` at the context ``serve`` uses, as its
    refusal of a budget of one byte states it."""
    import re

    from swapmoe.core.errors import InvalidField
    from swapmoe.executor.engine import Engine, EngineConfig

    try:
        Engine(EngineConfig(Path(checkpoint), 1, max_batch=1, max_context=context(checkpoint),
                            store_root=Path(store_root))).close()
    except InvalidField as refusal:
        return dict(min_budget=int(re.search(r"\((\d+) bytes", str(refusal)).group(1)))
    raise RuntimeError("a budget of one byte was accepted")
