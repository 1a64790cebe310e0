r"""StableAdamW: AdamW with a per-tensor update clip (Wortsman et al., 2023, "Stable and low-precision training
for large-scale vision-language models"), as the torch-optimi package implements it.

Loss spikes follow steps where the second moment :math:`v` underestimates the gradient (a rare feature's
gradient appears after a long quiet spell): :math:`g/\sqrt{\hat v}` is then far above 1. StableAdamW
measures that ratio's RMS over each tensor and divides the step — AdaFactor's update clipping — by it when
it exceeds 1:

.. math::

    m_t &= \beta_1 m_{t-1} + (1-\beta_1)\, g_t, \qquad v_t = \beta_2 v_{t-1} + (1-\beta_2)\, g_t^2 \\
    \hat m_t &= m_t / (1-\beta_1^t), \qquad \hat v_t = v_t / (1-\beta_2^t) \\
    \gamma_t &= \gamma \,/\, \max\!\left(1,\ \operatorname{RMS}\!\left(g_t / \sqrt{\max(\hat v_t, \epsilon^2)}\right)\right)
        \qquad \text{(RMS over the whole tensor)} \\
    w_t &= w_{t-1}\,(1 - \gamma_t\lambda) - \gamma_t\, \hat m_t / (\sqrt{\hat v_t} + \epsilon)

The decay uses the clipped lr, as in optimi. optimi stores the bias-corrected moments (it folds the
correction into "debiased" betas); thalweg stores torch's plain moving averages under torch's names, so a
``torch.optim.AdamW`` checkpoint's state means the same here; the trajectory is the same. With the RMS at
most 1 this is AdamW exactly; its lr is AdamW's (β2 = 0.99 by default: v follows g faster).

``cautious=True`` (Liang et al., 2024): components of :math:`\hat m_t/(\sqrt{\hat v_t}+\epsilon)` whose sign
differs from the gradient's are dropped, the rest scaled by :math:`1/\max(\text{kept fraction}, 10^{-3})`
over the whole tensor (timm's renormalisation); the decay is not masked.

State (torch's names): ``step``, ``exp_avg`` (:math:`m`), ``exp_avg_sq`` (:math:`v`).
"""

from __future__ import annotations

from typing import Any, Iterable

import torch

from .. import _checks
from .._base import Optimizer
from ..engine import Flag, PerTensor, lerp, maximum, norm, rule, sqrt, where


@rule
def stable_adamw(param, grad, exp_avg, exp_avg_sq, *, step, lr, beta1, beta2, eps, weight_decay, size: PerTensor,
                 cautious: Flag, maximize: Flag):
    """One StableAdamW step of one tensor (optimi's order: moments, RMS, decay with the clipped lr, update)."""
    if maximize:
        grad = -grad
    exp_avg = lerp(exp_avg, grad, 1 - beta1)
    exp_avg_sq = beta2 * exp_avg_sq + (1 - beta2) * grad * grad
    root = sqrt(exp_avg_sq) / sqrt(1 - beta2**step)  # sqrt of the bias-corrected v
    rms = norm(grad / maximum(root, eps)) / sqrt(size)
    clipped_lr = lr / maximum(rms, 1.0)
    if weight_decay != 0:
        param = param * (1 - clipped_lr * weight_decay)
    update = exp_avg / (1 - beta1**step) / (root + eps)
    if cautious:
        agrees = where(update * grad > 0, grad * 0 + 1, grad * 0)
        update = update * agrees / maximum(norm(agrees) ** 2 / size, 1e-3)
    param = param - clipped_lr * update
    return param, exp_avg, exp_avg_sq


class StableAdamW(Optimizer):
    """StableAdamW: AdamW whose step is divided, per tensor, by the RMS of :math:`g/\\sqrt{\\hat v}` when above 1.

    Args:
        params: parameters, ``named_parameters()`` or param-group dicts.
        lr: learning rate :math:`\\gamma` (default 1e-3, as AdamW).
        betas: :math:`(\\beta_1, \\beta_2)` (default (0.9, 0.99)).
        eps: added to :math:`\\sqrt{\\hat v}`, and its square floors :math:`\\hat v` in the RMS (default 1e-6).
        weight_decay: decoupled decay :math:`\\lambda`, scaled by the clipped lr (default 1e-2).
        cautious: mask the update where its sign disagrees with the gradient's (default False).
        maximize: ascend the objective instead of descending it (default False).
        backend, foreach, fused, max_grad_norm, skip_nonfinite, state_dtype, differentiable: as for every
            thalweg optimizer.
    """

    name = "stableadamw"  # thalweg.create's name
    family = "Adam-like"  # the arena's family (report panels, toggles)
    rule = stable_adamw
    state_codecs = {"exp_avg": "signed", "exp_avg_sq": "unsigned"}

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.99),
        eps: float = 1e-6,
        weight_decay: float = 1e-2,
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
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, cautious=cautious, maximize=maximize)
        super().__init__(params, defaults, backend=backend, foreach=foreach, fused=fused,
                         max_grad_norm=max_grad_norm, skip_nonfinite=skip_nonfinite, state_dtype=state_dtype, param_update=param_update,
                         differentiable=differentiable)

    def _check_hyperparameters(self, group: dict[str, Any]) -> None:
        _checks.non_negative("lr", group["lr"])
        _checks.betas(group["betas"])
        _checks.non_negative("eps", group["eps"])
        _checks.non_negative("weight_decay", group["weight_decay"])
        _checks.flag("cautious", group["cautious"])
        _checks.flag("maximize", group["maximize"])
