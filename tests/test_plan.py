"""A plan is valid for a model layout, or a precise InvalidField says which field is not."""

import pytest

from swapmoe.core.errors import InvalidField
from swapmoe.core.layout import LayerLayout, ModelLayout
from swapmoe.core.limits import MAX_ROWS
from swapmoe.core.plan import Plan, validate_plan

LAYOUT = ModelLayout("mixtral", "MixtralForCausalLM",
                     tuple(LayerLayout(i, f"model.layers.{i}.mlp", 8, 2, 100) for i in range(3)), dense_bytes=1000)


def test_a_plan_within_each_layers_experts_is_valid():
    for counts in [(1, 8, 4), (1, 1, 1), (8, 8, 8)]:  # inside and at both ends of 1..experts
        assert validate_plan(Plan(1, counts), LAYOUT) is None, counts  # no InvalidField


def test_a_plan_with_the_wrong_number_of_layers_names_the_field():
    with pytest.raises(InvalidField, match=r"plan.experts_per_layer: has 2 entries but the model has 3") as error:
        validate_plan(Plan(1, (4, 4)), LAYOUT)
    assert error.value.field == "plan.experts_per_layer"


@pytest.mark.parametrize("counts, layer", [((9, 4, 4), 0), ((4, 4, 0), 2)])
def test_a_count_outside_one_to_the_layers_experts_names_the_layer(counts, layer):
    with pytest.raises(InvalidField, match=rf"plan.experts_per_layer\[{layer}\]: keeps {counts[layer]} experts"):
        validate_plan(Plan(1, counts), LAYOUT)


@pytest.mark.parametrize("rows", [0, 1, MAX_ROWS])
def test_a_plan_names_its_rows_from_zero_a_full_batch_to_the_most_an_executor_may_decode(rows):
    assert validate_plan(Plan(1, (2, 2, 2), rows=rows), LAYOUT) is None


def test_rows_past_the_most_an_executor_may_decode_name_the_field():
    with pytest.raises(InvalidField, match=rf"^plan.rows: {MAX_ROWS + 1} is outside the allowed range 0 to {MAX_ROWS}$"):
        validate_plan(Plan(1, (2, 2, 2), rows=MAX_ROWS + 1), LAYOUT)
