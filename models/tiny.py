"""Tiny random MoE checkpoints of every architecture SwapMoE supports.

Tests and local development need real checkpoints -- the real ``transformers`` classes, saved
with ``save_pretrained`` and read back with ``from_pretrained`` -- but there is no network to
fetch one from a model hub, and real MoE models are gigabytes. These builders make models of a
few hundred KB that exercise the same code paths (routers, expert weights, on-disk tensor names,
Auto-class dispatch) with randomly initialised weights.

Every model has 8 experts per MoE layer, so expert-placement logic has something to choose
between, and a byte-level tokenizer that needs no training data.
"""

from __future__ import annotations

import pathlib

import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM, PreTrainedTokenizerFast

ARCHITECTURES: tuple[str, ...] = (
    "mixtral",
    "qwen2_moe",
    "qwen3_moe",
    "olmoe",
    "switch_transformers",
    "deepseek_v3",
)

SPECIAL_TOKENS = ("<pad>", "<s>", "</s>")  # ids 0, 1, 2: pad/bos/eos as T5 and Llama number them
PAD_ID, BOS_ID, EOS_ID = 0, 1, 2
VOCAB_SIZE = len(SPECIAL_TOKENS) + 256  # byte b has id b + 3
MAX_POSITIONS = 256
NUM_EXPERTS = 8

# Shared by the decoder-only configs; the argument names are the same across these classes.
_DECODER_COMMON = dict(
    vocab_size=VOCAB_SIZE,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=MAX_POSITIONS,
    num_experts_per_tok=2,
    pad_token_id=PAD_ID,
    bos_token_id=BOS_ID,
    eos_token_id=EOS_ID,
    tie_word_embeddings=False,
)

# Per-architecture settings. Each family names the expert count and expert width differently.
_CONFIGS: dict[str, dict] = {
    "mixtral": dict(num_local_experts=NUM_EXPERTS, intermediate_size=64),
    "qwen2_moe": dict(
        num_experts=NUM_EXPERTS,
        moe_intermediate_size=64,
        shared_expert_intermediate_size=64,  # Qwen2-MoE also has one always-on dense expert
        intermediate_size=64,
        decoder_sparse_step=1,  # every layer is MoE
        mlp_only_layers=[],
    ),
    "qwen3_moe": dict(
        num_experts=NUM_EXPERTS,
        moe_intermediate_size=64,
        intermediate_size=64,
        head_dim=8,
        decoder_sparse_step=1,
        mlp_only_layers=[],
    ),
    "olmoe": dict(num_experts=NUM_EXPERTS, intermediate_size=64),
    # DeepSeek-V3 keeps its first `first_k_dense_replace` layers dense (3 of 61 in the real
    # model). With 2 layers we keep that quirk once: layer 0 is a dense MLP, layer 1 is MoE.
    # Multi-head latent attention needs its low-rank sizes shrunk too. One expert group
    # (n_group=1, topk_group=1) makes its group-limited routing plain top-2 over all 8 experts.
    "deepseek_v3": dict(
        n_routed_experts=NUM_EXPERTS,
        n_shared_experts=1,
        moe_intermediate_size=64,
        intermediate_size=64,
        first_k_dense_replace=1,
        n_group=1,
        topk_group=1,
        num_key_value_heads=4,  # latent attention has no grouped KV heads: must equal num_attention_heads
        q_lora_rank=16,
        kv_lora_rank=16,
        qk_rope_head_dim=8,
        qk_nope_head_dim=8,
        v_head_dim=8,
        num_mtp_layers=0,  # transformers builds no multi-token-prediction layers anyway
    ),
    # Encoder-decoder: `num_sparse_*_layers=1` of 2 makes the config's sparse step 2, so layer 1
    # of both the encoder and the decoder is a SparseMLP and layer 0 is dense. Switch routes
    # top-1 and drops tokens past `expert_capacity` per sequence; a capacity equal to the longest
    # sequence means no token is ever dropped, so routing is pure top-1.
    "switch_transformers": dict(
        vocab_size=VOCAB_SIZE,
        d_model=32,
        d_kv=8,
        d_ff=64,
        num_heads=4,
        num_layers=2,
        num_decoder_layers=2,
        num_sparse_encoder_layers=1,
        num_sparse_decoder_layers=1,
        num_experts=NUM_EXPERTS,
        expert_capacity=MAX_POSITIONS,
        router_jitter_noise=0.0,
        dropout_rate=0.0,
        pad_token_id=PAD_ID,
        eos_token_id=EOS_ID,
        decoder_start_token_id=PAD_ID,  # T5 convention: decoding starts from <pad>
    ),
}


def is_encoder_decoder(arch: str) -> bool:
    """Whether `arch` is a seq2seq model (needs decoder inputs, loads via AutoModelForSeq2SeqLM)."""
    _check_arch(arch)
    return arch == "switch_transformers"


def _check_arch(arch: str) -> None:
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {arch!r}; supported: {', '.join(ARCHITECTURES)}")


def tiny_config(arch: str, **overrides) -> transformers.PretrainedConfig:
    """A tiny float32 config for `arch`; `overrides` replace any config argument."""
    _check_arch(arch)
    kwargs = {} if is_encoder_decoder(arch) else dict(_DECODER_COMMON)
    kwargs.update(_CONFIGS[arch])
    kwargs.update(overrides)
    config = transformers.AutoConfig.for_model(arch, **kwargs)
    config.dtype = torch.float32  # written to config.json, so from_pretrained loads float32 too
    return config


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table, the alphabet the ByteLevel pre-tokenizer emits.

    Reproduced here (rather than using ``ByteLevel.alphabet()``'s unordered list) so that token
    ids follow byte values, which makes token ids readable when debugging.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level tokenizer: every UTF-8 byte is a token, no merges, so no training is needed.

    Any text round-trips exactly through encode/decode. No BOS/EOS is added automatically.
    """
    alphabet = _bytes_to_unicode()
    assert set(alphabet.values()) == set(pre_tokenizers.ByteLevel.alphabet())
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS)}
    vocab.update({alphabet[b]: len(SPECIAL_TOKENS) + b for b in range(256)})
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens(list(SPECIAL_TOKENS))
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        model_max_length=MAX_POSITIONS,
    )


def build_tiny_model(arch: str, seed: int = 0, **config_overrides) -> transformers.PreTrainedModel:
    """A randomly initialised model of `arch` in eval mode; the same seed gives the same weights.

    transformers' default init (normal, std=initializer_range) leaves router weights small, so
    routing is close to uniform over experts -- fine for exercising serving code.
    """
    config = tiny_config(arch, **config_overrides)
    auto = AutoModelForSeq2SeqLM if is_encoder_decoder(arch) else AutoModelForCausalLM
    torch.manual_seed(seed)
    model = auto.from_config(config, dtype=torch.float32)
    return model.eval()


def save_tiny_model(arch: str, directory, seed: int = 0, dtype: torch.dtype = torch.float32,
                    **config_overrides) -> pathlib.Path:
    """Build a tiny `arch` model and save it with its tokenizer (safetensors) into `directory`,
    its weights in ``dtype`` (bf16 and fp16: as most published MoE checkpoints are stored).

    The directory then loads with ``AutoModelFor{CausalLM,Seq2SeqLM}.from_pretrained`` and
    ``AutoTokenizer.from_pretrained`` without any network access.
    """
    path = pathlib.Path(directory)
    path.mkdir(parents=True, exist_ok=True)
    model = build_tiny_model(arch, seed=seed, **config_overrides)
    if dtype != torch.float32:
        model = model.to(dtype)
        model.config.dtype = dtype
    model.save_pretrained(path, safe_serialization=True)
    byte_tokenizer().save_pretrained(path)
    return path


SAMPLE_INPUT = torch.tensor([[5, 17, 42, 99, 3, 250, 7, 8, 64, 128, 31, 2]])


def sample_logits(model, arch: str, input_ids: torch.Tensor = SAMPLE_INPUT) -> torch.Tensor:
    """One forward pass on a fixed input (seq2seq models decode its first half): the quantity
    exactness tests compare between our runtime and unmodified transformers."""
    with torch.inference_mode():
        if is_encoder_decoder(arch):
            return model(input_ids=input_ids, decoder_input_ids=input_ids[:, :input_ids.shape[1] // 2]).logits
        return model(input_ids=input_ids).logits
