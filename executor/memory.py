"""Process memory as the OS reports it, and the reserves a forward pass needs.

The KV cache and activation reserves are estimates sized for the longest
context the executor accepts, so a request can never push memory past what
the budget accounted for.
"""

from __future__ import annotations

import ctypes
import os
import platform
import resource
import socket

import psutil

from swapmoe.core.layout import DeviceInfo

_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter


def process_rss() -> int:
    return psutil.Process(os.getpid()).memory_info().rss


def return_large_frees_to_the_os(threshold: int = 1 << 20) -> bool:
    """Make glibc give every freed block of ``threshold`` bytes or more back to the OS.

    glibc serves allocations below its mmap threshold from heaps that rarely shrink, and raises
    that threshold (up to 32 MiB) each time a larger mapped block is freed, so a forward pass's
    temporaries of a few MiB soon come from the heap and stay there, fragmented. Measured: OLMoE
    on demand in 2 GiB kept 465 MiB above its accounted tensors after one prefill, 50 MiB with a
    fixed 1 MiB threshold (fixing it also turns the raising off), at the same speed. Returns
    whether the allocator took the setting (False off glibc)."""
    if "MALLOC_MMAP_THRESHOLD_" in os.environ or "mmap_threshold" in os.environ.get("GLIBC_TUNABLES", ""):
        return False  # the operator chose a threshold
    try:
        return bool(ctypes.CDLL("libc.so.6").mallopt(_M_MMAP_THRESHOLD, threshold))
    except (OSError, AttributeError):
        return False


def reset_peak_rss() -> int:
    """Start the peak (VmHWM) over from the current RSS, which it returns: the peak read after some
    work is then that work's (Linux; benchmarks and tests measure one stage of a process)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return process_rss()


def process_peak_rss() -> int:
    """Peak RSS of this process image. Linux's VmHWM starts afresh at exec; ru_maxrss (the
    fallback, in KiB) would include the parent's peak at fork time."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


# What the executor allocates beside the tensors a budget names, measured in a fresh process
# above the libraries (torch, transformers and the model's own modeling module, imported):
# the tokenizer, the model's, the store's and the batch's Python objects, thread stacks and
# the allocator's arenas came to 13-18 MiB on the three benchmark models
# (``python -m benchmarks.memory``, RESULTS-memory.md); this leaves room to spare.
RUNTIME_FIXED_BYTES = 24 << 20


def kv_slack_bytes(kv_bytes: int) -> int:
    """Memory a sequence holds beyond its keys and values: DynamicCache grows each layer by one
    column per pass through a new, larger tensor, and the allocator keeps freed copies (and
    prefills' workspace) it cannot reuse for the next, larger one. Measured up to 1.7x the KV
    cache with 16 sequences at full context (RESULTS-memory.md); counted as twice the KV cache."""
    return 2 * kv_bytes


def runtime_bytes(kv_bytes: int) -> int:
    """The executor's own allocations with one sequence: the fixed overhead and its KV slack."""
    return RUNTIME_FIXED_BYTES + kv_slack_bytes(kv_bytes)


def kv_cache_bytes(config, max_context: int, dtype_bytes: int) -> int:
    """Keys and values of every attention layer for ``max_context`` positions."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    layers = getattr(text, "num_hidden_layers", None) or getattr(text, "num_layers", 0)
    if getattr(text, "is_encoder_decoder", False):
        layers += getattr(text, "num_decoder_layers", layers)  # self- and cross-attention caches
    heads = getattr(text, "num_key_value_heads", None) or getattr(text, "num_attention_heads", None) \
        or getattr(text, "num_heads", 1)
    head_dim = getattr(text, "head_dim", None) or getattr(text, "d_kv", None) \
        or text.hidden_size // (getattr(text, "num_attention_heads", None) or heads)
    if getattr(text, "kv_lora_rank", None):  # DeepSeek MLA caches full keys/values in transformers
        head_dim = (text.qk_nope_head_dim + text.qk_rope_head_dim + text.v_head_dim) // 2
    return 2 * layers * heads * head_dim * max_context * dtype_bytes


def activation_bytes(config, max_context: int, dtype_bytes: int, batch: int = 1) -> int:
    """Workspace of one forward pass over ``max_context`` tokens: hidden states, the widest
    MLP (a token's ``top_k`` experts run in one grouped matmul, so their widths add up), the
    attention scores of one layer and one row of logits, plus a row of logits for each other
    sequence of a ``batch`` (a decode pass of ``batch`` <= ``max_context`` tokens needs no
    more than a prefill of ``max_context`` besides its logits)."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    hidden = getattr(text, "hidden_size", None) or text.d_model
    dense = getattr(text, "intermediate_size", 0) or 0  # Mixtral's: its experts' width
    expert = getattr(text, "moe_intermediate_size", 0) or dense
    inner = max(
        dense,
        (getattr(text, "num_experts_per_tok", 1) or 1) * expert,
        getattr(text, "d_ff", 0) or 0,
        hidden * 4,
    )
    heads = getattr(text, "num_attention_heads", None) or getattr(text, "num_heads", 1)
    per_token = 6 * hidden + 3 * inner + heads * max_context
    return (per_token * max_context + 2 * text.vocab_size * batch) * dtype_bytes


def device_info(device: str) -> DeviceInfo:
    """The device a budget is checked against: its kind, name, memory and the cores this process may use."""
    import torch  # here: reading this process's memory needs no torch

    if device.startswith("cuda"):
        props = torch.cuda.get_device_properties(torch.device(device))
        return DeviceInfo("cuda", props.name, props.total_memory, os.cpu_count() or 1, socket.gethostname())
    return DeviceInfo("cpu", platform.processor() or platform.machine(), psutil.virtual_memory().total,
                      len(os.sched_getaffinity(0)), socket.gethostname())
