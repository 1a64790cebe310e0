r"""ASGD: averaged stochastic gradient descent (Polyak & Juditsky, 1992; Bottou's schedule, 2012).

SGD with a decaying step size whose *average* iterate is the estimate: the average of the SGD
iterates converges at the optimal rate for convex problems even when the iterates themselves
bounce around. At step :math:`t`, with :math:`\eta_t, \mu_t` computed after the previous step:

.. math::

    g_t &\leftarrow g_t + \lambda_{wd} w_{t-1} \\
    w_t &= (1 - \lambda \eta_{t-1})\, w_{t-1} - \eta_{t-1} g_t \\
    \bar w_t &= \bar w_{t-1} + \mu_{t-1} (w_t - \bar w_{t-1}) \quad (\bar w_t = w_t \text{ while } \mu = 1) \\
    \eta_t &= \frac{\gamma}{(1 + \lambda \gamma t)^{\alpha}}, \qquad \mu_t = \frac{1}{\max(1, t - t_0)}

Averaging starts after :math:`t_0` steps (default 1e6: in practice plain SGD with a slowly decaying
step, as torch.optim's defaults make it). The average :math:`\bar w` is kept in the state (``ax``); the
parameters stay the SGD iterates — copy ``ax`` into the model to evaluate the average.

:math:`\eta` and :math:`\mu` are per-parameter 0-d tensors of torch's scalar dtype, as in torch.optim:
:meth:`ASGD._supplied` reads them for the step and :meth:`ASGD._after_step` writes the next ones.

State (torch's names): ``step``, ``eta``, ``mu``, ``ax`` (:math:`\bar w`). Checkpoints cross-load with
``torch.optim.ASGD``.
"""

from __future__ import annotations

import math
from typing import Any, Iterable

import numpy as np
import torch

from .. import _checks
from .._base import Optimizer
from ..engine import Flag, PerTensor, rule, where


@rule
def asgd(param, grad, ax, *, lambd, weight_decay, eta: PerTensor, mu: PerTensor, maximize: Flag):
    """One ASGD step of one tensor, in torch.optim's order of operations."""
    if maximize:
        grad = -grad
    if weight_decay != 0:
        grad = grad + weight_decay * param
    param = param * (1 - lambd * eta)
    param = param - eta * grad
    ax = where(mu == 1, param, ax + (param - ax) * mu)
    return param, ax


class ASGD(Optimizer):
    """ASGD, a drop-in for ``torch.optim.ASGD``: SGD with a decaying step and an averaged iterate (``ax``).

    Args:
        params: parameters, ``named_parameters()`` or param-group dicts.
        lr: learning rate :math:`\\gamma` (default 1e-2).
        lambd: decay term :math:`\\lambda` of the step size and the weights (default 1e-4).
        alpha: power :math:`\\alpha` of the step-size decay (default 0.75).
        t0: the step after which averaging starts (default 1e6).
        weight_decay: L2 penalty added to the gradient (default 0).
        foreach: as in torch (``True``: the foreach backend).
        maximize: ascend the objective instead of descending it (default False).
        backend, fused, max_grad_norm, skip_nonfinite, state_dtype, param_update: as for every thalweg optimizer.
    """

    name = "asgd"  # thalweg.create's name
    family = "SGD-like"  # the arena's family (report panels, toggles)
    rule = asgd

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-2,
        lambd: float = 1e-4,
        alpha: float = 0.75,
        t0: float = 1e6,
        weight_decay: float = 0,
        foreach: bool | None = None,
        maximize: bool = False,
        differentiable: bool = False,
        capturable: bool = False,
        *,
        backend: str = "auto",
        fused: bool | None = None,
        max_grad_norm: float | None = None,
        skip_nonfinite: bool = False,
        state_dtype: torch.dtype | None = None,
        param_update: str = "nearest",
    ) -> None:
        defaults = dict(lr=lr, lambd=lambd, alpha=alpha, t0=t0, weight_decay=weight_decay, maximize=maximize)
        super().__init__(params, defaults, backend=backend, foreach=foreach, fused=fused,
                         max_grad_norm=max_grad_norm, skip_nonfinite=skip_nonfinite, state_dtype=state_dtype, param_update=param_update,
                         differentiable=differentiable, capturable=capturable)

    def _check_hyperparameters(self, group: dict[str, Any]) -> None:
        _checks.non_negative("lr", group["lr"])
        _checks.non_negative("lambd", group["lambd"])
        _checks.non_negative("alpha", group["alpha"])
        t0 = _checks.as_number("t0", group["t0"])
        if math.isnan(t0):
            raise ValueError(f"t0 must be a number of steps, got {t0}")
        _checks.non_negative("weight_decay", group["weight_decay"])
        _checks.flag("maximize", group["maximize"])

    def _scalars(self, group: dict[str, Any]) -> dict[str, Any]:
        return dict(lambd=float(group["lambd"]), weight_decay=float(group["weight_decay"]), maximize=group["maximize"])

    def _scalar_state(self, group: dict[str, Any]) -> dict[str, float]:
        return {"eta": _checks.as_number("lr", group["lr"]), "mu": 1.0}

    def _supplied(self, group: dict[str, Any], states: list[dict[str, Any]], params: list[torch.Tensor]) -> dict[str, Any]:
        return dict(eta=np.array([float(state["eta"]) for state in states]),
                    mu=np.array([float(state["mu"]) for state in states]))

    def _after_step(self, group: dict[str, Any], states: list[dict[str, Any]], supplied: dict[str, Any]) -> None:
        lr = _checks.as_number("lr", group["lr"])
        lambd, alpha, t0 = float(group["lambd"]), float(group["alpha"]), float(group["t0"])
        for state in states:
            step = float(state["step"])  # this step's count (advanced by the step)
            state["eta"].copy_(torch.as_tensor(lr / ((1 + lambd * lr * step) ** alpha)))
            state["mu"].copy_(torch.as_tensor(1 / max(1.0, step - t0)))
