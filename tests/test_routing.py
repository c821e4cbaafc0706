"""Masked gating on every supported architecture, loaded from disk through the executor's path."""

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

from swapmoe.executor.adapters import UnsupportedModel, describe, find_moe_blocks, install_masked_routers
from swapmoe.executor.checkpoint import load_checkpoint
from swapmoe.models.tiny import ARCHITECTURES, is_encoder_decoder, sample_logits



@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_with_every_expert_resident_logits_equal_the_unmodified_model(arch, checkpoint_dirs):
    path = checkpoint_dirs(arch)
    auto = AutoModelForSeq2SeqLM if is_encoder_decoder(arch) else AutoModelForCausalLM
    reference = auto.from_pretrained(path).eval()
    ours = load_checkpoint(path).model
    install_masked_routers(ours)
    torch.testing.assert_close(sample_logits(ours, arch), sample_logits(reference, arch), rtol=1e-5, atol=1e-5)


def _capture_expert_choices(model):
    """Record which experts each experts module is asked to run."""
    seen = []

    def hook(module, args):
        routing = args[1]
        if routing.dtype == torch.bool or routing.dim() == 3:  # Switch: one-hot dispatch [T, 1, E]
            seen.append(routing.reshape(-1, routing.shape[-1]).nonzero()[:, 1])
        else:  # packed experts: indices [T, K], E means "no expert"
            seen.append(routing[routing < module.num_experts].flatten())

    for block in find_moe_blocks(model):
        block.experts.register_forward_pre_hook(hook)
    return seen


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_masked_gating_never_routes_to_an_absent_expert(arch, checkpoint_dirs):
    model = load_checkpoint(checkpoint_dirs(arch)).model
    routers = install_masked_routers(model)
    resident = [0, 3, 5]
    for router in routers:
        router.install(router.mask(resident))
    seen = _capture_expert_choices(model)
    sample_logits(model, arch)
    chosen = torch.cat(seen).unique().tolist()
    assert chosen and set(chosen) <= set(resident)


def test_masked_gating_is_the_routers_softmax_renormalized_over_resident_experts(checkpoint_dirs):
    """Paper Fig. 5 on Mixtral: top-k of softmax(logits) restricted to resident experts."""
    model = load_checkpoint(checkpoint_dirs("mixtral")).model
    routers = install_masked_routers(model)
    block = find_moe_blocks(model)[0].module
    resident = [1, 2, 6]
    routers[0].install(routers[0].mask(resident))
    x = torch.randn(1, 5, model.config.hidden_size)
    with torch.no_grad():
        ours = block(x)
        logits = x[0] @ routers[0].router.weight.T
        logits[:, [e for e in range(8) if e not in resident]] = float("-inf")
        weights, index = torch.topk(torch.softmax(logits, dim=-1), 2)
        weights = weights / weights.sum(dim=-1, keepdim=True)
        experts = block.experts
        expected = torch.zeros_like(x[0])
        for t in range(5):
            for w, e in zip(weights[t], index[t]):
                gate, up = (x[0, t] @ experts.gate_up_proj[e].T).chunk(2)
                expected[t] += w * ((torch.nn.functional.silu(gate) * up) @ experts.down_proj[e].T)
    torch.testing.assert_close(ours[0], expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_importance_counts_wanted_experts_even_when_absent(arch, checkpoint_dirs):
    model = load_checkpoint(checkpoint_dirs(arch)).model
    routers = install_masked_routers(model)
    for router in routers:
        router.install(router.mask([0]))
    sample_logits(model, arch)
    activations, importance = routers[0].stats()
    assert sum(activations) > 0
    assert any(a > 0 for a in activations[1:]), "absent experts the router wanted were not counted"
    assert all((a > 0) == (i > 0) for a, i in zip(activations, importance))


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_layout_counts_every_byte_once(arch, checkpoint_dirs):
    model = load_checkpoint(checkpoint_dirs(arch)).model
    layout = describe(model)
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    assert layout.total_bytes == params + buffers
    assert layout.layers and all(l.num_experts == 8 and l.bytes_per_expert > 0 for l in layout.layers)


def test_an_unsupported_model_fails_at_load_naming_its_class(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2)
    LlamaForCausalLM(config).save_pretrained(tmp_path)
    with pytest.raises(UnsupportedModel, match=r"LlamaForCausalLM \(model_type 'llama'\) is not supported"):
        load_checkpoint(tmp_path)
