"""Continuous batching on the executor: concurrent generations share forward passes, and each
streams the tokens it would have streamed alone (greedy, and seeded sampling), whoever joins or
leaves the batch meanwhile. Every expert is resident (1 GiB holds the tiny model), so the
resident set cannot differ between a batched and a solo run."""

from __future__ import annotations

import contextlib
import threading

import pytest

from swapmoe.core.errors import Busy
from swapmoe.executor.engine import Engine, EngineConfig
from swapmoe.executor.requests import GenerationRequest, SamplingParams
from swapmoe.models.tiny import save_tiny_model

from polling import wait_until

PROMPTS = [(5, 9, 14, 3), (7,), (11, 2, 8, 30, 41, 6, 19), (21, 4)]
SAMPLINGS = [SamplingParams(), SamplingParams(temperature=0.8, seed=7), SamplingParams(temperature=1.2, top_k=20, seed=3),
             SamplingParams(temperature=0.9, top_p=0.8, seed=11)]


@pytest.fixture(scope="module")
def batched(tmp_path_factory):
    model = save_tiny_model("mixtral", tmp_path_factory.mktemp("batched-mixtral"), max_position_embeddings=4096)
    with Engine(EngineConfig(model, budget_bytes=1 << 30, node_id="batched", max_batch=4, max_queue=1)) as engine:
        yield engine


def tokens(engine, request, into=None, close_after=None) -> list[int]:
    made = [] if into is None else into
    stream = engine.generate(request)
    for chunk in stream:
        made += chunk.token_ids
        if close_after is not None and len(made) >= close_after:
            stream.close()
            break
    return made


@contextlib.contextmanager
def counting_passes(engine):
    """A counter of the model's forward passes (a hook on its top module) while inside."""
    count = [0]
    hook = engine.model.register_forward_hook(lambda *_: count.__setitem__(0, count[0] + 1))
    try:
        yield count
    finally:
        hook.remove()


def concurrently(engine, requests, options: dict[int, dict] | None = None) -> list[list[int]]:
    """Each request's tokens, generated on threads of their own at once; ``options`` by index
    go to ``tokens`` (e.g. ``close_after``)."""
    results = [[] for _ in requests]
    threads = [threading.Thread(target=tokens, args=(engine, r, results[i]), kwargs=(options or {}).get(i, {}))
               for i, r in enumerate(requests)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    return results


def test_concurrent_generations_share_forward_passes_and_each_equals_its_solo_run(batched):
    requests = [GenerationRequest(p, max_new_tokens=12 + 3 * i, sampling=s)
                for i, (p, s) in enumerate(zip(PROMPTS, SAMPLINGS))]
    alone = [tokens(batched, r) for r in requests]
    with counting_passes(batched) as counted:
        together = concurrently(batched, requests)
    assert together == alone
    made = sum(len(t) for t in together)
    assert counted[0] < made, f"{counted[0]} forward passes for {made} tokens: the streams did not share passes"


def test_a_generation_closed_mid_batch_leaves_the_others_to_finish_as_they_would_alone(batched):
    requests = [GenerationRequest(p, max_new_tokens=16, sampling=s) for p, s in zip(PROMPTS[:3], SAMPLINGS[:3])]
    alone = [tokens(batched, r) for r in requests]
    together = concurrently(batched, requests, {1: {"close_after": 3}})
    assert together[0] == alone[0] and together[2] == alone[2]
    assert together[1] == alone[1][:len(together[1])] and len(together[1]) < 16
    wait_until(lambda: batched.running == 0 and batched.queue_depth == 0, timeout=10)


def test_past_the_batch_and_the_queue_a_request_is_busy_and_the_waiting_one_runs_later(batched):
    long = GenerationRequest((3, 4), max_new_tokens=3000)
    streams = [batched.generate(long) for _ in range(4)]
    for stream in streams:
        next(stream)  # four rows running
    waiting = threading.Thread(target=tokens, args=(batched, GenerationRequest((5,), max_new_tokens=2)))
    waiting.start()
    wait_until(lambda: batched.queue_depth == 1, timeout=10)
    with pytest.raises(Busy, match="max_queue 1"):
        next(batched.generate(GenerationRequest((6,), max_new_tokens=2)))
    assert batched.running == 4
    streams[0].close()
    waiting.join(30)
    assert not waiting.is_alive()
    for stream in streams[1:]:
        stream.close()
    wait_until(lambda: batched.running == 0, timeout=10)


def test_the_budget_accounts_for_the_kv_cache_of_every_row_and_holds_with_the_batch_full(batched):
    reserve = batched.memory_model.reserve
    assert batched.scheduler.limit == batched.scheduler.capacity == 4
    assert reserve.batch_bytes == 3 * batched.sequence_bytes and batched.sequence_bytes > reserve.kv_cache_bytes > 0
    streams = [batched.generate(GenerationRequest((3, 4), max_new_tokens=3000)) for _ in range(4)]
    for stream in streams:
        next(stream)
    assert batched.running == 4
    full = batched.memory()
    assert full.kv_cache_bytes == 4 * reserve.kv_cache_bytes
    assert full.dense_bytes + full.expert_bytes + full.kv_cache_bytes + full.activation_bytes <= full.budget_bytes
    for stream in streams:
        stream.close()
    wait_until(lambda: batched.running == 0, timeout=10)


@pytest.mark.slow
def test_a_budget_cut_takes_rows_out_of_the_batch_before_slots_and_every_stream_still_equals_its_solo_run(batched):
    before, plan = batched.budget_bytes, batched.plan
    requests = [GenerationRequest(p, max_new_tokens=30) for p in PROMPTS]
    alone = [tokens(batched, r) for r in requests]
    # Room for the plan and two sequences: two of the four rows wait, the slots stay.
    one = batched.memory_model.plan_bytes(plan.experts_per_layer) - batched.memory_model.reserve.batch_bytes
    cut = one + batched.sequence_bytes
    streams = [batched.generate(r) for r in requests]
    made = [list(next(stream).token_ids) for stream in streams]
    try:
        batched.set_budget(cut, "a cut while the batch runs")
        assert batched.scheduler.limit == 2 and batched.plan == plan and batched.running <= 2
        memory = batched.memory()
        assert memory.dense_bytes + memory.expert_bytes + memory.kv_cache_bytes + memory.activation_bytes <= cut
        for so_far, stream in zip(made, streams):
            for chunk in stream:
                so_far += chunk.token_ids
        assert made == alone
    finally:
        batched.set_budget(before, "restored")
    assert batched.scheduler.limit == 4 and batched.plan == plan
