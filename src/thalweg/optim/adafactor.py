r"""Adafactor (Shazeer & Stern, 2018), as torch.optim.Adafactor implements it.

Adam's second moment costs as much memory as the weights. Adafactor keeps, for a matrix, only its row
and column means — :math:`O(R + C)` instead of :math:`O(RC)` — and rebuilds the estimate as their outer
product; it keeps no first moment, and sizes each step relative to the weights' own scale. At step
:math:`t`, for a parameter :math:`W` of shape (…, R, C) with gradient :math:`G`:

.. math::

    \hat\beta_t &= t^{c} \quad (c = \text{beta2\_decay} \le 0), \qquad
        \rho_t = \min(\gamma, 1/\sqrt t), \qquad
        \alpha_t = \max(\epsilon_2, \operatorname{RMS}(W_{t-1}))\, \rho_t \\
    r_t &= (1-\hat\beta_t)\, r_{t-1} + \hat\beta_t\, \operatorname{mean}_{C}(G^2), \qquad
        c_t = (1-\hat\beta_t)\, c_{t-1} + \hat\beta_t\, \operatorname{mean}_{R}(G^2) \\
    \hat V_t &= r_t c_t / \operatorname{mean}_R(r_t) \quad \text{(1-d and 0-d parameters: } v_t
        = (1-\hat\beta_t) v_{t-1} + \hat\beta_t G^2 \text{)} \\
    U_t &= G / \sqrt{\max(\hat V_t, \epsilon_1^2)}, \qquad
        W_t = (1 - \gamma\lambda) W_{t-1} - \frac{\alpha_t}{\max(1, \operatorname{RMS}(U_t)/d)}\, U_t

This is torch's variant, which differs from the paper in places: the mean of the row factor is clamped
by :math:`\epsilon_1` (default: the dtype's machine epsilon), :math:`\epsilon_1` bounds the variance
from below inside the square root, weight decay is decoupled, and there is no first moment and no
relative-step switch. RMS is the root mean square (‖·‖/√numel).

The factored statistics are a stage of torch ops per tensor (:meth:`Adafactor._transform_grads`): it
updates ``row_var``/``col_var`` (or ``variance``) and hands :math:`U_t` to the rule, which the engine
runs as every other — the two RMS values as its per-tensor norms (float64), fused or not.

State (torch's names): ``step``, ``row_var`` (shape (…, R, 1)) and ``col_var`` ((…, 1, C)) for ≥ 2-d
parameters, ``variance`` for the others. Checkpoints cross-load with ``torch.optim.Adafactor``.
"""

from __future__ import annotations

import math
from typing import Any, Iterable

import numpy as np
import torch

from .. import _checks
from .._base import Optimizer
from ..engine import PerTensor, maximum, minimum, norm, rule, sqrt


@rule
def adafactor(param, grad, *, step, lr, weight_decay, eps2, d, root_numel: PerTensor):
    """The elementwise end of an Adafactor step: ``grad`` is the scaled update U (Adafactor._transform_grads)."""
    rho = minimum(lr, 1 / sqrt(step))
    alpha = maximum(eps2, norm(param) / root_numel) * rho  # the weights' scale before the decay
    if weight_decay != 0:
        param = param * (1 - lr * weight_decay)
    denom = maximum(1.0, norm(grad) / (root_numel * d))
    param = param - alpha / denom * grad
    return (param,)


class Adafactor(Optimizer):
    """Adafactor, a drop-in for ``torch.optim.Adafactor``: factored second moments (memory ~ rows + columns),
    steps relative to the weights' scale.

    Args:
        params: parameters, ``named_parameters()`` or param-group dicts.
        lr: :math:`\\gamma`, the cap of the relative step :math:`\\rho_t = \\min(\\gamma, 1/\\sqrt t)` (default 1e-2).
        beta2_decay: :math:`c \\le 0`: the second-moment average's weight is :math:`t^c` (default -0.8).
        eps: :math:`(\\epsilon_1, \\epsilon_2)`: the variance floor (None: the dtype's machine epsilon) and the
            floor of the weights' scale (default (None, 1e-3)).
        d: the clipping threshold of the update's RMS, >= 1 (default 1.0).
        weight_decay: decoupled weight decay :math:`\\lambda` (default 0).
        foreach: as in torch (``True``: the foreach backend for the final update).
        maximize: ascend the objective instead of descending it (default False).
        backend, fused, max_grad_norm, skip_nonfinite: as for every thalweg optimizer.
    """

    name = "adafactor"  # thalweg.create's name
    family = "RMSprop-like"  # the arena's family (report panels, toggles)
    rule = adafactor
    own_state_keys = frozenset({"row_var", "col_var", "variance"})
    unshaped_state_keys = frozenset({"row_var", "col_var"})
    transforms_grads = True

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-2,
        beta2_decay: float = -0.8,
        eps: tuple[float | None, float] = (None, 1e-3),
        d: float = 1.0,
        weight_decay: float = 0.0,
        *,
        foreach: bool | None = None,
        maximize: bool = False,
        backend: str = "auto",
        fused: bool | None = None,
        max_grad_norm: float | None = None,
        skip_nonfinite: bool = False,
    ) -> None:
        defaults = dict(lr=lr, beta2_decay=beta2_decay, eps=eps, d=d, weight_decay=weight_decay, foreach=foreach,
                        maximize=maximize)
        super().__init__(params, defaults, backend=backend, foreach=foreach, fused=fused, max_grad_norm=max_grad_norm,
                         skip_nonfinite=skip_nonfinite, differentiable=None)
        for g, group in enumerate(self.param_groups):
            for k, param in enumerate(group["params"]):
                if type(param).__name__ == "DTensor" and param.dim() > 1:
                    raise ValueError(f"Adafactor on sharded (DTensor, FSDP2) matrices is not supported yet: params[{k}] "
                                     f"of param group {g}; its column statistics need every row")

    def _check_hyperparameters(self, group: dict[str, Any]) -> None:
        _checks.non_negative("lr", group["lr"])
        beta2_decay = _checks.as_number("beta2_decay", group["beta2_decay"])
        if not beta2_decay <= 0:
            raise ValueError(f"beta2_decay must be <= 0, got {beta2_decay}")
        eps = group["eps"]
        if not isinstance(eps, (tuple, list)) or len(eps) != 2:
            raise ValueError(f"eps must be a pair (eps1 or None, eps2), got {eps!r}")
        if eps[0] is not None:
            _checks.non_negative("eps[0]", eps[0])
        _checks.non_negative("eps[1]", eps[1])
        d = _checks.as_number("d", group["d"])
        if not 1.0 <= d < math.inf:
            raise ValueError(f"d must be a finite number >= 1, got {d}")
        _checks.non_negative("weight_decay", group["weight_decay"])
        _checks.flag("maximize", group["maximize"])

    def _scalars(self, group: dict[str, Any]) -> dict[str, Any]:
        return dict(lr=_checks.as_number("lr", group["lr"]), weight_decay=float(group["weight_decay"]),
                    eps2=float(group["eps"][1]), d=float(group["d"]))

    def _supplied(self, group, states, params) -> dict[str, Any]:
        # (an empty tensor: 1, where torch divides by zero; its update is empty either way)
        return dict(root_numel=np.array([math.sqrt(max(p.numel(), 1)) for p in params]))

    def _check_state(self, where, params, states) -> None:
        for k, (param, state) in enumerate(zip(params, states)):
            if param.dim() > 1:
                expected = {"row_var": (*param.shape[:-1], 1), "col_var": (*param.shape[:-2], 1, param.shape[-1])}
            else:
                expected = {"variance": tuple(param.shape)}
            for key, shape in expected.items():
                value = state.get(key)
                if value is not None and not (isinstance(value, torch.Tensor) and tuple(value.shape) == shape):
                    got = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
                    raise RuntimeError(f"{where(k)}: state[{key!r}] is {got}, not the {shape} an Adafactor state "
                                       "holds for this parameter")

    def _transform_grads(self, group, params, grads, states) -> list[torch.Tensor]:
        """The factored second moment (torch's order of operations), updated in the state; returns U = G/√V̂."""
        beta2_decay, maximize = float(group["beta2_decay"]), group["maximize"]
        out = []
        for param, grad, state in zip(params, grads, states):
            grad = -grad if maximize else grad
            eps1 = group["eps"][0] if group["eps"][0] is not None else torch.finfo(param.dtype).eps
            weight = (float(state["step"]) + 1) ** beta2_decay  # this step's count, as the rule's `step`
            if grad.dim() > 1:
                row_var = state.get("row_var")
                if row_var is None:
                    row_var = state["row_var"] = grad.new_zeros((*grad.shape[:-1], 1))
                    state["col_var"] = grad.new_zeros((*grad.shape[:-2], 1, grad.shape[-1]))
                col_var = state["col_var"]
                row_var.lerp_(torch.norm(grad, dim=-1, keepdim=True).square_().div_(grad.size(-1)), weight)
                col_var.lerp_(torch.norm(grad, dim=-2, keepdim=True).square_().div_(grad.size(-2)), weight)
                estimate = (row_var @ col_var).div_(row_var.mean(dim=-2, keepdim=True).clamp_(min=eps1))
            else:
                variance = state.get("variance")
                if variance is None:
                    variance = state["variance"] = torch.zeros_like(grad, memory_format=torch.preserve_format)
                variance.lerp_(grad * grad, weight)
                estimate = variance.clone()
            out.append(estimate.clamp_(min=eps1 * eps1).rsqrt_().mul_(grad))
        return out
