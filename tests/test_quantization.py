"""Experts at lower precisions: the store keeps each expert at half, int8 and int4 beside the
checkpoint's dtype, and a layer holding them computes exactly what its dequantized weights
would (the kernels against a reference computed from the checkpoint's weights)."""

import pytest
import torch

from swapmoe.core.errors import Corrupted
from swapmoe.executor import quantization
from swapmoe.executor.adapters import find_moe_blocks
from swapmoe.executor.checkpoint import load_checkpoint
from swapmoe.executor.store import ExpertStore, check_store
from swapmoe.executor.store_build import build_store
from swapmoe.executor.virtual_experts import VirtualExperts
from swapmoe.models.tiny import sample_logits

PACKED = ["mixtral", "qwen2_moe", "olmoe"]


@pytest.mark.parametrize("precision", ["int8", "int4"])
@pytest.mark.parametrize("shape", [(256, 128), (96, 64), (64, 32)])
def test_a_quantized_matmul_equals_the_matmul_with_its_dequantized_weight(precision, shape):
    torch.manual_seed(0)
    weight, x = torch.randn(shape), torch.randn(5, shape[1])
    stored = quantization.quantize(weight, precision)
    assert [tuple(t.shape) for t in stored] == [p.shape for p in quantization.parts("w", shape, torch.float32, precision)]
    want = x @ quantization.reference(weight, precision).T
    torch.testing.assert_close(quantization.linear(x, stored, precision, torch.float32), want, rtol=1e-5, atol=1e-5)
    # Served with bfloat16 activations (the kernels' fast path): within bfloat16's rounding of them.
    served = quantization.linear(x, stored, precision)
    assert served.dtype == torch.float32
    torch.testing.assert_close(served, x.bfloat16().float() @ quantization.reference(weight, precision).T,
                               rtol=1e-2, atol=1e-2 * float(want.abs().max()))


def test_quantization_error_is_what_the_bits_allow():
    torch.manual_seed(0)
    weight = torch.randn(512, 256)
    error = {p: float((quantization.reference(weight, p) - weight).norm() / weight.norm()) for p in
             ("bfloat16", "int8", "int4")}
    assert error["bfloat16"] < 0.005 < error["int8"] < 0.02 < error["int4"] < 0.12


def test_int4_needs_in_features_in_whole_groups():
    with pytest.raises(ValueError, match="int4 needs in-features in whole groups of 32"):
        quantization.parts("down_proj", (64, 48), torch.float32, "int4")
    with pytest.raises(ValueError, match="out-features in multiples of 16"):
        quantization.parts("down_proj", (24, 64), torch.float32, "int4")


def test_the_store_keeps_every_expert_at_each_precision_as_quantized_from_the_checkpoint(checkpoint_dirs, tmp_path):
    path = checkpoint_dirs("mixtral")
    manifest = build_store(path, tmp_path / "store")
    assert manifest.precisions == ("float32", "bfloat16", "int8", "int4")
    model = load_checkpoint(path).model
    store = ExpertStore(tmp_path / "store")
    for layer, block in enumerate(find_moe_blocks(model)):
        for precision in manifest.precisions[1:]:
            buffer = store.buffer(layer, precision)
            for expert in range(block.num_experts):
                store.read_into(layer, expert, buffer, precision)
                got = list(store.tensors(layer, buffer, precision).values())
                want = [q for w in (block.experts.gate_up_proj[expert], block.experts.down_proj[expert])
                        for q in quantization.quantize(w.detach(), precision)]
                assert all(torch.equal(g, w) for g, w in zip(got, want, strict=True))
    store.close()


def test_a_damaged_quantized_expert_is_found_on_load_and_marks_the_store(checkpoint_dirs, tmp_path):
    manifest = build_store(checkpoint_dirs("mixtral"), tmp_path / "store")
    file, layers = manifest.variant("int4")
    with open(tmp_path / "store" / file, "r+b") as f:
        f.seek(layers[1].expert_offset(2) + 5)
        byte = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([byte[0] ^ 0xFF]))
    store = ExpertStore(tmp_path / "store")
    store.read_into(1, 1, store.buffer(1, "int4"), "int4")  # its neighbour is whole
    with pytest.raises(Corrupted, match=r"experts.int4.bin: expert 2 of layer 1 .* fails its checksum"):
        store.read_into(1, 2, store.buffer(1, "int4"), "int4")
    with pytest.raises(Corrupted, match="marked damaged"):
        check_store(tmp_path / "store")
    store.close()


def test_asking_a_store_for_a_precision_it_lacks_names_those_it_has(checkpoint_dirs, tmp_path):
    build_store(checkpoint_dirs("mixtral"), tmp_path / "store")
    store = ExpertStore(tmp_path / "store")
    with pytest.raises(KeyError, match="it has float32, bfloat16, int8, int4"):
        store.buffer(0, "int2")
    store.close()


@pytest.fixture
def runtime_of(checkpoint_dirs, tmp_path):
    made = []

    def make(arch):
        made.append(VirtualExperts(checkpoint_dirs(arch), store_root=tmp_path, log=lambda _: None))
        return made[-1]

    yield make
    for runtime in made:
        runtime.close()


def dequantized_model(checkpoint, precision: str):
    """The unmodified transformers model, its experts' weights replaced by what ``precision`` keeps."""
    model = load_checkpoint(checkpoint).model
    with torch.no_grad():
        for block in find_moe_blocks(model):
            for weights in (block.experts.gate_up_proj, block.experts.down_proj):
                for expert in range(weights.shape[0]):
                    weights[expert] = quantization.reference(weights[expert], precision)
    return model


@pytest.mark.parametrize("arch", PACKED)
@pytest.mark.parametrize("precision", ["int8", "int4"])
def test_with_every_expert_resident_quantized_logits_equal_the_dequantized_model(arch, precision, runtime_of,
                                                                               checkpoint_dirs):
    runtime = runtime_of(arch)
    everything = [l.num_experts for l in runtime.layout.layers]
    runtime.resize(everything, [precision] * len(everything))
    want = sample_logits(dequantized_model(checkpoint_dirs(arch), precision), arch)
    served = sample_logits(runtime.model, arch)  # bfloat16 activations into the kernels
    torch.testing.assert_close(served, want, rtol=0, atol=0.02 * float(want.abs().max()))
    for layer in runtime.layers:
        layer.experts.inner.compute = torch.float32  # the same stored weights, float32 activations: exact
    got = sample_logits(runtime.model, arch)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    original = sample_logits(load_checkpoint(checkpoint_dirs(arch)).model, arch)
    assert not torch.allclose(got, original, rtol=1e-5, atol=1e-5)  # the precision is really lower
    one_token = torch.tensor([[7]])  # a decode step's shape, which the experts serve without gathering
    torch.testing.assert_close(sample_logits(runtime.model, arch, one_token),
                               sample_logits(dequantized_model(checkpoint_dirs(arch), precision), arch, one_token),
                               rtol=1e-5, atol=1e-5)


def test_a_layer_changing_precision_holds_the_new_bytes_and_returns_exactly_to_the_checkpoints(runtime_of):
    runtime = runtime_of("mixtral")
    layers = runtime.layout.layers
    everything = [l.num_experts for l in layers]
    runtime.resize(everything, ["", ""])
    original = sample_logits(runtime.model, "mixtral")
    runtime.resize([4, everything[1]], ["int4", "bfloat16"])
    held = sum(t.numel() * t.element_size() for l in runtime.layers for slot in range(l.experts.capacity)
               for t in l.experts.slot_tensors(slot).values())
    assert held == runtime.slot_bytes() == 4 * layers[0].bytes_at("int4") + everything[1] * layers[1].bytes_at("bfloat16")
    assert layers[0].bytes_at("int4") < layers[0].bytes_per_expert / 6  # 4 bits, bfloat16 scales per 32 or 64
    runtime.wait_for_loads()  # the resize's update may move layer 0 toward what the pass above used
    runtime.poll()
    assert [len(r) for r in runtime.resident()] == [4, everything[1]]
    runtime.resize(everything, ["", ""])
    torch.testing.assert_close(sample_logits(runtime.model, "mixtral"), original, rtol=0, atol=0)


def test_switch_experts_are_kept_at_the_checkpoints_precision_only(runtime_of):
    runtime = runtime_of("switch_transformers")
    assert runtime.layout.precisions == () and runtime.store.manifest.variants == ()


def test_layers_swapping_precisions_never_hold_more_than_either_plan(runtime_of, monkeypatch):
    """Layers free what they give up before any layer takes more: moving int4 from layer 0 to
    layer 1 (the same bytes either way) never holds layer 0's new slots beside layer 1's old."""
    runtime = runtime_of("mixtral")
    everything = [l.num_experts for l in runtime.layout.layers]
    runtime.resize(everything, ["int4", ""])
    plan_bytes = runtime.slot_bytes()
    held, copy = [], runtime._sync.copy

    def counted(*args):
        held.append(sum(t.numel() * t.element_size() for l in runtime.layers
                        for p in l.experts.inner.parameters(recurse=False) for t in [p]))
        return copy(*args)

    monkeypatch.setattr(runtime._sync, "copy", counted)
    runtime.resize(everything, ["", "int4"])
    assert runtime.slot_bytes() == plan_bytes and max(held) <= plan_bytes


def test_a_damaged_expert_met_while_a_layer_changes_precision_is_set_aside_and_routing_stays_true(runtime_of):
    runtime = runtime_of("mixtral")
    everything = [l.num_experts for l in runtime.layout.layers]
    runtime.resize([4, everything[1]], ["", ""])
    file, layers = runtime.store.manifest.variant("int8")
    with open(runtime.store.directory / file, "r+b") as f:
        f.seek(layers[0].expert_offset(5) + 3)
        f.write(b"\xff\xfe")
    runtime.resize(everything, ["int8", ""])  # no error: the layer serves without expert 5
    layer = runtime.layers[0]
    assert 5 not in layer.pool.resident and len(layer.pool.resident) == everything[0] - 1
    assert runtime.stats.failed_loads == 1
    table = layer.experts.slots
    assert all(int(table.expert_in_slot[slot]) == expert for expert, slot in layer.pool.ready.items())


def test_a_manifest_whose_variant_disagrees_with_the_checkpoints_layers_is_damage(checkpoint_dirs, tmp_path):
    import json

    from swapmoe.executor.store import Manifest

    build_store(checkpoint_dirs("mixtral"), tmp_path / "store")
    raw = json.loads((tmp_path / "store" / "manifest.json").read_text())
    int4 = next(v for v in raw["variants"] if v["precision"] == "int4")
    int4["layers"][0]["parts"][0]["dtype"] = "int8"  # same bytes, another meaning
    (tmp_path / "store" / "manifest.json").write_text(json.dumps(raw))
    with pytest.raises(Corrupted, match="its int4 experts do not match the checkpoint's layers"):
        Manifest.load(tmp_path / "store")
