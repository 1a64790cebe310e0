r"""Lion: evolved sign momentum (Chen et al., 2023, "Symbolic Discovery of Optimization Algorithms").

Found by program search, Lion keeps a single moving average and steps by the *sign* of an interpolation
between it and the gradient, so every coordinate moves by exactly :math:`\pm\gamma` (or 0):

.. math::

    c_t &= \beta_1 m_{t-1} + (1-\beta_1)\, g_t \\
    w_t &= w_{t-1}\,(1 - \gamma\lambda) - \gamma\, \operatorname{sign}(c_t)
        \qquad (\operatorname{sign}(0) = 0) \\
    m_t &= \beta_2 m_{t-1} + (1-\beta_2)\, g_t

The update interpolates with :math:`\beta_1` but the state decays with :math:`\beta_2` (0.99 by default):
the momentum remembers about ten times longer than the step looks. As in the authors' code (the
``lion-pytorch`` package follows it) the decay is decoupled and scaled by the lr.

Because each step has norm :math:`\gamma\sqrt{n}`, Lion's lr is 3–10× smaller than AdamW's for the same
task, and its weight decay 3–10× larger so that :math:`\gamma\lambda` stays the same (the paper, §5).

``cautious=True`` (Liang et al., 2024, "Cautious Optimizers"): the components of :math:`\operatorname{sign}(c_t)`
whose sign differs from the gradient's are dropped, and the rest scaled by :math:`1/\max(\text{kept fraction},
10^{-3})` over the whole tensor (timm's renormalisation); the decay is not masked.

State: ``exp_avg`` (:math:`m`); no step counter.
"""

from __future__ import annotations

from typing import Any, Iterable

import torch

from .. import _checks
from .._base import Optimizer
from ..engine import Flag, PerTensor, lerp, maximum, norm, rule, sign, where


@rule
def lion(param, grad, exp_avg, *, lr, beta1, beta2, weight_decay, size: PerTensor, cautious: Flag, maximize: Flag):
    """One Lion step of one tensor (Algorithm 2 of the paper)."""
    if maximize:
        grad = -grad
    if weight_decay != 0:
        param = param * (1 - lr * weight_decay)
    update = sign(lerp(exp_avg, grad, 1 - beta1))
    if cautious:
        # 1 where the step goes the gradient's way (written on tensors: where() keeps the param's dtype)
        agrees = where(update * grad > 0, grad * 0 + 1, grad * 0)
        update = update * agrees / maximum(norm(agrees) ** 2 / size, 1e-3)
    param = param - lr * update
    exp_avg = lerp(exp_avg, grad, 1 - beta2)
    return param, exp_avg


class Lion(Optimizer):
    """Lion: sign of an interpolated momentum; memory of one moving average (half of Adam's state).

    Args:
        params: parameters, ``named_parameters()`` or param-group dicts.
        lr: learning rate :math:`\\gamma` (default 1e-4; about AdamW's lr / 3–10).
        betas: :math:`(\\beta_1, \\beta_2)`: the update's interpolation and the momentum's decay (default (0.9, 0.99)).
        weight_decay: decoupled decay :math:`\\lambda`, applied as :math:`w(1-\\gamma\\lambda)` (default 0;
            about AdamW's × 3–10).
        cautious: mask the update where its sign disagrees with the gradient's (default False).
        maximize: ascend the objective instead of descending it (default False).
        backend, foreach, fused, max_grad_norm, skip_nonfinite, state_dtype, differentiable: as for every
            thalweg optimizer.

    Example::

        optimizer = thalweg.Lion(model.parameters(), lr=1e-4, weight_decay=0.1)
    """

    name = "lion"  # thalweg.create's name
    family = "Adam-like"  # the arena's family (report panels, toggles)
    rule = lion
    state_codecs = {"exp_avg": "signed"}
    counts_steps = False  # the update needs no step count (no bias correction)

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-4,
        betas: tuple[float, float] = (0.9, 0.99),
        weight_decay: float = 0.0,
        *,
        cautious: bool = False,
        maximize: bool = False,
        backend: str = "auto",
        foreach: bool | None = None,
        fused: bool | None = None,
        max_grad_norm: float | None = None,
        skip_nonfinite: bool = False,
        state_dtype: torch.dtype | None = None,
        param_update: str = "nearest",
        differentiable: bool = False,
    ) -> None:
        defaults = dict(lr=lr, betas=betas, weight_decay=weight_decay, cautious=cautious, maximize=maximize)
        super().__init__(params, defaults, backend=backend, foreach=foreach, fused=fused,
                         max_grad_norm=max_grad_norm, skip_nonfinite=skip_nonfinite, state_dtype=state_dtype, param_update=param_update,
                         differentiable=differentiable)

    def _check_hyperparameters(self, group: dict[str, Any]) -> None:
        _checks.non_negative("lr", group["lr"])
        _checks.betas(group["betas"])
        _checks.non_negative("weight_decay", group["weight_decay"])
        _checks.flag("cautious", group["cautious"])
        _checks.flag("maximize", group["maximize"])
