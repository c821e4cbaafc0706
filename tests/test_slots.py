"""The slot pool's bookkeeping: the resident set moves toward the most important experts."""

import pytest

from swapmoe.executor.slots import SlotPool

SCORES = [0.0, 5.0, 1.0, 9.0, 2.0, 7.0, 0.5, 3.0]  # wanted order: 3, 5, 1, 7, 4, 2, 6, 0


def started(pool, scores=SCORES, target=2, max_loads=8):
    return pool.begin_loads(scores, target, max_loads)


def test_loads_fill_free_slots_with_the_most_important_experts_first():
    pool = SlotPool(8, capacity=3)
    assert started(pool, target=2) == [(3, 0), (5, 1)]
    assert pool.resident == []  # nothing is usable until its load finishes
    pool.finish_load(3, SCORES, 2)
    assert pool.resident == [3] and pool.slot_of(3) == 0 and pool.slot_of(5) is None


def test_a_spare_slot_means_nothing_is_evicted_before_its_replacement_is_ready():
    pool = SlotPool(8, capacity=3)
    for expert, _ in pool.fill([0, 2]):
        pool.finish_load(expert, SCORES, 2)
    loads = started(pool, target=2, max_loads=1)
    assert loads == [(3, 2)] and pool.resident == [0, 2]  # both still serve while 3 loads
    assert pool.finish_load(3, SCORES, 2) == [0]  # then the least important leaves
    assert pool.resident == [2, 3]


def test_without_a_spare_slot_the_least_important_resident_makes_room():
    pool = SlotPool(8, capacity=2)
    for expert, _ in pool.fill([0, 2]):
        pool.finish_load(expert, SCORES, 2)
    assert started(pool, target=2, max_loads=1) == [(3, 0)]  # expert 0 (score 0.0) gave its slot
    assert pool.resident == [2]


def test_loads_per_update_are_bounded():
    pool = SlotPool(8, capacity=6)
    assert len(started(pool, target=6, max_loads=2)) == 2
    assert len(started(pool, target=6, max_loads=2)) == 2  # in-flight loads are not started twice


def test_wanted_experts_already_resident_are_not_reloaded():
    pool = SlotPool(8, capacity=3)
    for expert, _ in pool.fill([3, 5]):
        pool.finish_load(expert, SCORES, 2)
    assert started(pool, target=2) == []


def test_shrinking_keeps_the_most_important_and_renumbers_slots():
    pool = SlotPool(8, capacity=4)
    for expert, _ in pool.fill([0, 3, 1, 5]):
        pool.finish_load(expert, SCORES, 4)
    moves = pool.shrink(2, SCORES)
    assert pool.resident == [3, 5] and pool.capacity == 2
    assert sorted(pool.ready.values()) == [0, 1] and moves == {1: 0, 3: 1}


def test_growing_adds_free_slots():
    pool = SlotPool(8, capacity=2)
    assert pool.grow(4) == [2, 3] and pool.capacity == 4
    assert len(started(pool, target=4)) == 4


def test_a_layer_needs_a_slot():
    with pytest.raises(ValueError):
        SlotPool(8, capacity=0)


def test_on_demand_evicts_the_least_recently_used_expert_that_is_not_needed_now():
    pool = SlotPool(8, capacity=3)
    for expert, _ in pool.fill([0, 1, 2]):
        pool.finish_load(expert, SCORES, 3)
    assert pool.touch(0) and pool.touch(1)  # 2 is now the least recently used
    assert not pool.touch(5)
    slot = pool.begin_sync_load(5, keep=[5])
    assert pool.resident == [0, 1] and pool.loading == {5: slot}  # 2 gave its slot
    pool.finish_sync_load(5)
    assert pool.resident == [0, 1, 5] and pool.slot_of(5) == slot
    assert not pool.touch(2)
    pool.begin_sync_load(2, keep=[2, 0])  # 0 is needed by the same tokens: 1 goes instead
    assert pool.resident == [0, 5]


def test_the_pool_counts_on_demand_hits_and_misses():
    pool = SlotPool(8, capacity=2)
    for expert, _ in pool.fill([3]):
        pool.finish_load(expert, SCORES, 2)
    [pool.touch(e) for e in (3, 3, 4)]
    assert (pool.hits, pool.misses) == (2, 1)


def test_a_failed_load_gives_its_slot_back():
    pool = SlotPool(8, capacity=1)
    for expert, _ in pool.fill([3]):
        pool.finish_load(expert, SCORES, 1)
    pool.begin_sync_load(4, keep=[4])
    pool.cancel_load(4)
    assert pool.resident == [] and pool.free == (0,) and not pool.loading


def test_others_read_the_pool_but_cannot_edit_it():
    pool = SlotPool(8, capacity=2)
    with pytest.raises(TypeError):
        pool.ready[3] = 0  # type: ignore[index]
    with pytest.raises(AttributeError):
        pool.free.append(0)  # type: ignore[attr-defined]


def test_an_expert_set_aside_is_never_loaded_again_and_the_next_most_important_takes_its_place():
    pool = SlotPool(8, capacity=2)
    assert started(pool, target=2, max_loads=1) == [(3, 0)]
    pool.cancel_load(3)  # its stored copy is damaged
    pool.set_aside(3)
    assert pool.damaged == {3} and 3 not in pool.wanted(SCORES, 8)
    assert [e for e, _ in started(pool, target=2)] == [5, 1]  # wanted order without 3: 5, 1, 7, ...
