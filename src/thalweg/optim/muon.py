r"""Muon: momentum, orthogonalised (Jordan et al., 2024; torch.optim.Muon).

For the hidden weight *matrices* of a network. The momentum of the gradient is replaced by the nearest
semi-orthogonal matrix — every singular value set to about 1 — so that each step moves the matrix by
the same amount in every direction it moves it at all, whatever the gradient's conditioning. The
orthogonalisation is a few Newton–Schulz iterations in bfloat16 (no SVD). At step :math:`t`:

.. math::

    b_t &= \mu b_{t-1} + (1-\mu)\, g_t, \qquad u_t = (1-\mu)\, g_t + \mu b_t \text{ (Nesterov) or } b_t \\
    X_0 &= u_t / \max(\lVert u_t\rVert_F, \epsilon), \qquad
        X_{k+1} = a X_k + (b\, X_k X_k^\top + c\, (X_k X_k^\top)^2)\, X_k \quad (k < \text{ns\_steps}) \\
    w_t &= (1 - \gamma\lambda)\, w_{t-1} - \gamma' X_{\text{ns\_steps}}

with :math:`X` transposed first when it has more rows than columns, and :math:`\gamma' = \gamma\,s` scaled
by the matrix's shape :math:`A \times B`: :math:`s = \sqrt{\max(1, A/B)}` (``adjust_lr_fn=None`` or
``"original"``) or :math:`s = 0.2\sqrt{\max(A, B)}` (``"match_rms_adamw"``: the update's RMS then matches
AdamW's, so AdamW's learning rate and weight decay carry over). The quintic's coefficients
:math:`(a, b, c) = (3.4445, -4.7750, 2.0315)` push small singular values up fast; the result's singular
values land in roughly [0.7, 1.2], which trains as well as the exact polar factor.

Matrices of more than two dims are read as torch's own layers lay them out: a convolution's weight
``(out, in, *kernel)`` is the matrix ``out x (in * kernel)`` (its trailing dims flattened, as Keller Jordan's
reference code and the Moonlight code do), and with ``batch_dims=k`` the first ``k`` dims index separate
matrices, each orthogonalised on its own (a mixture of experts' ``(experts, m, n)`` stack with ``batch_dims=1``);
the shape :math:`A \times B` that scales the lr is the matrix's. torch's ``Muon`` takes 2-D parameters only:
this is thalweg's extension (a ``batch_dims`` param-group key torch ignores). Parameters of fewer than two
dims, embeddings and the output layer belong to another optimizer (AdamW), as in every reference setup. Its update is not elementwise: the momentum and the
Newton–Schulz iterations run as torch ops on whole matrices (:meth:`Muon._transform_grads`), and the
final elementwise update is this file's rule, run by the engine like every other.

State (torch's name): ``momentum_buffer``. No ``step`` (as torch's). Checkpoints cross-load with
``torch.optim.Muon``.
"""

from __future__ import annotations

import math
from typing import Any, Iterable

import numpy as np
import torch

from .. import _checks
from .._base import Optimizer
from ..engine import PerTensor, rule

_ADJUSTMENTS = (None, "original", "match_rms_adamw")


@rule
def muon(param, grad, *, lr, weight_decay, adjusted_lr: PerTensor):
    """The elementwise end of a Muon step: ``grad`` is the orthogonalised momentum (Muon._transform_grads)."""
    if weight_decay != 0:
        param = param * (1 - lr * weight_decay)
    param = param - adjusted_lr * grad
    return (param,)


def orthogonalize(update: torch.Tensor, coefficients: tuple[float, float, float], steps: int,
                  eps: float) -> torch.Tensor:
    """About the nearest semi-orthogonal matrix to ``update`` (2-D, or a ``[batch, m, n]`` stack orthogonalised
    matrix by matrix): ``steps`` quintic Newton–Schulz iterations in bfloat16, on the wide orientation (so that
    X Xᵀ is the smaller Gram matrix)."""
    a, b, c = coefficients
    tall = update.size(-2) > update.size(-1)
    x = update.bfloat16()
    if tall:
        x = x.mT
    if x.ndim == 2:  # torch's own sequence of operations, so that the result is bit for bit torch's
        x = x / x.norm().clamp(min=eps)
        for _ in range(steps):
            gram = x @ x.T
            polynomial = torch.addmm(gram, gram, gram, beta=b, alpha=c)  # b·G + c·G²
            x = torch.addmm(x, polynomial, x, beta=a)  # a·X + (b·G + c·G²)·X
    else:  # the same per matrix of the stack
        x = x / torch.linalg.matrix_norm(x, keepdim=True).clamp(min=eps)
        for _ in range(steps):
            gram = x @ x.mT
            polynomial = torch.baddbmm(gram, gram, gram, beta=b, alpha=c)
            x = torch.baddbmm(x, polynomial, x, beta=a)
    return x.mT if tall else x


def matrix_shape(shape: torch.Size, batch_dims: int = 0) -> tuple[int, int, int]:
    """(matrices, rows, columns) that a parameter of ``shape`` is orthogonalised as: the first ``batch_dims`` dims
    count matrices, the next is the rows, the rest (a convolution's input channels and kernel) the columns."""
    matrices = math.prod(shape[:batch_dims])
    rows = shape[batch_dims]
    return matrices, rows, math.prod(shape[batch_dims + 1:])


def adjusted_lr(lr: float, adjust_lr_fn: str | None, shape: torch.Size, batch_dims: int = 0) -> float:
    _, rows, columns = matrix_shape(shape, batch_dims)
    if adjust_lr_fn == "match_rms_adamw":
        return lr * 0.2 * math.sqrt(max(rows, columns))
    return lr * math.sqrt(max(1, rows / columns))


class Muon(Optimizer):
    """Muon, a drop-in for ``torch.optim.Muon``: orthogonalised momentum for 2-D weight matrices.

    Args:
        params: hidden matrices (2-D, or more dims: see ``batch_dims``), ``named_parameters()`` or param-group dicts.
        lr: learning rate :math:`\\gamma` (default 1e-3), scaled per matrix by ``adjust_lr_fn``.
        weight_decay: decoupled weight decay :math:`\\lambda` (default 0.1).
        momentum: :math:`\\mu` (default 0.95).
        nesterov: Nesterov momentum (default True).
        ns_coefficients: :math:`(a, b, c)` of the Newton–Schulz quintic (default (3.4445, -4.775, 2.0315)).
        eps: floor of the norm the momentum is divided by (default 1e-7).
        ns_steps: Newton–Schulz iterations, below 100 (default 5).
        adjust_lr_fn: ``None``/``"original"`` (:math:`\\sqrt{\\max(1, A/B)}`) or ``"match_rms_adamw"``
            (:math:`0.2\\sqrt{\\max(A, B)}`).
        batch_dims: leading dims that index separate matrices (default 0: a parameter is one matrix, its dims after
            the first flattened, as a convolution's); thalweg's extension, keyword-only.
        max_grad_norm, skip_nonfinite: as for every thalweg optimizer; backend, foreach, fused: for the final
            elementwise update.

    Example::

        hidden = [p for n, p in model.named_parameters() if p.ndim == 2 and "embed" not in n and "head" not in n]
        others = [p for p in model.parameters() if all(p is not h for h in hidden)]
        optimizers = [thalweg.Muon(hidden, lr=0.02), thalweg.AdamW(others, lr=3e-4)]
    """

    name = "muon"  # thalweg.create's name
    family = "matrix"  # the arena's family (report panels, toggles)
    rule = muon
    counts_steps = False  # torch's Muon keeps no step counter
    own_state_keys = frozenset({"momentum_buffer"})
    transforms_grads = True
    optional_group_keys = Optimizer.optional_group_keys | {"batch_dims"}  # torch's checkpoints lack it

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        weight_decay: float = 0.1,
        momentum: float = 0.95,
        nesterov: bool = True,
        ns_coefficients: tuple[float, float, float] = (3.4445, -4.775, 2.0315),
        eps: float = 1e-7,
        ns_steps: int = 5,
        adjust_lr_fn: str | None = None,
        *,
        batch_dims: int = 0,
        backend: str = "auto",
        foreach: bool | None = None,
        fused: bool | None = None,
        max_grad_norm: float | None = None,
        skip_nonfinite: bool = False,
    ) -> None:
        defaults = dict(lr=lr, weight_decay=weight_decay, momentum=momentum, nesterov=nesterov,
                        ns_coefficients=ns_coefficients, eps=eps, ns_steps=ns_steps, adjust_lr_fn=adjust_lr_fn,
                        batch_dims=batch_dims)
        super().__init__(params, defaults, backend=backend, foreach=foreach, fused=fused, max_grad_norm=max_grad_norm,
                         skip_nonfinite=skip_nonfinite, differentiable=None)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """torch's ``add_param_group``, refusing (with the group left out) a parameter Muon cannot step."""
        super().add_param_group(param_group)
        g, group = len(self.param_groups) - 1, self.param_groups[-1]
        try:
            batch_dims = group["batch_dims"]
            if isinstance(batch_dims, bool) or not isinstance(batch_dims, int) or batch_dims < 0:
                raise ValueError(f"batch_dims must be an integer >= 0, got {batch_dims!r}")
            for k, param in enumerate(group["params"]):
                if type(param).__name__ == "DTensor":
                    raise ValueError(f"Muon on sharded (DTensor, FSDP2) parameters is not supported yet: params[{k}] of "
                                     f"param group {g}; its orthogonalisation needs the whole matrix")
                if param.ndim < 2 + batch_dims:
                    raise ValueError(f"Muon steps matrices: params[{k}] of param group {g} has shape {tuple(param.shape)}, "
                                     f"which with batch_dims={batch_dims} holds no matrix (give biases, norms and "
                                     "embeddings to AdamW)")
        except ValueError:
            self.param_groups.pop()
            raise

    def _check_hyperparameters(self, group: dict[str, Any]) -> None:
        _checks.non_negative("lr", group["lr"])
        _checks.non_negative("weight_decay", group["weight_decay"])
        _checks.non_negative("momentum", group["momentum"])
        _checks.flag("nesterov", group["nesterov"])
        coefficients = group["ns_coefficients"]
        if not isinstance(coefficients, (tuple, list)) or len(coefficients) != 3:
            raise ValueError(f"ns_coefficients must be three numbers (a, b, c), got {coefficients!r}")
        for index, value in enumerate(coefficients):
            _checks.as_number(f"ns_coefficients[{index}]", value)
        _checks.non_negative("eps", group["eps"])
        steps = group["ns_steps"]
        if isinstance(steps, bool) or not isinstance(steps, int) or not 0 <= steps < 100:
            raise ValueError(f"ns_steps must be an integer in [0, 100), got {steps!r}")
        if group["adjust_lr_fn"] not in _ADJUSTMENTS:
            raise ValueError(f"adjust_lr_fn must be one of {', '.join(map(repr, _ADJUSTMENTS))}, got "
                             f"{group['adjust_lr_fn']!r}")

    def _scalars(self, group: dict[str, Any]) -> dict[str, Any]:
        return dict(lr=_checks.as_number("lr", group["lr"]), weight_decay=float(group["weight_decay"]))

    def _supplied(self, group: dict[str, Any], states: list[dict[str, Any]], params: list[torch.Tensor]) -> dict[str, Any]:
        lr = _checks.as_number("lr", group["lr"])
        batch_dims = group.get("batch_dims", 0)
        return dict(adjusted_lr=np.array([adjusted_lr(lr, group["adjust_lr_fn"], p.shape, batch_dims) for p in params]))

    def _transform_grads(self, group, params, grads, states) -> list[torch.Tensor]:
        momentum, nesterov, batch_dims = float(group["momentum"]), group["nesterov"], group.get("batch_dims", 0)
        coefficients = tuple(float(c) for c in group["ns_coefficients"])
        out = []
        for param, grad, state in zip(params, grads, states):
            buffer = state.get("momentum_buffer")
            if buffer is None:
                buffer = state["momentum_buffer"] = torch.zeros_like(grad, memory_format=torch.preserve_format)
            buffer.lerp_(grad, 1 - momentum)
            update = grad.lerp(buffer, momentum) if nesterov else buffer
            matrices, rows, columns = matrix_shape(update.shape, batch_dims)
            # one matrix takes torch's 2-D path (a convolution's weight then steps exactly as torch's Muon would step
            # its flattened matrix); a stack, the batched one
            shaped = update.reshape(rows, columns) if matrices == 1 else update.reshape(matrices, rows, columns)
            ortho = orthogonalize(shaped, coefficients, int(group["ns_steps"]), float(group["eps"]))
            out.append(ortho.reshape(update.shape).to(param.dtype))
        return out
