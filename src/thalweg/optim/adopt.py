r"""ADOPT: Adam that converges with any β2 (Taniguchi et al., 2024, "ADOPT: Modified Adam Can Converge with
Any β2 with the Optimal Rate").

Adam's update correlates the gradient with its own second-moment estimate, which is why it can diverge
unless β2 is tuned to the problem. ADOPT removes the correlation by normalising the gradient with the
*previous* second moment, and by normalising before the momentum rather than after it:

.. math::

    v_1 &= g_1^2 \quad \text{(the first step only sets } v\text{; the weights do not move)} \\
    \tilde g_t &= \operatorname{clip}\!\left(g_t / \max(\sqrt{v_{t-1}}, \epsilon),\; (t-1)^{1/4}\right) \\
    m_t &= \beta_1 m_{t-1} + (1-\beta_1)\, \tilde g_t \\
    w_t &= w_{t-1} - \gamma\, m_t \\
    v_t &= \beta_2 v_{t-1} + (1-\beta_2)\, g_t^2

The clip to :math:`\pm (t-1)^{1/4}` (t counts this step) is the authors' stabiliser from the second
version of the paper and their code's default. Weight decay is an L2 term in the gradient (it enters
:math:`v` too), or with ``decoupled=True`` AdamW's :math:`w(1-\gamma\lambda)` (from the second step on, as
the official code). No bias correction is needed. ADOPT's lr is AdamW's; the paper keeps AdamW's
hyper-parameters but β2 = 0.9999.

State: ``step``, ``exp_avg`` (:math:`m`), ``exp_avg_sq`` (:math:`v`).
"""

from __future__ import annotations

from typing import Any, Iterable

import torch

from .. import _checks
from .._base import Optimizer
from ..engine import Flag, lerp, maximum, minimum, rule, sqrt, where


@rule
def adopt(param, grad, exp_avg, exp_avg_sq, *, step, first, lr, beta1, beta2, eps, weight_decay, decoupled: Flag,
          maximize: Flag):
    """One ADOPT step of one tensor, in the official code's order (``first``: the state is new: only v is set)."""
    if maximize:
        grad = -grad
    if weight_decay != 0:
        if decoupled:
            param = where(first, param, param * (1 - lr * weight_decay))
        else:
            grad = grad + weight_decay * param
    clip = (step - 1) ** 0.25
    normed = grad / maximum(sqrt(exp_avg_sq), eps)
    normed = minimum(maximum(normed, -clip), clip)
    exp_avg = where(first, exp_avg, lerp(exp_avg, normed, 1 - beta1))
    param = where(first, param, param - lr * exp_avg)
    exp_avg_sq = where(first, grad * grad, beta2 * exp_avg_sq + (1 - beta2) * grad * grad)
    return param, exp_avg, exp_avg_sq


class ADOPT(Optimizer):
    """ADOPT: the gradient normalised by the previous second moment, then averaged; converges for any β2.

    Args:
        params: parameters, ``named_parameters()`` or param-group dicts.
        lr: learning rate :math:`\\gamma` (default 1e-3, as AdamW).
        betas: :math:`(\\beta_1, \\beta_2)` (default (0.9, 0.9999)).
        eps: the floor of :math:`\\sqrt{v}` (default 1e-6; a floor, not an addend as in Adam).
        weight_decay: :math:`\\lambda` (default 0).
        decoupled: decay the weights directly (AdamW-style) instead of adding the L2 term to the gradient
            (default False).
        maximize: ascend the objective instead of descending it (default False).
        backend, foreach, fused, max_grad_norm, skip_nonfinite, state_dtype, differentiable: as for every
            thalweg optimizer.
    """

    name = "adopt"  # thalweg.create's name
    family = "Adam-like"  # the arena's family (report panels, toggles)
    rule = adopt
    state_codecs = {"exp_avg": "signed", "exp_avg_sq": "unsigned"}

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.9999),
        eps: float = 1e-6,
        weight_decay: float = 0.0,
        decoupled: bool = False,
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
    ) -> None:
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, decoupled=decoupled, maximize=maximize)
        super().__init__(params, defaults, backend=backend, foreach=foreach, fused=fused,
                         max_grad_norm=max_grad_norm, skip_nonfinite=skip_nonfinite, state_dtype=state_dtype, param_update=param_update,
                         differentiable=differentiable)

    def _check_hyperparameters(self, group: dict[str, Any]) -> None:
        _checks.non_negative("lr", group["lr"])
        _checks.betas(group["betas"])
        _checks.non_negative("eps", group["eps"])
        _checks.non_negative("weight_decay", group["weight_decay"])
        _checks.flag("decoupled", group["decoupled"])
        _checks.flag("maximize", group["maximize"])
