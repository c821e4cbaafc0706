"""The lean decode pass computes what the model's own forward computes, row for row, padding
and all; layouts it does not know keep the model's forward."""

import copy

import pytest
import torch

from swapmoe.executor.checkpoint import load_checkpoint
from swapmoe.executor.kv_batch import CausalBatch
from swapmoe.executor.lean_decode import LeanDecoder
from swapmoe.executor.virtual_experts import VirtualExperts
from swapmoe.models.tiny import save_tiny_model

PROMPTS = [(5, 9, 17, 3, 8), (40, 2), (7, 7, 100, 31, 12, 60, 6, 90)]  # left pads of 3, 6 and 0


def decode_both_ways(model, prompts, steps: int = 3):
    """Logits of each decode pass [B, V], lean and through the model's forward, from one batch."""
    lean = CausalBatch(model, len(prompts))
    assert lean.lean is not None
    for p in prompts:
        lean.join(p)
    own = copy.deepcopy(lean)
    own.lean = None
    passes = []
    for step in range(steps):
        tokens = [11 + step + row for row in range(len(prompts))]
        passes.append((lean.decode(tokens), own.decode(tokens)))
    return passes


def assert_decodes_alike(ours: CausalBatch, theirs: CausalBatch) -> None:
    """Both batches take PROMPTS, then three decode passes give the same logits."""
    for p in PROMPTS:
        ours.join(p), theirs.join(p)
    for step in range(3):
        tokens = [20 + step, 30 + step, 40 + step]
        torch.testing.assert_close(ours.decode(tokens), theirs.decode(tokens), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", ["mixtral", "qwen2_moe"])
@pytest.mark.parametrize("rows", [1, 3])
def test_a_lean_decode_pass_gives_the_models_own_logits(arch, rows, checkpoint_dirs):
    model = load_checkpoint(checkpoint_dirs(arch)).model
    for got, want in decode_both_ways(model, PROMPTS[-rows:]):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_with_every_expert_resident_the_executors_lean_pass_gives_transformers_logits(checkpoint_dirs, tmp_path):
    unmodified = load_checkpoint(checkpoint_dirs("mixtral")).model
    runtime = VirtualExperts(checkpoint_dirs("mixtral"), store_root=tmp_path, log=lambda _: None)
    try:
        runtime.resize([l.num_experts for l in runtime.layout.layers])
        ours, theirs = CausalBatch(runtime.model, 3), CausalBatch(unmodified, 3)
        theirs.lean = None
        assert_decodes_alike(ours, theirs)
    finally:
        runtime.close()


@pytest.mark.parametrize("arch", ["olmoe", "qwen3_moe", "deepseek_v3"])
def test_layouts_the_lean_pass_does_not_know_keep_the_models_forward(arch, checkpoint_dirs):
    model = load_checkpoint(checkpoint_dirs(arch)).model
    assert not LeanDecoder.supports(model)
    assert CausalBatch(model, 2).lean is None


def storage_bytes(model) -> int:
    """Bytes of the distinct storages behind the model's tensors."""
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
                for t in [*model.parameters(), *model.buffers()] if t.device.type != "meta"}
    return sum(storages.values())


@pytest.fixture(scope="module")
def aligned_qwen(tmp_path_factory):
    """q/k/v with biases, their rows in whole blocks of the int4 kernel's packing (128 and 64)."""
    return save_tiny_model("qwen2_moe", tmp_path_factory.mktemp("aligned"), hidden_size=128, num_attention_heads=4,
                           num_key_value_heads=2)


@pytest.mark.parametrize("dense_precision", ["", "int8", "int4"])
def test_fused_projections_add_no_bytes_and_the_models_own_forward_is_unchanged(dense_precision, aligned_qwen,
                                                                               tmp_path):
    runtime = VirtualExperts(aligned_qwen, store_root=tmp_path, log=lambda _: None, dense_precision=dense_precision)
    try:
        runtime.resize([l.num_experts for l in runtime.layout.layers])
        for module in runtime.model.modules():
            if hasattr(module, "compute"):
                module.compute = torch.float32  # lowered weights, float32 activations: exact
        ids = torch.tensor([PROMPTS[2]])
        before, held = runtime.model(input_ids=ids).logits, storage_bytes(runtime.model)
        ours, theirs = CausalBatch(runtime.model, 3), CausalBatch(runtime.model, 3)
        theirs.lean = None
        assert_decodes_alike(ours, theirs)  # the first decode pass fuses, in inference mode
        assert ours.lean.qkv[0] is not None and ours.lean.qkv[0] is CausalBatch(runtime.model, 1).lean.qkv[0]
        assert storage_bytes(runtime.model) == held
        for layer, fused in zip(runtime.model.model.layers, ours.lean.qkv):  # each projection views its rows
            attn = layer.self_attn
            for part in ("weight", "bias", *(["weight_scales"] if dense_precision in ("int8", "int4") else [])):
                stored = {getattr(m, part).untyped_storage().data_ptr() for m in (attn.q_proj, attn.k_proj,
                                                                                  attn.v_proj, fused)}
                assert len(stored) == 1, part
        torch.testing.assert_close(runtime.model(input_ids=ids).logits, before, rtol=0, atol=0)  # autograd on
    finally:
        runtime.close()


def test_int4_projections_whose_rows_do_not_fill_packed_blocks_stay_apart_and_decode_exactly(checkpoint_dirs,
                                                                                             tmp_path):
    runtime = VirtualExperts(checkpoint_dirs("qwen2_moe"), store_root=tmp_path, log=lambda _: None,
                             dense_precision="int4")  # q 32 rows, k and v 16
    try:
        runtime.resize([l.num_experts for l in runtime.layout.layers])
        ours, theirs = CausalBatch(runtime.model, 1), CausalBatch(runtime.model, 1)
        assert ours.lean.qkv == [None] * len(ours.lean.qkv)
        theirs.lean = None
        ours.join(PROMPTS[0]), theirs.join(PROMPTS[0])
        torch.testing.assert_close(ours.decode([9]), theirs.decode([9]), rtol=1e-5, atol=1e-5)
    finally:
        runtime.close()
