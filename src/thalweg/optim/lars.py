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
from .._backends import group_by_device_and_dtype, register
from .._base import Optimizer
from ._norms import norm, norms_together
from .sgd import sgd_foreach, sgd_reference


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
        backend, foreach, fused, max_grad_norm, skip_nonfinite, state_dtype: as for every thalweg optimizer.
    """

    algorithm = "lars"
    layerwise = True

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
    ) -> None:
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay, trust_coefficient=trust_coefficient,
                        eps=eps, nesterov=nesterov, maximize=maximize, trust_ratio=True)
        super().__init__(params, defaults, backend=backend, foreach=foreach, fused=fused,
                         max_grad_norm=max_grad_norm, skip_nonfinite=skip_nonfinite,
                         state_dtype=state_dtype)

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

    def _states(self, params, group) -> list[dict[str, Any]]:
        # the momentum buffer is the first step's direction, created by the update itself
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
            weight_decay=float(group["weight_decay"]),
            trust_coefficient=float(group["trust_coefficient"]),
            eps=float(group["eps"]),
            nesterov=group["nesterov"],
            maximize=group["maximize"],
            trust_ratio=group["trust_ratio"],
        )
        for state, buffer in zip(states, buffers):
            state["momentum_buffer"] = buffer


@register("lars", "reference")
def lars_reference(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    *,
    momentum_buffers: list[torch.Tensor | None],
    lr: float,
    momentum: float,
    weight_decay: float,
    trust_coefficient: float,
    eps: float,
    nesterov: bool,
    maximize: bool,
    trust_ratio: bool,
) -> None:
    """One tensor at a time: the layer-wise direction, then SGD's momentum step on it."""
    directions = []
    for param, grad in zip(params, grads):
        grad = -grad if maximize else grad
        direction = grad.add(param, alpha=weight_decay) if weight_decay != 0 else grad
        if trust_ratio:
            weight_norm, grad_norm = norm(param).item(), norm(grad).item()
            if weight_norm > 0 and grad_norm > 0:
                local_lr = trust_coefficient * weight_norm / (grad_norm + weight_decay * weight_norm + eps)
                direction = direction.mul(local_lr)
        directions.append(direction)
    sgd_reference(params, directions, momentum_buffers=momentum_buffers, lr=lr, momentum=momentum, dampening=0.0,
                  weight_decay=0.0, nesterov=nesterov, maximize=False)


@register("lars", "foreach")
def lars_foreach(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    *,
    momentum_buffers: list[torch.Tensor | None],
    lr: float,
    momentum: float,
    weight_decay: float,
    trust_coefficient: float,
    eps: float,
    nesterov: bool,
    maximize: bool,
    trust_ratio: bool,
) -> None:
    """Norms of a whole bucket in one batched call, the ratios without a host sync, then SGD's foreach step."""
    directions: list[torch.Tensor] = [None] * len(params)  # type: ignore[list-item]
    indices = list(range(len(params)))
    for params_, grads_, indices_ in group_by_device_and_dtype([params, grads, indices]):
        grads_ = torch._foreach_neg(grads_) if maximize else grads_
        directions_ = torch._foreach_add(grads_, params_, alpha=weight_decay) if weight_decay != 0 else grads_
        if trust_ratio:
            weight_norms, grad_norms = norms_together(params_, grads_)  # sharded: one reduction
            usable = (weight_norms > 0) & (grad_norms > 0)
            local_lrs = trust_coefficient * weight_norms / (grad_norms + weight_decay * weight_norms + eps)
            local_lrs = torch.where(usable, local_lrs, torch.ones_like(local_lrs))
            directions_ = torch._foreach_mul(directions_, list(local_lrs.unbind()))
        for i, direction in zip(indices_, directions_):
            directions[i] = direction
    sgd_foreach(params, directions, momentum_buffers=momentum_buffers, lr=lr, momentum=momentum, dampening=0.0,
                weight_decay=0.0, nesterov=nesterov, maximize=False)
