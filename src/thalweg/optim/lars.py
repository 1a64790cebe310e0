r"""LARS: layer-wise adaptive rate scaling (You, Gitman & Ginsburg, 2017), in the LARC form used with PyTorch.

Very large batches call for large learning rates, and a single global rate then overshoots layers
whose gradients are large relative to their weights. LARS gives every layer (tensor) a local rate
proportional to ‖w‖/‖g‖. With trust coefficient :math:`\eta`, weight decay :math:`\lambda` and momentum
:math:`\mu`:

.. math::

    d_t &= g_t + \lambda w_{t-1} \\
    d_t &\leftarrow \frac{\eta\,\lVert w_{t-1}\rVert}{\lVert g_t\rVert + \lambda \lVert w_{t-1}\rVert + \epsilon}\, d_t
        \quad \text{if the group's } \texttt{trust\_ratio} \text{ is on and } \lVert w\rVert > 0,\ \lVert g\rVert > 0 \\
    b_t &= d_t \text{ at the first step, then } \mu b_{t-1} + d_t \\
    w_t &= w_{t-1} - \gamma\,(d_t + \mu b_t \text{ (Nesterov) or } b_t)

The learning rate multiplies the update outside the momentum buffer (LARC / torch-style; optax applies
it before momentum). Biases and normalisation weights are usually excluded from the adaptation and
the decay: a param group with ``trust_ratio=False`` and ``weight_decay=0`` (``thalweg.create`` does this).

State (torch's name): ``momentum_buffer`` (when ``momentum != 0``).
"""

from __future__ import annotations

from typing import Any, Iterable

import torch

from .. import _checks
from .._base import Optimizer
from ..engine import Flag, norm, rule, where


@rule
def lars(param, grad, momentum_buffer, *, first, lr, momentum, weight_decay, trust_coefficient, eps,
         nesterov: Flag, maximize: Flag, trust_ratio: Flag):
    """One LARS step of one tensor: the layer-wise scaled direction, then SGD's momentum (``first``: new buffer)."""
    if maximize:
        grad = -grad
    direction = grad
    if weight_decay != 0:
        direction = grad + weight_decay * param
    if trust_ratio:
        weight_norm = norm(param)
        grad_norm = norm(grad)
        local_lr = trust_coefficient * weight_norm / (grad_norm + weight_decay * weight_norm + eps)
        direction = direction * where((weight_norm > 0) & (grad_norm > 0), local_lr, 1.0)
    if momentum != 0:
        momentum_buffer = where(first, direction, momentum * momentum_buffer + direction)
        if nesterov:
            direction = direction + momentum * momentum_buffer
        else:
            direction = momentum_buffer
    param = param - lr * direction
    return param, momentum_buffer


class LARS(Optimizer):
    """LARS for very large batches (ResNet-50 at batch 32k in the paper).

    Args:
        params: parameters, ``named_parameters()`` or param-group dicts (a group may set ``trust_ratio=False``).
        lr: global learning rate :math:`\\gamma` (required; the local rate is :math:`\\gamma\\eta\\lVert w\\rVert/\\lVert g\\rVert`,
            so useful values are larger than SGD's).
        momentum: momentum factor (default 0.9).
        weight_decay: :math:`\\lambda`, added to the direction before scaling (default 0).
        trust_coefficient: :math:`\\eta` (default 0.001).
        eps: added to the denominator of the trust ratio (default 1e-8).
        nesterov: Nesterov momentum (default False).
        maximize: ascend the objective instead of descending it (default False).
        backend, foreach, fused, max_grad_norm, skip_nonfinite, state_dtype, param_update: as for every thalweg optimizer.
    """

    name = "lars"  # thalweg.create's name
    family = "layer-wise"  # the arena's family (report panels, toggles)

    rule = lars
    state_codecs = {"momentum_buffer": "signed"}
    optional_group_keys = Optimizer.optional_group_keys | {"trust_ratio"}
    layerwise = True
    counts_steps = False

    def __init__(
        self,
        params: Iterable[Any],
        lr: float,
        momentum: float = 0.9,
        weight_decay: float = 0,
        trust_coefficient: float = 0.001,
        eps: float = 1e-8,
        nesterov: bool = False,
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
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay, trust_coefficient=trust_coefficient,
                        eps=eps, nesterov=nesterov, maximize=maximize, trust_ratio=True)
        super().__init__(params, defaults, backend=backend, foreach=foreach, fused=fused,
                         max_grad_norm=max_grad_norm, skip_nonfinite=skip_nonfinite,
                         state_dtype=state_dtype, param_update=param_update, differentiable=differentiable)

    def _check_hyperparameters(self, group: dict[str, Any]) -> None:
        _checks.non_negative("lr", group["lr"])
        _checks.non_negative("momentum", group["momentum"])
        _checks.non_negative("weight_decay", group["weight_decay"])
        _checks.positive("trust_coefficient", group["trust_coefficient"])
        _checks.non_negative("eps", group["eps"])
        _checks.flag("nesterov", group["nesterov"])
        _checks.flag("maximize", group["maximize"])
        _checks.flag("trust_ratio", group["trust_ratio"])
        if group["nesterov"] and _checks.as_number("momentum", group["momentum"]) <= 0:
            raise ValueError(f"nesterov=True requires momentum > 0, got momentum={group['momentum']}")
