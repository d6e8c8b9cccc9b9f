"""Attention over a KV cache: torch's scaled_dot_product_attention, or tempspec's CPU kernels.

torch's CPU flash attention is slow for one query row (about 0.3 ms per layer over 512 keys, 2.8 times its time for
two rows in benchmarks/results/attention_cpu_amd-epyc-zen4.json: a third of a 135M model's decode on a 2-core CPU).
`attend` sends up to MAX_KERNEL_QUERIES queries per row on the CPU to `csrc/attention_cpu.cpp`, which computes each
query row alone in fp32 (so a row's result does not depend on how many rows are computed with it: verification
attends exactly as decoding does). A causal prefill of more queries, in bf16 on a CPU with AVX-512 BF16, goes to
`csrc/prefill_attention_cpu.cpp` (flash attention on vdpbf16ps: 2.6x torch's time less on the default target's
prompts, benchmarks/bench_attention_cpu.py --prefill). Everything else goes to SDPA.

`TEMPSPEC_CPU_ATTENTION` chooses: `auto` / `1` (default: the kernels where they apply), `0` (always SDPA).
`attention_reference` states the semantics all follow.
"""
from __future__ import annotations

import functools
import math
from typing import Optional

import torch
import torch.nn.functional as F

from tempspec_engine.linear import kernel_available, kernel_policy

MAX_KERNEL_QUERIES = 32  # queries per row up to which the CPU kernel runs (decode, verification, drafting)


PREFILL_HEAD_DIMS = (64, 128)  # head dimensions the prefill kernel is built for


@functools.lru_cache(maxsize=None)
def cpu_attention_enabled() -> bool:
    """Whether CPU attention of a few queries runs tempspec's kernel in this process (decided once)."""
    return kernel_policy("TEMPSPEC_CPU_ATTENTION") != "0" and kernel_available()


@functools.lru_cache(maxsize=None)
def cpu_has_avx512bf16() -> bool:
    """Whether the extension is built and this CPU has AVX-512 BF16 (what the prefill kernel needs)."""
    if not kernel_available():
        return False
    from tempspec_engine import _C

    return _C.cpu_has_avx512bf16()


def cpu_prefill_attention_enabled() -> bool:
    """Whether a causal bf16 prefill on the CPU runs tempspec's kernel in this process (the policy of
    cpu_attention_enabled, on a CPU with AVX-512 BF16)."""
    return cpu_attention_enabled() and cpu_has_avx512bf16()


def attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                        mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The semantics, in fp32: q [B, H, T, D], k and v [B, Hkv, L, D] (query head h reads key head h // (H / Hkv)),
    mask [B or 1, H or 1, T, L] bool (True: visible; None: all visible). out[b, h, t] = softmax over the visible keys
    of q . k / sqrt(D), times v; zeros for a query that sees no key. Returns [B, H, T, D] in q's dtype."""
    group = q.shape[1] // k.shape[1]
    kf = k.float().repeat_interleave(group, dim=1)
    vf = v.float().repeat_interleave(group, dim=1)
    scores = q.float() @ kf.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    weights = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # a row with no visible key: all -inf -> NaN -> 0
    return (weights @ vf).to(q.dtype)


def kernel_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The kernel itself (needs kernel_available()): attention_reference's arguments and result, bf16 or fp32 CPU
    tensors whose last dimension is contiguous. The result is a [B, H, T, D] view of a [B, T, H, D] tensor."""
    from tempspec_engine import _C

    return _C.attention_cpu(q, k, v, mask, 1.0 / math.sqrt(q.shape[-1]))


@torch.library.custom_op("tempspec::attention_cpu", mutates_args=())
def attention_cpu(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
    """kernel_attention as an op torch.compile sees (eager calls go to kernel_attention directly)."""
    return kernel_attention(q, k, v, mask).contiguous()  # the layout register_fake states


@attention_cpu.register_fake
def _(q, k, v, mask):
    return q.new_empty(q.shape)


def kernel_prefill_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """The prefill kernel itself (needs cpu_prefill_attention_enabled()): causal attention_reference of q [B, H, T, D]
    over k, v [B, Hkv, T, D], bf16 CPU tensors whose last dimension is contiguous, D in PREFILL_HEAD_DIMS. The
    softmax weights are rounded to bf16 before their product with the values. Returns a [B, H, T, D] view of a
    [B, T, H, D] tensor."""
    from tempspec_engine import _C

    return _C.prefill_attention_cpu(q, k, v, 1.0 / math.sqrt(q.shape[-1]))


@torch.library.custom_op("tempspec::prefill_attention_cpu", mutates_args=())
def prefill_attention_cpu(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """kernel_prefill_attention as an op torch.compile sees (eager calls go to kernel_prefill_attention directly)."""
    return kernel_prefill_attention(q, k, v).contiguous()


@prefill_attention_cpu.register_fake
def _(q, k, v):
    return q.new_empty(q.shape)


def _cpu_kernel_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dtypes) -> bool:
    """Whether q, k, v are what the CPU kernels take: CPU tensors of one of `dtypes`, the last dimension contiguous,
    and no gradient wanted."""
    return (q.device.type == "cpu" and q.dtype in dtypes and k.dtype == q.dtype and v.dtype == q.dtype
            and q.stride(-1) == 1 and k.stride(-1) == 1 and v.stride(-1) == 1
            and not (torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)))


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor] = None,
           causal: bool = False) -> torch.Tensor:
    """scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, enable_gqa=True) with
    attention_reference's conventions, through tempspec's kernels on the CPU: up to MAX_KERNEL_QUERIES bf16/fp32
    queries per row, or a longer causal bf16 prefill. causal=True (mask None, as many keys as queries): query t sees
    keys 0..t."""
    if causal:
        if mask is not None or q.shape[2] != k.shape[2]:
            raise ValueError("attend: causal=True takes no mask and as many keys as queries")
        T = q.shape[2]
        if T <= MAX_KERNEL_QUERIES:  # the few-query kernel takes the mask; SDPA gets is_causal
            mask = torch.ones(T, T, dtype=torch.bool, device=q.device).tril().view(1, 1, T, T)
        elif (q.shape[-1] in PREFILL_HEAD_DIMS and _cpu_kernel_inputs(q, k, v, (torch.bfloat16,))
              and cpu_prefill_attention_enabled()):
            if torch.compiler.is_compiling():
                return prefill_attention_cpu(q, k, v)
            return kernel_prefill_attention(q, k, v)
    if (q.shape[2] <= MAX_KERNEL_QUERIES and _cpu_kernel_inputs(q, k, v, (torch.bfloat16, torch.float32))
            and cpu_attention_enabled()):
        if torch.compiler.is_compiling():
            return attention_cpu(q, k, v, mask)
        return kernel_attention(q, k, v, mask)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal and mask is None,
                                          enable_gqa=k.shape[1] != q.shape[1])
