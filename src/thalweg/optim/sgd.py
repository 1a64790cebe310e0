r"""SGD, with optional (Nesterov) momentum, and Momentum: the same with momentum on by default.

With gradient :math:`g_t`, learning rate :math:`\gamma`, momentum :math:`\mu`, dampening :math:`\tau`
and weight decay :math:`\lambda` (torch.optim.SGD's formulation, Sutskever et al. 2013):

.. math::

    g_t &\leftarrow g_t + \lambda w_{t-1} \\
    b_t &= g_t \text{ at the first step, then } \mu b_{t-1} + (1-\tau)\, g_t \\
    d_t &= g_t + \mu b_t \text{ (Nesterov) or } b_t \\
    w_t &= w_{t-1} - \gamma d_t

Without momentum, :math:`d_t = g_t`. The learning rate sits outside the buffer, as in torch (and
unlike Polyak's original), so a schedule changes the step size at once.

State (torch's name): ``momentum_buffer`` (only when ``momentum != 0``; no ``step`` counter, as in torch).
"""

from __future__ import annotations

from typing import Any, Iterable

import torch

from .. import _checks
from .._backends import group_by_device_and_dtype, register
from .._base import Optimizer


class SGD(Optimizer):
    """Stochastic gradient descent, a drop-in for ``torch.optim.SGD``.

    Args:
        params: parameters, ``named_parameters()`` or param-group dicts.
        lr: learning rate (default 1e-3, torch's).
        momentum: momentum factor :math:`\\mu` (default 0).
        dampening: dampening :math:`\\tau` of the gradient entering the buffer (default 0).
        weight_decay: L2 penalty :math:`\\lambda` (default 0).
        nesterov: Nesterov momentum; needs ``momentum > 0`` and ``dampening == 0`` (default False).
        maximize: ascend the objective instead of descending it (default False).
        backend, foreach, fused, max_grad_norm, skip_nonfinite, state_dtype: as for every thalweg optimizer
            (see :class:`thalweg.Adam`).
    """

    algorithm = "sgd"

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        momentum: float = 0,
        dampening: float = 0,
        weight_decay: float = 0,
        nesterov: bool = False,
        *,
        maximize: bool = False,
        backend: str = "auto",
        foreach: bool | None = None,
        fused: bool | None = None,
        max_grad_norm: float | None = None,
        skip_nonfinite: bool = False,
        state_dtype: torch.dtype | None = None,
    ) -> None:
        defaults = dict(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
                        nesterov=nesterov, maximize=maximize)
        super().__init__(params, defaults, backend=backend, foreach=foreach, fused=fused,
                         max_grad_norm=max_grad_norm, skip_nonfinite=skip_nonfinite,
                         state_dtype=state_dtype)

    def _check_hyperparameters(self, group: dict[str, Any]) -> None:
        _checks.non_negative("lr", group["lr"])
        _checks.non_negative("momentum", group["momentum"])
        _checks.in_interval("dampening", group["dampening"], 0.0, 1.0, closed_high=True)
        _checks.non_negative("weight_decay", group["weight_decay"])
        _checks.flag("nesterov", group["nesterov"])
        _checks.flag("maximize", group["maximize"])
        if group["nesterov"] and (_checks.as_number("momentum", group["momentum"]) <= 0 or group["dampening"] != 0):
            raise ValueError(
                f"nesterov=True requires momentum > 0 and dampening == 0, got momentum={group['momentum']}, "
                f"dampening={group['dampening']}"
            )

    def _states(self, params, group) -> list[dict[str, Any]]:
        # the momentum buffer is the first step's gradient, created by the update itself
        return [self.state[p] for p in params] if _checks.as_number("momentum", group["momentum"]) != 0 else []

    def _update(self, update, group, params, grads, states) -> None:
        momentum = _checks.as_number("momentum", group["momentum"])
        buffers = [s.get("momentum_buffer") for s in states] if momentum != 0 else []
        update(
            params,
            grads,
            momentum_buffers=buffers,
            lr=_checks.as_number("lr", group["lr"]),
            momentum=momentum,
            dampening=float(group["dampening"]),
            weight_decay=float(group["weight_decay"]),
            nesterov=group["nesterov"],
            maximize=group["maximize"],
        )
        for state, buffer in zip(states, buffers):
            state["momentum_buffer"] = buffer


class Momentum(SGD):
    """SGD with momentum 0.9 on by default — the classic "Momentum" optimizer. Arguments as :class:`SGD`."""

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        momentum: float = 0.9,
        dampening: float = 0,
        weight_decay: float = 0,
        nesterov: bool = False,
        *,
        maximize: bool = False,
        backend: str = "auto",
        foreach: bool | None = None,
        fused: bool | None = None,
        max_grad_norm: float | None = None,
        skip_nonfinite: bool = False,
        state_dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(params, lr, momentum, dampening, weight_decay, nesterov, maximize=maximize, backend=backend,
                         foreach=foreach, fused=fused, max_grad_norm=max_grad_norm, skip_nonfinite=skip_nonfinite,
                         state_dtype=state_dtype)


@register("sgd", "reference")
def sgd_reference(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    *,
    momentum_buffers: list[torch.Tensor | None],
    lr: float,
    momentum: float,
    dampening: float,
    weight_decay: float,
    nesterov: bool,
    maximize: bool,
) -> None:
    """One tensor at a time. ``momentum_buffers`` (empty without momentum) has its ``None`` entries replaced."""
    for i, (param, grad) in enumerate(zip(params, grads)):
        grad = -grad if maximize else grad
        if weight_decay != 0:
            grad = grad.add(param, alpha=weight_decay)
        if momentum != 0:
            buffer = momentum_buffers[i]
            if buffer is None:
                buffer = momentum_buffers[i] = grad.detach().clone()
            else:
                buffer.mul_(momentum).add_(grad, alpha=1 - dampening)
            grad = grad.add(buffer, alpha=momentum) if nesterov else buffer
        param.add_(grad, alpha=-lr)


@register("sgd", "foreach")
def sgd_foreach(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    *,
    momentum_buffers: list[torch.Tensor | None],
    lr: float,
    momentum: float,
    dampening: float,
    weight_decay: float,
    nesterov: bool,
    maximize: bool,
) -> None:
    """All tensors of a (device, dtype) bucket per ``torch._foreach_*`` call."""
    indices = list(range(len(params)))
    for params_, grads_, indices_ in group_by_device_and_dtype([params, grads, indices]):
        grads_ = torch._foreach_neg(grads_) if maximize else grads_
        if weight_decay != 0:
            grads_ = torch._foreach_add(grads_, params_, alpha=weight_decay)
        if momentum != 0:
            existing = [k for k, i in enumerate(indices_) if momentum_buffers[i] is not None]
            if existing:
                buffers = [momentum_buffers[indices_[k]] for k in existing]
                torch._foreach_mul_(buffers, momentum)
                torch._foreach_add_(buffers, [grads_[k] for k in existing], alpha=1 - dampening)
            for k, i in enumerate(indices_):
                if momentum_buffers[i] is None:
                    momentum_buffers[i] = grads_[k].detach().clone()
            buffers = [momentum_buffers[i] for i in indices_]
            grads_ = torch._foreach_add(grads_, buffers, alpha=momentum) if nesterov else buffers
        torch._foreach_add_(params_, grads_, alpha=-lr)
