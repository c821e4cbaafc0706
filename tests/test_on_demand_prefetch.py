"""On demand with speculative prefetch: while layer l routes, layer l+1's router guesses from the
same hidden state and its guessed experts load in the background. Exact all the same."""

import threading
import time

import pytest
import torch
from transformers import DynamicCache

from swapmoe.core.plan import Strategy
from swapmoe.executor.adapters import adapter_for, find_moe_blocks
from swapmoe.executor.checkpoint import load_checkpoint
from swapmoe.executor.virtual_experts import VirtualExperts
from swapmoe.models.tiny import SAMPLE_INPUT, sample_logits, save_tiny_model

HALF = 4  # of the tiny models' 8 experts per layer


@pytest.fixture(scope="module")
def deep(tmp_path_factory):
    """Tiny checkpoints with 4 decoder layers (the shared ones have 2: one guess per pass)."""
    built = {}

    def get(arch):
        if arch not in built:
            built[arch] = save_tiny_model(arch, tmp_path_factory.mktemp(f"deep-{arch}"), num_hidden_layers=4)
        return built[arch]

    return get


@pytest.fixture
def runtime_for(deep):
    made = []

    def make(arch, capacity=HALF, strategy=Strategy.ON_DEMAND, checkpoint=None, **options):
        runtime = VirtualExperts(checkpoint or deep(arch), log=lambda _: None, **options)
        runtime.resize([capacity] * runtime.layout.num_layers)
        runtime.set_strategy(strategy)
        made.append(runtime)
        return runtime

    yield make
    for runtime in made:
        runtime.close()


def _generate(model, runtime=None, steps=12, settle=False) -> torch.Tensor:
    """Greedy decoding of the sample input with a KV cache: the last position's logits of each pass
    (the runtime's turn between passes, as serving takes it; ``settle``: its loads awaited)."""
    cache, ids, logits = DynamicCache(config=model.config), SAMPLE_INPUT, []
    with torch.inference_mode():
        for _ in range(steps + 1):
            logits.append(model(input_ids=ids, cache=cache, use_cache=True).logits[:, -1])
            ids = logits[-1].argmax(-1, keepdim=True)
            if runtime is not None:
                runtime.between_passes(1)
                if settle:
                    runtime.wait_for_loads()
    return torch.cat(logits)


def _assert_every_slot_accounted_for_and_holding_its_expert(runtime, reference):
    adapter = adapter_for(reference)
    for layer, block in zip(runtime.layers, find_moe_blocks(reference)):
        pool = layer.pool
        assert len(pool.ready) + len(pool.loading) + len(pool.free) == pool.capacity  # none lost to a double load
        for expert, slot in pool.ready.items():
            for got, want in zip(layer.experts.slot_tensors(slot).values(), adapter.expert_tensors(block.experts, expert),
                                 strict=True):
                assert torch.equal(got, want.detach()), f"slot {slot} does not hold expert {expert}"


@pytest.mark.parametrize("arch", ["mixtral", "qwen2_moe", "olmoe", "deepseek_v3"])
def test_with_prefetch_a_generation_equals_the_unmodified_model(arch, deep, runtime_for):
    reference = load_checkpoint(deep(arch)).model
    runtime = runtime_for(arch, prefetch=True)
    torch.testing.assert_close(_generate(runtime.model, runtime), _generate(reference), rtol=1e-5, atol=1e-5)
    assert runtime.stats.prefetch_loads > 0
    runtime.wait_for_loads()
    runtime.poll()
    _assert_every_slot_accounted_for_and_holding_its_expert(runtime, reference)


def test_a_guess_still_loading_is_waited_for_and_never_routed_to_before(monkeypatch, deep, runtime_for):
    reference = load_checkpoint(deep("mixtral")).model
    runtime = runtime_for("mixtral", capacity=2, prefetch=True)
    copy = runtime.loader._copier.copy

    def slow_copy(*args):  # every prefetch is still loading when its layer runs
        time.sleep(0.02)
        return copy(*args)

    monkeypatch.setattr(runtime.loader._copier, "copy", slow_copy)
    waits, wait_for = [], runtime.loader.wait_for
    monkeypatch.setattr(runtime.loader, "wait_for", lambda load, timeout=None: waits.append(load) or wait_for(load))
    routed_while_loading = []
    for layer in runtime.layers:
        def check(module, args, pool=layer.pool):  # the slots a pass computes with, against those being written
            slots = set(args[1][args[1] < module.num_experts].flatten().tolist())
            routed_while_loading.extend(slots & set(pool.loading.values()))
        layer.experts.inner.register_forward_pre_hook(check)
    torch.testing.assert_close(_generate(runtime.model, runtime), _generate(reference), rtol=1e-5, atol=1e-5)
    assert waits and runtime.stats.prefetch_hits > 0
    assert not routed_while_loading
    runtime.wait_for_loads()
    runtime.poll()
    _assert_every_slot_accounted_for_and_holding_its_expert(runtime, reference)


def test_a_failed_prefetch_is_loaded_when_needed_and_the_generation_stays_exact(monkeypatch, deep, runtime_for):
    reference = load_checkpoint(deep("mixtral")).model
    runtime = runtime_for("mixtral", prefetch=True)
    copy, failed = runtime.loader._copier.copy, []

    def fail_twice(*args):
        if len(failed) < 2:
            failed.append(args[:2])
            raise OSError(5, "Input/output error (injected)")
        return copy(*args)

    monkeypatch.setattr(runtime.loader._copier, "copy", fail_twice)
    torch.testing.assert_close(_generate(runtime.model, runtime), _generate(reference), rtol=1e-5, atol=1e-5)
    assert len(failed) == 2 and runtime.stats.failed_loads == 2
    runtime.wait_for_loads()
    runtime.poll()
    _assert_every_slot_accounted_for_and_holding_its_expert(runtime, reference)


def test_switch_guesses_its_decoder_experts_from_the_encoder_exactly(checkpoint_dirs, runtime_for):
    checkpoint = checkpoint_dirs("switch_transformers")
    reference = sample_logits(load_checkpoint(checkpoint).model, "switch_transformers")
    runtime = runtime_for("switch_transformers", capacity=2, checkpoint=checkpoint, prefetch=True)
    for _ in range(3):
        torch.testing.assert_close(sample_logits(runtime.model, "switch_transformers"), reference, rtol=1e-5, atol=1e-5)
    assert runtime.stats.prefetch_loads > 0


def test_prefetch_hits_and_spares_synchronous_loads(runtime_for):
    plain, prefetching = runtime_for("mixtral"), runtime_for("mixtral", prefetch=True)
    _generate(plain.model, plain)
    _generate(prefetching.model, prefetching)
    assert plain.stats.prefetch_loads == plain.stats.prefetch_hits == 0
    assert 0 < prefetching.stats.prefetch_hits <= prefetching.stats.prefetch_loads
    assert prefetching.stats.on_demand_loads < plain.stats.on_demand_loads


def test_without_prefetch_on_demand_loads_only_synchronously_as_before(deep, runtime_for):
    reference = load_checkpoint(deep("mixtral")).model
    default = runtime_for("mixtral")  # prefetch is off unless asked for
    assert not default.on_demand.prefetch
    assert all(layer.router.after_route is None for layer in default.layers)
    reads_at_start = default.io.snapshot().loads
    torch.testing.assert_close(_generate(default.model, default), _generate(reference), rtol=1e-5, atol=1e-5)
    stats = default.stats
    assert stats.on_demand_loads == sum(layer.pool.misses for layer in default.layers) > 0  # each miss: one read
    assert stats.loads_started == stats.loads_finished == stats.prefetch_loads == stats.prefetch_hits == 0
    assert stats.prefetch_cancelled == stats.prefetch_waits == stats.prefetch_wasted_waits == 0
    assert stats.prefetch_wait_s == 0.0
    assert default.io.snapshot().loads - reads_at_start == stats.on_demand_loads  # the loader never ran
    assert default.loader.wait_idle(0)


def test_prefetch_does_nothing_under_the_other_strategies(runtime_for):
    plain = runtime_for("mixtral", strategy=Strategy.MASKED_GATING)
    asked = runtime_for("mixtral", strategy=Strategy.MASKED_GATING, prefetch=True)
    assert all(layer.router.after_route is None for layer in asked.layers)
    torch.testing.assert_close(_generate(asked.model, asked, settle=True), _generate(plain.model, plain, settle=True),
                               rtol=0, atol=0)
    assert asked.stats.prefetch_loads == 0
    asked.set_strategy(Strategy.ON_DEMAND)  # and it starts with on demand
    assert all(layer.router.after_route is not None for layer in asked.layers[:-1])
    asked.set_strategy(Strategy.SKIP)
    assert all(layer.router.after_route is None for layer in asked.layers)


def test_a_guess_is_not_one_of_the_routings_the_model_reports(deep, runtime_for):
    """transformers records router logits by hooks on the routers: a guess runs a router outside its layer."""
    reference = load_checkpoint(deep("mixtral")).model
    runtime = runtime_for("mixtral", prefetch=True)
    with torch.inference_mode():
        want = reference(input_ids=SAMPLE_INPUT, output_router_logits=True)
        got = runtime.model(input_ids=SAMPLE_INPUT, output_router_logits=True)
    assert runtime.stats.prefetch_loads > 0
    assert len(got.router_logits) == len(want.router_logits)
    torch.testing.assert_close(got.aux_loss, want.aux_loss, rtol=1e-5, atol=1e-5)


def _decode_until_a_guess_is_still_loading(runtime) -> None:
    for token in range(3, 40):
        with torch.inference_mode():
            runtime.model(input_ids=torch.tensor([[token]]))
        if not runtime.loader.wait_idle(0):
            return
    pytest.fail("every guess had loaded by the end of its pass")


def test_a_plan_change_with_prefetches_in_flight_leaves_no_slot_loading_and_stays_exact(monkeypatch, deep,
                                                                                         runtime_for):
    reference = load_checkpoint(deep("mixtral")).model
    runtime = runtime_for("mixtral", prefetch=True)
    copy = runtime.loader._copier.copy
    monkeypatch.setattr(runtime.loader._copier, "copy", lambda *args: time.sleep(0.05) or copy(*args))
    for capacity in (6, 3, HALF):  # grow, shrink, back
        _decode_until_a_guess_is_still_loading(runtime)
        runtime.resize([capacity] * runtime.layout.num_layers)
        assert not any(layer.pool.loading for layer in runtime.layers)
        _assert_every_slot_accounted_for_and_holding_its_expert(runtime, reference)
    _decode_until_a_guess_is_still_loading(runtime)
    runtime.set_strategy(Strategy.MASKED_GATING)
    assert not any(layer.pool.loading for layer in runtime.layers)
    runtime.set_strategy(Strategy.ON_DEMAND)
    torch.testing.assert_close(_generate(runtime.model, runtime, steps=4), _generate(reference, steps=4),
                               rtol=1e-5, atol=1e-5)
    _assert_every_slot_accounted_for_and_holding_its_expert(runtime, reference)


# --- what prefetch may cost the forward pass: at most a wrong guess's copy already under way ------
def _gate(monkeypatch, runtime):
    """The loader's copies wait for the gate (set it to let them run); returns it and the (layer,
    expert) of every copy the loader started, in order."""
    gate, started, copy = threading.Event(), [], runtime.loader._copier.copy

    def gated(*args):
        started.append(tuple(args[:2]))
        assert gate.wait(30), "the gate never opened"
        return copy(*args)

    monkeypatch.setattr(runtime.loader._copier, "copy", gated)
    return gate, started


def _until(condition, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.001)


def test_a_stale_queued_guess_is_cancelled_never_read_and_gives_its_slot_back(monkeypatch, deep, runtime_for):
    reference = load_checkpoint(deep("mixtral")).model
    runtime = runtime_for("mixtral", prefetch=True)
    pool, on_demand = runtime.layers[1].pool, runtime.on_demand
    a, b, c = [e for e in range(pool.num_experts) if e not in pool.ready][:3]
    gate, started = _gate(monkeypatch, runtime)
    before = runtime.io.snapshot()
    with runtime._state:
        on_demand._start_guess(1, [a, b])  # a pass guesses layer 1: a starts copying, b waits in the queue
    _until(lambda: started == [(1, a)])
    slot_of_b = pool.loading[b]
    with runtime._state:
        on_demand._start_guess(1, [c])  # the next pass guesses again before layer 1 ran: b is stale
    assert runtime.stats.prefetch_cancelled == 1 and b not in pool.loading
    assert a in pool.loading  # a copy under way is left to finish
    assert pool.loading[c] == slot_of_b  # b's slot, never written, went to c
    gate.set()
    runtime.wait_for_loads()
    runtime.poll()
    assert started == [(1, a), (1, c)]  # b was never read
    stats = runtime.stats
    assert (runtime.io.snapshot() - before).loads == 2 == stats.prefetch_loads - stats.prefetch_cancelled
    assert list(pool._recency)[:2] in ([a, c], [c, a])  # loaded guesses nobody used yet go first
    _assert_every_slot_accounted_for_and_holding_its_expert(runtime, reference)
    torch.testing.assert_close(_generate(runtime.model, runtime), _generate(reference), rtol=1e-5, atol=1e-5)


def test_a_layer_never_waits_for_a_queued_guess_nor_for_a_wrong_one_being_copied(monkeypatch, deep, runtime_for):
    reference = load_checkpoint(deep("mixtral")).model
    runtime = runtime_for("mixtral", prefetch=True)
    layer, on_demand = runtime.layers[1], runtime.on_demand
    pool = layer.pool
    a, b, c = [e for e in range(pool.num_experts) if e not in pool.ready][:3]
    gate, started = _gate(monkeypatch, runtime)
    with runtime._state:
        on_demand._start_guess(1, [a, b])
    _until(lambda: started == [(1, a)])
    slot_of_b, evicted_for_b = pool.loading[b], pool._guesses[b]
    hit = pool.least_recent(())
    on_demand.load_now(1, [hit])  # both guesses wrong: returns while a's copy is still held at the gate
    assert runtime.stats.prefetch_cancelled == 1 and b not in pool.loading and a in pool.loading
    assert pool.ready[evicted_for_b] == slot_of_b  # b's slot was never written: its expert is back
    assert layer.experts.slots.slot_of[evicted_for_b] == slot_of_b  # and routed to
    on_demand.load_now(1, [b, c])  # still no wait: b and c are read at once
    assert not gate.is_set() and {b, c} <= set(pool.ready) and a in pool.loading
    assert runtime.stats.on_demand_loads == 2
    assert runtime.stats.prefetch_waits == runtime.stats.prefetch_wasted_waits == 0
    gate.set()
    runtime.wait_for_loads()
    runtime.poll()
    assert started == [(1, a)] and a in pool.ready
    assert pool.least_recent(()) == a  # collected but never used: the least recently used
    on_demand.load_now(1, [a])
    assert runtime.stats.prefetch_hits == 1 and list(pool._recency)[-1] == a  # used now: the most recent
    _assert_every_slot_accounted_for_and_holding_its_expert(runtime, reference)


def test_with_a_slow_loader_prefetch_waits_only_for_copies_under_way_and_spares_synchronous_loads(
        monkeypatch, deep, runtime_for):
    """Every guess is still loading when its layer runs. The forward thread never waits for a queued
    guess nor behind one (each wait lasts one copy at most), reads fewer experts synchronously than
    plain on demand does for the same generation, and what it cancelled is never read."""
    reference = load_checkpoint(deep("mixtral")).model
    want, delay = _generate(reference), 0.03
    for capacity in (2, HALF):  # 2: every slot needed by each token's top 2
        plain = runtime_for("mixtral", capacity=capacity)
        prefetching = runtime_for("mixtral", capacity=capacity, prefetch=True)
        copy = prefetching.loader._copier.copy
        monkeypatch.setattr(prefetching.loader._copier, "copy", lambda *args: time.sleep(delay) or copy(*args))
        before = prefetching.io.snapshot()
        torch.testing.assert_close(_generate(plain.model, plain), want, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(_generate(prefetching.model, prefetching), want, rtol=1e-5, atol=1e-5)
        stats = prefetching.stats
        assert stats.prefetch_hits > 0 and stats.prefetch_cancelled > 0
        assert stats.on_demand_loads < plain.stats.on_demand_loads
        waits = stats.prefetch_waits + stats.prefetch_wasted_waits
        assert stats.prefetch_wait_s <= waits * (delay + 0.02)  # one copy each, never a queue of them
        assert waits <= stats.prefetch_loads - stats.prefetch_cancelled  # only started copies, each once
        prefetching.wait_for_loads()
        prefetching.poll()
        read = (prefetching.io.snapshot() - before).loads
        assert read == stats.on_demand_loads + stats.prefetch_loads - stats.prefetch_cancelled  # cancelled: never read
        _assert_every_slot_accounted_for_and_holding_its_expert(prefetching, reference)
