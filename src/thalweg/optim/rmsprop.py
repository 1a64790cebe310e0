r"""RMSprop (Hinton, Lecture 6e, 2012; centred variant from Graves, 2013).

Divides the gradient by a running root-mean-square of recent gradients, so each coordinate gets its
own step size that adapts to a non-stationary gradient scale. With smoothing constant :math:`\alpha`:

.. math::

    g_t &\leftarrow g_t + \lambda w_{t-1} \\
    v_t &= \alpha v_{t-1} + (1-\alpha)\, g_t^2 \\
    \bar g_t &= \alpha \bar g_{t-1} + (1-\alpha)\, g_t, \quad
        \tilde v_t = v_t - \bar g_t^2 \text{ (centred) or } v_t \\
    b_t &= \mu b_{t-1} + g_t / (\sqrt{\tilde v_t} + \epsilon), \quad w_t = w_{t-1} - \gamma b_t
        \quad \text{(with momentum } \mu > 0\text{)} \\
    w_t &= w_{t-1} - \gamma\, g_t / (\sqrt{\tilde v_t} + \epsilon) \quad \text{(without)}

State (torch's names): ``step``, ``square_avg`` (:math:`v`), ``momentum_buffer`` (with momentum),
``grad_avg`` (:math:`\bar g`, when centred).
"""

from __future__ import annotations

from typing import Any, Iterable

import torch

from .. import _checks
from .._backends import group_by_device_and_dtype, register
from .._base import Optimizer, scalar_dtype


class RMSprop(Optimizer):
    """RMSprop, a drop-in for ``torch.optim.RMSprop``.

    Args:
        params: parameters, ``named_parameters()`` or param-group dicts.
        lr: learning rate (default 1e-2).
        alpha: smoothing constant of the squared-gradient average, in [0, 1] (default 0.99).
        eps: added to the denominator (default 1e-8).
        weight_decay: L2 penalty (default 0).
        momentum: momentum factor (default 0).
        centered: normalise by the estimated variance instead of the raw second moment (default False).
        maximize: ascend the objective instead of descending it (default False).
        backend, foreach, fused, max_grad_norm, skip_nonfinite, state_dtype: as for every thalweg optimizer.
    """

    algorithm = "rmsprop"

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-2,
        alpha: float = 0.99,
        eps: float = 1e-8,
        weight_decay: float = 0,
        momentum: float = 0,
        centered: bool = False,
        *,
        maximize: bool = False,
        backend: str = "auto",
        foreach: bool | None = None,
        fused: bool | None = None,
        max_grad_norm: float | None = None,
        skip_nonfinite: bool = False,
        state_dtype: torch.dtype | None = None,
    ) -> None:
        defaults = dict(lr=lr, alpha=alpha, eps=eps, weight_decay=weight_decay, momentum=momentum,
                        centered=centered, maximize=maximize)
        super().__init__(params, defaults, backend=backend, foreach=foreach, fused=fused,
                         max_grad_norm=max_grad_norm, skip_nonfinite=skip_nonfinite,
                         state_dtype=state_dtype)

    def _check_hyperparameters(self, group: dict[str, Any]) -> None:
        _checks.non_negative("lr", group["lr"])
        _checks.in_interval("alpha", group["alpha"], 0.0, 1.0, closed_high=True)
        _checks.non_negative("eps", group["eps"])
        _checks.non_negative("weight_decay", group["weight_decay"])
        _checks.non_negative("momentum", group["momentum"])
        _checks.flag("centered", group["centered"])
        _checks.flag("maximize", group["maximize"])

    def _states(self, params, group) -> list[dict[str, Any]]:
        states = [self.state[p] for p in params]
        # Created when first needed, so a schedule that turns momentum on later (CyclicLR) works.
        momentum, centered = group["momentum"] > 0, group["centered"]
        for param, state in zip(params, states):
            if "step" not in state:
                state["step"] = torch.tensor(0.0, dtype=scalar_dtype())
                state["square_avg"] = self._new_state(param)
            if momentum and "momentum_buffer" not in state:
                state["momentum_buffer"] = self._new_state(param)
            if centered and "grad_avg" not in state:
                state["grad_avg"] = self._new_state(param)
        return states

    def _update(self, update, group, params, grads, states) -> None:
        momentum = _checks.as_number("momentum", group["momentum"])
        update(
            params,
            grads,
            square_avgs=[s["square_avg"] for s in states],
            grad_avgs=[s["grad_avg"] for s in states] if group["centered"] else [],
            momentum_buffers=[s["momentum_buffer"] for s in states] if momentum > 0 else [],
            steps=[s["step"] for s in states],
            lr=_checks.as_number("lr", group["lr"]),
            alpha=float(group["alpha"]),
            eps=float(group["eps"]),
            weight_decay=float(group["weight_decay"]),
            momentum=momentum,
            centered=group["centered"],
            maximize=group["maximize"],
        )


@register("rmsprop", "reference")
def rmsprop_reference(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    *,
    square_avgs: list[torch.Tensor],
    grad_avgs: list[torch.Tensor],
    momentum_buffers: list[torch.Tensor],
    steps: list[torch.Tensor],
    lr: float,
    alpha: float,
    eps: float,
    weight_decay: float,
    momentum: float,
    centered: bool,
    maximize: bool,
) -> None:
    """One tensor at a time, as the equations in the module docstring read."""
    for i, (param, grad) in enumerate(zip(params, grads)):
        grad = -grad if maximize else grad
        steps[i] += 1
        if weight_decay != 0:
            grad = grad.add(param, alpha=weight_decay)
        square_avgs[i].mul_(alpha).addcmul_(grad, grad, value=1 - alpha)
        if centered:
            grad_avgs[i].lerp_(grad, 1 - alpha)
            denom = square_avgs[i].addcmul(grad_avgs[i], grad_avgs[i], value=-1).sqrt_().add_(eps)
        else:
            denom = square_avgs[i].sqrt().add_(eps)
        if momentum > 0:
            momentum_buffers[i].mul_(momentum).addcdiv_(grad, denom)
            param.add_(momentum_buffers[i], alpha=-lr)
        else:
            param.addcdiv_(grad, denom, value=-lr)


@register("rmsprop", "foreach")
def rmsprop_foreach(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    *,
    square_avgs: list[torch.Tensor],
    grad_avgs: list[torch.Tensor],
    momentum_buffers: list[torch.Tensor],
    steps: list[torch.Tensor],
    lr: float,
    alpha: float,
    eps: float,
    weight_decay: float,
    momentum: float,
    centered: bool,
    maximize: bool,
) -> None:
    """All tensors of a (device, dtype) bucket per ``torch._foreach_*`` call."""
    buckets = group_by_device_and_dtype([params, grads, square_avgs, grad_avgs, momentum_buffers, steps])
    for params_, grads_, square_avgs_, grad_avgs_, momentum_buffers_, steps_ in buckets:
        grads_ = torch._foreach_neg(grads_) if maximize else grads_
        torch._foreach_add_(steps_, 1)
        if weight_decay != 0:
            grads_ = torch._foreach_add(grads_, params_, alpha=weight_decay)
        torch._foreach_mul_(square_avgs_, alpha)
        torch._foreach_addcmul_(square_avgs_, grads_, grads_, 1 - alpha)
        if centered:
            torch._foreach_lerp_(grad_avgs_, grads_, 1 - alpha)
            denoms = torch._foreach_addcmul(square_avgs_, grad_avgs_, grad_avgs_, -1)
            torch._foreach_sqrt_(denoms)
        else:
            denoms = torch._foreach_sqrt(square_avgs_)
        torch._foreach_add_(denoms, eps)
        if momentum > 0:
            torch._foreach_mul_(momentum_buffers_, momentum)
            torch._foreach_addcdiv_(momentum_buffers_, grads_, denoms)
            torch._foreach_add_(params_, momentum_buffers_, alpha=-lr)
        else:
            torch._foreach_addcdiv_(params_, grads_, denoms, -lr)
