r"""Adagrad (Duchi, Hazan & Singer, 2011), with sparse gradients.

Accumulates every squared gradient, so coordinates that are updated rarely (the rows of an embedding
that a batch does not touch) keep a large step size while frequent ones slow down:

.. math::

    g_t &\leftarrow g_t + \lambda w_{t-1} \\
    \tilde\gamma_t &= \gamma / (1 + (t-1)\,\eta) \\
    s_t &= s_{t-1} + g_t^2 \\
    w_t &= w_{t-1} - \tilde\gamma_t\, g_t / (\sqrt{s_t} + \epsilon)

(:math:`\eta` is ``lr_decay``.) With a sparse gradient (``nn.Embedding(sparse=True)``) only the rows
present in the gradient are read and written. Weight decay would touch every row, so it is refused
with sparse gradients, as in torch.

State (torch's names): ``step``, ``sum`` (:math:`s`, initialised to ``initial_accumulator_value`` when
the optimizer is built, as torch does).
"""

from __future__ import annotations

from typing import Any, Iterable

import torch

from .. import _checks
from .._base import Optimizer
from ..engine import Flag, rule, sqrt


@rule
def adagrad(param, grad, sum, *, step, lr, lr_decay, weight_decay, eps, maximize: Flag):  # noqa: A002
    """One dense Adagrad step of one tensor, in torch.optim's order of operations (``sum`` is torch's name)."""
    if maximize:
        grad = -grad
    if weight_decay != 0:
        grad = grad + weight_decay * param
    sum = sum + grad * grad  # noqa: A001
    step_lr = lr / (1 + (step - 1) * lr_decay)
    param = param - step_lr * grad / (sqrt(sum) + eps)
    return param, sum


class Adagrad(Optimizer):
    """Adagrad, a drop-in for ``torch.optim.Adagrad``, sparse gradients included.

    Args:
        params: parameters, ``named_parameters()`` or param-group dicts.
        lr: learning rate (default 1e-2).
        lr_decay: learning-rate decay :math:`\\eta` (default 0).
        weight_decay: L2 penalty (default 0; must stay 0 with sparse gradients).
        initial_accumulator_value: starting value of the ``sum`` state (default 0).
        eps: added to the denominator (default 1e-10).
        maximize: ascend the objective instead of descending it (default False).
        backend, foreach, fused, max_grad_norm, skip_nonfinite, state_dtype, param_update: as for every thalweg optimizer.
    """

    name = "adagrad"  # thalweg.create's name
    family = "RMSprop-like"  # the arena's family (report panels, toggles)

    rule = adagrad
    state_codecs = {"sum": "unsigned"}
    accepts_sparse_grads = True

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-2,
        lr_decay: float = 0,
        weight_decay: float = 0,
        initial_accumulator_value: float = 0,
        eps: float = 1e-10,
        foreach: bool | None = None,
        *,
        maximize: bool = False,
        backend: str = "auto",
        fused: bool | None = None,
        max_grad_norm: float | None = None,
        skip_nonfinite: bool = False,
        state_dtype: torch.dtype | None = None,
        param_update: str = "nearest",
        differentiable: bool = False,
    ) -> None:
        defaults = dict(lr=lr, lr_decay=lr_decay, weight_decay=weight_decay,
                        initial_accumulator_value=initial_accumulator_value, eps=eps, maximize=maximize)
        super().__init__(params, defaults, backend=backend, foreach=foreach, fused=fused,
                         max_grad_norm=max_grad_norm, skip_nonfinite=skip_nonfinite,
                         state_dtype=state_dtype, param_update=param_update, differentiable=differentiable)
        # torch creates Adagrad's state eagerly; doing the same keeps state_dict() layouts equal.
        for group in self.param_groups:
            self._states(group["params"], group, self.rule.program(self._scalars(group)))

    def _check_hyperparameters(self, group: dict[str, Any]) -> None:
        _checks.non_negative("lr", group["lr"])
        _checks.non_negative("lr_decay", group["lr_decay"])
        _checks.non_negative("weight_decay", group["weight_decay"])
        _checks.non_negative("initial_accumulator_value", group["initial_accumulator_value"])
        _checks.non_negative("eps", group["eps"])
        _checks.flag("maximize", group["maximize"])

    def _initial_value(self, role: str, group: dict[str, Any]) -> float:
        return float(group["initial_accumulator_value"])

    def _sparse_update(self, group, params, grads, states, first=None) -> None:
        """Only the rows present in each sparse gradient are read and written (torch's sparse Adagrad)."""
        lr, lr_decay, eps = _checks.as_number("lr", group["lr"]), float(group["lr_decay"]), float(group["eps"])
        for param, grad, state in zip(params, grads, states):
            grad = -grad if group["maximize"] else grad
            state["step"] += 1
            step_lr = lr / (1 + (state["step"].item() - 1) * lr_decay)
            _sparse_row_update(param, grad, state["sum"], step_lr=step_lr, eps=eps)


def _sparse_row_update(param: torch.Tensor, grad: torch.Tensor, state_sum: torch.Tensor, *, step_lr: float,
                       eps: float) -> None:
    grad = grad.coalesce()  # repeated indices must be summed before squaring
    indices, values = grad._indices(), grad._values()

    def sparse_like(new_values: torch.Tensor) -> torch.Tensor:
        # Built from a coalesced gradient: the invariants hold, checking them would only cost time.
        return torch.sparse_coo_tensor(indices, new_values, grad.shape, check_invariants=False, is_coalesced=True)

    state_sum.add_(sparse_like(values.pow(2)))
    std_values = state_sum.sparse_mask(grad)._values().sqrt_().add_(eps)
    param.add_(sparse_like(values / std_values), alpha=-step_lr)
