"""The linear layer of tempspec's transformer: torch's F.linear, or tempspec's bf16 kernel where torch's is slow.

On a CPU without oneDNN's bf16 matrix product (AVX2 without AVX-512: `torch.ops.mkldnn._is_mkldnn_bf16_supported()`
is False), torch multiplies bf16 matrices one input row at a time, so verifying k+1 tokens costs k+1 decodes and SD
cannot pay. There `linear` runs `csrc/linear_cpu.cpp` instead, which reads each weight once for all rows (fp32
sums, bf16 out, like torch's) and whose every output row is independent of the other rows.
On a CPU with oneDNN's bf16 product, each of its calls on a few rows costs tens of microseconds (the default target's
decode took 40 ms through it on a 2-core Zen 4, 18 ms through the kernel), while on many rows (a prefill) it is
faster than the kernel: there the kernel takes calls of up to ONEDNN_CROSSOVER_ROWS[kernel_isa()] input rows.
The kernel has two variants (kernel_isa): "avx512bf16" (vdpbf16ps, on CPUs with AVX-512 BF16) and "avx2";
`TEMPSPEC_CPU_LINEAR_ISA=avx2` makes a CPU with both run the avx2 one (default auto: the best).

`linears` multiplies one input by several weights of one K (a layer's q, k and v; its gate and up) in one kernel
call: each output is what `linear` gives, and a decode pays one call's overhead instead of three (the default
target's forward makes 121 calls instead of 211).

`TEMPSPEC_CPU_LINEAR` chooses: `auto` (default: the rules above), `1` (every call, whenever the CPU has AVX2 and FMA:
every row batch-invariant), `0` (never). The kernel has no backward: anything that needs gradients goes through
F.linear.
"""
from __future__ import annotations

import functools
import os
from typing import List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

POLICIES = ("auto", "1", "0")
# Input rows up to which the kernel's variant beats oneDNN's bf16 product in a forward of the default target
# (measured on a 2-core Zen 4 EPYC: the avx2 variant was within 10% at 8 rows, oneDNN ahead beyond; the avx512bf16
# variant verified 8, 16, 24, 32, 48 tokens in 23-24, 41, 52-53, 67-68, 89-96 ms against oneDNN's 36-39, 44-49,
# 52-57, 59-66, 74-91: benchmarks/results/shapes_smollm2-135m_cpu-amd-epyc-zen4_bf16_crossover_linear_{1,0}.json)
ONEDNN_CROSSOVER_ROWS = {"avx2": 8, "avx512bf16": 24}
ALL_ROWS = 1 << 62


def kernel_policy(variable: str) -> str:
    """The value of a CPU kernel's policy variable (TEMPSPEC_CPU_LINEAR, TEMPSPEC_CPU_ATTENTION): one of POLICIES,
    "auto" when unset or empty; anything else is refused, naming the variable."""
    policy = os.environ.get(variable, "auto").strip().lower() or "auto"
    if policy not in POLICIES:
        raise ValueError(f"{variable} must be one of {', '.join(POLICIES)}, got {policy!r}")
    return policy


@functools.lru_cache(maxsize=None)
def _extension():
    try:
        from tempspec_engine import _C
    except ImportError:
        return None
    return _C if hasattr(_C, "linear_bf16_cpu") else None


def torch_bf16_matmul_is_fast() -> bool:
    """Whether torch has oneDNN's bf16 matrix product on this CPU (AVX-512 BF16 or AMX)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a torch without this probe: trust torch
        return True


def kernel_available() -> bool:
    """Whether tempspec's kernel can run here: the extension is built with it and the CPU has AVX2 and FMA."""
    ext = _extension()
    return ext is not None and bool(ext.linear_bf16_cpu_supported())


@functools.lru_cache(maxsize=None)
def kernel_isa() -> str:
    """The kernel's variant in this process: TEMPSPEC_CPU_LINEAR_ISA (avx2 or avx512bf16) when set, else the best
    this CPU runs ("avx512bf16" or "avx2"); "" where kernel_available() is False. A variant the CPU cannot run is
    refused, naming the variable."""
    if not kernel_available():
        return ""
    best = _extension().linear_bf16_cpu_isa()
    wanted = os.environ.get("TEMPSPEC_CPU_LINEAR_ISA", "").strip().lower()
    runs = ("avx2", "avx512bf16") if best == "avx512bf16" else ("avx2",)
    if wanted in ("", "auto"):
        return best
    if wanted not in runs:
        raise ValueError(f"TEMPSPEC_CPU_LINEAR_ISA must be auto or a variant this CPU runs ({', '.join(runs)}), "
                         f"got {wanted!r}")
    return wanted


def kernel_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
                  isa: str = "") -> torch.Tensor:
    """The kernel itself (needs kernel_available()): x [..., K] bf16, weight [N, K] bf16 contiguous, bias [N] or
    None, all on the CPU -> [..., N] bf16; isa: the variant, "" for kernel_isa()."""
    return _extension().linear_bf16_cpu(x, weight, bias, isa or kernel_isa())


def kernel_linears(x: torch.Tensor, weights: Sequence[torch.Tensor], biases: Sequence[Optional[torch.Tensor]],
                   isa: str = "") -> List[torch.Tensor]:
    """kernel_linear of x by each weight (one K; a bias or None each) in one call -> [..., N_i] bf16 each."""
    return _extension().linear_bf16_cpu_many(x, list(weights), list(biases), isa or kernel_isa())


@functools.lru_cache(maxsize=None)
def cpu_kernel_max_rows() -> int:
    """The most input rows (the product of x's leading dimensions) for which a bf16 linear layer on the CPU runs
    tempspec's kernel in this process: 0 (never), ONEDNN_CROSSOVER_ROWS[kernel_isa()] or ALL_ROWS (decided once)."""
    policy = kernel_policy("TEMPSPEC_CPU_LINEAR")
    if policy == "0" or not kernel_available():
        return 0
    return ALL_ROWS if policy == "1" or not torch_bf16_matmul_is_fast() else ONEDNN_CROSSOVER_ROWS[kernel_isa()]


def cpu_kernel_enabled() -> bool:
    """Whether some bf16 linear layers on the CPU run tempspec's kernel in this process."""
    return cpu_kernel_max_rows() > 0


@torch.library.custom_op("tempspec::linear_bf16_cpu", mutates_args=())
def linear_bf16_cpu(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """x [..., K] bf16 (CPU), weight [N, K] bf16 contiguous, bias [N] or None -> [..., N] bf16 (torch.compile sees
    this op; eager calls go to kernel_linear directly)."""
    return kernel_linear(x, weight, bias)


@linear_bf16_cpu.register_fake
def _(x, weight, bias):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


@torch.library.custom_op("tempspec::linears_bf16_cpu", mutates_args=())
def linears_bf16_cpu(x: torch.Tensor, weights: List[torch.Tensor],
                     biases: List[Optional[torch.Tensor]]) -> List[torch.Tensor]:
    """kernel_linears as an op torch.compile sees (eager calls go to kernel_linears directly)."""
    return kernel_linears(x, weights, biases)


@linears_bf16_cpu.register_fake
def _(x, weights, biases):
    return [x.new_empty((*x.shape[:-1], w.shape[0])) for w in weights]


def _kernel_applies(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> bool:
    """Whether x @ weight^T (+ bias) runs tempspec's kernel: bf16 on the CPU, a contiguous weight, no gradient
    wanted, at most cpu_kernel_max_rows() rows."""
    return (x.dtype == torch.bfloat16 and weight.dtype == torch.bfloat16 and x.device.type == "cpu"
            and weight.is_contiguous() and (bias is None or bias.dtype == torch.bfloat16)
            and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad
                                                  or (bias is not None and bias.requires_grad)))
            and x.numel() <= cpu_kernel_max_rows() * x.shape[-1])


def linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """F.linear(x, weight, bias), through tempspec's kernel for bf16 on the CPU up to cpu_kernel_max_rows() rows."""
    if _kernel_applies(x, weight, bias):
        if torch.compiler.is_compiling():
            return linear_bf16_cpu(x, weight, bias)
        return kernel_linear(x, weight, bias)
    return F.linear(x, weight, bias)


def linears(x: torch.Tensor, layers: Sequence[nn.Linear]) -> List[torch.Tensor]:
    """[layer(x) for layer in layers] for linear layers of one input width, in one kernel call where `linear` would
    run the kernel for each (each result the same)."""
    if all(_kernel_applies(x, layer.weight, layer.bias) for layer in layers):
        weights, biases = [layer.weight for layer in layers], [layer.bias for layer in layers]
        if torch.compiler.is_compiling():
            return linears_bf16_cpu(x, weights, biases)
        return kernel_linears(x, weights, biases)
    return [layer(x) for layer in layers]


class Linear(nn.Linear):
    """nn.Linear (same parameters and state-dict keys) whose forward is `linear`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)
