r"""SparseAdam: Adam for sparse gradients, stepping only the rows a gradient holds ("lazy" Adam).

For embedding tables trained with ``nn.Embedding(sparse=True)``: each step's gradient holds a few rows,
and only those rows' moments and weights are updated — Adam's update (Kingma & Ba, 2015) restricted to
them. Rows absent from a gradient keep their moments as they were (dense Adam would decay them), so
this is an approximation of Adam that costs memory traffic in proportion to the rows used. At step
:math:`t`, for each row :math:`r` present in :math:`g_t`:

.. math::

    m_{t,r} &= m_{t-1,r} + (1-\beta_1)(g_{t,r} - m_{t-1,r}), \qquad
        v_{t,r} = v_{t-1,r} + (1-\beta_2)(g_{t,r}^2 - v_{t-1,r}) \\
    w_{t,r} &= w_{t-1,r} - \frac{\gamma\sqrt{1-\beta_2^t}}{1-\beta_1^t}\,\frac{m_{t,r}}{\sqrt{v_{t,r}} + \epsilon}

The step count is per parameter, not per row (as torch.optim's). Dense gradients are refused, as torch
refuses them (use :class:`~thalweg.Adam`); there is no weight decay, which would touch every row.

State (torch's names): ``step``, ``exp_avg`` (:math:`m`), ``exp_avg_sq`` (:math:`v`), dense like the
parameter; ``step`` is a Python int, as torch's (its other optimizers keep 0-d tensors). Checkpoints
cross-load with ``torch.optim.SparseAdam`` both ways and resume as if never stopped.
"""

from __future__ import annotations

from typing import Any, Iterable

import torch

from .. import _checks
from .._base import Optimizer
from ..engine import Flag, rule, sqrt


@rule
def sparse_adam(param, grad, exp_avg, exp_avg_sq, *, step, lr, beta1, beta2, eps, maximize: Flag):
    """One SparseAdam step of the rows a gradient holds (``param``, ``grad`` and the moments: those rows), in
    torch.optim's order of operations."""
    if maximize:
        grad = -grad
    exp_avg = exp_avg + (grad - exp_avg) * (1 - beta1)
    exp_avg_sq = exp_avg_sq + (grad * grad - exp_avg_sq) * (1 - beta2)
    step_size = lr * sqrt(1 - beta2**step) / (1 - beta1**step)
    param = param - step_size * (exp_avg / (sqrt(exp_avg_sq) + eps))
    return param, exp_avg, exp_avg_sq


class SparseAdam(Optimizer):
    """SparseAdam, a drop-in for ``torch.optim.SparseAdam``: Adam on the rows of sparse gradients only
    (``nn.Embedding(sparse=True)``); dense gradients are refused.

    Args:
        params: parameters (dense), ``named_parameters()`` or param-group dicts.
        lr: learning rate :math:`\\gamma` (default 1e-3).
        betas: :math:`(\\beta_1, \\beta_2)` (default (0.9, 0.999)).
        eps: added to the denominator (default 1e-8).
        maximize: ascend the objective instead of descending it (default False).
        max_grad_norm, skip_nonfinite: as for every thalweg optimizer.
    """

    name = "sparseadam"  # thalweg.create's name
    family = "Adam-like"  # the arena's family (report panels, toggles)
    rule = sparse_adam
    accepts_sparse_grads = True
    requires_sparse_grads = True
    # torch's SparseAdam counts steps in a Python int (its bias corrections then stay float64): kept alike, so
    # that a checkpoint resumes identically in either library
    counts_steps = False
    own_state_keys = frozenset({"step"})

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        maximize: bool = False,
        *,
        max_grad_norm: float | None = None,
        skip_nonfinite: bool = False,
    ) -> None:
        params = list(params) if not isinstance(params, torch.Tensor) else params
        complex_ = [[g, k] for g, tensors in enumerate(_tensors_by_group(params)) for k, p in enumerate(tensors)
                    if p.is_complex()]
        if complex_:  # torch's check and message (thalweg's other optimizers refuse complex params with a TypeError)
            raise ValueError(f"Complex params at indices {complex_}: SparseAdam does not support complex parameters")
        defaults = dict(lr=lr, betas=betas, eps=eps, maximize=maximize)
        super().__init__(params, defaults, backend="reference", foreach=None, fused=None,
                         max_grad_norm=max_grad_norm, skip_nonfinite=skip_nonfinite, differentiable=None)
        sparse = [[g, k] for g, group in enumerate(self.param_groups) for k, p in enumerate(group["params"]) if p.is_sparse]
        if sparse:
            raise ValueError(f"Sparse params at indices {sparse}: SparseAdam requires dense parameter tensors")

    def _check_hyperparameters(self, group: dict[str, Any]) -> None:
        _checks.non_negative("lr", group["lr"])
        _checks.betas(group["betas"])
        _checks.non_negative("eps", group["eps"])
        _checks.flag("maximize", group["maximize"])

    def _scalars(self, group: dict[str, Any]) -> dict[str, Any]:
        beta1, beta2 = group["betas"]
        # a tensor lr stays a tensor, as in torch's SparseAdam: its step size is then computed in the tensor's dtype
        lr = group["lr"] if isinstance(group["lr"], torch.Tensor) else _checks.as_number("lr", group["lr"])
        return dict(lr=lr, beta1=_checks.as_number("betas[0]", beta1),
                    beta2=_checks.as_number("betas[1]", beta2), eps=float(group["eps"]), maximize=group["maximize"])

    def _sparse_update(self, group, params, grads, states, first=None) -> None:
        """The rule on the rows each (coalesced) gradient holds; those rows written back, the others untouched."""
        scalars = self._scalars(group)
        for param, grad, state in zip(params, grads, states):
            state["step"] = state.get("step", 0) + 1
            grad = grad.coalesce()
            if grad._values().numel() == 0:
                continue
            rows = tuple(grad._indices())  # one index tensor per sparse dimension
            new = sparse_adam.fn(param[rows], grad._values(), state["exp_avg"][rows], state["exp_avg_sq"][rows],
                                 step=float(state["step"]), **scalars)
            for tensor, value in zip((param, state["exp_avg"], state["exp_avg_sq"]), new):
                tensor.index_put_(rows, value)




def _tensors_by_group(params: list) -> list[list[torch.Tensor]]:
    """The tensors of each param group as given (tensors, (name, tensor) pairs or group dicts); others skipped."""
    entries = params if params and isinstance(params[0], dict) else [{"params": params}]
    groups = []
    for entry in entries:
        items = entry.get("params", []) if isinstance(entry, dict) else []
        items = [items] if isinstance(items, torch.Tensor) else list(items)
        groups.append([i[1] if isinstance(i, tuple) and len(i) == 2 else i for i in items])
    return [[t for t in group if isinstance(t, torch.Tensor)] for group in groups]
