"""Two-dimensional test functions: the optimizer's path is visible, drawn over the function's contours.

Each function is written once with operations that work on both torch tensors and numpy arrays, so
training (torch, autograd) and drawing (numpy, contour grid) use the same formula.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import torch


def rosenbrock(x: Any, y: Any) -> Any:
    """Rosenbrock's banana valley; minimum 0 at (1, 1). Curvature ~1000 across the valley, ~1 along it."""
    return (1 - x) ** 2 + 100 * (y - x**2) ** 2


def beale(x: Any, y: Any) -> Any:
    """Beale's function; minimum 0 at (3, 0.5), with flat plateaus and steep walls."""
    return (1.5 - x + x * y) ** 2 + (2.25 - x + x * y**2) ** 2 + (2.625 - x + x * y**3) ** 2


def _cos(v: Any) -> Any:
    return torch.cos(v) if isinstance(v, torch.Tensor) else __import__("numpy").cos(v)


def rastrigin(x: Any, y: Any) -> Any:
    """Rastrigin's egg-crate; global minimum 0 at the origin and a local minimum near every integer point."""
    return 20 + x**2 - 10 * _cos(2 * math.pi * x) + y**2 - 10 * _cos(2 * math.pi * y)


@dataclass(frozen=True)
class Surface:
    """A 2-D test function with where to start, where the minimum is and what window to draw."""

    fn: Callable[[Any, Any], Any]
    start: tuple[float, float]
    minimum: tuple[float, float]
    xlim: tuple[float, float]
    ylim: tuple[float, float]


SURFACES: dict[str, Surface] = {
    "rosenbrock": Surface(rosenbrock, (-1.2, 1.0), (1.0, 1.0), (-2.0, 2.0), (-1.0, 3.0)),
    "beale": Surface(beale, (1.0, 1.5), (3.0, 0.5), (-0.5, 4.0), (-1.5, 2.0)),
    "rastrigin": Surface(rastrigin, (2.3, -1.7), (0.0, 0.0), (-3.0, 3.0), (-3.0, 3.0)),
}
