"""The elementwise work of a decoder layer: RMSNorm (after the residual add), SiLU(gate) * up, RoPE and the KV-cache
store. torch's operators, or tempspec's fused CPU kernels (csrc/layer_ops_cpu.cpp) where they apply.

In bf16 on the CPU, torch's RMSNorm runs a dozen operators (casts, pow, mean, rsqrt, the weight product), and RoPE
with the cache store another dozen; at a decode's few rows each one costs its dispatch, not its arithmetic, and the
default 135M target has 30 layers and 61 norms. Each op here is one call, which keeps torch's roundings between
operators (bf16 values rounded where torch stores them), and computes every row alone.

The *_reference functions state the semantics (the model's code before the kernels, operator for operator); the
kernels follow them up to the RMS's summation order and exp's last bit, and their rows do not depend on the other
rows. `TEMPSPEC_CPU_LAYER_OPS` chooses: `auto` / `1` (default: the kernels for bf16 and fp32 CPU tensors when nothing
needs gradients), `0` (torch's operators).
"""
from __future__ import annotations

import functools
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from tempspec_engine.linear import kernel_available, kernel_policy


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Hugging Face's semantics: x * rsqrt(mean(x^2) + eps) in fp32, rounded to x's dtype, times the weight (in x's
    dtype). x [..., n], weight [n] -> [..., n]."""
    return weight * F.rms_norm(x, (x.shape[-1],), eps=eps)


def add_rms_norm_reference(x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor,
                           eps: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """The residual add, then the norm: h = x + delta (rounded to the dtype), (h, rms_norm_reference(h))."""
    h = x + delta
    return h, rms_norm_reference(h, weight, eps)


def silu_mul_reference(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """SwiGLU's product: silu(gate) (rounded to the dtype) * up."""
    return F.silu(gate) * up


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE on x [B, T, heads, D] with cos, sin_signed [B, T, 1, D] (llama.rope_cos_sin): x * cos +
    rotate_half(x) * sin, where rotate_half(x) = [-x2, x1]; the sign lives in sin_signed (= [-sin, sin]), so this is
    [x2, x1] * sin_signed: the same products and sums, bit for bit, in four kernels."""
    h = x.shape[-1] // 2
    return x * cos + torch.cat((x[..., h:], x[..., :h]), dim=-1) * sin_signed


def rope_store_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                         k_cache: torch.Tensor, v_cache: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """RoPE on q [B, T, H, D] and k [B, T, Hkv, D] (one apply_rope over both), then RoPE(k) and v [B, T, Hkv, D]
    stored in k_cache, v_cache [B, Hkv, L, D] at slots [B, T] (int64) of each row. Returns RoPE(q) [B, T, H, D]."""
    H = q.shape[2]
    qk = apply_rope(torch.cat((q, k), dim=2), cos, sin)
    rows = torch.arange(slots.shape[0], device=slots.device).unsqueeze(1)
    k_cache[rows, :, slots] = qk[:, :, H:]
    v_cache[rows, :, slots] = v
    return qk[:, :, :H]


@functools.lru_cache(maxsize=None)
def _extension():
    try:
        from tempspec_engine import _C
    except ImportError:
        return None
    return _C if hasattr(_C, "rms_norm_cpu") and kernel_available() else None


@functools.lru_cache(maxsize=None)
def cpu_layer_ops_enabled() -> bool:
    """Whether the fused CPU kernels run in this process: built, an AVX2/FMA CPU, TEMPSPEC_CPU_LAYER_OPS not 0."""
    return kernel_policy("TEMPSPEC_CPU_LAYER_OPS") != "0" and _extension() is not None


def _kernel_applies(*tensors: torch.Tensor) -> bool:
    """CPU tensors of one dtype, bf16 or fp32, none needing gradients, and the kernels enabled."""
    dtype = tensors[0].dtype
    return (dtype in (torch.bfloat16, torch.float32)
            and all(t.device.type == "cpu" and t.dtype == dtype for t in tensors)
            and not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors))
            and cpu_layer_ops_enabled())


# The kernels as ops torch.compile sees (eager calls go to the extension directly).
@torch.library.custom_op("tempspec::rms_norm_cpu", mutates_args=())
def rms_norm_cpu(x: torch.Tensor, delta: Optional[torch.Tensor], weight: torch.Tensor,
                 eps: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """(h, y) = (x + delta, weight * rms_norm(x + delta)); without delta h is an empty tensor and y norms x."""
    out = _extension().rms_norm_cpu(x, delta, weight, eps)
    return (out[0], out[1]) if delta is not None else (x.new_empty(0), out[0])


@rms_norm_cpu.register_fake
def _(x, delta, weight, eps):
    return (torch.empty_like(x) if delta is not None else x.new_empty(0)), torch.empty_like(x)


@torch.library.custom_op("tempspec::silu_mul_cpu", mutates_args=())
def silu_mul_cpu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up."""
    return _extension().silu_mul_cpu(gate, up)


@silu_mul_cpu.register_fake
def _(gate, up):
    return torch.empty_like(gate)


@torch.library.custom_op("tempspec::rope_store_cpu", mutates_args=("k_cache", "v_cache"))
def rope_store_cpu(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                   k_cache: torch.Tensor, v_cache: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """rope_store_reference's arguments and result."""
    return _extension().rope_store_cpu(q, k, v, cos, sin, k_cache, v_cache, slots)


@rope_store_cpu.register_fake
def _(q, k, v, cos, sin, k_cache, v_cache, slots):
    return q.new_empty(q.shape)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """rms_norm_reference, through the kernel where it applies."""
    if _kernel_applies(x, weight):
        if torch.compiler.is_compiling():
            return rms_norm_cpu(x, None, weight, eps)[1]
        return _extension().rms_norm_cpu(x, None, weight, eps)[0]
    return rms_norm_reference(x, weight, eps)


def add_rms_norm(x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor,
                 eps: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """add_rms_norm_reference, through the kernel where it applies (x and delta of one shape)."""
    if x.shape == delta.shape and _kernel_applies(x, delta, weight):
        if torch.compiler.is_compiling():
            return rms_norm_cpu(x, delta, weight, eps)
        h, y = _extension().rms_norm_cpu(x, delta, weight, eps)  # a list from the extension
        return h, y
    return add_rms_norm_reference(x, delta, weight, eps)


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu_mul_reference, through the kernel where it applies."""
    if gate.shape == up.shape and _kernel_applies(gate, up):
        if torch.compiler.is_compiling():
            return silu_mul_cpu(gate, up)
        return _extension().silu_mul_cpu(gate, up)
    return silu_mul_reference(gate, up)


def rope_store(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
               k_cache: torch.Tensor, v_cache: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """rope_store_reference, through the kernel where it applies."""
    if (_kernel_applies(q, k, v, cos, sin, k_cache, v_cache) and slots.device.type == "cpu"
            and all(t.stride(-1) == 1 for t in (q, k, v, cos, sin, k_cache, v_cache))):
        if torch.compiler.is_compiling():
            return rope_store_cpu(q, k, v, cos, sin, k_cache, v_cache, slots)
        return _extension().rope_store_cpu(q, k, v, cos, sin, k_cache, v_cache, slots)
    return rope_store_reference(q, k, v, cos, sin, k_cache, v_cache, slots)
