"""The expert store: built tensor by tensor from a checkpoint, read back one expert per read."""

import time

import pytest
import torch

from swapmoe.executor.adapters import adapter_for, find_moe_blocks
from swapmoe.executor.checkpoint import load_checkpoint
from swapmoe.executor.store import ALIGN, ExpertStore
from swapmoe.executor.store_build import build_store
from swapmoe.models.tiny import ARCHITECTURES


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_every_expert_reads_back_equal_to_the_loaded_models_weights(arch, checkpoint_dirs, tmp_path):
    path = checkpoint_dirs(arch)
    manifest = build_store(path, tmp_path / "store")
    model = load_checkpoint(path).model
    adapter = adapter_for(model)
    blocks = find_moe_blocks(model)
    assert [l.module for l in manifest.layers] == [b.name for b in blocks]
    store = ExpertStore(tmp_path / "store")
    for layer, block in enumerate(blocks):
        buffer = store.buffer(layer)
        for expert in range(block.num_experts):
            assert store.read_into(layer, expert, buffer) == manifest.layers[layer].expert_bytes
            got = list(store.tensors(layer, buffer).values())
            want = adapter.expert_tensors(block.experts, expert)
            for g, w in zip(got, want, strict=True):
                assert torch.equal(g, w.detach())
    store.close()


def test_experts_are_aligned_for_direct_reads(checkpoint_dirs, tmp_path):
    manifest = build_store(checkpoint_dirs("mixtral"), tmp_path / "store")
    for layer in manifest.layers:
        assert layer.offset % ALIGN == 0 and layer.stride % ALIGN == 0 and layer.stride >= layer.expert_bytes
    assert (tmp_path / "store" / "experts.bin").stat().st_size == sum(l.stride * l.num_experts for l in manifest.layers)


def test_reading_an_expert_that_does_not_exist_is_an_error(checkpoint_dirs, tmp_path):
    build_store(checkpoint_dirs("mixtral"), tmp_path / "store")
    store = ExpertStore(tmp_path / "store")
    with pytest.raises(IndexError, match="no expert 8"):
        store.read_into(0, 8, store.buffer(0))


def test_a_bandwidth_cap_paces_reads(checkpoint_dirs, tmp_path):
    manifest = build_store(checkpoint_dirs("mixtral"), tmp_path / "store")
    nbytes = manifest.layers[0].expert_bytes
    store = ExpertStore(tmp_path / "store", bandwidth=nbytes * 20)  # 20 experts a second
    buffer = store.buffer(0)
    started = time.monotonic()
    for expert in range(5):
        store.read_into(0, expert, buffer)
    assert time.monotonic() - started >= 5 / 20 * 0.95  # never faster than the cap
    assert "capped at" in store.tier
    store.close()
