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
from .._base import Optimizer
from ..engine import Flag, lerp, rule, sqrt


@rule
def rmsprop(param, grad, square_avg, grad_avg, momentum_buffer, *, lr, alpha, eps, weight_decay, momentum,
            centered: Flag, maximize: Flag):
    """One RMSprop step of one tensor, in torch.optim's order of operations.

    ``momentum_buffer`` and ``grad_avg`` are created when first needed (the ``if`` tests decide which state
    a group's options use), so a schedule that turns momentum on later (CyclicLR) works.
    """
    if maximize:
        grad = -grad
    if weight_decay != 0:
        grad = grad + weight_decay * param
    square_avg = alpha * square_avg + (1 - alpha) * grad * grad
    if centered:
        grad_avg = lerp(grad_avg, grad, 1 - alpha)
        denominator = sqrt(square_avg - grad_avg * grad_avg) + eps
    else:
        denominator = sqrt(square_avg) + eps
    if momentum > 0:
        momentum_buffer = momentum * momentum_buffer + grad / denominator
        param = param - lr * momentum_buffer
    else:
        param = param - lr * grad / denominator
    return param, square_avg, grad_avg, momentum_buffer


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
        backend, foreach, fused, max_grad_norm, skip_nonfinite, state_dtype, param_update: as for every thalweg optimizer.
    """

    name = "rmsprop"  # thalweg.create's name
    family = "RMSprop-like"  # the arena's family (report panels, toggles)

    rule = rmsprop
    state_codecs = {"square_avg": "unsigned", "grad_avg": "signed", "momentum_buffer": "signed"}
    optional_group_keys = Optimizer.optional_group_keys | {"momentum", "centered"}

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-2,
        alpha: float = 0.99,
        eps: float = 1e-8,
        weight_decay: float = 0,
        momentum: float = 0,
        centered: bool = False,
        capturable: bool = False,
        foreach: bool | None = None,
        maximize: bool = False,
        differentiable: bool = False,
        *,
        backend: str = "auto",
        fused: bool | None = None,
        max_grad_norm: float | None = None,
        skip_nonfinite: bool = False,
        state_dtype: torch.dtype | None = None,
        param_update: str = "nearest",
    ) -> None:
        defaults = dict(lr=lr, alpha=alpha, eps=eps, weight_decay=weight_decay, momentum=momentum,
                        centered=centered, maximize=maximize)
        super().__init__(params, defaults, backend=backend, foreach=foreach, fused=fused,
                         max_grad_norm=max_grad_norm, skip_nonfinite=skip_nonfinite,
                         state_dtype=state_dtype, param_update=param_update, differentiable=differentiable, capturable=capturable)

    def _check_hyperparameters(self, group: dict[str, Any]) -> None:
        _checks.non_negative("lr", group["lr"])
        _checks.in_interval("alpha", group["alpha"], 0.0, 1.0, closed_high=True)
        _checks.non_negative("eps", group["eps"])
        _checks.non_negative("weight_decay", group["weight_decay"])
        _checks.non_negative("momentum", group["momentum"])
        _checks.flag("centered", group["centered"])
        _checks.flag("maximize", group["maximize"])
