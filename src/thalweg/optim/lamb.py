r"""LAMB: layer-wise adaptive moments for batch training (You et al., 2019, Algorithm 2 with φ = identity).

Adam's direction, plus decoupled weight decay, rescaled per layer (tensor) so that the step is a fixed
fraction of the weight's norm — which keeps very large learning rates stable (BERT pre-training at
batch 32k–64k in the paper):

.. math::

    m_t &= \beta_1 m_{t-1} + (1-\beta_1)\, g_t, \qquad v_t = \beta_2 v_{t-1} + (1-\beta_2)\, g_t^2 \\
    \hat m_t &= m_t / (1-\beta_1^t), \qquad \hat v_t = v_t / (1-\beta_2^t)
        \quad (\text{or } m_t, v_t \text{ without bias correction}) \\
    r_t &= \hat m_t / (\sqrt{\hat v_t} + \epsilon) + \lambda w_{t-1} \\
    q_t &= \lVert w_{t-1}\rVert / \lVert r_t\rVert
        \quad \text{if the group's } \texttt{trust\_ratio} \text{ is on and both norms} > 0, \text{ else } 1 \\
    w_t &= w_{t-1} - \gamma\, q_t\, r_t

No gradient clipping is hidden inside (NVIDIA's and timm's LAMB clip the global norm to 1.0 by
default): pass ``max_grad_norm=1.0`` for that behaviour.

State (Adam's names): ``step``, ``exp_avg`` (:math:`m`), ``exp_avg_sq`` (:math:`v`).
"""

from __future__ import annotations

from typing import Any, Iterable

import torch

from .. import _checks
from .._base import Optimizer
from ..engine import Flag, lerp, norm, rule, sqrt, where


@rule
def lamb(param, grad, exp_avg, exp_avg_sq, *, step, lr, beta1, beta2, eps, weight_decay, bias_correction: Flag,
         maximize: Flag, trust_ratio: Flag):
    """One LAMB step of one tensor (Algorithm 2 of the paper, φ = identity)."""
    if maximize:
        grad = -grad
    exp_avg = lerp(exp_avg, grad, 1 - beta1)
    exp_avg_sq = beta2 * exp_avg_sq + (1 - beta2) * grad * grad
    if bias_correction:
        update = (exp_avg / (1 - beta1**step)) / (sqrt(exp_avg_sq) / sqrt(1 - beta2**step) + eps)
    else:
        update = exp_avg / (sqrt(exp_avg_sq) + eps)
    if weight_decay != 0:
        update = update + weight_decay * param
    if trust_ratio:
        weight_norm = norm(param)
        update_norm = norm(update)
        update = update * where((weight_norm > 0) & (update_norm > 0), weight_norm / update_norm, 1.0)
    param = param - lr * update
    return param, exp_avg, exp_avg_sq


class LAMB(Optimizer):
    """LAMB for very large batches.

    Args:
        params: parameters, ``named_parameters()`` or param-group dicts (a group may set ``trust_ratio=False``).
        lr: learning rate :math:`\\gamma` (default 1e-3).
        betas: :math:`(\\beta_1, \\beta_2)` (default (0.9, 0.999)).
        eps: added to :math:`\\sqrt{\\hat v}` (default 1e-6, the paper's).
        weight_decay: decoupled decay :math:`\\lambda` inside the trust-scaled direction (default 0.01).
        bias_correction: divide the moments by :math:`1-\\beta^t` (default True).
        maximize: ascend the objective instead of descending it (default False).
        backend, foreach, fused, max_grad_norm, skip_nonfinite, state_dtype, param_update: as for every thalweg optimizer.
    """

    name = "lamb"  # thalweg.create's name
    family = "layer-wise"  # the arena's family (report panels, toggles)

    rule = lamb
    state_codecs = {"exp_avg": "signed", "exp_avg_sq": "unsigned"}
    optional_group_keys = Optimizer.optional_group_keys | {"trust_ratio"}
    layerwise = True

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.01,
        bias_correction: bool = True,
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
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, bias_correction=bias_correction,
                        maximize=maximize, trust_ratio=True)
        super().__init__(params, defaults, backend=backend, foreach=foreach, fused=fused,
                         max_grad_norm=max_grad_norm, skip_nonfinite=skip_nonfinite,
                         state_dtype=state_dtype, param_update=param_update, differentiable=differentiable)

    def _check_hyperparameters(self, group: dict[str, Any]) -> None:
        _checks.non_negative("lr", group["lr"])
        _checks.betas(group["betas"])
        _checks.non_negative("eps", group["eps"])
        _checks.non_negative("weight_decay", group["weight_decay"])
        _checks.flag("bias_correction", group["bias_correction"])
        _checks.flag("maximize", group["maximize"])
        _checks.flag("trust_ratio", group["trust_ratio"])
