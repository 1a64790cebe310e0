r"""NAdam: Adam with Nesterov momentum (Dozat, 2016).

Nesterov's look-ahead applied to Adam: the step uses the momentum that the *next* step will have,
mixed with the current gradient. Dozat's momentum schedule warms :math:`\mu_t` up from
:math:`\beta_1/2` towards :math:`\beta_1`, and the bias correction divides by the product of all
:math:`\mu` so far. At step :math:`t`, with momentum decay :math:`\psi`:

.. math::

    \mu_t &= \beta_1 \left(1 - \tfrac12\, 0.96^{t\psi}\right), \qquad
        \Pi_t = \prod_{i \le t} \mu_i \quad \text{(state ``mu_product``)} \\
    m_t &= \beta_1 m_{t-1} + (1-\beta_1)\, g_t, \qquad v_t = \beta_2 v_{t-1} + (1-\beta_2)\, g_t^2 \\
    d_t &= \sqrt{v_t / (1-\beta_2^t)} + \epsilon \\
    w_t &= w_{t-1} - \gamma\,\frac{1-\mu_t}{1-\Pi_t}\,\frac{g_t}{d_t}
        - \gamma\,\frac{\mu_{t+1}}{1-\Pi_t\,\mu_{t+1}}\,\frac{m_t}{d_t}

Weight decay is an L2 term in the gradient, or decoupled (``decoupled_weight_decay=True``: the weights
are multiplied by :math:`1-\gamma\lambda` first; NAdamW).

The schedule is per tensor and scalar: :meth:`NAdam._supplied` computes :math:`\mu_t`, :math:`\mu_{t+1}`
and :math:`\Pi_t` on the host, as torch.optim does (``mu_product`` is a 0-d tensor of torch's scalar dtype,
multiplied in place, so it rounds as torch's does), and the elementwise rule receives them as per-tensor
values.

State (torch's names): ``step``, ``mu_product`` (:math:`\Pi`), ``exp_avg`` (:math:`m`), ``exp_avg_sq``
(:math:`v`). Checkpoints cross-load with ``torch.optim.NAdam``.
"""

from __future__ import annotations

from typing import Any, Iterable

import numpy as np
import torch

from .. import _checks
from .._base import Optimizer
from ..engine import Flag, PerTensor, lerp, maximum, norm, rule, sqrt, where


@rule
def nadam(param, grad, exp_avg, exp_avg_sq, *, step, lr, beta1, beta2, eps, weight_decay, mu: PerTensor,
          mu_next: PerTensor, mu_product: PerTensor, size: PerTensor, decoupled_weight_decay: Flag, cautious: Flag,
          maximize: Flag):
    """One NAdam step of one tensor, in torch.optim's order of operations (``mu_product``: after this step's
    factor ``mu``)."""
    if maximize:
        grad = -grad
    if weight_decay != 0:
        if decoupled_weight_decay:
            param = param * (1 - lr * weight_decay)
        else:
            grad = grad + weight_decay * param
    exp_avg = lerp(exp_avg, grad, 1 - beta1)
    exp_avg_sq = beta2 * exp_avg_sq + (1 - beta2) * grad * grad
    denom = sqrt(exp_avg_sq / (1 - beta2**step)) + eps
    mu_product_next = mu_product * mu_next
    if cautious:
        update = (1 - mu) / (1 - mu_product) * grad / denom + mu_next / (1 - mu_product_next) * exp_avg / denom
        agrees = where(update * grad > 0, grad * 0 + 1, grad * 0)
        update = update * agrees / maximum(norm(agrees) ** 2 / size, 1e-3)
        param = param - lr * update
    else:
        param = param - lr * (1 - mu) / (1 - mu_product) * grad / denom
        param = param - lr * mu_next / (1 - mu_product_next) * exp_avg / denom
    return param, exp_avg, exp_avg_sq


class NAdam(Optimizer):
    """NAdam, a drop-in for ``torch.optim.NAdam``: Adam with Nesterov momentum and Dozat's momentum warm-up.

    Args:
        params: parameters, ``named_parameters()`` or param-group dicts.
        lr: learning rate :math:`\\gamma` (default 2e-3).
        betas: :math:`(\\beta_1, \\beta_2)` (default (0.9, 0.999)).
        eps: added to the denominator (default 1e-8).
        weight_decay: :math:`\\lambda` (default 0).
        momentum_decay: :math:`\\psi`, the speed of the momentum warm-up (default 4e-3).
        decoupled_weight_decay: decay the weights directly (NAdamW) instead of adding the L2 term to the
            gradient (default False).
        maximize: ascend the objective instead of descending it (default False).
        cautious: drop the components of the step whose sign differs from the gradient's (with L2 weight decay:
            the gradient plus the L2 term), the rest scaled by 1 / max(kept fraction, 1e-3) over the whole
            tensor (Liang et al. 2024, timm's renormalisation; a thalweg extension, default False).
        backend, foreach, fused, max_grad_norm, skip_nonfinite, state_dtype, param_update: as for every thalweg optimizer.
    """

    name = "nadam"  # thalweg.create's name
    family = "Adam-like"  # the arena's family (report panels, toggles)
    rule = nadam
    state_codecs = {"exp_avg": "signed", "exp_avg_sq": "unsigned"}
    optional_group_keys = Optimizer.optional_group_keys | {"decoupled_weight_decay", "cautious"}

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 2e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0,
        momentum_decay: float = 4e-3,
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
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, momentum_decay=momentum_decay,
                        decoupled_weight_decay=decoupled_weight_decay, cautious=cautious, maximize=maximize)
        super().__init__(params, defaults, backend=backend, foreach=foreach, fused=fused,
                         max_grad_norm=max_grad_norm, skip_nonfinite=skip_nonfinite, state_dtype=state_dtype, param_update=param_update,
                         differentiable=differentiable, capturable=capturable)

    def _check_hyperparameters(self, group: dict[str, Any]) -> None:
        _checks.non_negative("lr", group["lr"])
        _checks.betas(group["betas"])
        _checks.non_negative("eps", group["eps"])
        _checks.non_negative("weight_decay", group["weight_decay"])
        _checks.non_negative("momentum_decay", group["momentum_decay"])
        _checks.flag("decoupled_weight_decay", group["decoupled_weight_decay"])
        _checks.flag("cautious", group["cautious"])
        _checks.flag("maximize", group["maximize"])

    def _scalar_state(self, group: dict[str, Any]) -> dict[str, float]:
        return {"mu_product": 1.0}

    def _supplied(self, group: dict[str, Any], states: list[dict[str, Any]], params: list[torch.Tensor]) -> dict[str, Any]:
        beta1, psi = _checks.as_number("betas[0]", group["betas"][0]), float(group["momentum_decay"])
        step = np.array([float(state["step"]) for state in states]) + 1  # the count after this step's increment
        mu = beta1 * (1.0 - 0.5 * 0.96 ** (step * psi))
        mu_next = beta1 * (1.0 - 0.5 * 0.96 ** ((step + 1) * psi))
        # torch multiplies the 0-d state in place (it rounds to the state's dtype); written after the step
        products = [state["mu_product"] * float(m) for state, m in zip(states, mu)]
        return dict(mu=mu, mu_next=mu_next, mu_product=np.array([float(p) for p in products]), products=products)

    def _after_step(self, group: dict[str, Any], states: list[dict[str, Any]], supplied: dict[str, Any]) -> None:
        for state, product in zip(states, supplied["products"]):
            state["mu_product"].copy_(product)
