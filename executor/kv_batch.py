"""A running decode batch over one KV cache: rows join with their own prefill and leave any time.

"Prefill alone, decode together": a prompt is prefilled at batch 1, exactly as solo, so routing
and expert importance (Eq. 1) see only its tokens; its KV is then merged in with left padding.
Pads never enter the model: they are KV columns the attention mask hides, so routers see real
tokens only. Batched logits differ from solo ones by float noise (other GEMM shapes), so tokens
equal solo ones unless the solo top-2 margin is within that noise.

Shapes: B rows, L KV columns (the longest row plus its left pads), V vocabulary;
keys and values are [B, H_kv, L, D] per layer.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from swapmoe.executor.lean_decode import LeanDecoder


def last_logits(model, ids: torch.Tensor, cache: DynamicCache, **inputs) -> torch.Tensor:
    """Last-position logits [B, V] for ids [B, T], appending T columns to ``cache``."""
    return model(input_ids=ids, cache=cache, use_cache=True, logits_to_keep=1, **inputs).logits[:, -1]


def causal_step(model, prompt: torch.Tensor):
    """Decoder-only models: prefill the prompt, then feed one token at a time."""
    cache = DynamicCache(config=model.config)

    def step(token: int | None) -> torch.Tensor:
        ids = prompt if token is None else prompt.new_tensor([[token]])
        return last_logits(model, ids, cache)[0]

    return step


def seq2seq_step(model, prompt: torch.Tensor):
    """Encoder-decoder models: encode once, then decode from the start token."""
    encoded = model.get_encoder()(input_ids=prompt)
    past = None
    start = model.config.decoder_start_token_id or 0

    def step(token: int | None) -> torch.Tensor:
        nonlocal past
        ids = torch.tensor([[start if token is None else token]], device=prompt.device)
        out = model(encoder_outputs=encoded, decoder_input_ids=ids, past_key_values=past, use_cache=True)
        past = out.past_key_values
        return out.logits[0, -1]

    return step


def _pad_left(t: torch.Tensor, width: int) -> torch.Tensor:
    return F.pad(t, (0, 0, width - t.shape[-2], 0))  # [B, H, L, D] -> [B, H, width, D]


def _full_attention_only(config) -> bool:
    """Whether every cache layer is a plain DynamicLayer: the merge writes keys and values column
    by column, while sliding layers also count the columns they saw (padding included)."""
    return all(type(layer) is DynamicLayer for layer in DynamicCache(config=config).layers)


def _check_tokens(tokens: Sequence[int], rows: int) -> None:
    if rows == 0 or len(tokens) != rows:
        raise ValueError(f"decode needs one token per row: got {len(tokens)} for {rows} rows")


def _check_rows(rows: Sequence[int], count: int) -> None:
    if not set(rows) <= set(range(count)):
        raise IndexError(f"rows {sorted(rows)} are not all in a batch of {count}")


class CausalBatch:
    """Rows of a running decode batch for a decoder-only model: each joins with its own prefill
    (run alone, so routing and importance see exactly what they would solo) and its KV is merged
    in with left padding; every decode pass feeds one token per row with a per-row attention
    mask and position ids."""

    def __init__(self, model, capacity: int):
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        if not _full_attention_only(model.config):
            raise ValueError("CausalBatch needs full-attention cache layers; use make_batch")
        self.model, self.capacity = model, capacity
        self.lean = LeanDecoder(model) if LeanDecoder.supports(model) else None  # decode passes, when it can
        self.device = next(model.parameters()).device
        self.cache: DynamicCache | None = None
        self.mask: torch.Tensor | None = None  # [B, L] long, 0 over each row's left pads

    def __len__(self) -> int:
        return 0 if self.mask is None else self.mask.shape[0]

    @torch.inference_mode()
    def join(self, prompt_ids: Sequence[int]) -> torch.Tensor:
        """Prefill the prompt alone, merge it as the last row; returns its last-position logits [V]."""
        if len(self) >= self.capacity:
            raise RuntimeError(f"the batch is full ({self.capacity} rows)")
        if not prompt_ids:
            raise ValueError("an empty prompt has nothing to prefill")
        cache = DynamicCache(config=self.model.config)
        logits = last_logits(self.model, torch.tensor([list(prompt_ids)], device=self.device), cache)
        self._merge(cache, torch.ones(1, len(prompt_ids), dtype=torch.long, device=self.device))
        return logits[0]

    def _merge(self, cache: DynamicCache, mask: torch.Tensor) -> None:
        if self.cache is None:
            self.cache, self.mask = cache, mask
            return
        width = max(self.mask.shape[1], mask.shape[1])
        # Layer by layer, in place: the transient peak is one layer's batch KV, as in a decode step.
        for mine, theirs in zip(self.cache.layers, cache.layers):
            mine.keys = torch.cat([_pad_left(mine.keys, width), _pad_left(theirs.keys, width)])
            mine.values = torch.cat([_pad_left(mine.values, width), _pad_left(theirs.values, width)])
        self.mask = torch.cat([F.pad(m, (width - m.shape[1], 0)) for m in (self.mask, mask)])

    @torch.inference_mode()
    def decode(self, tokens: Sequence[int]) -> torch.Tensor:
        """One forward pass feeding tokens[i] to row i; returns logits [B, V]."""
        _check_tokens(tokens, len(self))
        ids = torch.tensor(list(tokens), device=self.device)[:, None]  # [B, 1]
        # A row's next position is its own token count, not the padded width L.
        positions = self.mask.sum(1, keepdim=True)  # [B, 1]
        mask = F.pad(self.mask, (0, 1), value=1)  # [B, L + 1]
        if self.lean is not None:
            logits = self.lean(ids, self.cache, mask, positions)
        else:
            logits = last_logits(self.model, ids, self.cache, attention_mask=mask, position_ids=positions)
        self.mask = mask
        return logits

    @torch.inference_mode()
    def leave(self, rows: Sequence[int]) -> None:
        """Drop these rows (the others keep their order) and the leading columns only they used."""
        _check_rows(rows, len(self))
        gone = set(rows)
        keep = [r for r in range(len(self)) if r not in gone]
        if not keep:
            self.cache = self.mask = None
        if not rows or not keep:
            return
        self.cache.batch_select_indices(torch.tensor(keep, device=self.device))
        self.mask = self.mask[keep]
        # Pads are leading, so the columns that are padding in every row are the first `lead`.
        lead = int((self.mask == 0).sum(1).min())
        if lead:
            for layer in self.cache.layers:
                layer.keys, layer.values = layer.keys[:, :, lead:], layer.values[:, :, lead:]
            self.mask = self.mask[:, lead:]


class SoloBatch:
    """Encoder-decoder models (Switch) and sliding-window caches: one row at a time."""

    capacity = 1

    def __init__(self, model):
        self.model = model
        self.device = next(model.parameters()).device
        self._step = None  # token | None -> logits [V], while a row is present

    def __len__(self) -> int:
        return 0 if self._step is None else 1

    @torch.inference_mode()
    def join(self, prompt_ids: Sequence[int]) -> torch.Tensor:
        if self._step is not None:
            raise RuntimeError("a SoloBatch holds one row at a time")
        if not prompt_ids:
            raise ValueError("an empty prompt has nothing to prefill")
        prompt = torch.tensor([list(prompt_ids)], device=self.device)
        seq2seq = self.model.config.is_encoder_decoder  # encode once, decode from the start token
        step = seq2seq_step(self.model, prompt) if seq2seq else causal_step(self.model, prompt)
        logits = step(None)
        self._step = step
        return logits

    @torch.inference_mode()
    def decode(self, tokens: Sequence[int]) -> torch.Tensor:
        _check_tokens(tokens, len(self))
        return self._step(tokens[0])[None]  # [1, V]

    def leave(self, rows: Sequence[int]) -> None:
        _check_rows(rows, len(self))
        if rows:  # frees the cache (and the encoder output) with the step
            self._step = None


def make_batch(model, max_batch: int) -> CausalBatch | SoloBatch:
    """CausalBatch(model, max_batch) unless the model is encoder-decoder or DynamicCache would build
    a layer other than full attention (sliding windows count padded columns): then SoloBatch."""
    if max_batch < 1:
        raise ValueError(f"max_batch must be >= 1, got {max_batch}")
    if model.config.is_encoder_decoder or not _full_attention_only(model.config):
        return SoloBatch(model)
    return CausalBatch(model, max_batch)
