"""The virtual-experts runtime: slots loaded from the expert store, swapped while serving."""

import threading

import pytest
import torch

from swapmoe.core.errors import InvalidField
from swapmoe.core.plan import Plan, Strategy
from swapmoe.executor.adapters import adapter_for, find_moe_blocks
from swapmoe.executor.checkpoint import load_checkpoint
from swapmoe.executor.engine import Engine, EngineConfig
from swapmoe.executor.requests import GenerationRequest
from swapmoe.executor.loader import Load
from swapmoe.executor.virtual_experts import VirtualExperts
from swapmoe.models.tiny import ARCHITECTURES, is_encoder_decoder, sample_logits



@pytest.fixture
def runtime_for(checkpoint_dirs, tmp_path):
    made = []

    def make(arch, capacities=None):
        runtime = VirtualExperts(checkpoint_dirs(arch), store_root=tmp_path, log=lambda _: None)
        runtime.resize(capacities or [l.num_experts for l in runtime.layout.layers])
        made.append(runtime)
        return runtime

    yield make
    for runtime in made:
        runtime.close()


def _half(runtime):
    return [max(1, l.num_experts // 2) for l in runtime.layout.layers]


def _assert_slots_hold_their_experts(runtime, reference):
    adapter = adapter_for(reference)
    for layer, block in zip(runtime.layers, find_moe_blocks(reference)):
        assert layer.pool.ready, "a layer with no resident expert"
        for expert, slot in layer.pool.ready.items():
            want = adapter.expert_tensors(block.experts, expert)
            got = list(layer.experts.slot_tensors(slot).values())
            for g, w in zip(got, want, strict=True):
                assert torch.equal(g, w.detach()), f"{block.name}: slot {slot} does not hold expert {expert}"


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_with_every_expert_in_a_slot_logits_equal_the_unmodified_model(arch, checkpoint_dirs, runtime_for):
    reference = load_checkpoint(checkpoint_dirs(arch)).model
    runtime = runtime_for(arch)
    torch.testing.assert_close(sample_logits(runtime.model, arch), sample_logits(reference, arch), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_on_demand_is_exact_with_half_the_slots(arch, checkpoint_dirs, runtime_for):
    reference = load_checkpoint(checkpoint_dirs(arch)).model
    runtime = runtime_for(arch)
    runtime.resize([1] * runtime.layout.num_layers)  # one slot per layer: the hardest case
    runtime.set_strategy(Strategy.ON_DEMAND)
    torch.testing.assert_close(sample_logits(runtime.model, arch), sample_logits(reference, arch), rtol=1e-5, atol=1e-5)
    assert runtime.stats.on_demand_loads > 0
    _assert_slots_hold_their_experts(runtime, reference)


def _slot_choices(runtime):
    """Per layer, the slots each experts call is asked to run (in slot space)."""
    seen = []
    for index, layer in enumerate(runtime.layers):
        def hook(module, args, index=index):
            routing = args[1]
            if routing.dim() == 3:  # one-hot over slots
                slots = routing.reshape(-1, routing.shape[-1]).nonzero()[:, 1]
            else:
                slots = routing[routing < module.num_experts].flatten()
            seen.append((index, slots.unique().tolist()))
        layer.experts.inner.register_forward_pre_hook(hook)
    return seen


@pytest.mark.parametrize("strategy", [Strategy.MASKED_GATING, Strategy.SKIP])
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_tokens_only_reach_slots_that_hold_a_ready_expert(arch, strategy, runtime_for):
    runtime = runtime_for(arch, None)
    runtime.resize(_half(runtime))
    runtime.set_strategy(strategy)
    runtime.update(max_loads=2)  # some slots are now being loaded in the background
    seen = _slot_choices(runtime)
    sample_logits(runtime.model, arch)
    assert seen
    for index, slots in seen:
        ready_slots = set(runtime.layers[index].pool.ready.values())
        assert set(slots) <= ready_slots


@pytest.mark.parametrize("arch", ["mixtral", "switch_transformers"])
def test_after_many_swaps_every_slot_holds_exactly_its_expert(arch, checkpoint_dirs, runtime_for):
    reference = load_checkpoint(checkpoint_dirs(arch)).model
    runtime = runtime_for(arch)
    runtime.resize(_half(runtime))
    for step in range(12):
        ids = torch.randint(3, 250, (1, 10), generator=torch.Generator().manual_seed(step))
        with torch.inference_mode():
            kw = dict(decoder_input_ids=ids[:, :4]) if is_encoder_decoder(arch) else {}
            runtime.model(input_ids=ids, **kw)
        runtime.update(max_loads=2)
        runtime.loader.wait_idle(5)
        runtime.poll()
    assert runtime.stats.loads_finished > 4
    _assert_slots_hold_their_experts(runtime, reference)
    # Packed experts and Switch's per-expert modules alike are read from disk straight into
    # their page-aligned slots (the staging buffer is for stores without O_DIRECT, below).
    direct = runtime.store.can_read_into(0, runtime.layers[0].experts.slot_tensors(0))
    assert direct == runtime.store.direct


@pytest.mark.parametrize("arch", ["mixtral", "switch_transformers"])
def test_without_direct_reads_experts_go_through_the_staging_buffer(arch, checkpoint_dirs, runtime_for):
    reference = load_checkpoint(checkpoint_dirs(arch)).model
    runtime = runtime_for(arch)
    runtime.store.without_direct_io()  # as on a file system that refuses O_DIRECT reads
    runtime.resize(_half(runtime))
    assert not runtime.store.can_read_into(0, runtime.layers[0].experts.slot_tensors(0))
    runtime.update(max_loads=2)
    runtime.loader.wait_idle(5)
    runtime.poll()
    _assert_slots_hold_their_experts(runtime, reference)


def test_background_loads_never_change_a_concurrent_forward_pass(runtime_for):
    runtime = runtime_for("mixtral")
    runtime.resize(_half(runtime))
    layer = runtime.layers[0]
    reserved = max(layer.pool.ready)  # reserve a slot for loading, as an update does
    layer.pool.evict(reserved)
    [(_, slot)] = layer.pool.fill([reserved])
    runtime._publish_now(0)
    expected = sample_logits(runtime.model, "mixtral")
    stop = threading.Event()

    def hammer():  # keep rewriting the reserved slot with other experts
        expert = 0
        while not stop.is_set():
            runtime.loader.submit(Load(0, expert % layer.pool.num_experts, slot, layer.experts.slot_tensors(slot)))
            runtime.loader.wait_idle(1)
            expert += 1

    writer = threading.Thread(target=hammer)
    writer.start()
    try:
        for _ in range(30):
            torch.testing.assert_close(sample_logits(runtime.model, "mixtral"), expected, rtol=0, atol=0)
    finally:
        stop.set()
        writer.join()
    assert runtime.io.snapshot().loads > 30


def _generate(engine, n=24):
    prompt = tuple(range(5, 25))
    return [c for c in engine.generate(GenerationRequest(prompt, max_new_tokens=n))]


def _model_tensor_bytes(model) -> int:
    tensors = {t.data_ptr(): t for t in [*model.parameters(), *model.buffers()] if t.device.type != "meta"}
    return sum(t.numel() * t.element_size() for t in tensors.values())


def test_a_checkpoint_bigger_than_the_budget_loads_and_generates(checkpoint_dirs):
    with Engine(EngineConfig(checkpoint_dirs("mixtral"), budget_bytes=1 << 30)) as probe:
        full = probe.layout.dense_bytes + probe.layout.expert_bytes([l.num_experts for l in probe.layout.layers])
        budget = probe.memory_model.plan_bytes([2] * probe.layout.num_layers)
    engine = Engine(EngineConfig(checkpoint_dirs("mixtral"), budget_bytes=budget))
    try:
        assert budget < engine.memory_model.fixed_bytes + full - engine.layout.dense_bytes  # the whole model would not fit
        assert engine.achieved == (2,) * engine.layout.num_layers
        chunks = _generate(engine)
        assert chunks[-1].completion_tokens == 24
        assert engine.memory().accounted_bytes <= budget
        assert _model_tensor_bytes(engine.model) <= engine.layout.dense_bytes + engine.experts.slot_bytes()
    finally:
        engine.close()


def test_the_budget_holds_across_swaps_and_live_budget_changes(checkpoint_dirs):
    engine = Engine(EngineConfig(checkpoint_dirs("mixtral"), budget_bytes=1 << 30))
    try:
        engine.apply_plan(Plan(1, _half(engine.experts), update_frequency=2))
        sizes = [engine.memory_model.plan_bytes([n] * engine.layout.num_layers) for n in (3, 1, 4, 2, 8)]
        for budget in sizes:
            engine.set_budget(budget)
            _generate(engine, 8)
            report = engine.memory()
            assert report.accounted_bytes <= budget
            assert _model_tensor_bytes(engine.model) <= report.dense_bytes + engine.experts.slot_bytes()
        assert engine.experts.stats.loads_started > 0
    finally:
        engine.close()


def test_growing_the_budget_fills_the_new_slots_in_the_background(checkpoint_dirs):
    engine = Engine(EngineConfig(checkpoint_dirs("mixtral"), budget_bytes=1 << 30))
    try:
        engine.apply_plan(Plan(1, (1,) * engine.layout.num_layers, update_frequency=1))
        engine.apply_plan(Plan(2, (4,) * engine.layout.num_layers, update_frequency=0))
        routed = lambda: [int(layer.router.resident.sum()) for layer in engine.experts.layers]  # noqa: E731
        assert routed() == [1] * engine.layout.num_layers  # apply_plan did not wait for the loads
        engine.experts.wait_for_loads()
        _generate(engine, 2)  # finished loads become usable between forward passes
        assert routed() == [4] * engine.layout.num_layers
        assert [len(r) for r in engine.experts.resident()] == [4] * engine.layout.num_layers
    finally:
        engine.close()


def _fail_once(monkeypatch, copier):
    original = copier.copy
    calls = []

    def copy(*args):
        calls.append(args)
        if len(calls) == 1:
            raise OSError(5, "Input/output error (injected)")
        return original(*args)

    monkeypatch.setattr(copier, "copy", copy)
    return calls


def test_a_failed_background_load_is_never_published_and_the_loader_keeps_serving(monkeypatch, runtime_for,
                                                                                  checkpoint_dirs):
    runtime = runtime_for("mixtral")
    runtime.resize(_half(runtime))
    sample_logits(runtime.model, "mixtral")  # importance: some absent experts are now wanted
    calls = _fail_once(monkeypatch, runtime.loader._copier)
    assert runtime.update(max_loads=2) > 0
    assert runtime.loader.wait_idle(5)
    runtime.poll()
    assert runtime.stats.failed_loads == 1
    failed_layer, failed_expert = calls[0][0], calls[0][1]
    layer = runtime.layers[failed_layer]
    assert failed_expert not in layer.pool.ready and not layer.pool.loading
    assert not layer.router.resident[failed_expert]
    runtime.update(max_loads=2)  # the loader thread survived: later loads go through
    assert runtime.loader.wait_idle(5)
    runtime.poll()
    _assert_slots_hold_their_experts(runtime, load_checkpoint(checkpoint_dirs("mixtral")).model)


def test_a_failed_on_demand_load_raises_and_leaves_every_mapping_valid(monkeypatch, runtime_for, checkpoint_dirs):
    reference = load_checkpoint(checkpoint_dirs("mixtral")).model
    runtime = runtime_for("mixtral")
    runtime.resize([2] * runtime.layout.num_layers)
    runtime.set_strategy(Strategy.ON_DEMAND)
    _fail_once(monkeypatch, runtime._sync)
    with pytest.raises(OSError, match="injected"):
        sample_logits(runtime.model, "mixtral")
    _assert_slots_hold_their_experts(runtime, reference)
    assert all(len(l.pool.ready) + len(l.pool.free) == l.pool.capacity for l in runtime.layers)
    torch.testing.assert_close(sample_logits(runtime.model, "mixtral"), sample_logits(reference, "mixtral"),
                               rtol=1e-5, atol=1e-5)


def test_a_context_longer_than_the_model_has_positions_is_refused(checkpoint_dirs):
    with pytest.raises(InvalidField, match="max_context: 10000 is above the model's 256 positions"):
        Engine(EngineConfig(checkpoint_dirs("mixtral"), budget_bytes=1 << 30, max_context=10_000))
