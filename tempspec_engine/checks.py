"""Checks of the engine's Python arguments: numbers from Python, numpy or 0-d torch alike, bools refused, and a
ValueError that names the argument. The valid range of each sampling argument (TEMPERATURE, TOP_K, TOP_P, MIN_P,
LENIENCE) is written here only: the engine's per-request settings (sampling.py) and the fused ops (ops.py) both check
against it."""
from __future__ import annotations

import math
import numbers
import operator
from typing import Callable, NamedTuple, Optional

import numpy as np
import torch


def is_int(x) -> bool:
    """An integer that is not a bool (Python, numpy or 0-d torch integers)."""
    if isinstance(x, bool) or (isinstance(x, torch.Tensor) and (x.dim() != 0 or x.is_floating_point())):
        return False
    try:
        operator.index(x)
    except TypeError:
        return False
    return True


def is_real_number(x) -> bool:
    """A real number that is not a bool (Python, numpy or 0-d torch reals: int, float, np.float32, np.int64, ...);
    complex numbers are not."""
    if isinstance(x, torch.Tensor):
        return x.dim() == 0 and not x.is_complex() and x.dtype != torch.bool
    return isinstance(x, numbers.Real) and not isinstance(x, (bool, np.bool_))


def per_prompt(value, n: int) -> list:
    """A list, tuple or 1-d array/tensor as given (one value per prompt), anything else repeated n times."""
    if isinstance(value, (list, tuple)) or getattr(value, "ndim", 0) == 1:
        return list(value)
    return [value] * n


def check_positive_int(name: str, value) -> None:
    if not is_int(value) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


class SamplingArg(NamedTuple):
    """One per-row sampling argument: its type, its valid range and the value that turns it off."""

    name: str
    integer: bool
    in_range: Callable  # value or tensor -> bool or bool tensor (False for NaN)
    expected: str  # the range, for error messages
    off: Optional[float]  # None: no value turns it off

    def as_kernels_see(self, value):
        """A number as the kernels see it: int64 (any top_k >= V keeps every token) or fp32 (1e-50 rounds to 0)."""
        if self.integer:
            return min(int(value), 2**63 - 1)
        with np.errstate(over="ignore"):
            return float(np.float32(value))

    def checked(self, value, where: str = ""):
        """A Python, numpy or 0-d torch number whose value as the kernels see it lies in the range, as a Python int
        (integer arguments, as the kernels see it: a top_k past int64 is capped) or float; ValueError naming the
        argument (and `where`, e.g. the prompt) otherwise."""
        if not is_real_number(value) or (self.integer and not is_int(value)):
            kind = self.expected if self.integer else "a real number"
            raise ValueError(f"{self.name}{where} must be {kind}, got {type(value).__name__} {value!r}")
        value = int(value) if self.integer else float(value)
        if not self.in_range(self.as_kernels_see(value)):  # NaN fails every comparison
            raise ValueError(f"{self.name}{where} must be {self.expected}, got {value!r}")
        return self.as_kernels_see(value) if self.integer else value


TEMPERATURE = SamplingArg("temperature", False, lambda v: (v >= 0) & (v < math.inf), "finite and >= 0", None)
TOP_K = SamplingArg("top_k", True, lambda v: v >= 0, "an integer >= 0 (0: off)", 0)
TOP_P = SamplingArg("top_p", False, lambda v: (v > 0) & (v <= 1), "in (0, 1] (1: off)", 1.0)
MIN_P = SamplingArg("min_p", False, lambda v: (v >= 0) & (v < 1), "in [0, 1) (0: off)", 0.0)
LENIENCE = SamplingArg("lenience", False, lambda v: (v > 0) & (v <= 1), "in (0, 1] (1: lossless)", 1.0)
FILTERS = (TOP_K, TOP_P, MIN_P)
