r"""Adamax (Kingma & Ba, 2015, section 7.1).

Adam with the infinity norm in place of the L2 norm: the second moment becomes an exponentially
weighted maximum of the gradient's magnitude, which needs no bias correction and bounds each
coordinate's step by :math:`\gamma/(1-\beta_1^t)`. At step :math:`t`:

.. math::

    g_t &\leftarrow g_t + \lambda w_{t-1} \\
    m_t &= \beta_1 m_{t-1} + (1-\beta_1)\, g_t \\
    u_t &= \max(\beta_2 u_{t-1},\ |g_t| + \epsilon) \\
    w_t &= w_{t-1} - \frac{\gamma}{1-\beta_1^t}\,\frac{m_t}{u_t}

:math:`\epsilon` sits inside the maximum, as torch.optim writes it (the paper has none), so a
coordinate whose gradient was always zero divides by :math:`\epsilon`, not by zero.

State (torch's names): ``step``, ``exp_avg`` (:math:`m`), ``exp_inf`` (:math:`u`). Checkpoints cross-load
with ``torch.optim.Adamax``.
"""

from __future__ import annotations

from typing import Any, Iterable

import torch

from .. import _checks
from .._base import Optimizer
from ..engine import Flag, abs, lerp, maximum, rule  # noqa: A004


@rule
def adamax(param, grad, exp_avg, exp_inf, *, step, lr, beta1, beta2, eps, weight_decay, maximize: Flag):
    """One Adamax step of one tensor, in torch.optim's order of operations."""
    if maximize:
        grad = -grad
    if weight_decay != 0:
        grad = grad + weight_decay * param
    exp_avg = lerp(exp_avg, grad, 1 - beta1)
    exp_inf = maximum(exp_inf * beta2, abs(grad) + eps)
    param = param - lr / (1 - beta1**step) * exp_avg / exp_inf
    return param, exp_avg, exp_inf


class Adamax(Optimizer):
    """Adamax, a drop-in for ``torch.optim.Adamax``: Adam with an infinity-norm second moment.

    Args:
        params: parameters, ``named_parameters()`` or param-group dicts.
        lr: learning rate :math:`\\gamma` (default 2e-3).
        betas: :math:`(\\beta_1, \\beta_2)`: decay of the gradient average and of the running maximum
            (default (0.9, 0.999)).
        eps: floor of the running maximum (default 1e-8).
        weight_decay: L2 penalty :math:`\\lambda` added to the gradient (default 0).
        foreach: as in torch (``True``: the foreach backend).
        maximize: ascend the objective instead of descending it (default False).
        backend, fused, max_grad_norm, skip_nonfinite, state_dtype, param_update: as for every thalweg optimizer.
    """

    name = "adamax"  # thalweg.create's name
    family = "Adam-like"  # the arena's family (report panels, toggles)
    rule = adamax
    state_codecs = {"exp_avg": "signed", "exp_inf": "unsigned"}

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 2e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
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
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, maximize=maximize)
        super().__init__(params, defaults, backend=backend, foreach=foreach, fused=fused,
                         max_grad_norm=max_grad_norm, skip_nonfinite=skip_nonfinite, state_dtype=state_dtype, param_update=param_update,
                         differentiable=differentiable, capturable=capturable)

    def _check_hyperparameters(self, group: dict[str, Any]) -> None:
        _checks.non_negative("lr", group["lr"])
        _checks.betas(group["betas"])
        _checks.non_negative("eps", group["eps"])
        _checks.non_negative("weight_decay", group["weight_decay"])
        _checks.flag("maximize", group["maximize"])
