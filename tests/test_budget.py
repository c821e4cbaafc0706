"""The budget arithmetic (E_memory) that the executor checks plans with and the planner searches with."""

import pytest
from hypothesis import given, settings, strategies as st

from swapmoe.core.budget import MemoryModel, Reserve, even_split
from swapmoe.core.errors import InvalidField
from swapmoe.core.layout import LayerLayout, ModelLayout
from swapmoe.core.plan import DEFAULT_UPDATE_FREQUENCY

LAYOUT = ModelLayout("mixtral", "MixtralForCausalLM",
                     tuple(LayerLayout(i, f"model.layers.{i}.mlp", 8, 2, 100) for i in range(3)), dense_bytes=1000)
MODEL = MemoryModel(LAYOUT, Reserve(staging_bytes=10, kv_cache_bytes=20, activation_bytes=30))


def test_a_plan_needs_dense_weights_the_reserve_and_its_slots():
    assert MODEL.fixed_bytes == 1000 + 60
    assert MODEL.plan_bytes((2, 1, 4)) == 1060 + 7 * 100
    assert MODEL.min_budget_bytes == 1060 + 300


def test_a_budget_below_the_minimum_names_the_field_and_the_minimum():
    MODEL.check_budget(MODEL.min_budget_bytes)
    with pytest.raises(InvalidField, match=r"budget_bytes: .* below this model's minimum .*\(1360 bytes") as error:
        MODEL.check_budget(MODEL.min_budget_bytes - 1)
    assert error.value.field == "budget_bytes"


def test_over_budget_says_how_much_a_plan_needs_and_is_empty_when_it_fits():
    assert MODEL.over_budget((2, 2, 2), MODEL.plan_bytes((2, 2, 2))) == ""
    assert MODEL.over_budget((2, 2, 2), 1500) == "plan needs 1.6 KiB (1660 bytes) but the budget is 1.5 KiB (1500 bytes)"


BATCHED = MemoryModel(LAYOUT, Reserve(staging_bytes=10, kv_cache_bytes=20, activation_bytes=30, batch_bytes=250))


def test_plans_leave_room_for_a_full_batch_but_one_sequence_is_the_minimum_and_enough_to_accept():
    assert BATCHED.smallest_plan_bytes == 1060 + 250 + 300 and BATCHED.min_budget_bytes == 1060 + 300
    BATCHED.check_budget(BATCHED.min_budget_bytes)
    assert BATCHED.fit(BATCHED.plan_bytes((2, 2, 2))) == (2, 2, 2)  # a plan made for a budget keeps the batch's room
    assert BATCHED.fit(BATCHED.plan_bytes((2, 2, 2)) - 250) == (1, 1, 1)
    assert BATCHED.over_budget((2, 2, 2), BATCHED.plan_bytes((2, 2, 2)) - 250) == ""  # runs with one sequence
    assert BATCHED.over_budget((2, 2, 2), BATCHED.plan_bytes((2, 2, 2)) - 251) != ""
    # A budget cut keeps the plan while one sequence fits beside it, then cuts experts.
    assert BATCHED.shrink((2, 2, 2), BATCHED.plan_bytes((2, 2, 2)) - 250)[0] == (2, 2, 2)
    assert BATCHED.shrink((2, 2, 2), BATCHED.plan_bytes((2, 2, 2)) - 251)[0] == (2, 2, 1)


def test_fit_splits_what_the_budget_leaves_after_the_fixed_bytes_evenly():
    assert MODEL.fit(MODEL.min_budget_bytes) == (1, 1, 1)
    assert MODEL.fit(MODEL.plan_bytes((4, 4, 4)) + 99) == (4, 4, 4)
    assert MODEL.fit(MODEL.plan_bytes((4, 4, 4)) + 100) == (5, 4, 4)


def test_shrink_keeps_a_fitting_plan_and_cuts_each_layer_to_the_fit_otherwise():
    assert MODEL.shrink((8, 1, 2), MODEL.plan_bytes((8, 1, 2)))[0] == (8, 1, 2)
    assert MODEL.shrink((8, 1, 2), MODEL.plan_bytes((3, 3, 3)))[0] == (3, 1, 2)


def test_executor_and_planner_start_from_the_same_default_plan():
    plan = MODEL.default_plan(MODEL.plan_bytes((2, 2, 2)), version=3, origin="test")
    assert (plan.version, plan.experts_per_layer, plan.update_frequency) == (3, (2, 2, 2), DEFAULT_UPDATE_FREQUENCY)


def test_even_split_spreads_experts_round_robin_within_the_bytes():
    assert even_split(LAYOUT, 300) == (1, 1, 1)
    assert even_split(LAYOUT, 499) == (2, 1, 1)
    assert even_split(LAYOUT, 1200) == (4, 4, 4)
    assert even_split(LAYOUT, 10**9) == (8, 8, 8)


def test_even_split_keeps_one_expert_per_layer_even_without_room():
    assert even_split(LAYOUT, 0) == (1, 1, 1)


def round_robin(layout: ModelLayout, available: int) -> tuple[int, ...]:
    """The definition of an even split, one expert at a time (slow for many experts)."""
    counts = [1] * layout.num_layers
    used, grew = layout.expert_bytes(counts), True
    while grew:
        grew = False
        for i, spec in enumerate(layout.layers):
            if counts[i] < spec.num_experts and used + spec.bytes_per_expert <= available:
                counts[i], used, grew = counts[i] + 1, used + spec.bytes_per_expert, True
    return tuple(counts)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 24), st.integers(1, 300)), min_size=1, max_size=6), st.integers(-50, 20_000))
def test_even_split_is_the_round_robin_split(layers, available):
    layout = ModelLayout("x", "X", tuple(LayerLayout(i, "m", n, 1, b) for i, (n, b) in enumerate(layers)), 0)
    assert even_split(layout, available) == round_robin(layout, available)


def test_even_split_of_billions_of_experts_and_an_exabyte_is_immediate():
    layout = ModelLayout("x", "X", (LayerLayout(0, "m", 2**32 - 1, 1, 1), LayerLayout(1, "m", 7, 1, 2**40)), 0)
    assert even_split(layout, 2**64 - 1) == (2**32 - 1, 7)


def test_a_budget_above_the_devices_memory_names_the_field():
    on_device = MemoryModel(LAYOUT, MODEL.reserve, device_bytes=10_000)
    on_device.check_budget(10_000)
    with pytest.raises(InvalidField, match="budget_bytes: .* above this device's memory"):
        on_device.check_budget(10_001)
    with pytest.raises(InvalidField, match="budget_bytes: .* above the largest budget allowed"):
        MODEL.check_budget(2**64 - 1)


# Batch rows: --max-batch 4, each sequence past the first 50 bytes (batch_bytes holds three).
ROWS = MemoryModel(LAYOUT, Reserve(staging_bytes=10, kv_cache_bytes=20, activation_bytes=30, batch_bytes=150,
                                   sequence_bytes=50))


def test_a_plan_pays_for_each_sequence_past_the_first_and_rows_zero_is_a_full_batch():
    one = 1060 + 6 * 100  # dense, reserve of one sequence, two experts in each of three layers
    assert ROWS.reserve.max_rows == 4
    assert ROWS.plan_bytes((2, 2, 2), 1) == one
    assert ROWS.plan_bytes((2, 2, 2), 3) == one + 2 * 50
    assert ROWS.plan_bytes((2, 2, 2), 0) == ROWS.plan_bytes((2, 2, 2), 4) == ROWS.plan_bytes((2, 2, 2)) == one + 150


def test_plan_bytes_of_columns_of_plans_is_one_figure_per_plan():
    import numpy as np

    experts = np.array([[2, 1, 8], [2, 1, 8], [2, 1, 8]])  # [layers, N]
    rows = np.array([3, 1, 0])  # [N]
    assert ROWS.plan_bytes(experts, rows).tolist() == [ROWS.plan_bytes((2, 2, 2), 3), ROWS.plan_bytes((1, 1, 1), 1),
                                                        ROWS.plan_bytes((8, 8, 8), 0)]


def test_rows_within_is_the_most_sequences_the_budget_holds_beside_the_experts():
    one = ROWS.plan_bytes((2, 2, 2), 1)
    assert ROWS.rows_within((2, 2, 2), one) == 1
    assert ROWS.rows_within((2, 2, 2), one + 49) == 1
    assert ROWS.rows_within((2, 2, 2), one + 50) == 2
    assert ROWS.rows_within((2, 2, 2), one + 2 * 50 + 49) == 3
    assert ROWS.rows_within((2, 2, 2), 10**9) == 4  # never past --max-batch
    assert ROWS.rows_within((2, 2, 2), one - 1) == 1  # plans are checked for one sequence


def test_the_minimum_budget_is_one_expert_per_layer_and_one_sequence():
    assert ROWS.min_budget_bytes == ROWS.plan_bytes((1, 1, 1), 1) == 1060 + 300
    ROWS.check_budget(ROWS.min_budget_bytes)
    with pytest.raises(InvalidField, match="budget_bytes"):
        ROWS.check_budget(ROWS.min_budget_bytes - 1)
    assert ROWS.over_budget((2, 2, 2), ROWS.plan_bytes((2, 2, 2), 1)) == ""  # a plan is accepted with one sequence


def test_a_reserve_without_sequence_bytes_plans_for_its_full_batch_as_before():
    """From an executor that does not say its bytes per sequence: a plan's bytes are the full batch's
    (rows 0 or any but one), the minimum is one sequence, and it decodes one row as far as plans know."""
    assert BATCHED.reserve.max_rows == 1
    assert BATCHED.plan_bytes((2, 2, 2)) == BATCHED.plan_bytes((2, 2, 2), 0) == BATCHED.fixed_bytes + 600
    assert BATCHED.plan_bytes((2, 2, 2), 1) == BATCHED.fixed_bytes - 250 + 600
    assert BATCHED.min_budget_bytes == 1060 + 300
    assert BATCHED.rows_within((2, 2, 2), 10**9) == BATCHED.rows_within((2, 2, 2), BATCHED.min_budget_bytes) == 1


QUANTIZED = MemoryModel(ModelLayout("mixtral", "MixtralForCausalLM", tuple(
    LayerLayout(i, f"model.layers.{i}.mlp", 8, 2, 100, (("bfloat16", 50), ("int4", 15))) for i in range(3)),
    dense_bytes=1000), Reserve(staging_bytes=10, kv_cache_bytes=20, activation_bytes=30))


def test_a_plans_experts_are_counted_at_its_precision_per_layer():
    assert QUANTIZED.plan_bytes((2, 1, 4), 1, ("int4", "", "bfloat16")) == 1060 + 2 * 15 + 100 + 4 * 50
    assert QUANTIZED.fit(1060 + 8 * 3 * 15, precision=("int4",) * 3) == (8, 8, 8)  # every expert at int4
    assert QUANTIZED.fit(1060 + 8 * 3 * 15) == (1, 1, 1)  # the same bytes hold one each at the checkpoint's


def test_the_minimum_budget_is_one_expert_per_layer_at_its_smallest_precision():
    assert QUANTIZED.layout.smallest_precision == ("int4",) * 3
    assert QUANTIZED.min_budget_bytes == 1060 + 3 * 15


def test_a_budget_cut_cuts_experts_at_the_plans_precision_and_lowers_it_only_when_one_per_layer_no_longer_fits():
    assert QUANTIZED.shrink((4, 4, 4), 1060 + 600) == ((2, 2, 2), ())
    assert QUANTIZED.shrink((4, 4, 4), 1060 + 150) == ((4, 3, 3), ("int4",) * 3)  # 100 a layer no longer fits
    assert QUANTIZED.default_plan(1060 + 299, 1, "test").precision == ("int4",) * 3
    assert QUANTIZED.default_plan(1060 + 300, 1, "test").precision == ()
