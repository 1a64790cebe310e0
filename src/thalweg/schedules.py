"""Learning-rate schedules built on torch's ``LambdaLR`` (torch's own schedulers are not re-implemented).

Each factor is a small callable object rather than a lambda, so ``scheduler.state_dict()`` saves it
and a resumed run continues the same schedule.
"""

from __future__ import annotations

import math

import torch
from torch.optim.lr_scheduler import LambdaLR

from . import _checks


def _check(warmup_steps: int, total_steps: int, min_lr_ratio: float) -> None:
    for name, value in (("warmup_steps", warmup_steps), ("total_steps", total_steps)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name} must be an int, got {value!r}")
    if warmup_steps < 0:
        raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
    if total_steps <= 0:
        raise ValueError(f"total_steps must be > 0, got {total_steps}")
    if warmup_steps > total_steps:
        raise ValueError(f"warmup_steps must be <= total_steps, got warmup_steps={warmup_steps}, total_steps={total_steps}")
    _checks.in_interval("min_lr_ratio", min_lr_ratio, 0.0, 1.0, closed_high=True)


class _WarmupThenDecay:
    """lr factor: linear warm-up from 1/warmup_steps to 1, then a decay to ``min_lr_ratio`` at ``total_steps``."""

    def __init__(self, warmup_steps: int, total_steps: int, min_lr_ratio: float, shape: str) -> None:
        self.warmup_steps, self.total_steps, self.min_lr_ratio, self.shape = warmup_steps, total_steps, min_lr_ratio, shape

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            # (step + 1): the first step already moves; a factor of 0 would waste it.
            return (step + 1) / self.warmup_steps
        progress = min(1.0, (step - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps))
        remaining = 0.5 * (1 + math.cos(math.pi * progress)) if self.shape == "cosine" else 1 - progress
        return self.min_lr_ratio + (1 - self.min_lr_ratio) * remaining


def warmup_cosine(optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int, min_lr_ratio: float = 0.0) -> LambdaLR:
    """Linear warm-up over ``warmup_steps``, then a cosine decay to ``min_lr_ratio × lr`` at ``total_steps``.

    Call ``scheduler.step()`` after each ``optimizer.step()``, as with every torch scheduler.
    """
    _check(warmup_steps, total_steps, min_lr_ratio)
    return LambdaLR(optimizer, _WarmupThenDecay(warmup_steps, total_steps, float(min_lr_ratio), "cosine"))


def warmup_linear(optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int, min_lr_ratio: float = 0.0) -> LambdaLR:
    """Linear warm-up over ``warmup_steps``, then a linear decay to ``min_lr_ratio × lr`` at ``total_steps``."""
    _check(warmup_steps, total_steps, min_lr_ratio)
    return LambdaLR(optimizer, _WarmupThenDecay(warmup_steps, total_steps, float(min_lr_ratio), "linear"))
