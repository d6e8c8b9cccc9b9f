"""Per-request generation settings and the arguments of the fused ops they make, one step at a time.

A request samples at temperature T with optional filters (top_k, top_p, min_p; exact semantics and their order in
tempspec_engine/reference.py) and a lenience (1 = lossless). The target distribution that speculative decoding
preserves is F(p). Two ways to treat the draft:
  filter_draft=True (tempspec's default): the draft samples from its own filtered F(q), and the ratio test uses F(q);
  filter_draft=False (what vLLM and SGLang do): the draft samples from its unfiltered q, the ratio test uses q, and
      only the target is filtered. Also lossless; it exists to measure what filtering the draft gains.
"""
from __future__ import annotations

import dataclasses
from typing import Dict, Sequence

import torch

from tempspec_engine.checks import FILTERS, LENIENCE, MIN_P, TEMPERATURE, TOP_K, TOP_P
from tempspec_engine.reference import filtered_weights


@dataclasses.dataclass(frozen=True)
class SamplingSettings:
    """One request's settings: temperature (0 = greedy), top_k (0 = off), top_p (1 = off), min_p (0 = off), lenience
    (1 = lossless); their ranges: tempspec_engine/checks.py."""

    temperature: float = 0.0
    top_k: int = TOP_K.off
    top_p: float = TOP_P.off
    min_p: float = MIN_P.off
    lenience: float = LENIENCE.off

    @classmethod
    def checked(cls, temperature, top_k=None, top_p=None, min_p=None, lenience=None, where: str = "") -> \
            "SamplingSettings":
        """Settings from user values (None: off); ValueError naming the argument (and `where`, e.g. the prompt)."""
        def value(arg, given):
            return arg.off if given is None else arg.checked(given, where)

        return cls(TEMPERATURE.checked(temperature, where), value(TOP_K, top_k), value(TOP_P, top_p),
                   value(MIN_P, min_p), value(LENIENCE, lenience))

    @property
    def filtered(self) -> bool:
        """Whether a filter changes this request's distribution (greedy rows ignore filters)."""
        return self.temperature > 0 and any(getattr(self, arg.name) != arg.off for arg in FILTERS)


def parse_filters(text: str) -> Dict[str, float]:
    """A benchmark preset: 'none' -> {}; 'top_p=0.9,top_k=50' -> {'top_p': 0.9, 'top_k': 50} (keys top_k, top_p,
    min_p); ValueError naming the preset otherwise."""
    if text.strip() in ("", "none"):
        return {}
    out = {}
    for part in text.split(","):
        key, sep, value = part.strip().partition("=")
        if not sep or key not in ("top_k", "top_p", "min_p"):
            raise ValueError(f"filter preset {text!r}: use none or KEY=VALUE,... with keys top_k, top_p, min_p")
        try:
            out[key] = int(value) if key == "top_k" else float(value)
        except ValueError:
            raise ValueError(f"filter preset {text!r}: {key} needs a number") from None
    return out


def filters_label(filters: Dict[str, float]) -> str:
    return ",".join(f"{k}={v}" for k, v in filters.items()) or "none"


class StepSettings:
    """The settings of one step's rows [B] as op arguments (tensors only where some row needs them, so that a batch
    of plain temperature rows runs the temperature-only kernels)."""

    def __init__(self, rows: Sequence[SamplingSettings], device: torch.device):
        self.temperature = torch.tensor([s.temperature for s in rows], dtype=torch.float32, device=device)
        self.filters: Dict[str, torch.Tensor] = {}
        if any(s.filtered for s in rows):
            self.filters = {"top_k": torch.tensor([s.top_k for s in rows], dtype=torch.int64, device=device),
                            "top_p": torch.tensor([s.top_p for s in rows], dtype=torch.float32, device=device),
                            "min_p": torch.tensor([s.min_p for s in rows], dtype=torch.float32, device=device)}
        self.lenience: Dict[str, torch.Tensor] = {}
        if any(s.lenience != LENIENCE.off for s in rows):
            self.lenience = {"lenience": torch.tensor([s.lenience for s in rows], dtype=torch.float32,
                                                      device=device)}

    def filter_target_only(self, target_logits: torch.Tensor) -> torch.Tensor:
        """target logits [B, n, V] with the tokens the row's filters drop set to -inf: softmax of the result at T is
        F(p) exactly (filter_draft=False: the op then runs unfiltered on these and the draft's raw logits)."""
        if not self.filters:
            return target_logits
        shape = target_logits.shape[:-1]
        safe_t = torch.where(self.temperature > 0, self.temperature, torch.ones_like(self.temperature))
        per_row = [x[:, None].expand(shape) for x in (safe_t, *self.filters.values())]
        keep = filtered_weights(target_logits, *per_row) > 0
        return target_logits.masked_fill(~keep, float("-inf"))
