"""Public fused ops: `speculative_sample` (one lossless verification step) and `sample` (the draft-side sampler).

These wrappers validate inputs, normalize temperature / uniforms, draw the random numbers when none are given and
dispatch to a backend (tempspec_engine/backends.py). Exact semantics: tempspec_engine/reference.py.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from tempspec_engine.backends import resolve_backend
from tempspec_engine.checks import FILTERS, LENIENCE, TEMPERATURE, SamplingArg, is_real_number

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


def _per_row_tensor(name: str, value, batch: int, device: torch.device, integer: bool) -> torch.Tensor:
    """A 0-d or [B] tensor of per-row values -> contiguous [B] on `device` (int64 if `integer`, else fp32)."""
    if value.dim() == 0:
        value = value.reshape(1).expand(batch)
    if value.shape != (batch,):
        raise ValueError(f"{name} must be a number or a tensor of shape [{batch}], got {tuple(value.shape)}")
    if integer and (value.is_floating_point() or value.is_complex() or value.dtype == torch.bool):
        raise ValueError(f"{name} must be an integer tensor, got {value.dtype}")
    if value.is_complex() or value.dtype == torch.bool:
        raise ValueError(f"{name} must be a real number tensor, got {value.dtype}")
    return value.to(device=device, dtype=torch.int64 if integer else torch.float32).contiguous()


def _row_arg_tensor(arg: SamplingArg, value, batch: int, device: torch.device, validate: bool) -> torch.Tensor | None:
    """None / number / 0-d or [B] tensor -> [B] tensor (int64 for top_k, else fp32), or None when known to be off
    (temperature, which no value turns off, must be given). The ranges: tempspec_engine/checks.py.

    Off is known without reading device memory for None and numbers; for tensors only when `validate` (which reads
    them anyway): with validate=False a tensor is passed on as it is, even if every row is off.
    """
    if value is None and arg.off is not None:
        return None
    if isinstance(value, torch.Tensor):
        tensor = _per_row_tensor(arg.name, value, batch, device, arg.integer)
        if validate:
            if not bool(torch.all(arg.in_range(tensor))):
                raise ValueError(f"{arg.name} must be {arg.expected} in every row, got {tensor.tolist()}")
            if arg.off is not None and bool(torch.all(tensor == arg.off)):
                return None
        return tensor
    if not is_real_number(value):
        raise ValueError(f"{arg.name} must be a real number or a tensor, got {type(value).__name__}")
    value = arg.as_kernels_see(arg.checked(value))
    if value == arg.off:
        return None
    return torch.full((batch,), value, dtype=torch.int64 if arg.integer else torch.float32, device=device)


class Filters(NamedTuple):
    """Per-row sampling settings as passed to the filter-capable backend ops (semantics: reference.py):
    top_k int64 [B] (0: off), top_p fp32 [B] (1: off), min_p fp32 [B] (0: off)."""

    top_k: torch.Tensor
    top_p: torch.Tensor
    min_p: torch.Tensor


def _filters(top_k, top_p, min_p, batch: int, device: torch.device, validate: bool) -> Filters | None:
    """The checked filters, or None when every one is known to be off (then the temperature-only kernels run)."""
    given = [_row_arg_tensor(arg, value, batch, device, validate)
             for arg, value in zip(FILTERS, (top_k, top_p, min_p))]
    if all(t is None for t in given):
        return None
    return Filters(*[t if t is not None else off for t, off in zip(given, _off_filters(batch, device))])


def _off_filters(batch: int, device: torch.device) -> Filters:
    """Filters with every one off, for rows (or calls) that only use lenience."""
    return Filters(*[torch.full((batch,), arg.off, dtype=torch.int64 if arg.integer else torch.float32, device=device)
                     for arg in FILTERS])


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
    top_k=None,
    top_p=None,
    min_p=None,
    lenience=None,
) -> SpecSampleOutput:
    """Verify k draft tokens against the target with lossless speculative sampling (Leviathan et al., Chen et al.).

    draft_logits [B, k, V_d] and target_logits [B, k+1, V] (float32 / bfloat16 / float16, same dtype, V_d <= V: the
    draft is padded with -inf), draft_tokens [B, k] int64 sampled from softmax(draft_logits / T), temperature float or
    [B] tensor >= 0 (0: greedy verification of that row), generator for the random draws, or uniforms [B, k+1] fp32 in
    [0, 1) to use instead (u_i for the acceptance tests, u_k for the one resampling draw). `validate=False` skips the
    checks that read tensor values (NaN logits, token ranges, uniforms range), which cost a host synchronization.

    Sampling filters, each a number for every row or a [B] tensor (None: off), applied to the target and the draft
    distributions alike (the draft tokens must be drawn from the filtered draft distribution, e.g. by `sample` with
    the same settings): top_k integer >= 0 (0: off), top_p in (0, 1] (1: off), min_p in [0, 1) (0: off).
    lenience in (0, 1] (1: lossless) makes the acceptance lossy (accept iff u * lenience * q(x) <= p(x)). Exact rules:
    tempspec_engine/reference.py. With every filter off and lenience 1 known without reading device memory (numbers
    or None, or tensors when validate=True) the temperature-only kernels run.
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
    temperature = _row_arg_tensor(TEMPERATURE, temperature, B, device, validate)
    uniforms = _uniforms_tensor(uniforms, (B, k + 1), device, generator, validate)
    filters = _filters(top_k, top_p, min_p, B, device, validate)
    lenience = _row_arg_tensor(LENIENCE, lenience, B, device, validate)
    plain = filters is None and lenience is None
    impl = resolve_backend(backend, device, filtered=not plain)

    if v_draft < v_target:
        draft_logits = torch.nn.functional.pad(draft_logits, (0, v_target - v_draft), value=float("-inf"))
    args = (draft_logits.contiguous(), target_logits.contiguous(), draft_tokens, temperature, uniforms)
    if plain:
        accepted, tokens = impl.speculative_sample(*args)
    else:
        if filters is None:
            filters = _off_filters(B, device)
        if lenience is None:
            lenience = torch.ones(B, dtype=torch.float32, device=device)
        accepted, tokens = impl.speculative_sample_filtered(*args, *filters, lenience)
    return SpecSampleOutput(accepted, tokens)


def sample(
    logits: torch.Tensor,
    temperature,
    generator: torch.Generator | None = None,
    uniforms: torch.Tensor | None = None,
    backend: str = "auto",
    validate: bool = True,
    top_k=None,
    top_p=None,
    min_p=None,
) -> torch.Tensor:
    """Draw one token per row from F(softmax(logits / T)) by inverse CDF (argmax where T == 0).

    logits [B, V] float32 / bfloat16 / float16, temperature number or [B] tensor >= 0, uniforms [B] fp32 in [0, 1) or
    None (drawn from `generator`), filters top_k / top_p / min_p as in `speculative_sample` (F: reference.py).
    Returns [B] int64.
    """
    _check_logits("logits", logits, 2, validate)
    B = logits.shape[0]
    temperature = _row_arg_tensor(TEMPERATURE, temperature, B, logits.device, validate)
    uniforms = _uniforms_tensor(uniforms, (B,), logits.device, generator, validate)
    filters = _filters(top_k, top_p, min_p, B, logits.device, validate)
    impl = resolve_backend(backend, logits.device, filtered=filters is not None)
    if filters is None:
        return impl.sample(logits.contiguous(), temperature, uniforms)
    return impl.sample_filtered(logits.contiguous(), temperature, uniforms, *filters)
