"""Dense weights held at a lower precision: what is lowered and what is not, the bytes it
accounts, and logits equal to the model holding the dequantized dense weights."""

import pytest
import torch
from torch import nn

from swapmoe.executor import quantization
from swapmoe.executor.checkpoint import load_checkpoint
from swapmoe.executor.lowered_dense import LoweredLinear, lowered_linears
from swapmoe.executor.virtual_experts import VirtualExperts
from swapmoe.models.tiny import sample_logits

ARCHS = ["mixtral", "qwen2_moe", "olmoe", "deepseek_v3"]


@pytest.fixture
def runtime_of(checkpoint_dirs, tmp_path):
    made = []

    def make(arch, dense_precision):
        made.append(VirtualExperts(checkpoint_dirs(arch), store_root=tmp_path, log=lambda _: None,
                                   dense_precision=dense_precision))
        made[-1].resize([l.num_experts for l in made[-1].layout.layers])
        return made[-1]

    yield make
    for runtime in made:
        runtime.close()


def dequantized_dense(checkpoint, precision: str):
    """The unmodified transformers model, the weights the runtime lowers replaced by what
    ``precision`` keeps of them."""
    model = load_checkpoint(checkpoint).model
    with torch.no_grad():
        for module in lowered_linears(model, precision).values():
            module.weight.copy_(quantization.reference(module.weight, precision))
    return model


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("precision", ["bfloat16", "int8", "int4"])
def test_lowered_dense_logits_equal_the_model_with_dequantized_dense_weights(arch, precision, runtime_of,
                                                                             checkpoint_dirs):
    runtime = runtime_of(arch, precision)
    lowered = [m for m in runtime.model.modules() if isinstance(m, LoweredLinear)]
    assert lowered, "nothing was lowered"
    want = sample_logits(dequantized_dense(checkpoint_dirs(arch), precision), arch)
    torch.testing.assert_close(sample_logits(runtime.model, arch), want, rtol=0, atol=0.02 * float(want.abs().max()))
    for module in lowered:
        module.compute = torch.float32  # the same stored weights, float32 activations: exact
    got = sample_logits(runtime.model, arch)
    if precision != "bfloat16":  # half weights compute in their own dtype
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    original = sample_logits(load_checkpoint(checkpoint_dirs(arch)).model, arch)
    assert not torch.allclose(got, original, rtol=1e-5, atol=1e-5)  # the precision is really lower


def test_routers_embeddings_and_routed_experts_keep_the_checkpoints_precision(runtime_of):
    runtime = runtime_of("qwen2_moe", "int4")
    model = runtime.model
    kept = [model.get_input_embeddings(), model.get_output_embeddings(),
            *(layer.router.router for layer in runtime.layers)]
    assert all(p.dtype == torch.float32 for m in kept for p in m.parameters())
    names = {n for n, m in model.named_modules() if isinstance(m, LoweredLinear)}
    assert any(".self_attn.q_proj" in n for n in names) and any(".shared_expert." in n for n in names)
    assert not any(".experts." in n or n.endswith("gate") for n in names)  # shared_expert_gate: one row, kept
    assert all(type(m) is nn.Linear or isinstance(m, LoweredLinear)
               for n, m in model.named_modules() if n.endswith("_proj") and ".experts" not in n)


def test_lowered_dense_weights_are_accounted_at_their_bytes(runtime_of):
    full, low = runtime_of("mixtral", ""), runtime_of("mixtral", "int4")
    lowered = [m for m in low.model.modules() if isinstance(m, LoweredLinear)]
    saved = sum(m.in_features * m.out_features * 4 - sum(b.numel() * b.element_size() for b in m.buffers())
                for m in lowered)
    assert saved > 0 and low.layout.dense_bytes == full.layout.dense_bytes - saved
    assert low.layout.layers == full.layout.layers  # the experts' bytes are the plan's business


@pytest.mark.parametrize("precision, message", [
    ("int2", "dense precision 'int2' is not one of bfloat16, int8, int4"),
    ("float16", "dense precision 'float16' is not one of"),
])
def test_a_dense_precision_the_store_cannot_hold_is_refused_before_a_store_is_built(precision, message,
                                                                                   checkpoint_dirs, tmp_path):
    with pytest.raises(ValueError, match=message):
        VirtualExperts(checkpoint_dirs("mixtral"), store_root=tmp_path, log=lambda _: None, dense_precision=precision)
    assert not any(tmp_path.iterdir())
