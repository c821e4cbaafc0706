"""The planner's heap keeper: survivors leave the collector's walks, and a full collection
still finds any cycle that formed among them."""

import gc
import weakref

from swapmoe.planner_service.heap import HeapKeeper, HeapSettings

from polling import wait_until


class Node:
    pass


def test_survivors_are_frozen_and_only_a_full_collection_reclaims_a_cycle_among_them():
    keeper = HeapKeeper(HeapSettings(freeze_every_s=0.02)).start()
    try:
        node = Node()
        node.itself = node
        gone = weakref.ref(node)
        frozen = gc.get_freeze_count()
        wait_until(lambda: gc.get_freeze_count() > frozen, timeout=5)  # a freeze since the cycle was made
        del node
        gc.collect()
        assert gone() is not None, "a frozen cycle is out of reach of ordinary collections"
        assert keeper.full_collection() >= 1 and keeper.full_collections == 1
        assert gone() is None
    finally:
        keeper.stop()
    assert gc.get_freeze_count() == 0
