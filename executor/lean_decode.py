"""A decode pass without transformers' per-pass machinery, for the common decoder layer.

A decode pass feeds one token per row, and on a CPU most of its time outside the matmuls is
transformers' generic plumbing around them: per-pass mask building, keyword routing through
each layer, attention-interface dispatch, output recorders. For decoder layers of the common
pre-norm shape (attention, then the MoE block or MLP, each with a residual), ``LeanDecoder``
runs the same modules in the same order and computes the attention with one
``scaled_dot_product_attention`` call and the RMSNorms with one ``rms_norm`` call each: every
other weight still goes through the model's own modules (projections, the MoE block with its
masked router and slots). Measured on issue 30's Mixtral in one process, alternating with the
model's forward: +11% tokens/s, and +13% more with q/k/v fused (``executor.fused_qkv``). Other
layouts (MLA, per-head norms, sliding windows) keep the model's own forward.
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F
from torch import nn

from swapmoe.executor import fused_qkv

# Decoder layers whose forward is: x + attn(norm1(x)); then x + mlp(norm2(x)), with attention
# q/k/v projections (bias or not), rotary embeddings and o_proj, and nothing else.
SUPPORTED = {
    "MixtralDecoderLayer": "MixtralAttention",
    "Qwen2MoeDecoderLayer": "Qwen2MoeAttention",
}


class LeanDecoder:
    def __init__(self, model: nn.Module):
        self.model, self.base = model, model.model
        attn = self.base.layers[0].self_attn
        family = sys.modules[type(attn).__module__]
        self.rotate, self.rotate_half = family.apply_rotary_pos_emb, family.rotate_half
        self._qkv: list[nn.Module | None] | None = None

    @property
    def qkv(self) -> list[nn.Module | None]:
        """Each layer's fused q/k/v projection (None: three matmuls), made on first use: by the
        thread that decodes, not the one that builds the batch (see ``intra_op.single_threaded``)."""
        if self._qkv is None:
            self._qkv = [fused_qkv.fuse(layer.self_attn) for layer in self.base.layers]
        return self._qkv

    @staticmethod
    def supports(model: nn.Module) -> bool:
        base = getattr(model, "model", None)
        layers = getattr(base, "layers", None)
        if layers is None or getattr(model.config, "sliding_window", None) or model.config.is_encoder_decoder:
            return False
        if model.config._attn_implementation not in ("sdpa", "eager"):
            return False
        return all(SUPPORTED.get(type(layer).__name__) == type(layer.self_attn).__name__
                   and hasattr(layer.input_layernorm, "variance_epsilon") for layer in layers)

    def __call__(self, ids: torch.Tensor, cache, attention_mask: torch.Tensor,
                 position_ids: torch.Tensor) -> torch.Tensor:
        """Logits [B, V] of the last position for ids [B, 1]; appends a column to ``cache``."""
        base = self.base
        x = base.embed_tokens(ids)
        cos, sin = base.rotary_emb(x, position_ids)
        mask = None if bool(attention_mask.all()) else attention_mask.bool()[:, None, None, :]
        rows = x.shape[0]
        for layer, qkv in zip(base.layers, self.qkv):
            attn = layer.self_attn
            h = _rms_norm(layer.input_layernorm, x)
            shape = (rows, 1, -1, attn.head_dim)
            if qkv is None:
                q, k, v = (t(h).reshape(shape).transpose(1, 2) for t in (attn.q_proj, attn.k_proj, attn.v_proj))
                q, k = self.rotate(q, k, cos, sin)
            else:  # queries and keys rotated together: the same operations on their heads side by side
                heads = qkv(h).reshape(shape).transpose(1, 2)  # [B, Hq + 2 Hkv, 1, D]
                queries, keys = attn.q_proj.out_features // attn.head_dim, attn.k_proj.out_features // attn.head_dim
                qk, v = heads[:, :queries + keys], heads[:, queries + keys:]
                qk = qk * cos[:, None] + self.rotate_half(qk) * sin[:, None]
                q, k = qk[:, :queries], qk[:, queries:]
            k, v = cache.update(k, v, attn.layer_idx)
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=attn.scaling,
                                               enable_gqa=q.shape[1] != k.shape[1])
            x = x + attn.o_proj(o.transpose(1, 2).reshape(rows, 1, -1))
            x = x + layer.mlp(_rms_norm(layer.post_attention_layernorm, x))
        return self.model.lm_head(_rms_norm(base.norm, x))[:, -1]


def _rms_norm(norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The supported layers' RMSNorm (``weight * x / rms(x)``, in float32) as torch's one operation
    for float32 activations (half ones round between steps as the module does: the module)."""
    if x.dtype != torch.float32:
        return norm(x)
    return F.rms_norm(x, norm.weight.shape, norm.weight, norm.variance_epsilon)
