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

import math
from typing import Any, Iterable

import torch

from .. import _checks
from .._backends import group_by_device_and_dtype, register
from .._base import Optimizer, scalar_dtype
from ._norms import norm, norms_together


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
        backend, foreach, fused, max_grad_norm, skip_nonfinite, state_dtype: as for every thalweg optimizer.
    """

    algorithm = "lamb"
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
    ) -> None:
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, bias_correction=bias_correction,
                        maximize=maximize, trust_ratio=True)
        super().__init__(params, defaults, backend=backend, foreach=foreach, fused=fused,
                         max_grad_norm=max_grad_norm, skip_nonfinite=skip_nonfinite,
                         state_dtype=state_dtype)

    def _check_hyperparameters(self, group: dict[str, Any]) -> None:
        _checks.non_negative("lr", group["lr"])
        _checks.betas(group["betas"])
        _checks.non_negative("eps", group["eps"])
        _checks.non_negative("weight_decay", group["weight_decay"])
        _checks.flag("bias_correction", group["bias_correction"])
        _checks.flag("maximize", group["maximize"])
        _checks.flag("trust_ratio", group["trust_ratio"])

    def _states(self, params, group) -> list[dict[str, Any]]:
        states = [self.state[p] for p in params]
        for param, state in zip(params, states):
            if "step" not in state:
                state["step"] = torch.tensor(0.0, dtype=scalar_dtype())
                state["exp_avg"] = self._new_state(param)
                state["exp_avg_sq"] = self._new_state(param)
        return states

    def _update(self, update, group, params, grads, states) -> None:
        beta1, beta2 = group["betas"]
        update(
            params,
            grads,
            exp_avgs=[s["exp_avg"] for s in states],
            exp_avg_sqs=[s["exp_avg_sq"] for s in states],
            steps=[s["step"] for s in states],
            lr=_checks.as_number("lr", group["lr"]),
            beta1=_checks.as_number("betas[0]", beta1),
            beta2=_checks.as_number("betas[1]", beta2),
            eps=float(group["eps"]),
            weight_decay=float(group["weight_decay"]),
            bias_correction=group["bias_correction"],
            maximize=group["maximize"],
            trust_ratio=group["trust_ratio"],
        )


def _bias_corrections(t: float, beta1: float, beta2: float, bias_correction: bool) -> tuple[float, float]:
    """(1 - β1^t, √(1 - β2^t)), or (1, 1) without bias correction."""
    if not bias_correction:
        return 1.0, 1.0
    return 1 - beta1**t, math.sqrt(1 - beta2**t)


@register("lamb", "reference")
def lamb_reference(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    *,
    exp_avgs: list[torch.Tensor],
    exp_avg_sqs: list[torch.Tensor],
    steps: list[torch.Tensor],
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    bias_correction: bool,
    maximize: bool,
    trust_ratio: bool,
) -> None:
    """One tensor at a time, as the equations in the module docstring read."""
    for i, (param, grad) in enumerate(zip(params, grads)):
        grad = -grad if maximize else grad
        steps[i] += 1
        correction1, correction2_sqrt = _bias_corrections(steps[i].item(), beta1, beta2, bias_correction)
        exp_avgs[i].lerp_(grad, 1 - beta1)
        exp_avg_sqs[i].mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        update = (exp_avgs[i] / correction1) / (exp_avg_sqs[i].sqrt() / correction2_sqrt + eps)
        if weight_decay != 0:
            update.add_(param, alpha=weight_decay)
        ratio = 1.0
        if trust_ratio:
            weight_norm, update_norm = norm(param).item(), norm(update).item()
            if weight_norm > 0 and update_norm > 0:
                ratio = weight_norm / update_norm
        param.add_(update, alpha=-lr * ratio)


@register("lamb", "foreach")
def lamb_foreach(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    *,
    exp_avgs: list[torch.Tensor],
    exp_avg_sqs: list[torch.Tensor],
    steps: list[torch.Tensor],
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    bias_correction: bool,
    maximize: bool,
    trust_ratio: bool,
) -> None:
    """All tensors of a bucket per call; the trust ratios from one batched norm call, without a host sync."""
    for params_, grads_, exp_avgs_, exp_avg_sqs_, steps_ in group_by_device_and_dtype(
        [params, grads, exp_avgs, exp_avg_sqs, steps]
    ):
        grads_ = torch._foreach_neg(grads_) if maximize else grads_
        torch._foreach_add_(steps_, 1)
        corrections = [_bias_corrections(step.item(), beta1, beta2, bias_correction) for step in steps_]
        torch._foreach_lerp_(exp_avgs_, grads_, 1 - beta1)
        torch._foreach_mul_(exp_avg_sqs_, beta2)
        torch._foreach_addcmul_(exp_avg_sqs_, grads_, grads_, 1 - beta2)
        denoms = torch._foreach_sqrt(exp_avg_sqs_)
        torch._foreach_div_(denoms, [c2 for _, c2 in corrections])
        torch._foreach_add_(denoms, eps)
        updates = torch._foreach_div(exp_avgs_, [c1 for c1, _ in corrections])
        torch._foreach_div_(updates, denoms)
        if weight_decay != 0:
            torch._foreach_add_(updates, params_, alpha=weight_decay)
        if trust_ratio:
            weight_norms, update_norms = norms_together(params_, updates)  # sharded: one reduction
            usable = (weight_norms > 0) & (update_norms > 0)
            ratios = torch.where(usable, weight_norms / update_norms, torch.ones_like(weight_norms))
            torch._foreach_mul_(updates, list(ratios.unbind()))
        torch._foreach_add_(params_, updates, alpha=-lr)
