"""Expert updates are decided off the forward thread; routing tables change only between passes."""

import threading

import pytest
import torch

from swapmoe.executor.updater import PendingTables, Worker
from swapmoe.executor.virtual_experts import VirtualExperts
from swapmoe.models.tiny import sample_logits


def test_a_worker_runs_each_kick_on_its_own_thread_with_everything_kicked_since_its_last_run():
    runs, gate = [], threading.Event()

    def work(due):
        gate.wait(5)
        runs.append((threading.current_thread().name, due))

    worker = Worker(work, "test-worker")
    try:
        worker.kick([1])
        worker.kick([2, 3])  # while the first run waits at the gate, or before it starts
        worker.kick()
        gate.set()
        assert worker.wait_idle(5)
        assert {name for name, _ in runs} == {"test-worker"}
        assert set().union(*(due for _, due in runs)) == {1, 2, 3}
        assert len(runs) <= 2
    finally:
        worker.close()


def test_a_failing_run_is_logged_and_the_worker_serves_the_next_kick(caplog):
    seen = []

    def work(due):
        if not seen:
            seen.append("failed")
            raise RuntimeError("boom")
        seen.append(sorted(due))

    worker = Worker(work, "test-worker")
    try:
        worker.kick([1])
        assert worker.wait_idle(5)
        worker.kick([2])
        assert worker.wait_idle(5)
    finally:
        worker.close()
    assert seen == ["failed", [2]]
    assert "expert update failed" in caplog.text


def test_the_pending_tables_keep_each_layers_newest_tables_and_every_load_in_order():
    box = PendingTables()
    box.post(0, "old tables", ["load a"])
    box.post(1, "tables of 1")
    box.post(0, "new tables", ["load b"])
    tables, loads = box.take()
    assert tables == {0: "new tables", 1: "tables of 1"} and loads == ["load a", "load b"]
    assert box.take() == ({}, [])


@pytest.fixture
def half_runtime(checkpoint_dirs, tmp_path):
    runtime = VirtualExperts(checkpoint_dirs("mixtral"), store_root=tmp_path, log=lambda _: None,
                             background_updates=True)
    runtime.resize([max(1, l.num_experts // 2) for l in runtime.layout.layers])
    yield runtime
    runtime.close()


def test_between_passes_hands_decisions_to_the_updater_thread(half_runtime, monkeypatch):
    runtime = half_runtime
    threads = []
    decide = runtime._decide

    def spy(layers, max_loads):
        if layers:
            threads.append(threading.current_thread().name)
        return decide(layers, max_loads)

    monkeypatch.setattr(runtime, "_decide", spy)
    runtime.begin_input()
    for step in range(8):
        ids = torch.randint(3, 250, (1, 6), generator=torch.Generator().manual_seed(step))
        with torch.inference_mode():
            runtime.model(input_ids=ids)
        runtime.between_passes(update_frequency=1)
        runtime.wait_for_loads()
    assert threads and set(threads) == {"expert-updater"}
    assert runtime.stats.loads_finished > 0


def test_routing_tables_change_only_when_the_forward_thread_installs_them(half_runtime):
    """The updater's decisions wait in the pending tables: a pass before the next ``between_passes``
    routes exactly as before them, and their loads start only once their tables are installed."""
    runtime = half_runtime
    sample_logits(runtime.model, "mixtral")  # importance: some absent experts are now wanted
    before = sample_logits(runtime.model, "mixtral")
    tables = [(l.experts.slots, l.router.resident) for l in runtime.layers]
    loads_before = runtime.io.snapshot().loads
    runtime.updater.kick(range(len(runtime.layers)))
    assert runtime.updater.wait_idle(5)
    assert runtime.stats.loads_started > 0  # decided...
    assert runtime.loader.wait_idle(5) and runtime.io.snapshot().loads == loads_before  # ...none started
    assert all(l.experts.slots is s and l.router.resident is r for l, (s, r) in zip(runtime.layers, tables))
    torch.testing.assert_close(sample_logits(runtime.model, "mixtral"), before, rtol=0, atol=0)
    runtime.between_passes(update_frequency=0)  # installs the tables, then starts their loads
    runtime.wait_for_loads()
    assert runtime.io.snapshot().loads > loads_before
    runtime.between_passes(update_frequency=0)  # the loaded experts' tables
    assert any(not torch.equal(l.router.resident, r) for l, (_, r) in zip(runtime.layers, tables))
