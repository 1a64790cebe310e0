r"""Adadelta (Zeiler, 2012).

Adagrad's per-coordinate step without its ever-shrinking learning rate: the squared gradients are
averaged over a decaying window, and the step is given units by the running RMS of the previous
updates. With decay :math:`\rho`:

.. math::

    g_t &\leftarrow g_t + \lambda w_{t-1} \\
    v_t &= \rho v_{t-1} + (1-\rho)\, g_t^2 \\
    \Delta_t &= \frac{\sqrt{u_{t-1} + \epsilon}}{\sqrt{v_t + \epsilon}}\, g_t \\
    u_t &= \rho u_{t-1} + (1-\rho)\, \Delta_t^2 \\
    w_t &= w_{t-1} - \gamma\, \Delta_t

The paper has no learning rate (:math:`\gamma = 1`, torch's default). State (torch's names): ``step``,
``square_avg`` (:math:`v`), ``acc_delta`` (:math:`u`). Checkpoints cross-load with ``torch.optim.Adadelta``.
"""

from __future__ import annotations

from typing import Any, Iterable

import torch

from .. import _checks
from .._base import Optimizer
from ..engine import Flag, rule, sqrt


@rule
def adadelta(param, grad, square_avg, acc_delta, *, lr, rho, eps, weight_decay, maximize: Flag):
    """One Adadelta step of one tensor, in torch.optim's order of operations."""
    if maximize:
        grad = -grad
    if weight_decay != 0:
        grad = grad + weight_decay * param
    square_avg = rho * square_avg + (1 - rho) * grad * grad
    std = sqrt(square_avg + eps)
    delta = sqrt(acc_delta + eps) / std * grad
    acc_delta = rho * acc_delta + (1 - rho) * delta * delta
    param = param - lr * delta
    return param, square_avg, acc_delta


class Adadelta(Optimizer):
    """Adadelta, a drop-in for ``torch.optim.Adadelta``: per-coordinate steps from running RMS ratios.

    Args:
        params: parameters, ``named_parameters()`` or param-group dicts.
        lr: scales the update (default 1.0: the paper's rule).
        rho: decay of both running averages, in [0, 1] (default 0.9).
        eps: added inside both square roots (default 1e-6).
        weight_decay: L2 penalty :math:`\\lambda` added to the gradient (default 0).
        foreach: as in torch (``True``: the foreach backend).
        maximize: ascend the objective instead of descending it (default False).
        backend, fused, max_grad_norm, skip_nonfinite, state_dtype, param_update: as for every thalweg optimizer.
    """

    name = "adadelta"  # thalweg.create's name
    family = "RMSprop-like"  # the arena's family (report panels, toggles)
    rule = adadelta
    state_codecs = {"square_avg": "unsigned", "acc_delta": "unsigned"}

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1.0,
        rho: float = 0.9,
        eps: float = 1e-6,
        weight_decay: float = 0,
        foreach: bool | None = None,
        *,
        maximize: bool = False,
        backend: str = "auto",
        fused: bool | None = None,
        max_grad_norm: float | None = None,
        skip_nonfinite: bool = False,
        state_dtype: torch.dtype | None = None,
        param_update: str = "nearest",
        differentiable: bool = False,
        capturable: bool = False,
    ) -> None:
        defaults = dict(lr=lr, rho=rho, eps=eps, weight_decay=weight_decay, maximize=maximize)
        super().__init__(params, defaults, backend=backend, foreach=foreach, fused=fused,
                         max_grad_norm=max_grad_norm, skip_nonfinite=skip_nonfinite, state_dtype=state_dtype, param_update=param_update,
                         differentiable=differentiable, capturable=capturable)

    def _check_hyperparameters(self, group: dict[str, Any]) -> None:
        _checks.non_negative("lr", group["lr"])
        _checks.in_interval("rho", group["rho"], 0.0, 1.0, closed_high=True)
        _checks.non_negative("eps", group["eps"])
        _checks.non_negative("weight_decay", group["weight_decay"])
        _checks.flag("maximize", group["maximize"])
