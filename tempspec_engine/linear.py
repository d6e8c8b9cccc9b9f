"""The linear layer of tempspec's transformer: torch's F.linear, or tempspec's bf16 kernel where torch's is slow.

On a CPU without oneDNN's bf16 matrix product (AVX2 without AVX-512: `torch.ops.mkldnn._is_mkldnn_bf16_supported()`
is False), torch multiplies bf16 matrices one input row at a time, so verifying k+1 tokens costs k+1 decodes and SD
cannot pay. There `linear` runs `csrc/linear_cpu.cpp` instead, which reads each weight once for all rows (fp32
products and sums, bf16 out, like torch's) and whose every output row is independent of the other rows.

`TEMPSPEC_CPU_LINEAR` chooses: `auto` (default: the rule above), `1` (whenever the CPU has AVX2 and FMA), `0` (never).
The kernel has no backward: anything that needs gradients goes through F.linear.
"""
from __future__ import annotations

import functools
import os
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

POLICIES = ("auto", "1", "0")


@functools.lru_cache(maxsize=None)
def _extension():
    try:
        from tempspec_engine import _C
    except ImportError:
        return None
    return _C if hasattr(_C, "linear_bf16_cpu") else None


def _torch_bf16_matmul_is_fast() -> bool:
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a torch without this probe: trust torch
        return True


def kernel_available() -> bool:
    """Whether tempspec's kernel can run here: the extension is built with it and the CPU has AVX2 and FMA."""
    ext = _extension()
    return ext is not None and bool(ext.linear_bf16_cpu_supported())


def kernel_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The kernel itself (needs kernel_available()): x [..., K] bf16, weight [N, K] bf16 contiguous, bias [N] or
    None, all on the CPU -> [..., N] bf16."""
    return _extension().linear_bf16_cpu(x, weight, bias)


@functools.lru_cache(maxsize=None)
def cpu_kernel_enabled() -> bool:
    """Whether bf16 linear layers on the CPU run tempspec's kernel in this process (decided once)."""
    policy = os.environ.get("TEMPSPEC_CPU_LINEAR", "auto").strip().lower() or "auto"
    if policy not in POLICIES:
        raise ValueError(f"TEMPSPEC_CPU_LINEAR must be one of {', '.join(POLICIES)}, got {policy!r}")
    if policy == "0" or not kernel_available():
        return False
    return policy == "1" or not _torch_bf16_matmul_is_fast()


@torch.library.custom_op("tempspec::linear_bf16_cpu", mutates_args=())
def linear_bf16_cpu(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """x [..., K] bf16 (CPU), weight [N, K] bf16 contiguous, bias [N] or None -> [..., N] bf16 (torch.compile sees
    this op; eager calls go to kernel_linear directly)."""
    return kernel_linear(x, weight, bias)


@linear_bf16_cpu.register_fake
def _(x, weight, bias):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


def linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """F.linear(x, weight, bias), through tempspec's kernel for bf16 on the CPU where cpu_kernel_enabled()."""
    if (x.dtype == torch.bfloat16 and weight.dtype == torch.bfloat16 and x.device.type == "cpu"
            and weight.is_contiguous() and (bias is None or bias.dtype == torch.bfloat16)
            and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad
                                                  or (bias is not None and bias.requires_grad)))
            and cpu_kernel_enabled()):
        if torch.compiler.is_compiling():
            return linear_bf16_cpu(x, weight, bias)
        return kernel_linear(x, weight, bias)
    return F.linear(x, weight, bias)


class Linear(nn.Linear):
    """nn.Linear (same parameters and state-dict keys) whose forward is `linear`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)
