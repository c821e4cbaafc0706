import pytest

from swapmoe.layout import LayerLayout, ModelLayout
from swapmoe.plan import InvalidField, Plan, even_split, validate_plan

LAYOUT = ModelLayout("mixtral", "MixtralForCausalLM",
                     tuple(LayerLayout(i, f"model.layers.{i}.mlp", 8, 2, 100) for i in range(3)), dense_bytes=1000)


def test_a_plan_within_each_layers_experts_is_valid():
    validate_plan(Plan(1, (1, 8, 4)), LAYOUT)


def test_a_plan_with_the_wrong_number_of_layers_names_the_field():
    with pytest.raises(InvalidField, match=r"plan.experts_per_layer: has 2 entries but the model has 3") as error:
        validate_plan(Plan(1, (4, 4)), LAYOUT)
    assert error.value.field == "plan.experts_per_layer"


@pytest.mark.parametrize("counts, layer", [((9, 4, 4), 0), ((4, 4, 0), 2)])
def test_a_count_outside_one_to_the_layers_experts_names_the_layer(counts, layer):
    with pytest.raises(InvalidField, match=rf"plan.experts_per_layer\[{layer}\]: keeps {counts[layer]} experts"):
        validate_plan(Plan(1, counts), LAYOUT)


def test_even_split_spreads_experts_round_robin_within_the_bytes():
    assert even_split(LAYOUT, 300) == (1, 1, 1)
    assert even_split(LAYOUT, 499) == (2, 1, 1)
    assert even_split(LAYOUT, 1200) == (4, 4, 4)
    assert even_split(LAYOUT, 10**9) == (8, 8, 8)


def test_even_split_keeps_one_expert_per_layer_even_without_room():
    assert even_split(LAYOUT, 0) == (1, 1, 1)
