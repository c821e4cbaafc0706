"""The planner's bookkeeping, without a network: registration, ACK/NACK, resync, replanning."""

from swapmoe.core.layout import LayerLayout, ModelLayout
from swapmoe.core.plan import Plan
from swapmoe.planner_service.registry import Registry
from swapmoe.rpc import convert
from swapmoe.v1 import common_pb2, planner_pb2 as ppb

LAYOUT = ModelLayout("mixtral", "MixtralForCausalLM",
                     tuple(LayerLayout(i, f"model.layers.{i}.mlp", 8, 2, 100) for i in range(2)), dense_bytes=1000)
RESERVE = 50
MIN_BUDGET = 1000 + 2 * 100 + RESERVE


def registration(budget: int, plan: Plan | None = None) -> ppb.Registration:
    reg = ppb.Registration(node_id="n1", budget_bytes=budget, min_budget_bytes=MIN_BUDGET,
                           layout=convert.layout_to_pb(LAYOUT), reserve=common_pb2.Reserve(kv_cache_bytes=RESERVE))
    if plan:
        reg.current_plan.CopyFrom(convert.plan_to_pb(plan))
    return reg


def ack(version: int, accepted: bool = True) -> common_pb2.PlanResult:
    return common_pb2.PlanResult(plan_version=version, accepted=accepted, reason="" if accepted else "no")


def test_a_new_executor_gets_an_even_split_of_its_budget_leaving_the_reserve():
    record = Registry().connect(registration(MIN_BUDGET + 4 * 100))  # room for 2 more experts per layer
    plan = record.outbox.get_nowait()
    assert plan.version == 1 and plan.experts_per_layer == (3, 3)
    assert record.state == ppb.PLAN_STATE_PENDING


def test_ack_and_nack_update_the_plan_state():
    registry = Registry()
    record = registry.connect(registration(10**6))
    plan = record.outbox.get_nowait()
    registry.on_result(record, ack(plan.version))
    assert record.state == ppb.PLAN_STATE_ACKED and record.acked == plan
    registry.push([], Plan(0, (1, 1)))
    pushed = record.outbox.get_nowait()
    assert pushed.version == plan.version + 1
    registry.on_result(record, ack(pushed.version, accepted=False))
    assert record.state == ppb.PLAN_STATE_NACKED and record.acked == plan


def test_a_resyncing_executor_already_running_the_right_plan_gets_nothing_new():
    running = Plan(7, (8, 8), origin="before the planner restarted")
    record = Registry().connect(registration(10**6, running))
    assert record.outbox.empty()
    assert record.state == ppb.PLAN_STATE_ACKED and record.acked == running


def test_a_plan_the_executor_missed_while_away_is_sent_again_on_reconnect():
    registry = Registry()
    record = registry.connect(registration(10**6))
    missed = record.outbox.get_nowait()
    registry.disconnect(record)
    again = registry.connect(registration(10**6))
    assert again.outbox.get_nowait() == missed


def test_a_budget_change_is_replanned_with_a_newer_version():
    registry = Registry()
    record = registry.connect(registration(10**6))
    first = record.outbox.get_nowait()
    registry.on_result(record, ack(first.version))
    registry.on_budget_change(record, ppb.BudgetChange(budget_bytes=MIN_BUDGET))
    replanned = record.outbox.get_nowait()
    assert replanned.version > first.version and replanned.experts_per_layer == (1, 1)
