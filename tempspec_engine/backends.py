"""Which implementations of the fused ops exist on this machine, and which one `backend="auto"` picks.

Order for "auto": cuda > triton (GPU only) > cpu C++ > torch. Calls with sampling filters or lenience
(`filtered=True`) need a backend with the filter-capable ops: "auto" skips those without them, and an explicitly
requested backend that cannot run (or lacks them) raises BackendUnavailableError saying why.
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from typing import Callable

import torch

BACKEND_NAMES = ("torch", "cpu", "cuda", "triton")


class BackendUnavailableError(RuntimeError):
    """An explicitly requested backend cannot run for these inputs on this machine."""


@dataclass(frozen=True)
class Backend:
    """The fused ops of one implementation (signatures in tempspec_engine/reference.py).

    speculative_sample(draft, target, tokens, temperature, uniforms) and sample(logits, temperature, uniforms) are the
    temperature-only ops; the *_filtered variants (None where the backend has none) take in addition the per-row
    top_k int64 [B], top_p fp32 [B], min_p fp32 [B] and, for speculative_sample_filtered, lenience fp32 [B].
    """

    name: str
    speculative_sample: Callable
    sample: Callable
    speculative_sample_filtered: Callable | None = None
    sample_filtered: Callable | None = None

    @property
    def supports_filters(self) -> bool:
        return self.speculative_sample_filtered is not None and self.sample_filtered is not None


@functools.lru_cache(maxsize=None)
def _extension():
    """tempspec_engine._C, or the reason it cannot be imported."""
    try:
        from tempspec_engine import _C
    except ImportError as exc:
        return None, f"the C++ extension tempspec_engine._C is not built or failed to import ({exc})"
    return _C, None


@functools.lru_cache(maxsize=None)
def _triton_kernels():
    try:
        from tempspec_engine.kernels import acceptance_triton
    except ImportError as exc:
        return None, f"triton is not importable ({exc})"
    return acceptance_triton, None


def _load(name: str, device: torch.device) -> tuple[Backend | None, str | None]:
    """The backend `name` for tensors on `device`, or (None, reason)."""
    if name == "torch":
        from tempspec_engine import torch_backend

        return Backend("torch", torch_backend.speculative_sample_torch, torch_backend.sample_torch,
                       torch_backend.speculative_sample_filtered_torch, torch_backend.sample_filtered_torch), None
    if name == "cpu":
        if device.type != "cpu":
            return None, f"the cpu backend needs CPU tensors, got {device}"
        ext, why = _extension()
        if ext is None:
            return None, why
        return Backend("cpu", ext.speculative_sample_cpu, ext.sample_cpu,
                       getattr(ext, "speculative_sample_filtered_cpu", None),
                       getattr(ext, "sample_filtered_cpu", None)), None
    if name == "cuda":
        if device.type != "cuda":
            return None, f"the cuda backend needs CUDA tensors, got {device}"
        ext, why = _extension()
        if ext is None:
            return None, why
        if not ext.with_cuda:
            return None, "tempspec_engine._C was built without CUDA (torch without CUDA or nvcc not found at build time)"
        return Backend("cuda", ext.speculative_sample_cuda, ext.sample_cuda,
                       getattr(ext, "speculative_sample_filtered_cuda", None),
                       getattr(ext, "sample_filtered_cuda", None)), None
    if name == "triton":
        if device.type != "cuda" and os.environ.get("TRITON_INTERPRET", "0") != "1":
            return None, f"the triton backend needs CUDA tensors (or TRITON_INTERPRET=1 for CPU tensors), got {device}"
        kernels, why = _triton_kernels()
        if kernels is None:
            return None, why
        return Backend("triton", kernels.speculative_sample_triton, kernels.sample_triton,
                       kernels.speculative_sample_filtered_triton, kernels.sample_filtered_triton), None
    check_backend_name(name)  # (every valid name returned above)
    raise AssertionError(f"backend {name!r} has no loader")


def check_backend_name(name: str) -> None:
    """ValueError unless `name` is "auto" or one of BACKEND_NAMES (before anything is loaded or run)."""
    if name != "auto" and name not in BACKEND_NAMES:
        raise ValueError(f"backend must be one of 'auto', {', '.join(repr(n) for n in BACKEND_NAMES)}; got {name!r}")


def available_backends(device: torch.device | str = "cpu") -> list[str]:
    """Names of every backend that can run on `device`: those `auto` considers first, in its order of preference."""
    device = torch.device(device)
    ordered = _auto_order(device) + tuple(n for n in BACKEND_NAMES if n not in _auto_order(device))
    return [name for name in ordered if _load(name, device)[0] is not None]


def _auto_order(device: torch.device) -> tuple[str, ...]:
    return ("cuda", "triton", "torch") if device.type == "cuda" else ("cpu", "torch")


def resolve_backend(name: str, device: torch.device, filtered: bool = False) -> Backend:
    """The Backend to run for `name` ("auto" or one of BACKEND_NAMES) on `device`; with `filtered`, one whose
    filter-capable ops exist."""
    if name == "auto":
        for candidate in _auto_order(device):
            backend, _ = _load(candidate, device)
            if backend is not None and (backend.supports_filters or not filtered):
                return backend
    backend, why = _load(name, device)
    if backend is None:
        raise BackendUnavailableError(f"backend {name!r} is not available: {why}")
    if filtered and not backend.supports_filters:
        raise BackendUnavailableError(
            f"backend {name!r} does not support top_k / top_p / min_p / lenience yet; use 'auto' or 'torch'"
        )
    return backend
