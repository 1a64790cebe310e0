r"""Adan: adaptive Nesterov momentum (Xie et al., 2022, "Adan: Adaptive Nesterov Momentum Algorithm for
Faster Optimizing Deep Models").

Adan estimates Nesterov's look-ahead gradient from the change of the gradient between steps, so it needs
no extra gradient evaluation: besides the moments of :math:`g` it keeps a moment of :math:`g_t - g_{t-1}`,
and the second moment is taken of the look-ahead gradient :math:`g_t + \beta_2 (g_t - g_{t-1})`. With the
official code's convention (β close to 1; the paper writes 1 − β):

.. math::

    \Delta_t &= g_t - g_{t-1} \quad (g_0 := g_1: \Delta_1 = 0) \\
    m_t &= \beta_1 m_{t-1} + (1-\beta_1)\, g_t, \qquad
    d_t = \beta_2 d_{t-1} + (1-\beta_2)\, \Delta_t \\
    n_t &= \beta_3 n_{t-1} + (1-\beta_3)\, (g_t + \beta_2 \Delta_t)^2 \\
    u_t &= \frac{m_t/(1-\beta_1^t) + \beta_2\, d_t/(1-\beta_2^t)}{\sqrt{n_t/(1-\beta_3^t)} + \epsilon} \\
    w_t &= (w_{t-1} - \gamma u_t) / (1 + \gamma\lambda) \qquad
        \text{or, with } \texttt{no\_prox}: \; w_t = w_{t-1}(1 - \gamma\lambda) - \gamma u_t

The proximal form (the default) is the paper's Algorithm 1; ``no_prox=True`` is AdamW's decoupled decay.
An lr of AdamW's order works; the paper uses 5–10× larger ones with β = (0.98, 0.92, 0.99).

``cautious=True`` (Liang et al., 2024, as timm's Adan): components of the first-moment term :math:`m_t`
whose sign differs from the gradient's are dropped and the rest scaled by :math:`1/\max(\text{kept fraction},
10^{-3})` over the whole tensor; the gradient-difference term and the decay are not masked.

State (the official code's names): ``step``, ``exp_avg`` (:math:`m`), ``exp_avg_diff`` (:math:`d`),
``exp_avg_sq`` (:math:`n`), ``pre_grad`` (:math:`g_{t-1}`, after ``maximize``).
"""

from __future__ import annotations

from typing import Any, Iterable

import torch

from .. import _checks
from .._base import Optimizer
from ..engine import Flag, PerTensor, lerp, maximum, norm, rule, sqrt, where


@rule
def adan(param, grad, exp_avg, exp_avg_diff, exp_avg_sq, pre_grad, *, step, first, lr, beta1, beta2, beta3, eps,
         weight_decay, size: PerTensor, no_prox: Flag, cautious: Flag, maximize: Flag):
    """One Adan step of one tensor (Algorithm 1 of the paper, the official code's order of operations)."""
    if maximize:
        grad = -grad
    diff = grad - where(first, grad, pre_grad)
    lookahead = grad + beta2 * diff
    exp_avg = lerp(exp_avg, grad, 1 - beta1)
    exp_avg_diff = lerp(exp_avg_diff, diff, 1 - beta2)
    exp_avg_sq = beta3 * exp_avg_sq + (1 - beta3) * lookahead * lookahead
    denom = sqrt(exp_avg_sq) / sqrt(1 - beta3**step) + eps
    momentum = exp_avg
    if cautious:  # timm's Adan: the first moment's term is masked, the gradient-difference term is not
        agrees = where(exp_avg * grad > 0, grad * 0 + 1, grad * 0)
        momentum = exp_avg * agrees / maximum(norm(agrees) ** 2 / size, 1e-3)
    update = (momentum / (1 - beta1**step) + beta2 * exp_avg_diff / (1 - beta2**step)) / denom
    if no_prox:
        if weight_decay != 0:
            param = param * (1 - lr * weight_decay)
        param = param - lr * update
    else:
        param = param - lr * update
        if weight_decay != 0:
            param = param / (1 + lr * weight_decay)
    pre_grad = grad
    return param, exp_avg, exp_avg_diff, exp_avg_sq, pre_grad


class Adan(Optimizer):
    """Adan: Adam-like moments plus a moment of the gradient's change (Nesterov's look-ahead without a second
    gradient); 4 state tensors per parameter.

    Args:
        params: parameters, ``named_parameters()`` or param-group dicts.
        lr: learning rate :math:`\\gamma` (default 1e-3).
        betas: :math:`(\\beta_1, \\beta_2, \\beta_3)` for the gradient, its change and the squared look-ahead
            gradient (default (0.98, 0.92, 0.99), the paper's).
        eps: added to the denominator (default 1e-8).
        weight_decay: :math:`\\lambda` (default 0).
        no_prox: decay as AdamW does, before the step, instead of the proximal division after it (default False).
        cautious: mask the update where its sign disagrees with the gradient's (default False).
        maximize: ascend the objective instead of descending it (default False).
        backend, foreach, fused, max_grad_norm, skip_nonfinite, state_dtype, differentiable: as for every
            thalweg optimizer (the official code's ``max_grad_norm`` is thalweg's ``max_grad_norm``).
    """

    name = "adan"  # thalweg.create's name
    family = "Adam-like"  # the arena's family (report panels, toggles)
    rule = adan
    state_codecs = {"exp_avg": "signed", "exp_avg_diff": "signed", "exp_avg_sq": "unsigned", "pre_grad": "signed"}

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        betas: tuple[float, float, float] = (0.98, 0.92, 0.99),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        no_prox: bool = False,
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
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, no_prox=no_prox, cautious=cautious,
                        maximize=maximize)
        super().__init__(params, defaults, backend=backend, foreach=foreach, fused=fused,
                         max_grad_norm=max_grad_norm, skip_nonfinite=skip_nonfinite, state_dtype=state_dtype, param_update=param_update,
                         differentiable=differentiable)

    def _check_hyperparameters(self, group: dict[str, Any]) -> None:
        _checks.non_negative("lr", group["lr"])
        _checks.betas(group["betas"], count=3)
        _checks.non_negative("eps", group["eps"])
        _checks.non_negative("weight_decay", group["weight_decay"])
        _checks.flag("no_prox", group["no_prox"])
        _checks.flag("cautious", group["cautious"])
        _checks.flag("maximize", group["maximize"])
