"""What the resident sets move toward: Eq. 1 (``gate``), tokens routed (``count``) or seeded noise
(``random``, the ablation's floor)."""

import pytest
import torch

from swapmoe.executor.virtual_experts import VirtualExperts
from swapmoe.models.tiny import sample_logits

HALF = 4  # of the tiny models' 8 experts per layer


@pytest.fixture
def runtime_for(checkpoint_dirs):
    made = []

    def make(importance="gate", seed=0):
        runtime = VirtualExperts(checkpoint_dirs("mixtral"), log=lambda _: None, importance=importance,
                                 importance_seed=seed)
        runtime.resize([HALF] * runtime.layout.num_layers)
        made.append(runtime)
        return runtime

    yield make
    for runtime in made:
        runtime.close()


def _serve(runtime, passes=6):
    for step in range(passes):
        ids = torch.randint(3, 250, (1, 10), generator=torch.Generator().manual_seed(step))
        sample_logits(runtime.model, "mixtral", ids)


def _move(runtime) -> list[list[int]]:
    """One update that may move a whole layer, its loads landed: the resident sets it reached."""
    runtime.update(max_loads=HALF)
    assert runtime.loader.wait_idle(5)
    runtime.poll()
    return runtime.resident()


def _the_most(values, experts):
    """Whether ``experts`` are a top set of ``values``: none outside ranks above one inside."""
    outside = [v for e, v in enumerate(values) if e not in experts]
    return min(values[e] for e in experts) >= max(outside)


def test_an_unknown_importance_is_refused_naming_the_choices(checkpoint_dirs):
    with pytest.raises(ValueError, match="gate, count, random.*'norms'"):
        VirtualExperts(checkpoint_dirs("mixtral"), log=lambda _: None, importance="norms")


def test_count_moves_the_resident_sets_to_the_most_routed_experts(runtime_for):
    runtime = runtime_for("count")
    _serve(runtime)
    for layer, resident in zip(runtime.layers, _move(runtime)):
        assert _the_most(layer.router.activations.tolist(), resident)


def test_count_ignores_what_eq1_weighs_tokens_by(runtime_for):
    """An expert with a huge ||E_i|| but the fewest tokens: Eq. 1 wants it, counting does not."""
    chosen = {}
    for mode in ("gate", "count"):
        runtime = runtime_for(mode)
        router = runtime.layers[0].router
        _serve(runtime, passes=1)
        rare = min(range(router.num_experts), key=lambda e: (router.activations[e].item(), e))
        router._norms_padded[rare] *= 1e6  # Eq. 1's ||E_i||, as the store's manifest gave it
        _serve(runtime)
        chosen[mode] = (rare, _move(runtime)[0])
    (rare, gate), (_, count) = chosen["gate"], chosen["count"]
    assert rare in gate and rare not in count


def test_random_moves_the_resident_sets_without_any_traffic_where_importance_keeps_them(runtime_for):
    gate, random = runtime_for("gate"), runtime_for("random")
    start = gate.resident()
    assert random.resident() == start  # both filled by the experts' norms
    assert _move(gate) == start  # no token seen: Eq. 1 has no reason to move
    assert _move(random) != start


def test_random_is_reproducible_with_the_same_seed_and_differs_with_another(runtime_for):
    def moves(seed):
        runtime = runtime_for("random", seed)
        sets = []
        for _ in range(3):
            _serve(runtime, passes=2)
            sets.append(_move(runtime))
        runtime.restart([HALF] * runtime.layout.num_layers)  # as freshly built: the draws start over
        _serve(runtime, passes=2)
        return sets, _move(runtime)

    (first, again), (same, _) = moves(0), moves(0)
    assert first == same and again == first[0]
    assert len({str(s) for s in first}) > 1  # it keeps moving
    assert moves(1)[0] != first
