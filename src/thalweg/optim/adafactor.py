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

Under FSDP2 (parameters sharded by rows, dim 0) the statistics are the single process's: a 2-d matrix's column
statistics and the mean of its row factor are summed over every process's rows (an all-reduce each), its two RMS
norms are the engine's (summed across shards); the factors are DTensors, so DCP saves and reshards them.

State (torch's names): ``step``, ``row_var`` (shape (…, R, 1)) and ``col_var`` ((…, 1, C)) for ≥ 2-d
parameters, ``variance`` for the others. Checkpoints cross-load with ``torch.optim.Adafactor``.
"""

from __future__ import annotations

import math
from typing import Any, Iterable

import torch

from .. import _checks, distributed
from .._base import Optimizer
from ..engine import PerTensor, maximum, minimum, norm, rule, sqrt


@rule
def adafactor(param, grad, *, step, lr, weight_decay, eps2, d, size: PerTensor):
    """The elementwise end of an Adafactor step: ``grad`` is the scaled update U (Adafactor._transform_grads)."""
    root_numel = sqrt(maximum(size, 1.0))  # (the whole tensor's count; an empty one: 1, where torch divides by 0)
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

    def _check_parameters(self, group: dict[str, Any], params: list[torch.Tensor], g: int) -> None:
        for k, param in enumerate(params):
            if distributed.is_sharded(param) and param.dim() > 1 and distributed.flat_offset(param) is None:
                raise ValueError(f"Adafactor on a matrix sharded other than by rows (FSDP2's Shard(0)) is not "
                                 f"supported: params[{k}] of param group {g} has placements {tuple(param.placements)}")

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

    def _check_state(self, where, params, states) -> None:
        for k, (param, state) in enumerate(zip(params, states)):
            if param.dim() > 1:
                expected = {"row_var": (*param.shape[:-1], 1), "col_var": (*param.shape[:-2], 1, param.shape[-1])}
            else:
                expected = {"variance": tuple(param.shape)}
            for key, shape in expected.items():  # (``params`` are local shards under FSDP2: so are the factors)
                value = state.get(key)
                value = distributed.local(value) if isinstance(value, torch.Tensor) else value
                if value is not None and not (isinstance(value, torch.Tensor) and tuple(value.shape) == shape):
                    got = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
                    raise RuntimeError(f"{where(k)}: state[{key!r}] is {got}, not the {shape} an Adafactor state "
                                       "holds for this parameter")

    def _transform_grads(self, group, params, grads, states) -> list[torch.Tensor]:
        """The factored second moment (torch's order of operations), updated in the state; returns U = G/√V̂.

        Under FSDP2 (``params`` are the local shards of DTensors sharded by rows, dim 0): a 2-d matrix's rows are
        split between processes, so its column statistics and the mean of its row factor are sums over every
        process's rows (one all-reduce each); a stack of matrices (≥ 3 dims) is split by matrix, and everything
        is local. ``row_var`` is then a DTensor sharded as its parameter, ``col_var`` one replicated (2-d) or
        sharded (stacks): the state the single process keeps, for DCP."""
        beta2_decay, maximize = float(group["beta2_decay"]), group["maximize"]
        sharded = self._sharded_by_state(group)
        across = (distributed.group_sharding(0, list(sharded.values())).sum_across_shards_ if sharded else None)
        out = []
        for param, grad, state in zip(params, grads, states):
            grad = -grad if maximize else grad
            eps1 = group["eps"][0] if group["eps"][0] is not None else torch.finfo(param.dtype).eps
            weight = (float(state["step"]) + 1) ** beta2_decay  # this step's count, as the rule's `step`
            whole = sharded.get(id(state))
            split_rows = whole is not None and whole.dim() == 2  # (a stack's dim 0 indexes whole matrices)
            rows = whole.shape[-2] if split_rows else grad.size(-2) if grad.dim() > 1 else 0
            if grad.dim() > 1:
                row_var = state.get("row_var")
                if row_var is None:
                    row_var, col_var = grad.new_zeros((*grad.shape[:-1], 1)), grad.new_zeros((*grad.shape[:-2], 1, grad.shape[-1]))
                    state["row_var"], state["col_var"] = (row_var, col_var) if whole is None else _sharded_factors(
                        whole, row_var, col_var, split_rows)
                row_var, col_var = distributed.local(state["row_var"]), distributed.local(state["col_var"])
                row_var.lerp_(torch.norm(grad, dim=-1, keepdim=True).square_().div_(grad.size(-1)), weight)
                column_squares = torch.norm(grad, dim=-2, keepdim=True).square_()
                if split_rows:  # the column sums of every process's rows
                    across(column_squares)
                col_var.lerp_(column_squares.div_(rows), weight)
                row_sum = row_var.sum(dim=-2, keepdim=True) if split_rows else None
                if split_rows:
                    across(row_sum)
                row_mean = row_sum.div_(rows) if split_rows else row_var.mean(dim=-2, keepdim=True)
                estimate = (row_var @ col_var).div_(row_mean.clamp_(min=eps1))
            else:
                if state.get("variance") is None:
                    variance = torch.zeros_like(grad, memory_format=torch.preserve_format)
                    state["variance"] = variance if whole is None else distributed.shard_like(whole, variance)
                variance = distributed.local(state["variance"])
                variance.lerp_(grad * grad, weight)
                estimate = variance.clone()
            out.append(estimate.clamp_(min=eps1 * eps1).rsqrt_().mul_(grad))
        return out


def _sharded_factors(param: torch.Tensor, row_var: torch.Tensor, col_var: torch.Tensor,
                     split_rows: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The local factors of DTensor ``param`` as DTensors of the whole factors' shapes: ``row_var`` placed as the
    parameter (its rows, or its matrices, are this process's), ``col_var`` replicated when the rows are split (every
    process holds every column), else placed as the parameter too."""
    from torch.distributed.tensor import DTensor

    def placed(local: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
        strides = torch.empty(shape, device="meta").stride()
        return DTensor.from_local(local, param.device_mesh, param.placements, run_check=False, shape=shape,
                                  stride=strides)

    rows = placed(row_var, (*param.shape[:-1], 1))
    columns = (distributed.replicated_like(param, col_var) if split_rows
               else placed(col_var, (*param.shape[:-2], 1, param.shape[-1])))
    return rows, columns

