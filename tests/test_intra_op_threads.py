"""The forward pass's torch intra-op threads by measurement (``swapmoe.executor.intra_op``): the choice
on hand-made points, the measurement with a load beside it on a real tiny engine, and the count an
executor runs: ``--threads``, the last device profile's choice kept in its state directory, or a
probe at start-up. Timings are never asserted: which count wins depends on the machine."""

import json

import pytest
import torch

from swapmoe.core.device_profile import ThreadPoint
from swapmoe.core.fingerprint import model_fingerprint
from swapmoe.executor.device_profiling import ProfileSpec, measure_threads
from swapmoe.executor.engine import Engine, EngineConfig
from swapmoe.executor.intra_op import (FILE, ThreadKey, choice_json, choose_threads, loads_beside, thread_counts,
                                       usable_cores)
from swapmoe.orchestration.processes import spawn
from swapmoe.profiler.report import load_device, save_device
from swapmoe.rpc import transport
from swapmoe.v1 import executor_pb2 as epb, executor_pb2_grpc

from polling import wait_until
from serving import own_engine

SMALL = ProfileSpec(token_counts=(1,), repeats=2, update_frequencies=(0, 2), sweep_tokens=4)


def points(step_ns: dict[int, int]) -> list[ThreadPoint]:
    return [ThreadPoint(threads, ns) for threads, ns in step_ns.items()]


# --- the choice, on hand-made points ------------------------------------------------------------------
@pytest.mark.parametrize("step_ns, expected", [
    ({1: 200, 2: 100}, 2),  # a second thread halves the pass
    ({1: 50, 2: 80}, 1),  # a second thread fights the load for the cores
    ({1: 100, 2: 100}, 1),  # a tie: the thread is left to loads and RPCs
    ({1: 100, 2: 60, 3: 58, 4: 57}, 3),  # 3 is within 5% of the fastest, 2 is not
    ({4: 57, 1: 100, 3: 58, 2: 60}, 3),  # the order of the points does not matter
    ({1: 100, 2: 96, 3: 200}, 1),  # the fastest is 2, and 1 is within 5% of it
    ({}, 0),  # nothing measured
])
def test_the_fewest_threads_within_the_tolerance_of_the_fastest_win(step_ns, expected):
    assert choose_threads(points(step_ns), tolerance=0.05) == expected


def test_a_wider_tolerance_prefers_fewer_threads():
    measured = points({1: 108, 2: 100})
    assert choose_threads(measured, 0.05) == 2
    assert choose_threads(measured, 0.10) == 1


@pytest.mark.parametrize("cores, counts", [
    (1, (1,)), (2, (1, 2)), (4, (1, 2, 3, 4)), (12, (1, 2, 3, 4, 5, 6, 7, 8, 11, 12)),
    (64, (1, 2, 3, 4, 5, 6, 7, 8, 16, 32, 63, 64)),
])
def test_every_count_up_to_eight_is_measured_then_powers_of_two_and_the_last_two(cores, counts):
    assert thread_counts(cores) == counts


# --- the measurement on a real engine ---------------------------------------------------------------
@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    with own_engine(tiny_model_dir, "threads") as engine:
        yield engine


def test_a_load_runs_beside_without_touching_the_runtimes_counters(engine):
    before = engine.load_counters()
    with loads_beside(engine.experts) as beside:
        wait_until(lambda: beside.snapshot().loads >= 2, what="loads beside")
    assert engine.load_counters() == before


def test_each_count_is_measured_and_the_calling_threads_count_is_restored(engine):
    torch.set_num_threads(1)
    counts = thread_counts(usable_cores())
    measured, chosen = measure_threads(engine.experts, counts, rounds=2, passes=2)
    assert [p.threads for p in measured] == list(counts) and all(p.step_ns > 0 for p in measured)
    assert chosen in counts
    assert torch.get_num_threads() == 1


def test_the_profile_carries_the_thread_points_and_its_choice(engine, tmp_path):
    result = [p for p in engine.profile(SMALL)][-1].result
    counts = thread_counts(usable_cores())
    assert [p.threads for p in result.thread_points] == list(counts)
    assert all(p.step_ns > 0 for p in result.thread_points) and result.threads in counts
    stored = load_device(save_device(tmp_path, result))  # the profiler's copy keeps them
    assert (stored.thread_points, stored.threads) == (result.thread_points, result.threads)
    assert engine.threads.setting.threads == result.threads  # started with --threads 0: runs the choice
    assert engine.loop.call(torch.get_num_threads) == result.threads


# --- which count an executor runs -------------------------------------------------------------------
def key_for(model_dir) -> ThreadKey:
    return ThreadKey(model_fingerprint(model_dir), "cpu", usable_cores())


def save_choice(state_dir, key: ThreadKey, threads: int) -> None:
    state_dir.mkdir(parents=True, exist_ok=True)
    (state_dir / FILE).write_text(choice_json(key, threads, points({1: 300, threads: 200})))


@pytest.mark.parametrize("saved", sorted({1, usable_cores()}))
def test_without_threads_an_engine_runs_the_choice_kept_in_its_state_directory(tiny_model_dir, tmp_path, saved):
    save_choice(tmp_path, key_for(tiny_model_dir), saved)
    with Engine(EngineConfig(tiny_model_dir, budget_bytes=1 << 30, node_id="kept", state_dir=tmp_path)) as engine:
        assert engine.threads.setting.threads == saved
        assert "chosen by the device profile kept in" in engine.threads.setting.reason
        assert engine.loop.call(torch.get_num_threads) == saved  # on the thread that runs the passes


def test_explicit_threads_win_over_the_kept_choice(tiny_model_dir, tmp_path):
    save_choice(tmp_path, key_for(tiny_model_dir), usable_cores())
    config = EngineConfig(tiny_model_dir, budget_bytes=1 << 30, node_id="told", state_dir=tmp_path, threads=3)
    with Engine(config) as engine:
        assert engine.threads.setting.threads == 3 and "--threads 3" in engine.threads.setting.reason
        assert engine.loop.call(torch.get_num_threads) == 3
        [p for p in engine.profile(SMALL)]  # a profile keeps its choice but changes nothing
        assert engine.loop.call(torch.get_num_threads) == 3
    assert json.loads((tmp_path / FILE).read_text())["thread_points"]


@pytest.mark.parametrize("kept", [
    lambda key: choice_json(ThreadKey("another model", key.device, key.cores), 1, ()),
    lambda key: choice_json(ThreadKey(key.model_fingerprint, key.device, key.cores + 1), 1, ()),
    lambda key: "not json",
    lambda key: json.dumps({"threads": 1}),
], ids=["another model", "other cores", "not json", "no key"])
def test_a_choice_for_another_model_or_machine_or_unreadable_is_measured_again(tiny_model_dir, tmp_path, kept):
    (tmp_path / FILE).write_text(kept(key_for(tiny_model_dir)))
    with Engine(EngineConfig(tiny_model_dir, budget_bytes=1 << 30, node_id="probed", state_dir=tmp_path)) as engine:
        setting = engine.threads.setting
        assert setting.threads in thread_counts(usable_cores())
        assert "measured at start-up" in setting.reason or "one core" in setting.reason
        assert engine.loop.call(torch.get_num_threads) == setting.threads


def test_a_profiles_choice_is_kept_and_resumed_after_a_restart(tiny_model_dir, tmp_path):
    config = EngineConfig(tiny_model_dir, budget_bytes=1 << 30, node_id="restarted", state_dir=tmp_path)
    with Engine(config) as engine:
        chosen = [p for p in engine.profile(SMALL)][-1].result.threads
    with Engine(config) as restarted:
        assert restarted.threads.setting.threads == chosen and "kept in" in restarted.threads.setting.reason


@pytest.mark.slow
def test_an_executor_process_started_with_threads_0_runs_the_kept_choice_and_says_so(tiny_model_dir, tmp_path):
    saved = usable_cores()
    save_choice(tmp_path / "state", key_for(tiny_model_dir), saved)
    process = spawn("executor", ["executor", "serve", "--model", str(tiny_model_dir), "--budget", "1GiB",
                                 "--port", "0", "--threads", "0", "--state-dir", str(tmp_path / "state")],
                    log_dir=tmp_path)
    try:
        with transport.channel(process.address) as channel:
            described = executor_pb2_grpc.ExecutorServiceStub(channel).Describe(epb.DescribeRequest(), timeout=10)
        assert described.threads == saved and "kept in" in described.threads_reason
        wait_until(lambda: any(described.threads_reason in line for line in process.output), what="the start note")
    finally:
        process.stop()
