r"""AdEMAMix: Adam with a mixture of a fast and a slow moving average (Pagliardini et al., 2024, "The AdEMAMix
Optimizer: Better, Faster, Older").

A single EMA of the gradient cannot both react to recent gradients and remember old ones. AdEMAMix adds
a second, very slow EMA (β3 = 0.9999: a memory of ~10k steps) to Adam's numerator, weighted by α:

.. math::

    m^{(1)}_t &= \beta_1 m^{(1)}_{t-1} + (1-\beta_1)\, g_t, \qquad
    m^{(2)}_t = \beta_3(t)\, m^{(2)}_{t-1} + (1-\beta_3(t))\, g_t \\
    v_t &= \beta_2 v_{t-1} + (1-\beta_2)\, g_t^2 \\
    w_t &= w_{t-1} - \gamma \left( \frac{m^{(1)}_t / (1-\beta_1^t) + \alpha(t)\, m^{(2)}_t}
        {\sqrt{v_t / (1-\beta_2^t)} + \epsilon} + \lambda w_{t-1} \right)

The slow EMA is not bias-corrected (it starts at 0 on purpose). Early on it would be dominated by the
first gradients, so the paper warms α up linearly from 0 and β3 up from β1 (linearly in the half-life
:math:`\ln(1/2)/\ln\beta - 1`) over ``alpha_warmup`` / ``beta3_warmup`` steps — Apple's
``linear_warmup_scheduler`` and ``linear_hl_warmup_scheduler``; set both (the paper uses the whole run's
length) for long runs. The decay is decoupled, :math:`\gamma\lambda w`. AdEMAMix's lr is AdamW's.

``cautious=True`` (Liang et al., 2024): the components of the adaptive part of the update whose sign
differs from the gradient's are dropped, the rest scaled by :math:`1/\max(\text{kept fraction}, 10^{-3})`
over the whole tensor (timm's renormalisation); the decay is not masked.

State: ``step``, ``exp_avg_fast`` (:math:`m^{(1)}`), ``exp_avg_slow`` (:math:`m^{(2)}`), ``exp_avg_sq``
(:math:`v`): always tensors, also with β1 = 0 (where Apple's code keeps ``None``), so that every
checkpoint has the same layout.
"""

from __future__ import annotations

import math
from typing import Any, Iterable

import numpy as np
import torch

from .. import _checks
from .._base import Optimizer
from ..engine import Flag, PerTensor, lerp, maximum, norm, rule, sqrt, where


@rule
def ademamix(param, grad, exp_avg_fast, exp_avg_slow, exp_avg_sq, *, step, lr, beta1, beta2, eps, weight_decay,
             alpha_t: PerTensor, beta3_t: PerTensor, size: PerTensor, cautious: Flag, maximize: Flag):
    """One AdEMAMix step of one tensor (Algorithm 1 of the paper; ``alpha_t``, ``beta3_t``: after warm-up)."""
    if maximize:
        grad = -grad
    exp_avg_fast = lerp(exp_avg_fast, grad, 1 - beta1)
    exp_avg_slow = lerp(exp_avg_slow, grad, 1 - beta3_t)
    exp_avg_sq = beta2 * exp_avg_sq + (1 - beta2) * grad * grad
    denom = sqrt(exp_avg_sq) / sqrt(1 - beta2**step) + eps
    update = (exp_avg_fast / (1 - beta1**step) + alpha_t * exp_avg_slow) / denom
    if cautious:
        agrees = where(update * grad > 0, grad * 0 + 1, grad * 0)
        update = update * agrees / maximum(norm(agrees) ** 2 / size, 1e-3)
    if weight_decay != 0:
        update = update + weight_decay * param
    param = param - lr * update
    return param, exp_avg_fast, exp_avg_slow, exp_avg_sq


def _half_life(beta: float) -> float:
    # Apple's f(): the number of steps after which a weight has decayed to a half, minus one (its eps kept)
    return math.log(0.5) / math.log(beta + 1e-8) - 1


class AdEMAMix(Optimizer):
    """AdEMAMix: Adam plus a slow, α-weighted moving average of the gradient; 3 state tensors per parameter.

    Args:
        params: parameters, ``named_parameters()`` or param-group dicts.
        lr: learning rate :math:`\\gamma` (default 1e-3, as AdamW).
        betas: :math:`(\\beta_1, \\beta_2, \\beta_3)`: fast EMA, second moment, slow EMA (default
            (0.9, 0.999, 0.9999)).
        alpha: weight :math:`\\alpha` of the slow EMA (default 2.0; the paper uses 5–8 on large models).
        beta3_warmup: steps over which β3 grows from β1 (linearly in half-life); None: no warm-up.
        alpha_warmup: steps over which α grows linearly from 0; None: no warm-up.
        eps: added to the denominator (default 1e-8).
        weight_decay: decoupled decay :math:`\\lambda` (default 0).
        cautious: mask the update where its sign disagrees with the gradient's (default False).
        maximize: ascend the objective instead of descending it (default False).
        backend, foreach, fused, max_grad_norm, skip_nonfinite, state_dtype, differentiable: as for every
            thalweg optimizer.
    """

    name = "ademamix"  # thalweg.create's name
    family = "Adam-like"  # the arena's family (report panels, toggles)
    rule = ademamix
    state_codecs = {"exp_avg_fast": "signed", "exp_avg_slow": "signed", "exp_avg_sq": "unsigned"}

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        betas: tuple[float, float, float] = (0.9, 0.999, 0.9999),
        alpha: float = 2.0,
        beta3_warmup: int | None = None,
        alpha_warmup: int | None = None,
        eps: float = 1e-8,
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
        defaults = dict(lr=lr, betas=betas, alpha=alpha, beta3_warmup=beta3_warmup, alpha_warmup=alpha_warmup, eps=eps,
                        weight_decay=weight_decay, cautious=cautious, maximize=maximize)
        super().__init__(params, defaults, backend=backend, foreach=foreach, fused=fused,
                         max_grad_norm=max_grad_norm, skip_nonfinite=skip_nonfinite, state_dtype=state_dtype, param_update=param_update,
                         differentiable=differentiable)

    def _check_hyperparameters(self, group: dict[str, Any]) -> None:
        _checks.non_negative("lr", group["lr"])
        _checks.betas(group["betas"], count=3)
        _checks.non_negative("alpha", group["alpha"])
        for name in ("beta3_warmup", "alpha_warmup"):
            _checks.optional_positive_int(name, group[name])
        _checks.non_negative("eps", group["eps"])
        _checks.non_negative("weight_decay", group["weight_decay"])
        _checks.flag("cautious", group["cautious"])
        _checks.flag("maximize", group["maximize"])

    def _supplied(self, group: dict[str, Any], states: list[dict[str, Any]], params: list[torch.Tensor]) -> dict[str, Any]:
        beta1, beta3 = (_checks.as_number(f"betas[{i}]", group["betas"][i]) for i in (0, 2))
        alpha = _checks.as_number("alpha", group["alpha"])
        step = np.array([float(state["step"]) for state in states]) + 1  # the count after this step's increment
        alpha_t = np.full(len(states), alpha)
        beta3_t = np.full(len(states), beta3)
        if group["alpha_warmup"] is not None:  # linear from 0 to alpha
            fraction = np.minimum(step / group["alpha_warmup"], 1.0)
            alpha_t = np.where(step < group["alpha_warmup"], (1 - fraction) * 0.0 + fraction * alpha, alpha)
        if group["beta3_warmup"] is not None:  # linear in the half-life, from beta1's to beta3's
            fraction = np.minimum(step / group["beta3_warmup"], 1.0)
            half_life = (1 - fraction) * _half_life(beta1) + fraction * _half_life(beta3)
            beta3_t = np.where(step < group["beta3_warmup"], 0.5 ** (1 / (half_life + 1)), beta3)
        return dict(alpha_t=alpha_t, beta3_t=beta3_t)
