r"""Rprop: resilient backpropagation (Riedmiller & Braun, 1993).

Only the *sign* of each gradient coordinate is used. Every coordinate has its own step size, which
grows by :math:`\eta_+` while the gradient keeps its sign and shrinks by :math:`\eta_-` when it flips
(a minimum was jumped over); after a flip the coordinate rests for one step. At step :math:`t`:

.. math::

    s &= \operatorname{sign}(g_t \cdot g_{t-1}) \\
    \Delta_t &= \operatorname{clamp}\big(\Delta_{t-1} \cdot
        (\eta_+ \text{ if } s > 0,\ \eta_- \text{ if } s < 0,\ 1 \text{ otherwise}),\
        \Delta_{\min}, \Delta_{\max}\big) \\
    g_t &\leftarrow 0 \text{ where } s < 0 \\
    w_t &= w_{t-1} - \operatorname{sign}(g_t)\, \Delta_t

This is the Rprop⁻ variant torch.optim implements (no weight backtracking). It suits full-batch
training: with mini-batches the gradient's sign is noisy, and the step sizes collapse.

State (torch's names): ``step``, ``prev`` (:math:`g_{t-1}`, zeroed after a flip), ``step_size``
(:math:`\Delta`, starting at ``lr``). Checkpoints cross-load with ``torch.optim.Rprop``.
"""

from __future__ import annotations

import math
from typing import Any, Iterable

import torch

from .. import _checks
from .._base import Optimizer
from ..engine import Flag, maximum, minimum, rule, sign, where


@rule
def rprop(param, grad, prev, step_size, *, etaminus, etaplus, step_size_min, step_size_max, maximize: Flag):
    """One Rprop step of one tensor, as torch.optim computes it."""
    if maximize:
        grad = -grad
    agreement = sign(grad * prev)
    step_size = where(agreement > 0, step_size * etaplus, where(agreement < 0, step_size * etaminus, step_size))
    step_size = minimum(maximum(step_size, step_size_min), step_size_max)
    grad = where(agreement < 0, 0, grad)
    param = param - sign(grad) * step_size
    prev = grad
    return param, prev, step_size


class Rprop(Optimizer):
    """Rprop, a drop-in for ``torch.optim.Rprop``: sign-based steps with per-coordinate adaptive sizes
    (full-batch training).

    Args:
        params: parameters, ``named_parameters()`` or param-group dicts.
        lr: the initial step size of every coordinate (default 1e-2).
        etas: :math:`(\\eta_-, \\eta_+)`, the factors applied when the gradient's sign flips or holds, with
            :math:`0 < \\eta_- < 1 < \\eta_+` (default (0.5, 1.2)).
        step_sizes: :math:`(\\Delta_{\\min}, \\Delta_{\\max})`, the bounds of each step size (default (1e-6, 50)).
        maximize: ascend the objective instead of descending it (default False).
        backend, foreach, fused, max_grad_norm, skip_nonfinite, state_dtype, param_update: as for every thalweg optimizer.
    """

    name = "rprop"  # thalweg.create's name
    family = "RMSprop-like"  # the arena's family (report panels, toggles)
    rule = rprop
    state_codecs = {"prev": "signed", "step_size": "float"}  # step sizes span decades within a block

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-2,
        etas: tuple[float, float] = (0.5, 1.2),
        step_sizes: tuple[float, float] = (1e-6, 50),
        *,
        maximize: bool = False,
        backend: str = "auto",
        foreach: bool | None = None,
        fused: bool | None = None,
        max_grad_norm: float | None = None,
        skip_nonfinite: bool = False,
        state_dtype: torch.dtype | None = None,
        param_update: str = "nearest",
        differentiable: bool = False,
        capturable: bool = False,
    ) -> None:
        defaults = dict(lr=lr, etas=etas, step_sizes=step_sizes, maximize=maximize)
        super().__init__(params, defaults, backend=backend, foreach=foreach, fused=fused,
                         max_grad_norm=max_grad_norm, skip_nonfinite=skip_nonfinite, state_dtype=state_dtype, param_update=param_update,
                         differentiable=differentiable, capturable=capturable)

    def _check_hyperparameters(self, group: dict[str, Any]) -> None:
        _checks.non_negative("lr", group["lr"])
        etas, step_sizes = group["etas"], group["step_sizes"]
        if not isinstance(etas, (tuple, list)) or len(etas) != 2:
            raise ValueError(f"etas must be a pair (etaminus, etaplus), got {etas!r}")
        etaminus, etaplus = (_checks.as_number(f"etas[{i}]", eta) for i, eta in enumerate(etas))
        if not 0.0 < etaminus < 1.0 < etaplus < math.inf:
            raise ValueError(f"etas must satisfy 0 < etas[0] < 1 < etas[1] (finite), got {tuple(etas)}")
        if not isinstance(step_sizes, (tuple, list)) or len(step_sizes) != 2:
            raise ValueError(f"step_sizes must be a pair (min, max), got {step_sizes!r}")
        low, high = (_checks.as_number(f"step_sizes[{i}]", size) for i, size in enumerate(step_sizes))
        if not 0.0 <= low <= high:
            raise ValueError(f"step_sizes must satisfy 0 <= step_sizes[0] <= step_sizes[1], got {tuple(step_sizes)}")
        _checks.flag("maximize", group["maximize"])

    def _scalars(self, group: dict[str, Any]) -> dict[str, Any]:
        etaminus, etaplus = group["etas"]
        low, high = group["step_sizes"]
        return dict(etaminus=float(etaminus), etaplus=float(etaplus), step_size_min=float(low),
                    step_size_max=float(high), maximize=group["maximize"])

    def _initial_value(self, role: str, group: dict[str, Any]) -> float:
        return _checks.as_number("lr", group["lr"]) if role == "step_size" else 0.0
