"""A plan's rows on the executor: at most that many sequences are decoded together, within
--max-batch and what the budget holds beside the plan's experts; the ACK says how many. Every
expert is resident (1 GiB holds the tiny model), so rows change the batch, never the tokens."""

from __future__ import annotations

import threading

import pytest

from swapmoe.core.plan import Plan, PlanResult
from swapmoe.executor import plans
from swapmoe.executor.engine import Engine, EngineConfig
from swapmoe.executor.requests import GenerationRequest

from polling import wait_until

BUDGET = 1 << 30


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    with Engine(EngineConfig(tiny_model_dir, budget_bytes=BUDGET, node_id="rows", max_batch=4)) as engine:
        yield engine


@pytest.fixture(autouse=True)
def full_batch_after(engine):
    """Each test leaves the engine as it starts: every expert resident and a full batch, under 1 GiB."""
    yield
    everything = tuple(layer.num_experts for layer in engine.layout.layers)
    assert apply(engine, rows=0, experts=everything, budget_bytes=BUDGET).accepted
    assert engine.scheduler.limit == 4


def apply(engine: Engine, rows: int, experts: tuple[int, ...] | None = None, budget_bytes: int = 0) -> PlanResult:
    experts = experts or tuple(engine.plan.experts_per_layer)
    return engine.apply_plan(Plan(engine.plan.version + 1, experts, rows=rows, budget_bytes=budget_bytes))


def bytes_for(engine: Engine, rows: int) -> int:
    """A budget that holds the plan's experts and ``rows`` sequences, and no more."""
    return engine.memory_model.plan_bytes(engine.plan.experts_per_layer, rows)


def test_a_plan_with_two_rows_decodes_two_sequences_together_though_the_budget_holds_four(engine):
    assert engine.memory_model.rows_within(engine.plan.experts_per_layer, engine.budget_bytes) == 4
    result = apply(engine, rows=2)
    assert result.accepted and result.reason == ""
    assert result.achieved_rows == engine.scheduler.limit == 2
    assert result.memory.kv_cache_bytes == 2 * engine.memory_model.reserve.kv_cache_bytes
    assert engine.memory().accounted_bytes == bytes_for(engine, 2)
    streams = [engine.generate(GenerationRequest((3, 4), max_new_tokens=3000)) for _ in range(3)]
    for stream in streams[:2]:
        next(stream)
    third = threading.Thread(target=lambda: next(streams[2], None), daemon=True)
    third.start()
    try:
        wait_until(lambda: engine.queue_depth == 1, timeout=10)
        assert engine.running == 2  # the third waits for a row
    finally:
        for stream in streams[:2]:
            stream.close()
        third.join(30)
        streams[2].close()
    wait_until(lambda: engine.running == 0, timeout=10)


def test_a_plan_with_rows_zero_decodes_as_many_as_the_budget_holds(engine):
    assert apply(engine, rows=0).achieved_rows == 4
    result = apply(engine, rows=0, budget_bytes=bytes_for(engine, 3))
    assert result.accepted and result.achieved_rows == engine.scheduler.limit == 3
    assert engine.memory().accounted_bytes == bytes_for(engine, 3) == engine.budget_bytes


def test_a_budget_that_holds_fewer_rows_than_the_plan_names_runs_what_it_holds(engine):
    result = apply(engine, rows=4, budget_bytes=bytes_for(engine, 2))
    assert result.accepted and result.reason == "" and result.achieved_rows == engine.scheduler.limit == 2
    one = apply(engine, rows=3, budget_bytes=bytes_for(engine, 1))  # a plan is accepted when one sequence fits
    assert one.accepted and one.achieved_rows == 1
    back = apply(engine, rows=3, budget_bytes=BUDGET)  # and grows to its rows when the budget does
    assert back.achieved_rows == 3


def test_rows_above_max_batch_run_max_batch_and_the_ack_says_so(engine):
    result = apply(engine, rows=16)
    assert result.accepted and result.achieved_rows == engine.scheduler.limit == 4
    assert result.reason == "rows 16 capped at --max-batch 4"
    assert engine.plan.rows == 16  # the plan is kept as sent: the planner sees what it asked for


def test_a_budget_cut_that_shrinks_the_plan_keeps_its_rows(engine):
    assert apply(engine, rows=3).achieved_rows == 3
    engine.set_budget(engine.min_budget_bytes, "a cut to the minimum")
    assert engine.plan.experts_per_layer == (1,) * engine.layout.num_layers and engine.plan.rows == 3
    assert engine.scheduler.limit == 1
    engine.set_budget(BUDGET, "restored")
    assert engine.scheduler.limit == 3  # the plan's rows, not --max-batch


def test_the_saved_plan_keeps_its_rows_and_an_older_file_without_rows_is_a_full_batch(tmp_path):
    plan = Plan(3, (2, 2), update_frequency=4, origin="planner:test", rows=5)
    plans.save(tmp_path, plan)
    assert plans.load(tmp_path) == plan
    (tmp_path / plans.FILE).write_text('{"version": "3", "experts_per_layer": [2, 2], "update_frequency": 4}')
    assert plans.load(tmp_path) == Plan(3, (2, 2), update_frequency=4)


def test_an_encoder_decoder_model_runs_one_row_whatever_the_plan_names(checkpoint_dirs):
    config = EngineConfig(checkpoint_dirs("switch_transformers"), budget_bytes=BUDGET, node_id="rows-seq2seq")
    with Engine(config) as seq2seq:
        result = seq2seq.apply_plan(Plan(1, seq2seq.plan.experts_per_layer, rows=4))
        assert result.accepted and result.achieved_rows == 1
        assert result.reason == ("rows 4 capped at 1: this model decodes one sequence at a time "
                                 "(encoder-decoder or sliding-window attention)")
