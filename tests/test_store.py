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


_PEAK_DURING_BUILD = """
import sys
from pathlib import Path
from swapmoe.executor.memory import process_peak_rss, reset_peak_rss
from swapmoe.executor.store_build import build_store, meta_model

meta_model(Path(sys.argv[1]))  # transformers' lazy imports, before the peak is reset
before = reset_peak_rss()  # the peak resident set starts over from here
build_store(Path(sys.argv[1]), Path(sys.argv[2]))
print(process_peak_rss() - before)
"""


@pytest.mark.slow
def test_building_a_store_holds_one_expert_at_a_time_not_the_checkpoint(tmp_path):
    """Peak resident memory while building stays near one expert's size however large the
    checkpoint: tensors are read outside any memory map and written as they come."""
    import subprocess
    import sys

    from swapmoe.models.tiny import save_tiny_model

    checkpoint = save_tiny_model("mixtral", tmp_path / "ckpt", hidden_size=512, intermediate_size=1024,
                                 num_hidden_layers=4)  # 32 experts of 6 MiB: 200 MiB of weights
    size = sum(p.stat().st_size for p in checkpoint.glob("*.safetensors"))
    assert size > 200 * 2**20
    out = subprocess.run([sys.executable, "-c", _PEAK_DURING_BUILD, str(checkpoint), str(tmp_path / "store")],
                         capture_output=True, text=True, check=True)
    growth = int(out.stdout.split()[-1])
    assert growth < 64 * 2**20, f"building a {size >> 20} MiB checkpoint's store grew RSS by {growth >> 20} MiB"
