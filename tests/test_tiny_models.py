"""The tiny checkpoints are real transformers checkpoints: they save, load back through the
Auto classes with no network, and compute exactly what the in-memory model computed."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

from swapmoe.models.tiny import (
    ARCHITECTURES,
    NUM_EXPERTS,
    VOCAB_SIZE,
    build_tiny_model,
    byte_tokenizer,
    is_encoder_decoder,
    save_tiny_model,
    tiny_config,
)

TEXT = "def f(x):\n    return x  # ünïcode"
INPUT_IDS = torch.tensor([[1, 103, 104, 105, 35, 200, 3, 258], [1, 50, 51, 52, 53, 54, 2, 0]])
DECODER_INPUT_IDS = torch.tensor([[0, 70, 71, 72, 73], [0, 80, 81, 82, 2]])
MOE_SUFFIXES = ("SparseMoeBlock", "MoE", "SparseMLP", "MoeBlock")


def moe_blocks(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """Modules that are MoE blocks: a known block class name, or holding an `experts` child."""
    return {
        name: module
        for name, module in model.named_modules()
        if type(module).__name__.endswith(MOE_SUFFIXES) or hasattr(module, "experts")
    }


def num_experts(block: torch.nn.Module) -> int:
    experts = block.experts
    # Packed experts (Mixtral family) store 3D tensors and say how many; Switch has a ModuleDict.
    return getattr(experts, "num_experts", None) or len(experts)


def logits(model, arch: str) -> torch.Tensor:
    with torch.no_grad():
        if is_encoder_decoder(arch):
            return model(input_ids=INPUT_IDS, decoder_input_ids=DECODER_INPUT_IDS).logits
        return model(input_ids=INPUT_IDS).logits


def test_byte_tokenizer_round_trips_text():
    tokenizer = byte_tokenizer()
    assert len(tokenizer) == VOCAB_SIZE
    assert (tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id) == (0, 1, 2)
    ids = tokenizer.encode(TEXT)
    assert len(ids) == len(TEXT.encode("utf-8"))  # one token per byte, nothing added
    assert tokenizer.decode(ids) == TEXT


def test_unknown_architecture_is_named_in_the_error():
    with pytest.raises(ValueError, match="gpt_oss"):
        tiny_config("gpt_oss")


def test_seed_decides_the_weights():
    a, b, c = (build_tiny_model("mixtral", seed=s) for s in (0, 0, 1))
    torch.testing.assert_close(logits(a, "mixtral"), logits(b, "mixtral"), atol=0, rtol=0)
    assert not torch.equal(logits(a, "mixtral"), logits(c, "mixtral"))


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_tiny_model_save_load_round_trip(arch, tmp_path):
    built = build_tiny_model(arch, seed=0)
    assert not built.training
    assert built.config.vocab_size == VOCAB_SIZE

    path = save_tiny_model(arch, tmp_path / arch, seed=0)
    assert (path / "model.safetensors").is_file()
    auto = AutoModelForSeq2SeqLM if is_encoder_decoder(arch) else AutoModelForCausalLM
    loaded = auto.from_pretrained(path).eval()
    assert type(loaded) is type(built)
    assert loaded.dtype == torch.float32

    loaded_state = loaded.state_dict()
    for name, tensor in built.state_dict().items():
        assert torch.equal(loaded_state[name], tensor), f"{arch}: {name} changed in the round trip"
    # Bit-identical weights can still give logits that differ in the last bit: tensors read from
    # a safetensors file sit at other memory alignments, which changes CPU kernel paths.
    torch.testing.assert_close(logits(loaded, arch), logits(built, arch), atol=1e-5, rtol=1e-5)

    blocks = moe_blocks(loaded)
    assert blocks, f"{arch}: no MoE block found"
    assert all(num_experts(block) == NUM_EXPERTS for block in blocks.values())
    if is_encoder_decoder(arch):
        assert any(name.startswith("encoder.") for name in blocks)
        assert any(name.startswith("decoder.") for name in blocks)
    # Random init must leave real weights, not zeros, in every expert and router.
    for block in blocks.values():
        for name, param in block.named_parameters():
            if name.endswith("weight") or name.endswith("_proj"):
                assert param.abs().max() > 0, f"{arch}: {name} is all zero"

    tokenizer = AutoTokenizer.from_pretrained(path)
    assert len(tokenizer) == loaded.config.vocab_size
    assert tokenizer.decode(tokenizer.encode(TEXT)) == TEXT
