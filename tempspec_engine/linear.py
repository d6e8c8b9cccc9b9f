"""The linear layer of tempspec's transformer: torch's F.linear, or tempspec's bf16 kernel where torch's is slow.

On a CPU without oneDNN's bf16 matrix product (AVX2 without AVX-512: `torch.ops.mkldnn._is_mkldnn_bf16_supported()`
is False), torch multiplies bf16 matrices one input row at a time, so verifying k+1 tokens costs k+1 decodes and SD
cannot pay. There `linear` runs `csrc/linear_cpu.cpp` instead, which reads each weight once for all rows (fp32
sums, bf16 out, like torch's) and whose every output row is independent of the other rows.
On a CPU with oneDNN's bf16 product, each of its calls on a few rows costs tens of microseconds (the default target's
decode took 40 ms through it on a 2-core Zen 4, 18 ms through the kernel). The kernel takes calls of up to
ONEDNN_CROSSOVER_ROWS[kernel_isa()] input rows: the avx2 variant's few, the avx512bf16 variant's all of them.
The kernel has two variants (kernel_isa): "avx512bf16" (vdpbf16ps, on CPUs with AVX-512 BF16) and "avx2";
`TEMPSPEC_CPU_LINEAR_ISA=avx2` makes a CPU with both run the avx2 one (default auto: the best). The avx512bf16
variant reads each weight in a packed layout (`packed_weight`: tiles of 32 outputs with their input pairs side by
side), made once per weight and kept while the weight is unchanged; it doubles the memory those weights take
(`TEMPSPEC_CPU_LINEAR_ISA=avx2` keeps none, at the avx2 variant's speed).

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
import weakref
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

POLICIES = ("auto", "1", "0")
ALL_ROWS = 1 << 62
# Input rows up to which the kernel's variant beats oneDNN's bf16 product, measured on a 2-core Zen 4 EPYC. The avx2
# variant was within 10% at 8 rows in a forward of the default target, oneDNN ahead beyond. The avx512bf16 variant on
# packed weights beats it at every size: each of the default target's shapes 1.3-5.3x up to 24 rows and 1.04-1.09x at
# 512 (benchmarks/results/linear_cpu_amd-epyc-zen4_packed.json), and a 256-token prefill took 182-208 ms against
# 215-221 through oneDNN (docs/kernels_cpu.md, "Measured").
ONEDNN_CROSSOVER_ROWS = {"avx2": 8, "avx512bf16": ALL_ROWS}


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


# packed_weight's cache: (id of the weight's base tensor, offset, shape, strides) -> (weakref to that base, its
# data pointer, its in-place version, the packed weight)
_PACKED: Dict[tuple, tuple] = {}


def packed_weight(weight: torch.Tensor) -> Optional[torch.Tensor]:
    """`weight` [N, K] bf16 in the layout the avx512bf16 variant streams (linear_bf16_cpu_pack: tiles of 32 outputs
    with their (k, k+1) pairs side by side, [ceil(N/32), ceil(K/2), 64] bf16), packed once and kept while the weight
    (or the tensor it is a view of) lives with the same storage and in-place version. None for an inference tensor,
    which has no version counter to tell whether it changed (kernel_linears then runs the avx2 variant)."""
    if weight.is_inference():
        return None
    base = weight if weight._base is None else weight._base
    key = (id(base), weight.storage_offset(), tuple(weight.shape), tuple(weight.stride()))
    state = (weight.data_ptr(), weight._version)
    entry = _PACKED.get(key)
    if entry is not None and entry[0]() is base and entry[1] == state:
        return entry[2]
    if entry is None:  # forget it with its base (an id is reused only after its object is gone)
        weakref.finalize(base, _PACKED.pop, key, None)
    packed = _extension().linear_bf16_cpu_pack(weight.detach())
    _PACKED[key] = (weakref.ref(base), state, packed)
    return packed


def kernel_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None, isa: str = "",
                  packed: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The kernel itself (needs kernel_available()): x [..., K] bf16, weight [N, K] bf16 contiguous, bias [N] or
    None, all on the CPU -> [..., N] bf16; isa: the variant, "" for kernel_isa(); packed: packed_weight(weight)
    when the caller keeps it (None: looked up in packed_weight's cache)."""
    return kernel_linears(x, [weight], [bias], isa, [packed])[0]


def kernel_linears(x: torch.Tensor, weights: Sequence[torch.Tensor], biases: Sequence[Optional[torch.Tensor]],
                   isa: str = "", packed: Optional[Sequence[Optional[torch.Tensor]]] = None) -> List[torch.Tensor]:
    """kernel_linear of x by each weight (one K; a bias or None each) in one call -> [..., N_i] bf16 each. The
    avx512bf16 variant reads each weight's packed form (packed, else packed_weight's); a call with a weight that has
    none (an inference tensor: packed_weight) runs the avx2 variant, which reads the weights as they are, rather than
    pack them anew in every call."""
    isa = isa or kernel_isa()
    if isa == "avx512bf16":
        packed = [p if p is not None else packed_weight(w) for w, p in zip(weights, packed or [None] * len(weights))]
        if any(p is None for p in packed):
            isa = "avx2"
    if isa != "avx512bf16":
        packed = []
    return _extension().linear_bf16_cpu_many(x, list(weights), list(biases), isa, packed)


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
    if _input_takes_kernel(x) and all(isinstance(layer, Linear) for layer in layers):
        args = [layer.kernel_args() for layer in layers]
        if all(a is not None for a in args):
            weights, biases, packed = zip(*args)
            return _extension().linear_bf16_cpu_many(x, list(weights), list(biases), kernel_isa(), list(packed))
    if all(_kernel_applies(x, layer.weight, layer.bias) for layer in layers):
        weights, biases = [layer.weight for layer in layers], [layer.bias for layer in layers]
        if torch.compiler.is_compiling():
            return linears_bf16_cpu(x, weights, biases)
        return kernel_linears(x, weights, biases)
    return [layer(x) for layer in layers]


def _input_takes_kernel(x: torch.Tensor) -> bool:
    """The input's half of _kernel_applies, for inference (no gradient mode) in eager mode: the fast path of Linear
    and linears, whose layers check their own half once (Linear.kernel_args)."""
    return (x.dtype is torch.bfloat16 and x.is_cpu and not torch.is_grad_enabled()
            and not torch.compiler.is_compiling() and x.numel() <= cpu_kernel_max_rows() * x.shape[-1])


class Linear(nn.Linear):
    """nn.Linear (same parameters and state-dict keys) whose forward is `linear`. Under inference it keeps what the
    kernel needs of its parameters (`kernel_args`: checked once, and their packed form for the avx512bf16 variant),
    so that a call checks only its input: a forward of the default target makes 211 of them."""

    # (weight, bias, the weight's in-place version, its data pointer, kernel_isa(), kernel_args()) as last checked
    _kernel = None

    def kernel_args(self):
        """(weight, bias, packed) as the kernel takes them (packed: packed_weight's form for the avx512bf16 variant,
        None for the avx2 one), or None where the parameters do not qualify (not bf16 on the CPU, a non-contiguous
        weight, the kernel unavailable, or an avx512bf16 weight without a version counter: packed_weight). Rechecked
        when the weight or bias is another tensor or the weight changed in place."""
        w, b = self._parameters["weight"], self._parameters["bias"]
        entry = self._kernel
        if (entry is not None and entry[0] is w and entry[1] is b and entry[2] == w._version
                and entry[3] == w.data_ptr() and entry[4] == kernel_isa()):
            return entry[5]
        isa = kernel_isa()
        qualifies = bool(isa and w.dtype == torch.bfloat16 and w.device.type == "cpu" and w.is_contiguous()
                         and (b is None or (b.dtype == torch.bfloat16 and b.device.type == "cpu")))
        if w.is_inference():  # no version counter to tell a change by: nothing kept, nothing packed
            return (w, b, None) if qualifies and isa != "avx512bf16" else None
        args = None
        if qualifies:
            args = (w, b, _extension().linear_bf16_cpu_pack(w.detach()) if isa == "avx512bf16" else None)
        self._kernel = (w, b, w._version, w.data_ptr(), isa, args)
        return args

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _input_takes_kernel(x):
            args = self.kernel_args()
            if args is not None:
                return _extension().linear_bf16_cpu(x, args[0], args[1], kernel_isa(), args[2])
        return linear(x, self.weight, self.bias)
