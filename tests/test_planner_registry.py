"""The planner's bookkeeping, without a network: registration, ACK/NACK, resync, replanning."""

import pytest

from swapmoe.core.errors import InvalidField
from swapmoe.core.layout import LayerLayout, ModelLayout
from swapmoe.core.limits import MAX_PLAN_VERSION, MAX_VERSION_STEP
from swapmoe.core.plan import BudgetChange, Plan
from swapmoe.planner_service.registration import check_registration
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


def connect(registry: Registry, reg: ppb.Registration):
    """Registers as the server does: checked first, then the registry."""
    return registry.connect(check_registration(reg))[0]


def ack(version: int, accepted: bool = True) -> common_pb2.PlanResult:
    return common_pb2.PlanResult(plan_version=version, accepted=accepted, reason="" if accepted else "no")


def test_a_new_executor_gets_an_even_split_of_its_budget_leaving_the_reserve():
    record = connect(Registry(), registration(MIN_BUDGET + 4 * 100))  # room for 2 more experts per layer
    plan = record.outbox.take()
    assert plan.version == 1 and plan.experts_per_layer == (3, 3)
    assert record.state == ppb.PLAN_STATE_PENDING


def test_ack_and_nack_update_the_plan_state():
    registry = Registry()
    record = connect(registry, registration(10**6))
    plan = record.outbox.take()
    registry.on_result(record, ack(plan.version))
    assert record.state == ppb.PLAN_STATE_ACKED and record.acked == plan
    registry.push([], Plan(0, (1, 1)))
    pushed = record.outbox.take()
    assert pushed.version == plan.version + 1
    registry.on_result(record, ack(pushed.version, accepted=False))
    assert record.state == ppb.PLAN_STATE_NACKED and record.acked == plan


def test_a_resyncing_executor_already_running_the_right_plan_gets_nothing_new():
    running = Plan(7, (8, 8), origin="before the planner restarted")
    record = connect(Registry(), registration(10**6, running))
    assert not record.outbox.pending
    assert record.state == ppb.PLAN_STATE_ACKED and record.acked == running


def test_a_plan_the_executor_missed_while_away_is_sent_again_on_reconnect():
    registry = Registry()
    record = connect(registry, registration(10**6))
    missed = record.outbox.take()
    registry.disconnect(record)
    again = connect(registry, registration(10**6))
    assert again.outbox.take() == missed


def test_a_budget_change_is_replanned_with_a_newer_version():
    registry = Registry()
    record = connect(registry, registration(10**6))
    first = record.outbox.take()
    registry.on_result(record, ack(first.version))
    registry.on_budget_change(record, BudgetChange(10**6, MIN_BUDGET))
    replanned = record.outbox.take()
    assert replanned.version > first.version and replanned.experts_per_layer == (1, 1)


def test_a_forgetful_planner_adopts_the_plan_an_executor_runs_instead_of_its_even_split():
    operators = Plan(9, (8, 1), origin="operator")
    record = connect(Registry(), registration(10**6, operators))
    assert not record.outbox.pending and record.acked == operators and record.state == ppb.PLAN_STATE_ACKED


def test_a_pinned_plan_stays_through_budget_changes_and_reconnects_until_a_push_without_a_plan():
    registry = Registry()
    record = connect(registry, registration(10**6))
    registry.on_result(record, ack(record.outbox.take().version))
    registry.push(["n1"], Plan(0, (2, 2), origin="operator"))
    pinned = record.outbox.take()
    registry.on_result(record, ack(pinned.version))
    registry.on_budget_change(record, BudgetChange(10**6, 10**6 - 1))
    assert not record.outbox.pending and record.pinned
    registry.disconnect(record)
    lost = connect(registry, registration(10**6 - 1))  # restarted without its state: runs nothing yet
    assert lost.outbox.take() == pinned and lost.pinned
    registry.push(["n1"], None)
    assert not lost.pinned and lost.outbox.take().experts_per_layer == (8, 8)


def test_a_registration_running_a_version_the_planner_could_never_follow_is_refused():
    """Version 2^53-1 once poisoned a node: no plan could be sent after it, by this planner or a restarted one."""
    with pytest.raises(InvalidField, match=r"registration.current_plan.version: 9007199254740991 is more than "
                                           r"4294967296 past the newest version this planner issued"):
        connect(Registry(), registration(10**6, Plan(MAX_PLAN_VERSION, (8, 8))))
    connect(Registry(), registration(10**6, Plan(MAX_VERSION_STEP, (8, 8))))  # a planner that lost its state


def test_versions_stop_at_the_bound_with_a_clear_error():
    registry = Registry()
    record = connect(registry, registration(10**6, Plan(MAX_VERSION_STEP, (8, 8))))
    record.version = MAX_PLAN_VERSION  # as after 2^21 pushes of the largest step
    with pytest.raises(InvalidField, match="plan.version: no version after"):
        registry.push(["n1"], Plan(0, (1, 1)))
    assert record.version == MAX_PLAN_VERSION


def test_registration_fields_past_their_bounds_name_the_field():
    huge = registration(10**6)
    huge.layout.layers[1].num_experts = 2**32 - 1
    with pytest.raises(InvalidField, match=r"registration.layout.layers\[1\].num_experts"):
        check_registration(huge)
    poor = registration(MIN_BUDGET - 1)
    with pytest.raises(InvalidField, match="registration.budget_bytes: .* below"):
        check_registration(poor)
    small_device = registration(10**6)
    small_device.device.memory_bytes = 10**5
    with pytest.raises(InvalidField, match="registration.budget_bytes: .* above this device's memory"):
        check_registration(small_device)
