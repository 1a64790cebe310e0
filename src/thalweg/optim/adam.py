r"""Adam and AdamW.

Adam (Kingma & Ba, 2015) keeps exponential moving averages of the gradient and of its square and
steps along their bias-corrected ratio. At step :math:`t`, with gradient :math:`g_t`:

.. math::

    g_t &\leftarrow g_t + \lambda w_{t-1}                       && \text{(Adam: L2 penalty in the gradient)} \\
    w_{t-1} &\leftarrow (1 - \gamma\lambda)\, w_{t-1}           && \text{(AdamW: decoupled decay)} \\
    m_t &= \beta_1 m_{t-1} + (1-\beta_1)\, g_t \\
    v_t &= \beta_2 v_{t-1} + (1-\beta_2)\, g_t^2 \\
    \hat v_t &= \max(\hat v_{t-1}, v_t) \text{ with amsgrad, else } v_t \\
    w_t &= w_{t-1} - \frac{\gamma}{1-\beta_1^t}\,\frac{m_t}{\sqrt{\hat v_t}/\sqrt{1-\beta_2^t} + \epsilon}

AdamW (Loshchilov & Hutter, 2019) decays the weights directly instead of adding :math:`\lambda w` to the
gradient, so the decay is not rescaled by the adaptive denominator.

State (torch's names): ``step`` (a 0-d float tensor), ``exp_avg`` (:math:`m`), ``exp_avg_sq``
(:math:`v`), ``max_exp_avg_sq`` (with ``amsgrad``). Checkpoints cross-load with ``torch.optim.Adam``/``AdamW``.
"""

from __future__ import annotations

import math
from typing import Any, Iterable

import torch

from .. import _checks
from .._backends import group_by_device_and_dtype, register
from .._base import Optimizer, scalar_dtype


class Adam(Optimizer):
    """Adam, a drop-in for ``torch.optim.Adam`` (same arguments, defaults, state and checkpoints).

    Args:
        params: parameters, ``named_parameters()`` or param-group dicts.
        lr: learning rate :math:`\\gamma` (default 1e-3).
        betas: :math:`(\\beta_1, \\beta_2)`, decay rates of the two moving averages (default (0.9, 0.999)).
        eps: added to the denominator for numerical stability (default 1e-8).
        weight_decay: L2 penalty :math:`\\lambda` added to the gradient (default 0).
        amsgrad: use the running maximum of :math:`v` (Reddi et al., 2018) (default False).
        maximize: ascend the objective instead of descending it (default False).
        backend: ``"auto"``, ``"reference"``, ``"foreach"`` or ``"fused"``; ``foreach=``/``fused=`` as in torch.
        max_grad_norm: clip the global gradient norm to this before the update (default None: off).
        skip_nonfinite: skip, and count in ``skipped_steps``, a step whose gradients hold NaN/Inf.
        state_dtype: ``torch.float32`` keeps the state of bfloat16/float16 parameters in float32, each step
            computed in float32 and the parameter rounded once (default None: the parameter's dtype, as torch).

    Example::

        optimizer = thalweg.Adam(model.parameters(), lr=1e-3)
        loss_fn(model(x), y).backward()
        optimizer.step()
        optimizer.zero_grad()
    """

    algorithm = "adam"
    decoupled_weight_decay = False

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0,
        amsgrad: bool = False,
        *,
        maximize: bool = False,
        backend: str = "auto",
        foreach: bool | None = None,
        fused: bool | None = None,
        max_grad_norm: float | None = None,
        skip_nonfinite: bool = False,
        state_dtype: torch.dtype | None = None,
    ) -> None:
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad, maximize=maximize)
        super().__init__(params, defaults, backend=backend, foreach=foreach, fused=fused,
                         max_grad_norm=max_grad_norm, skip_nonfinite=skip_nonfinite,
                         state_dtype=state_dtype)

    def _check_hyperparameters(self, group: dict[str, Any]) -> None:
        _checks.non_negative("lr", group["lr"])
        _checks.betas(group["betas"])
        _checks.non_negative("eps", group["eps"])
        _checks.non_negative("weight_decay", group["weight_decay"])
        _checks.flag("amsgrad", group["amsgrad"])
        _checks.flag("maximize", group["maximize"])

    def _states(self, params, group) -> list[dict[str, Any]]:
        states = [self.state[p] for p in params]
        amsgrad = group["amsgrad"]
        for param, state in zip(params, states):
            if "step" not in state:
                state["step"] = torch.tensor(0.0, dtype=scalar_dtype())
                state["exp_avg"] = self._new_state(param)
                state["exp_avg_sq"] = self._new_state(param)
            if amsgrad and "max_exp_avg_sq" not in state:
                state["max_exp_avg_sq"] = self._new_state(param)
        return states

    def _update(self, update, group, params, grads, states) -> None:
        beta1, beta2 = group["betas"]
        update(
            params,
            grads,
            exp_avgs=[s["exp_avg"] for s in states],
            exp_avg_sqs=[s["exp_avg_sq"] for s in states],
            max_exp_avg_sqs=[s["max_exp_avg_sq"] for s in states] if group["amsgrad"] else [],
            steps=[s["step"] for s in states],
            lr=_checks.as_number("lr", group["lr"]),
            beta1=_checks.as_number("betas[0]", beta1),
            beta2=_checks.as_number("betas[1]", beta2),
            eps=float(group["eps"]),
            weight_decay=float(group["weight_decay"]),
            decoupled_weight_decay=self.decoupled_weight_decay,
            amsgrad=group["amsgrad"],
            maximize=group["maximize"],
        )


class AdamW(Adam):
    """AdamW, a drop-in for ``torch.optim.AdamW``: Adam with decoupled weight decay (default 1e-2).

    Arguments as :class:`Adam`; ``weight_decay`` multiplies the weights by :math:`1-\\gamma\\lambda`
    each step instead of entering the gradient.
    """

    algorithm = "adam"
    decoupled_weight_decay = True

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        amsgrad: bool = False,
        *,
        maximize: bool = False,
        backend: str = "auto",
        foreach: bool | None = None,
        fused: bool | None = None,
        max_grad_norm: float | None = None,
        skip_nonfinite: bool = False,
        state_dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(params, lr, betas, eps, weight_decay, amsgrad, maximize=maximize, backend=backend,
                         foreach=foreach, fused=fused, max_grad_norm=max_grad_norm, skip_nonfinite=skip_nonfinite,
                         state_dtype=state_dtype)


@register("adam", "reference")
def adam_reference(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    *,
    exp_avgs: list[torch.Tensor],
    exp_avg_sqs: list[torch.Tensor],
    max_exp_avg_sqs: list[torch.Tensor],
    steps: list[torch.Tensor],
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    decoupled_weight_decay: bool,
    amsgrad: bool,
    maximize: bool,
) -> None:
    """One tensor at a time, as the equations in the module docstring read."""
    for i, (param, grad) in enumerate(zip(params, grads)):
        grad = -grad if maximize else grad
        steps[i] += 1
        t = steps[i].item()
        if weight_decay != 0:
            if decoupled_weight_decay:
                param.mul_(1 - lr * weight_decay)
            else:
                grad = grad.add(param, alpha=weight_decay)
        exp_avgs[i].lerp_(grad, 1 - beta1)
        exp_avg_sqs[i].mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        second_moment = exp_avg_sqs[i]
        if amsgrad:
            torch.maximum(max_exp_avg_sqs[i], exp_avg_sqs[i], out=max_exp_avg_sqs[i])
            second_moment = max_exp_avg_sqs[i]
        denom = (second_moment.sqrt() / math.sqrt(1 - beta2**t)).add_(eps)
        param.addcdiv_(exp_avgs[i], denom, value=-lr / (1 - beta1**t))


@register("adam", "foreach")
def adam_foreach(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    *,
    exp_avgs: list[torch.Tensor],
    exp_avg_sqs: list[torch.Tensor],
    max_exp_avg_sqs: list[torch.Tensor],
    steps: list[torch.Tensor],
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    decoupled_weight_decay: bool,
    amsgrad: bool,
    maximize: bool,
) -> None:
    """All tensors of a (device, dtype) bucket per ``torch._foreach_*`` call."""
    buckets = group_by_device_and_dtype([params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps])
    for params_, grads_, exp_avgs_, exp_avg_sqs_, max_exp_avg_sqs_, steps_ in buckets:
        grads_ = torch._foreach_neg(grads_) if maximize else grads_
        torch._foreach_add_(steps_, 1)
        ts = [step.item() for step in steps_]
        if weight_decay != 0:
            if decoupled_weight_decay:
                torch._foreach_mul_(params_, 1 - lr * weight_decay)
            else:
                grads_ = torch._foreach_add(grads_, params_, alpha=weight_decay)
        torch._foreach_lerp_(exp_avgs_, grads_, 1 - beta1)
        torch._foreach_mul_(exp_avg_sqs_, beta2)
        torch._foreach_addcmul_(exp_avg_sqs_, grads_, grads_, 1 - beta2)
        second_moments = exp_avg_sqs_
        if amsgrad:
            torch._foreach_maximum_(max_exp_avg_sqs_, exp_avg_sqs_)
            second_moments = max_exp_avg_sqs_
        denoms = torch._foreach_sqrt(second_moments)
        torch._foreach_div_(denoms, [math.sqrt(1 - beta2**t) for t in ts])
        torch._foreach_add_(denoms, eps)
        torch._foreach_addcdiv_(params_, exp_avgs_, denoms, [-lr / (1 - beta1**t) for t in ts])
