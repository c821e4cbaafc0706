import numpy as np
import pytest

from swapmoe.models import routing_stats as rs


def test_a_token_stream_that_never_changes_experts_repeats_fully():
    choices = np.array([[1, 2]] * 10)
    assert rs.repeat_rate(choices, 4) == 1.0
    assert rs.chance_repeat_rate(choices, 4) == 1.0  # only two experts ever used: chance is also certain


def test_alternating_disjoint_experts_never_repeat_though_chance_says_half():
    choices = np.array([[0, 1], [2, 3]] * 10)
    assert rs.repeat_rate(choices, 4) == 0.0
    assert rs.chance_repeat_rate(choices, 4) == pytest.approx(0.5)


def test_usage_and_concentration():
    uniform = rs.usage(np.arange(16).reshape(-1, 1), 16)
    assert rs.top_share(uniform) == pytest.approx(0.25)
    assert rs.effective_experts(uniform) == pytest.approx(16)
    one = rs.usage(np.zeros((5, 1), dtype=int), 16)
    assert rs.top_share(one) == 1.0 and rs.effective_experts(one) == pytest.approx(1)


def test_similarity_and_divergence_bounds():
    a, b = np.array([1.0, 0, 0]), np.array([0, 0.5, 0.5])
    assert rs.intersection(a, a) == 1.0 and rs.intersection(a, b) == 0.0
    assert rs.jensen_shannon(a, a) == 0.0 and rs.jensen_shannon(a, b) == pytest.approx(1.0)
    assert rs.consecutive_input_similarity([a, a, b]) == pytest.approx(0.5)
