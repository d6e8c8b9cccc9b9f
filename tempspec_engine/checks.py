"""Checks of the engine's Python arguments: numbers from Python, numpy or 0-d torch alike, bools refused, and a
ValueError that names the argument."""
from __future__ import annotations

import math
import numbers
import operator

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


def per_prompt(value, n: int) -> list:
    """A list, tuple or 1-d array/tensor as given (one value per prompt), anything else repeated n times."""
    if isinstance(value, (list, tuple)) or getattr(value, "ndim", 0) == 1:
        return list(value)
    return [value] * n


def check_positive_int(name: str, value) -> None:
    if not is_int(value) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


def real_number(value, name: str) -> float:
    """A finite real >= 0 from a Python, numpy or 0-d torch number (not a bool); ValueError naming `name`."""
    if isinstance(value, torch.Tensor) and value.dim() == 0 and not value.is_complex() and value.dtype != torch.bool:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a real number, got {type(value).__name__} {value!r}")
    value = float(value)
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be finite and >= 0, got {value}")
    return value
