import pytest
import torch

from swapmoe.core.errors import InvalidField
from swapmoe.executor.requests import GenerationRequest, SamplingParams
from swapmoe.executor.sampling import choose_token
from swapmoe.executor.text import IncrementalText


def test_greedy_takes_the_most_likely_token():
    assert choose_token(torch.tensor([0.1, 3.0, 0.2]), SamplingParams(), None) == 1


def test_top_k_one_is_greedy_whatever_the_temperature():
    g = torch.Generator().manual_seed(0)
    picks = {choose_token(torch.tensor([0.0, 2.0, 1.9, 1.8]), SamplingParams(temperature=5.0, top_k=1), g)
             for _ in range(50)}
    assert picks == {1}


def test_top_p_keeps_only_the_nucleus():
    g = torch.Generator().manual_seed(0)
    logits = torch.log(torch.tensor([0.6, 0.3, 0.05, 0.05]))
    picks = {choose_token(logits, SamplingParams(temperature=1.0, top_p=0.8), g) for _ in range(200)}
    assert picks == {0, 1}


def test_sampling_with_a_seed_is_reproducible():
    logits = torch.randn(100)
    params = SamplingParams(temperature=1.0)
    draw = lambda: [choose_token(logits, params, torch.Generator().manual_seed(7)) for _ in range(5)]
    assert draw() == draw()


@pytest.mark.parametrize("kwargs, field", [
    (dict(temperature=-1), "sampling.temperature"),
    (dict(top_p=1.5), "sampling.top_p"),
    (dict(top_k=-2), "sampling.top_k"),
])
def test_bad_sampling_parameters_name_the_field(kwargs, field):
    with pytest.raises(InvalidField, match=field):
        SamplingParams(**kwargs)


def test_an_empty_prompt_is_rejected():
    with pytest.raises(InvalidField, match="prompt"):
        GenerationRequest(())


def test_stop_sequences_are_never_streamed():
    text = IncrementalText(("\n\n",))
    assert text.update("def f():") == ("def f():", False)
    assert text.update("def f():\n") == ("", False)  # could be the start of the stop sequence
    assert text.update("def f():\n    x") == ("\n    x", False)
    assert text.update("def f():\n    x\n\nmore") == ("", True)


def test_an_incomplete_character_is_held_back():
    text = IncrementalText(())
    assert text.update("caf\ufffd") == ("caf", False)
    assert text.update("café") == ("é", False)
    assert text.flush("café!") == "!"
