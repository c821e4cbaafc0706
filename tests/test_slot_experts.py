"""A block's experts in slots: routing in expert space reaches the slots that hold them, through
transformers' grouped experts forward, and an assignment to no resident expert adds nothing."""

import copy

import pytest
import torch
from transformers import MixtralConfig
from transformers.models.mixtral.modeling_mixtral import MixtralExperts

from swapmoe.executor.slot_experts import Packed, SlotExperts

EXPERTS, HIDDEN, TOKENS = 6, 16, 9


@pytest.fixture
def original():
    """A real Mixtral experts module (every expert, transformers' eager forward: it skips the
    index E), with random weights."""
    config = MixtralConfig(hidden_size=HIDDEN, intermediate_size=8, num_local_experts=EXPERTS, num_experts_per_tok=2)
    config._experts_implementation = "eager"
    experts = MixtralExperts(config)
    generator = torch.Generator().manual_seed(0)
    for param in experts.parameters():
        param.data = torch.randn(param.shape, generator=generator) * 0.3
    return experts


def slotted(original, ready: dict[int, int], capacity: int) -> SlotExperts:
    """``original``'s experts in ``capacity`` slots (expert -> slot ``ready``), every other slot NaN."""
    inner = copy.deepcopy(original)
    inner.config = copy.copy(original.config)
    inner.config._experts_implementation = "grouped_mm"  # as executor.skeleton builds it
    experts = SlotExperts(inner, Packed, EXPERTS)
    experts.resize(capacity, {}, "cpu")
    for slot in range(capacity):
        for tensor in experts.slot_tensors(slot).values():
            tensor.fill_(float("nan"))
    for expert, slot in ready.items():
        for tensor, source in zip(experts.slot_tensors(slot).values(), Packed.slot_tensors(original, expert).values()):
            tensor.copy_(source)
    experts.install(experts.table(ready))
    return experts


def routing(seed: int = 1):
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(TOKENS, HIDDEN, generator=generator)
    weights, index = torch.rand(TOKENS, EXPERTS, generator=generator).softmax(-1).topk(2, dim=-1)
    return hidden, index, weights


@torch.no_grad()
def test_with_every_expert_in_a_slot_the_output_is_the_original_experts(original):
    hidden, index, weights = routing()
    for ready in ({e: e for e in range(EXPERTS)}, {e: EXPERTS - 1 - e for e in range(EXPERTS)}):
        experts = slotted(original, ready, EXPERTS)
        torch.testing.assert_close(experts(hidden, index, weights), original(hidden, index, weights),
                                   rtol=1e-6, atol=1e-6)


@torch.no_grad()
def test_assignments_to_absent_experts_add_nothing_whatever_the_empty_slots_hold(original):
    """Masked gating sends a token's extra picks to E when fewer than K experts are resident,
    and skip sends absent picks there with their weights: both must drop out, not read NaN."""
    hidden, index, weights = routing()
    ready = {3: 1, 5: 0}
    experts = slotted(original, ready, capacity=4)  # slots 2 and 3 hold NaN
    resident = torch.zeros(EXPERTS + 1, dtype=torch.bool)
    resident[list(ready)] = True
    index[0, 1] = EXPERTS  # the "no expert" index itself
    assert not resident[index].all() and resident[index].any()
    dropped = torch.where(resident[index], index, EXPERTS)  # the eager forward skips E
    got = experts(hidden, index, weights)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, original(hidden, dropped, weights), rtol=1e-6, atol=1e-6)


@torch.no_grad()
def test_with_no_expert_resident_the_experts_add_nothing(original):
    hidden, index, weights = routing()
    experts = slotted(original, {}, capacity=2)
    assert torch.equal(experts(hidden, index, weights), torch.zeros_like(hidden))
