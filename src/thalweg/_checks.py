"""Validation of user input: every message names the argument as spelled in the signature, and its value.

Errors, never asserts: these run on what users type.
"""

from __future__ import annotations

import math
from numbers import Integral, Real
from typing import Any

import torch


def as_number(name: str, value: Any) -> float:
    """``value`` as a float, or a TypeError that names ``name``. Accepts 0-d tensors (torch allows a tensor lr)."""
    if type(value) is float or type(value) is int:  # the usual case, without the costlier checks below
        return float(value)
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"{name} must be a number or a one-element tensor, got a tensor of shape {tuple(value.shape)}")
        if value.is_meta:
            raise ValueError(f"{name} must be a number or a one-element tensor holding one, got a meta tensor (no value)")
        if value.is_complex() or value.dtype == torch.bool:
            raise TypeError(f"{name} must be a real number, got a {value.dtype} tensor")
        return float(value.detach().cpu().reshape(()).item())
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"{name} must be a real number, got {value!r} ({type(value).__name__})")
    return float(value)


def non_negative(name: str, value: Any) -> None:
    number = as_number(name, value)
    if math.isnan(number) or math.isinf(number):
        raise ValueError(f"{name} must be a finite number >= 0, got {number}")
    if number < 0:
        raise ValueError(f"{name} must be >= 0, got {number}")


def positive(name: str, value: Any) -> None:
    number = as_number(name, value)
    if not math.isfinite(number) or number <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {number}")


def in_interval(name: str, value: Any, low: float, high: float, *, closed_high: bool) -> None:
    """``low <= value < high`` (or ``<= high`` when ``closed_high``)."""
    number = as_number(name, value)
    inside = low <= number <= high if closed_high else low <= number < high
    if not inside:
        bracket = "]" if closed_high else ")"
        raise ValueError(f"{name} must be in [{low:g}, {high:g}{bracket}, got {number}")


def betas(value: Any, count: int = 2) -> None:
    """``betas``: a tuple of ``count`` numbers, each in [0, 1)."""
    if not isinstance(value, (tuple, list)) or len(value) != count:
        names = ", ".join(f"beta{i + 1}" for i in range(count))
        raise ValueError(f"betas must be {'a pair' if count == 2 else f'{count} numbers'} ({names}), got {value!r}")
    for index, beta in enumerate(value):
        in_interval(f"betas[{index}]", beta, 0.0, 1.0, closed_high=False)


def flag(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {value!r}")


def optional_positive(name: str, value: Any) -> None:
    if value is not None:
        positive(name, value)


def optional_positive_int(name: str, value: Any) -> None:
    """None, or an integer >= 1 (a number of steps)."""
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, Integral):
        raise TypeError(f"{name} must be None or a whole number of steps, got {value!r} ({type(value).__name__})")
    if value < 1:
        raise ValueError(f"{name} must be >= 1 (or None: no warm-up), got {value}")
