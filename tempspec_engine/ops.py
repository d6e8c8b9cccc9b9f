"""Public fused ops: `speculative_sample` (one lossless verification step) and `sample` (the draft-side sampler).

These wrappers validate inputs, normalize temperature / uniforms, draw the random numbers when none are given and
dispatch to a backend (tempspec_engine/backends.py). Exact semantics: tempspec_engine/reference.py.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch

from tempspec_engine.backends import resolve_backend

LOGIT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


class SpecSampleOutput(NamedTuple):
    """accepted [B] int64 (0..k draft tokens accepted); tokens [B, k+1] int64: the accepted draft tokens, then the
    corrected or bonus token at index `accepted`, then -1."""

    accepted: torch.Tensor
    tokens: torch.Tensor


def _check_logits(name: str, logits: torch.Tensor, ndim: int, validate: bool) -> None:
    if not isinstance(logits, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(logits).__name__}")
    if logits.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(logits.shape)}")
    if logits.dtype not in LOGIT_DTYPES:
        raise ValueError(f"{name} must be float32, bfloat16 or float16, got {logits.dtype}")
    if any(s == 0 for s in logits.shape):
        raise ValueError(f"{name} must not be empty, got shape {tuple(logits.shape)}")
    if validate:
        if torch.isnan(logits).any():
            raise ValueError(f"{name} contains NaN")
        if torch.isposinf(logits).any():
            raise ValueError(f"{name} contains +inf (only -inf is allowed, to mask tokens)")
        if torch.isneginf(logits.amax(dim=-1)).any():
            raise ValueError(f"{name} has a row whose logits are all -inf (no token can be sampled)")


def _temperature_tensor(temperature, batch: int, device: torch.device, validate: bool) -> torch.Tensor:
    """float or [B] / 0-d tensor -> contiguous fp32 [B] on `device`."""
    if isinstance(temperature, torch.Tensor):
        if temperature.dim() == 0:
            temperature = temperature.reshape(1).expand(batch)
        if temperature.shape != (batch,):
            raise ValueError(f"temperature must be a float or a tensor of shape [{batch}], got {tuple(temperature.shape)}")
        if temperature.is_complex() or not (temperature.is_floating_point() or temperature.dtype in (torch.int32, torch.int64)):
            raise ValueError(f"temperature must be a real number tensor, got {temperature.dtype}")
        temperature = temperature.to(device=device, dtype=torch.float32).contiguous()
        if validate and not bool(torch.all(torch.isfinite(temperature) & (temperature >= 0))):
            raise ValueError(f"temperature must be finite and >= 0, got {temperature.tolist()}")
        return temperature
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
        raise ValueError(f"temperature must be a float or a tensor, got {type(temperature).__name__}")
    if not math.isfinite(temperature) or temperature < 0:
        raise ValueError(f"temperature must be finite and >= 0, got {temperature}")
    return torch.full((batch,), float(temperature), dtype=torch.float32, device=device)


def _uniforms_tensor(uniforms, shape: tuple[int, ...], device, generator, validate: bool) -> torch.Tensor:
    """Given uniforms checked to be fp32 in [0, 1) of `shape`, or fresh ones drawn from `generator`."""
    if uniforms is None:
        if generator is not None and torch.device(generator.device).type != device.type:
            raise ValueError(f"generator is on {generator.device} but the logits are on {device}")
        return torch.rand(shape, generator=generator, device=device, dtype=torch.float32)
    if not isinstance(uniforms, torch.Tensor) or tuple(uniforms.shape) != shape:
        got = tuple(uniforms.shape) if isinstance(uniforms, torch.Tensor) else type(uniforms).__name__
        raise ValueError(f"uniforms must be a tensor of shape {list(shape)}, got {got}")
    if uniforms.dtype != torch.float32:
        raise ValueError(f"uniforms must be float32, got {uniforms.dtype}")
    uniforms = uniforms.to(device).contiguous()
    if validate and not bool(torch.all((uniforms >= 0) & (uniforms < 1))):
        raise ValueError("uniforms must lie in [0, 1)")
    return uniforms


def speculative_sample(
    draft_logits: torch.Tensor,
    target_logits: torch.Tensor,
    draft_tokens: torch.Tensor,
    temperature,
    generator: torch.Generator | None = None,
    uniforms: torch.Tensor | None = None,
    backend: str = "auto",
    validate: bool = True,
) -> SpecSampleOutput:
    """Verify k draft tokens against the target with lossless speculative sampling (Leviathan et al., Chen et al.).

    draft_logits [B, k, V_d] and target_logits [B, k+1, V] (float32 / bfloat16 / float16, same dtype, V_d <= V: the
    draft is padded with -inf), draft_tokens [B, k] int64 sampled from softmax(draft_logits / T), temperature float or
    [B] tensor >= 0 (0: greedy verification of that row), generator for the random draws, or uniforms [B, k+1] fp32 in
    [0, 1) to use instead (u_i for the acceptance tests, u_k for the one resampling draw). `validate=False` skips the
    checks that read tensor values (NaN logits, token ranges, uniforms range), which cost a host synchronization.
    """
    _check_logits("draft_logits", draft_logits, 3, validate)
    _check_logits("target_logits", target_logits, 3, validate)
    B, k, v_draft = draft_logits.shape
    if target_logits.shape[:2] != (B, k + 1):
        raise ValueError(
            f"target_logits must have shape [B, k+1, V] = [{B}, {k + 1}, V] for draft_logits {tuple(draft_logits.shape)},"
            f" got {tuple(target_logits.shape)}"
        )
    v_target = target_logits.shape[2]
    if v_draft > v_target:
        raise ValueError(f"draft_logits vocabulary ({v_draft}) is larger than target_logits vocabulary ({v_target})")
    if draft_logits.dtype != target_logits.dtype:
        raise ValueError(f"draft_logits ({draft_logits.dtype}) and target_logits ({target_logits.dtype}) must share a dtype")
    if draft_logits.device != target_logits.device:
        raise ValueError(f"draft_logits ({draft_logits.device}) and target_logits ({target_logits.device}) must share a device")
    device = target_logits.device
    if not isinstance(draft_tokens, torch.Tensor) or tuple(draft_tokens.shape) != (B, k):
        got = tuple(draft_tokens.shape) if isinstance(draft_tokens, torch.Tensor) else type(draft_tokens).__name__
        raise ValueError(f"draft_tokens must be a tensor of shape [{B}, {k}], got {got}")
    if draft_tokens.dtype != torch.int64:
        raise ValueError(f"draft_tokens must be int64, got {draft_tokens.dtype}")
    draft_tokens = draft_tokens.to(device).contiguous()
    if validate and bool(((draft_tokens < 0) | (draft_tokens >= v_draft)).any()):
        raise ValueError(f"draft_tokens must lie in [0, {v_draft}), got values {draft_tokens.min().item()}..{draft_tokens.max().item()}")
    temperature = _temperature_tensor(temperature, B, device, validate)
    uniforms = _uniforms_tensor(uniforms, (B, k + 1), device, generator, validate)
    impl = resolve_backend(backend, device)

    if v_draft < v_target:
        draft_logits = torch.nn.functional.pad(draft_logits, (0, v_target - v_draft), value=float("-inf"))
    accepted, tokens = impl.speculative_sample(
        draft_logits.contiguous(), target_logits.contiguous(), draft_tokens, temperature, uniforms
    )
    return SpecSampleOutput(accepted, tokens)


def sample(
    logits: torch.Tensor,
    temperature,
    generator: torch.Generator | None = None,
    uniforms: torch.Tensor | None = None,
    backend: str = "auto",
    validate: bool = True,
) -> torch.Tensor:
    """Draw one token per row from softmax(logits / T) by inverse CDF (argmax where T == 0).

    logits [B, V] float32 / bfloat16 / float16, temperature float or [B] tensor >= 0, uniforms [B] fp32 in [0, 1) or
    None (drawn from `generator`). Returns [B] int64.
    """
    _check_logits("logits", logits, 2, validate)
    B = logits.shape[0]
    temperature = _temperature_tensor(temperature, B, logits.device, validate)
    uniforms = _uniforms_tensor(uniforms, (B,), logits.device, generator, validate)
    impl = resolve_backend(backend, logits.device)
    return impl.sample(logits.contiguous(), temperature, uniforms)
