r"""RAdam: rectified Adam (Liu et al., 2020).

Early in training Adam's second moment rests on few gradients, and its adaptive step size has a
large variance; warm-up schedules exist to hide that. RAdam measures it instead: the length
:math:`\rho_t` of the simple moving average that the exponential one approximates. While
:math:`\rho_t \le 5` the variance is intractable and the step is bias-corrected momentum SGD; after
that, Adam's step scaled by the rectification term :math:`r_t`. At step :math:`t`:

.. math::

    m_t &= \beta_1 m_{t-1} + (1-\beta_1)\, g_t, \qquad v_t = \beta_2 v_{t-1} + (1-\beta_2)\, g_t^2 \\
    \rho_\infty &= \frac{2}{1-\beta_2} - 1, \qquad
        \rho_t = \rho_\infty - \frac{2 t \beta_2^t}{1-\beta_2^t} \\
    r_t &= \sqrt{\frac{(\rho_t-4)(\rho_t-2)\,\rho_\infty}{(\rho_\infty-4)(\rho_\infty-2)\,\rho_t}} \\
    w_t &= w_{t-1} - \gamma\,\frac{m_t}{1-\beta_1^t} \cdot
        \begin{cases} r_t\,\dfrac{\sqrt{1-\beta_2^t}}{\sqrt{v_t} + \epsilon} & \rho_t > 5 \\ 1 & \text{otherwise} \end{cases}

Weight decay is an L2 term in the gradient, or decoupled (``decoupled_weight_decay=True``: the
weights are multiplied by :math:`1-\gamma\lambda` first, as AdamW). The threshold 5 is torch.optim's
(the paper's code uses 4 in one version and 5 in another).

State (torch's names): ``step``, ``exp_avg`` (:math:`m`), ``exp_avg_sq`` (:math:`v`). Checkpoints cross-load
with ``torch.optim.RAdam``.
"""

from __future__ import annotations

from typing import Any, Iterable

import torch

from .. import _checks
from .._base import Optimizer
from ..engine import Flag, PerTensor, lerp, maximum, norm, rule, sqrt, where


@rule
def radam(param, grad, exp_avg, exp_avg_sq, *, step, lr, beta1, beta2, eps, weight_decay,
          size: PerTensor, decoupled_weight_decay: Flag, cautious: Flag, maximize: Flag):
    """One RAdam step of one tensor, in torch.optim's order of operations."""
    if maximize:
        grad = -grad
    if weight_decay != 0:
        if decoupled_weight_decay:
            param = param * (1 - lr * weight_decay)
        else:
            grad = grad + weight_decay * param
    exp_avg = lerp(exp_avg, grad, 1 - beta1)
    exp_avg_sq = beta2 * exp_avg_sq + (1 - beta2) * grad * grad
    bias_correction1 = 1 - beta1**step
    bias_correction2 = 1 - beta2**step
    rho_inf = 2 / (1 - beta2) - 1
    rho_t = rho_inf - 2 * step * beta2**step / bias_correction2
    rectified = rho_t > 5
    # computed only where it is used: (rho_inf - 4)(rho_inf - 2) is 0 for beta2 = 0.6 or 1/3, never rectified
    rect = sqrt(where(rectified, (rho_t - 4) * (rho_t - 2) * rho_inf, 0)
                / where(rectified, (rho_inf - 4) * (rho_inf - 2) * rho_t, 1))
    update = exp_avg / bias_correction1 * lr
    adaptive_lr = sqrt(bias_correction2) / (sqrt(exp_avg_sq) + eps)
    if cautious:
        update = where(rectified, update * adaptive_lr * rect, update)
        agrees = where(update * grad > 0, grad * 0 + 1, grad * 0)
        update = update * agrees / maximum(norm(agrees) ** 2 / size, 1e-3)
        param = param - update
    else:
        param = param - where(rectified, update * adaptive_lr * rect, update)
    return param, exp_avg, exp_avg_sq


class RAdam(Optimizer):
    """RAdam, a drop-in for ``torch.optim.RAdam``: Adam whose adaptive step is switched on, and scaled,
    by the variance of its second moment (no warm-up needed).

    Args:
        params: parameters, ``named_parameters()`` or param-group dicts.
        lr: learning rate :math:`\\gamma` (default 1e-3).
        betas: :math:`(\\beta_1, \\beta_2)` (default (0.9, 0.999)).
        eps: added to the denominator (default 1e-8).
        weight_decay: :math:`\\lambda` (default 0).
        decoupled_weight_decay: decay the weights directly (as AdamW) instead of adding the L2 term to the
            gradient (default False).
        maximize: ascend the objective instead of descending it (default False).
        cautious: drop the components of the step whose sign differs from the gradient's (with L2 weight decay:
            the gradient plus the L2 term), the rest scaled by 1 / max(kept fraction, 1e-3) over the whole
            tensor (Liang et al. 2024, timm's renormalisation; a thalweg extension, default False).
        backend, foreach, fused, max_grad_norm, skip_nonfinite, state_dtype, param_update: as for every thalweg optimizer.
    """

    name = "radam"  # thalweg.create's name
    family = "Adam-like"  # the arena's family (report panels, toggles)
    rule = radam
    state_codecs = {"exp_avg": "signed", "exp_avg_sq": "unsigned"}
    optional_group_keys = Optimizer.optional_group_keys | {"decoupled_weight_decay", "cautious"}

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0,
        decoupled_weight_decay: bool = False,
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
        capturable: bool = False,
    ) -> None:
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                        decoupled_weight_decay=decoupled_weight_decay, cautious=cautious, maximize=maximize)
        super().__init__(params, defaults, backend=backend, foreach=foreach, fused=fused,
                         max_grad_norm=max_grad_norm, skip_nonfinite=skip_nonfinite, state_dtype=state_dtype, param_update=param_update,
                         differentiable=differentiable, capturable=capturable)

    def _check_hyperparameters(self, group: dict[str, Any]) -> None:
        _checks.non_negative("lr", group["lr"])
        _checks.betas(group["betas"])
        _checks.non_negative("eps", group["eps"])
        _checks.non_negative("weight_decay", group["weight_decay"])
        _checks.flag("decoupled_weight_decay", group["decoupled_weight_decay"])
        _checks.flag("cautious", group["cautious"])
        _checks.flag("maximize", group["maximize"])
