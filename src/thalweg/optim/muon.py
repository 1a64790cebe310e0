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

Muon takes 2-D parameters only; embeddings, biases, norms and the output layer belong to another
optimizer (AdamW), as in every reference setup. Its update is not elementwise: the momentum and the
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
    """About the nearest semi-orthogonal matrix to ``update`` (2-D): ``steps`` quintic Newton–Schulz
    iterations in bfloat16, on the wide orientation (so that X Xᵀ is the smaller Gram matrix)."""
    a, b, c = coefficients
    tall = update.size(0) > update.size(1)
    x = update.bfloat16()
    if tall:
        x = x.T
    x = x / x.norm().clamp(min=eps)
    for _ in range(steps):
        gram = x @ x.T
        polynomial = torch.addmm(gram, gram, gram, beta=b, alpha=c)  # b·G + c·G²
        x = torch.addmm(x, polynomial, x, beta=a)  # a·X + (b·G + c·G²)·X
    return x.T if tall else x


def adjusted_lr(lr: float, adjust_lr_fn: str | None, shape: torch.Size) -> float:
    rows, columns = shape[:2]
    if adjust_lr_fn == "match_rms_adamw":
        return lr * 0.2 * math.sqrt(max(rows, columns))
    return lr * math.sqrt(max(1, rows / columns))


class Muon(Optimizer):
    """Muon, a drop-in for ``torch.optim.Muon``: orthogonalised momentum for 2-D weight matrices.

    Args:
        params: 2-D parameters (hidden matrices), ``named_parameters()`` or param-group dicts.
        lr: learning rate :math:`\\gamma` (default 1e-3), scaled per matrix by ``adjust_lr_fn``.
        weight_decay: decoupled weight decay :math:`\\lambda` (default 0.1).
        momentum: :math:`\\mu` (default 0.95).
        nesterov: Nesterov momentum (default True).
        ns_coefficients: :math:`(a, b, c)` of the Newton–Schulz quintic (default (3.4445, -4.775, 2.0315)).
        eps: floor of the norm the momentum is divided by (default 1e-7).
        ns_steps: Newton–Schulz iterations, below 100 (default 5).
        adjust_lr_fn: ``None``/``"original"`` (:math:`\\sqrt{\\max(1, A/B)}`) or ``"match_rms_adamw"``
            (:math:`0.2\\sqrt{\\max(A, B)}`).
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
        backend: str = "auto",
        foreach: bool | None = None,
        fused: bool | None = None,
        max_grad_norm: float | None = None,
        skip_nonfinite: bool = False,
    ) -> None:
        defaults = dict(lr=lr, weight_decay=weight_decay, momentum=momentum, nesterov=nesterov,
                        ns_coefficients=ns_coefficients, eps=eps, ns_steps=ns_steps, adjust_lr_fn=adjust_lr_fn)
        super().__init__(params, defaults, backend=backend, foreach=foreach, fused=fused, max_grad_norm=max_grad_norm,
                         skip_nonfinite=skip_nonfinite, differentiable=None)
        for g, group in enumerate(self.param_groups):
            for k, param in enumerate(group["params"]):
                if type(param).__name__ == "DTensor":
                    raise ValueError(f"Muon on sharded (DTensor, FSDP2) parameters is not supported yet: params[{k}] of "
                                     f"param group {g}; its orthogonalisation needs the whole matrix")
                if param.ndim != 2:
                    raise ValueError(f"Muon steps 2-D parameters only: params[{k}] of param group {g} has shape "
                                     f"{tuple(param.shape)} (give biases, norms and embeddings to AdamW)")

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
        return dict(adjusted_lr=np.array([adjusted_lr(lr, group["adjust_lr_fn"], p.shape) for p in params]))

    def _transform_grads(self, group, params, grads, states) -> list[torch.Tensor]:
        momentum, nesterov = float(group["momentum"]), group["nesterov"]
        coefficients = tuple(float(c) for c in group["ns_coefficients"])
        out = []
        for param, grad, state in zip(params, grads, states):
            buffer = state.get("momentum_buffer")
            if buffer is None:
                buffer = state["momentum_buffer"] = torch.zeros_like(grad, memory_format=torch.preserve_format)
            buffer.lerp_(grad, 1 - momentum)
            update = grad.lerp(buffer, momentum) if nesterov else buffer
            out.append(orthogonalize(update, coefficients, int(group["ns_steps"]), float(group["eps"])).to(param.dtype))
        return out
