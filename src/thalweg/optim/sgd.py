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
from .._base import Optimizer
from ..engine import Flag, PerTensor, maximum, norm, rule, where

# where backend="auto" takes the fused path on CPU (see SGD._auto_fused)
_FUSED_BELOW_MEAN_ELEMENTS = 1 << 16
_FUSED_FROM_TENSORS = 32
_MOMENTUM_FUSED_FROM_ELEMENTS = 1 << 20


@rule
def sgd(param, grad, momentum_buffer, *, first, lr, momentum, dampening, weight_decay, size: PerTensor,
        nesterov: Flag, cautious: Flag, maximize: Flag):
    """One SGD step of one tensor, in torch.optim's order of operations (``first``: the buffer is new)."""
    if maximize:
        grad = -grad
    if weight_decay != 0:
        grad = grad + weight_decay * param
    update = grad
    if momentum != 0:
        # torch: a new buffer is a copy of the direction, then momentum·buffer + (1 - dampening)·direction
        momentum_buffer = where(first, grad, momentum * momentum_buffer + (1 - dampening) * grad)
        if nesterov:
            update = grad + momentum * momentum_buffer
        else:
            update = momentum_buffer
    if cautious:
        agrees = where(update * grad > 0, grad * 0 + 1, grad * 0)
        update = update * agrees / maximum(norm(agrees) ** 2 / size, 1e-3)
    param = param - lr * update
    return param, momentum_buffer


class SGD(Optimizer):
    """Stochastic gradient descent, a drop-in for ``torch.optim.SGD``.

    Args:
        params: parameters, ``named_parameters()`` or param-group dicts.
        lr: learning rate (default 1e-3, torch's).
        momentum: momentum factor :math:`\\mu` (default 0).
        dampening: dampening :math:`\\tau` of the gradient entering the buffer (default 0).
        weight_decay: L2 penalty :math:`\\lambda` (default 0).
        nesterov: Nesterov momentum; needs ``momentum > 0`` and ``dampening == 0`` (default False).
        cautious: drop the components of the step whose sign differs from the gradient's (with ``weight_decay``:
            the gradient plus the L2 term), the rest scaled by 1 / max(kept fraction, 1e-3) over the whole
            tensor (Liang et al. 2024, timm's renormalisation; a thalweg extension, default False).
        maximize: ascend the objective instead of descending it (default False).
        backend, foreach, fused, max_grad_norm, skip_nonfinite, state_dtype, param_update: as for every thalweg optimizer
            (see :class:`thalweg.Adam`).
    """

    name = "sgd"  # thalweg.create's name
    family = "SGD-like"  # the arena's family (report panels, toggles)

    rule = sgd
    state_codecs = {"momentum_buffer": "signed"}
    optional_group_keys = Optimizer.optional_group_keys | {"nesterov", "cautious"}
    counts_steps = False  # torch's SGD keeps no step counter
    accepts_sparse_grads = True  # as torch's (nn.Embedding(sparse=True)); the momentum buffer is kept dense

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        momentum: float = 0,
        dampening: float = 0,
        weight_decay: float = 0,
        nesterov: bool = False,
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
        defaults = dict(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
                        nesterov=nesterov, cautious=cautious, maximize=maximize)
        super().__init__(params, defaults, backend=backend, foreach=foreach, fused=fused,
                         max_grad_norm=max_grad_norm, skip_nonfinite=skip_nonfinite,
                         state_dtype=state_dtype, param_update=param_update, differentiable=differentiable)

    def _check_hyperparameters(self, group: dict[str, Any]) -> None:
        _checks.non_negative("lr", group["lr"])
        _checks.non_negative("momentum", group["momentum"])
        _checks.in_interval("dampening", group["dampening"], 0.0, 1.0, closed_high=True)
        _checks.non_negative("weight_decay", group["weight_decay"])
        _checks.flag("nesterov", group["nesterov"])
        _checks.flag("cautious", group["cautious"])
        _checks.flag("maximize", group["maximize"])
        if group["nesterov"] and (_checks.as_number("momentum", group["momentum"]) <= 0 or group["dampening"] != 0):
            raise ValueError(
                f"nesterov=True requires momentum > 0 and dampening == 0, got momentum={group['momentum']}, "
                f"dampening={group['dampening']}"
            )

    def _auto_fused(self, device: torch.device, params: list[torch.Tensor], group: dict[str, Any]) -> bool:
        # SGD's for-loop is already one pass per tensor (a single in-place torch op, vectorised by torch), so
        # on CPU the fused kernel only wins where per-tensor dispatch dominates: many small tensors.
        # Measured (benchmarks/results/cpu-2026-11-23.md, for-loop vs fused ms): 32 x 1M 6.48 vs 6.45,
        # GPT-small (mean 100k elements) 1.03 vs 1.03, 2000 x 1000 5.02 vs 2.42; with a handful of tensors
        # the kernel call's fixed cost loses (a 4-tensor MLP after a cache flush: 0.12 vs 0.23 ms per step).
        # With momentum the for-loop makes three passes (buffer, then parameter), so fused wins on any
        # sizeable model: 32 x 1M 8.78 vs 6.83, GPT-small 2.15 vs 1.56; only small models keep the for-loop
        # (a 235k-parameter MLP: 0.30 vs 0.33 ms after a cache flush, a 4.8k-parameter one: 0.19 vs 0.23).
        if device.type != "cpu":
            return True
        n_tensors = len(params)
        n_elements = sum(map(torch.Tensor.numel, params))
        if group.get("momentum", 0) != 0:
            return n_tensors >= _FUSED_FROM_TENSORS or n_elements >= _MOMENTUM_FUSED_FROM_ELEMENTS
        return n_tensors >= _FUSED_FROM_TENSORS and n_elements / n_tensors < _FUSED_BELOW_MEAN_ELEMENTS


class Momentum(SGD):
    """SGD with momentum 0.9 on by default — the classic "Momentum" optimizer. Arguments as :class:`SGD`."""

    name = "momentum"  # thalweg.create's name
    family = "SGD-like"  # the arena's family (report panels, toggles)

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        momentum: float = 0.9,
        dampening: float = 0,
        weight_decay: float = 0,
        nesterov: bool = False,
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
        super().__init__(params, lr, momentum, dampening, weight_decay, nesterov, cautious=cautious, maximize=maximize,
                         backend=backend,
                         foreach=foreach, fused=fused, max_grad_norm=max_grad_norm, skip_nonfinite=skip_nonfinite,
                         state_dtype=state_dtype, param_update=param_update, differentiable=differentiable)
