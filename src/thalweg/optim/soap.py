r"""SOAP: Adam run in the eigenbasis of Shampoo's preconditioner (Vyas et al., 2024), as the authors' soap.py.

Shampoo preconditions a matrix's gradient :math:`G` (m × n) with two Kronecker factors, the running averages
:math:`L = \operatorname{avg}(G G^\top)` (m × m) and :math:`R = \operatorname{avg}(G^\top G)` (n × n). SOAP keeps
their eigenbases :math:`Q_L, Q_R` and runs plain Adam *in that basis*: the gradient is rotated in, Adam's two
moments are kept there, and the normalised step is rotated back. The eigenbases are refreshed only every
``precondition_frequency`` steps (one power iteration and a QR), which is what makes it affordable; between
refreshes it costs Adam plus four matrix products per matrix. At Adam step :math:`t` (:math:`\beta_s` is
``shampoo_beta``, or :math:`\beta_2` when that is negative):

.. math::

    G' &= Q_L^\top G\, Q_R, \qquad
        m_t = \beta_1 m_{t-1} + (1-\beta_1)\, G', \qquad v_t = \beta_2 v_{t-1} + (1-\beta_2)\, G'^2 \\
    W_t &= \bigl(W_{t-1} - \eta_t\, Q_L \tfrac{m_t}{\sqrt{v_t} + \epsilon} Q_R^\top\bigr)\,(1 - \gamma\lambda),
        \qquad \eta_t = \gamma \tfrac{\sqrt{1-\beta_2^t}}{1-\beta_1^t}
        \ (\gamma \text{ without } \texttt{correct\_bias}) \\
    L &\leftarrow \beta_s L + (1-\beta_s)\, G G^\top, \qquad R \leftarrow \beta_s R + (1-\beta_s)\, G^\top G
        \quad \text{(after the update: the step never uses its own gradient's statistics)}

and every ``precondition_frequency`` Adam steps, for each factor :math:`F` with basis :math:`Q`: the columns are
ordered by the estimated eigenvalues :math:`\operatorname{diag}(Q^\top F Q)`, descending (:math:`v` permuted with
them), and :math:`Q \leftarrow \operatorname{qr}(F Q)`; the first moment is rotated into the new basis. A tensor of
any order gets one factor per dimension (the rotation is the product over dimensions), a dimension longer than
``max_precond_dim`` none (it stays in the original basis: an embedding's vocabulary), and a 1-d tensor one only
with ``precondition_1d``. ``merge_dims`` first merges neighbouring dimensions, from the left, while their product
stays within ``max_precond_dim`` (a convolution's ``(16, 8, 3, 3)`` with a limit of 100 is preconditioned as
``16 × 72``). ``normalize_grads`` divides the rotated-back step by its RMS.

The authors' code, followed here: the first step of each parameter only initialises the factors
(:math:`L, R` from that gradient and :math:`Q` from ``eigh``) and leaves the parameter alone, so Adam's bias
corrections count from the second; :math:`\epsilon` is added to :math:`\sqrt{v_t}` before the bias correction
(which scales the step instead); the weight decay multiplies the already updated weights by :math:`1-\gamma\lambda`.
Not followed: soap.py rotates the first moment back and forth on every step (an identity between refreshes):
here only at a refresh; ``shampoo_beta`` and ``precondition_frequency`` are read from the param group at each
step (soap.py fixes them per parameter at its first step); the factors of a float64 parameter are computed in
float64 (soap.py: float32); an empty parameter gets no factors. ``data_format="channels_last"`` is not offered.

How it runs: the rotations and the factors are a stage of torch ops per tensor (:meth:`SOAP._transform_grads`);
Adam's moments in the eigenbasis are the rule :func:`soap_moments`, which the engine runs over every tensor of
the group at once (fused: one pass); the final update is the rule :func:`soap`, run like every optimizer's.
Factors and moments of bfloat16/float16 parameters are float32 (the eigen-solvers need it).

Under FSDP2 (parameters split by rows, dim 0) the factors need whole gradients: each split parameter's rotations,
factors and refreshes are done by one process of the shard group (the parameters dealt out in turn), which gathers
the rows it needs and scatters each process its rows of the results; the moments step where they lie. The
operations are the single process's, on the same values: the results are its, bit for bit.

State: ``step`` (the steps taken, the initialising one included), ``exp_avg`` (in the eigenbasis) and
``exp_avg_sq``, and per preconditioned dimension ``d`` (of the merged shape) ``GG_d`` (its factor) and ``Q_d``
(its eigenbasis, kept row-major): tensors only, DTensors split by rows under FSDP2, so
``torch.distributed.checkpoint`` saves, loads and reshards it.
"""

from __future__ import annotations

import math
from typing import Any, Iterable

import numpy as np
import torch

from .. import _checks, distributed, engine
from .._base import Optimizer
from ..engine import PerTensor, rule, sqrt

MAX_DIMS = 8  # factors are state entries GG_0 ... GG_7: a (merged) parameter of more dims is refused
_FACTORS = tuple(f"GG_{d}" for d in range(MAX_DIMS))
_BASES = tuple(f"Q_{d}" for d in range(MAX_DIMS))


@rule
def soap_moments(direction, grad, exp_avg, exp_avg_sq, *, beta1, beta2, eps):
    """Adam's moments in the eigenbasis (``grad``: the rotated gradient G') and the step direction m / (√v + ε),
    which the stage rotates back (``direction`` is written, never read)."""
    exp_avg = exp_avg * beta1 + (1 - beta1) * grad
    exp_avg_sq = exp_avg_sq * beta2 + (1 - beta2) * (grad * grad)
    direction = exp_avg / (sqrt(exp_avg_sq) + eps)
    return direction, exp_avg, exp_avg_sq


@rule
def soap(param, grad, *, lr, weight_decay, step_size: PerTensor, stepping: PerTensor):
    """The elementwise end of a SOAP step: ``grad`` is the rotated-back direction (SOAP._transform_grads);
    ``stepping`` is 0 on a parameter's first step, which only initialises its preconditioner."""
    param = param - step_size * grad
    if weight_decay != 0:
        param = param - stepping * lr * weight_decay * param
    return (param,)


def merged_shape(shape: tuple[int, ...], max_precond_dim: int) -> tuple[int, ...]:
    """``shape`` with neighbouring dimensions merged while their product stays within ``max_precond_dim`` (soap.py's
    ``merge_dims``; dims of size 1 disappear into their neighbours)."""
    merged: list[int] = []
    running = 1
    for size in shape:
        if running * size > max_precond_dim:
            if running > 1:
                merged.append(running)
                running = size
            else:
                merged.append(size)
                running = 1
        else:
            running *= size
    if running > 1 or not merged:
        merged.append(running)
    return tuple(merged)


def layout(shape: tuple[int, ...], group: dict[str, Any]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(the shape SOAP works on, the dims of it that have a factor) for a parameter of ``shape`` in ``group``."""
    limit = group["max_precond_dim"]
    if math.prod(shape) == 0:
        return tuple(shape), ()
    if len(shape) == 1:
        return tuple(shape), ((0,) if group["precondition_1d"] and shape[0] <= limit else ())
    work = merged_shape(tuple(shape), limit) if group["merge_dims"] else tuple(shape)
    return work, tuple(d for d, size in enumerate(work) if size <= limit)


def rotate(tensor: torch.Tensor, bases: dict[int, torch.Tensor], back: bool = False) -> torch.Tensor:
    """``tensor`` in the eigenbasis (``back``: from it): dimension ``d`` multiplied by ``bases[d]`` (transposed going
    in), the other dims untouched. For a matrix: Q_Lᵀ G Q_R, and Q_L G' Q_Rᵀ back."""
    for d in range(tensor.dim()):  # each contraction moves its dimension last: after all of them, the order is restored
        basis = bases.get(d)
        if basis is None:
            tensor = tensor.movedim(0, -1)
        else:
            tensor = torch.tensordot(tensor, basis, dims=([0], [1 if back else 0]))
    return tensor


def eigenbasis(factor: torch.Tensor) -> torch.Tensor:
    """The eigenvectors of symmetric ``factor``, by descending eigenvalue (soap.py's first basis: ``eigh`` of the factor
    plus 1e-30·I, in float64 if its own dtype fails to converge)."""
    shifted = factor + 1e-30 * torch.eye(factor.shape[0], dtype=factor.dtype, device=factor.device)
    try:
        vectors = torch.linalg.eigh(shifted)[1]
    except RuntimeError:  # (torch.linalg.LinAlgError: no convergence)
        vectors = torch.linalg.eigh(shifted.double())[1].to(factor.dtype)
    return vectors.flip(1).contiguous()  # (row-major, as every basis is kept: see _refreshed)


def _shampoo_beta(group: dict[str, Any]) -> float:
    beta = float(group["shampoo_beta"])
    return beta if beta >= 0 else float(group["betas"][1])


def _accumulate(factors: dict[int, torch.Tensor], grad: torch.Tensor, beta: float) -> None:
    """Each factor F_d ← β F_d + (1-β) G_(d) G_(d)ᵀ, where G_(d) is ``grad`` with dim d as rows (the rest flattened)."""
    for d, factor in factors.items():
        others = [k for k in range(grad.dim()) if k != d]
        factor.lerp_(torch.tensordot(grad, grad, dims=(others, others)), 1 - beta)


class SOAP(Optimizer):
    """SOAP (Vyas et al., 2024): Adam in the eigenbasis of Shampoo's Kronecker factors, refreshed every
    ``precondition_frequency`` steps; the authors' soap.py semantics and defaults.

    Args:
        params: parameters, ``named_parameters()`` or param-group dicts.
        lr: learning rate :math:`\\gamma` (default 3e-3).
        betas: Adam's :math:`(\\beta_1, \\beta_2)` (default (0.95, 0.95)).
        shampoo_beta: decay of the factors' running averages; negative: ``betas[1]`` (default -1).
        eps: added to :math:`\\sqrt{v}` (default 1e-8).
        weight_decay: decoupled weight decay :math:`\\lambda`, applied after the update (default 0.01).
        precondition_frequency: Adam steps between refreshes of the eigenbases (default 10).
        max_precond_dim: a dimension longer than this gets no factor (default 10000).
        merge_dims: merge neighbouring dimensions up to ``max_precond_dim`` first (default False).
        precondition_1d: give 1-d parameters a factor too (default False).
        normalize_grads: divide each tensor's rotated-back step by its RMS (default False).
        correct_bias: Adam's bias corrections (default True).
        maximize: ascend the objective instead of descending it (default False).
        backend, foreach, fused, max_grad_norm, skip_nonfinite: as for every thalweg optimizer (the backend runs the
            moments in the eigenbasis and the final update).

    Example::

        optimizer = thalweg.SOAP(model.parameters(), lr=3e-3, weight_decay=0.01)
    """

    name = "soap"  # thalweg.create's name
    family = "matrix"  # the arena's family (report panels, toggles)
    rule = soap
    transforms_grads = True
    own_state_keys = frozenset({"exp_avg", "exp_avg_sq", *_FACTORS, *_BASES})
    unshaped_state_keys = frozenset({*_FACTORS, *_BASES})

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 3e-3,
        betas: tuple[float, float] = (0.95, 0.95),
        shampoo_beta: float = -1,
        eps: float = 1e-8,
        weight_decay: float = 0.01,
        precondition_frequency: int = 10,
        max_precond_dim: int = 10000,
        merge_dims: bool = False,
        precondition_1d: bool = False,
        normalize_grads: bool = False,
        correct_bias: bool = True,
        *,
        maximize: bool = False,
        backend: str = "auto",
        foreach: bool | None = None,
        fused: bool | None = None,
        max_grad_norm: float | None = None,
        skip_nonfinite: bool = False,
    ) -> None:
        defaults = dict(lr=lr, betas=betas, shampoo_beta=shampoo_beta, eps=eps, weight_decay=weight_decay,
                        precondition_frequency=precondition_frequency, max_precond_dim=max_precond_dim,
                        merge_dims=merge_dims, precondition_1d=precondition_1d, normalize_grads=normalize_grads,
                        correct_bias=correct_bias, maximize=maximize)
        super().__init__(params, defaults, backend=backend, foreach=foreach, fused=fused, max_grad_norm=max_grad_norm,
                         skip_nonfinite=skip_nonfinite, differentiable=None)

    def _check_parameters(self, group: dict[str, Any], params: list[torch.Tensor], g: int) -> None:
        for k, param in enumerate(params):
            distributed.refuse_unless_split_by_rows("SOAP", param, k, g)
            if param.is_complex():
                raise ValueError(f"SOAP steps real parameters: params[{k}] of param group {g} is {param.dtype}")
            work, _ = layout(tuple(param.shape), group)
            if len(work) > MAX_DIMS:
                raise ValueError(f"SOAP preconditions up to {MAX_DIMS} dims: params[{k}] of param group {g} has "
                                 f"shape {tuple(param.shape)} (merge_dims=True merges small ones)")

    def _check_hyperparameters(self, group: dict[str, Any]) -> None:
        _checks.non_negative("lr", group["lr"])
        _checks.betas(group["betas"])
        shampoo_beta = _checks.as_number("shampoo_beta", group["shampoo_beta"])
        if not shampoo_beta < 1:
            raise ValueError(f"shampoo_beta must be in [0, 1), or negative for betas[1], got {shampoo_beta}")
        _checks.non_negative("eps", group["eps"])
        _checks.non_negative("weight_decay", group["weight_decay"])
        for name in ("precondition_frequency", "max_precond_dim"):
            value = group[name]
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        for name in ("merge_dims", "precondition_1d", "normalize_grads", "correct_bias", "maximize"):
            _checks.flag(name, group[name])

    def _scalars(self, group: dict[str, Any]) -> dict[str, Any]:
        return dict(lr=_checks.as_number("lr", group["lr"]), weight_decay=float(group["weight_decay"]))

    def _supplied(self, group: dict[str, Any], states: list[dict[str, Any]], params: list[torch.Tensor]) -> dict[str, Any]:
        # the Adam step this is: the steps taken before it, the first having only initialised the preconditioner
        t = np.array([float(state["step"]) for state in states])
        stepping = (t > 0).astype(np.float64)
        lr = _checks.as_number("lr", group["lr"])
        if group["correct_bias"]:
            beta1, beta2 = map(float, group["betas"])
            with np.errstate(divide="ignore", invalid="ignore"):
                size = np.where(t > 0, lr * np.sqrt(1 - beta2 ** t) / (1 - beta1 ** t), 0.0)
        else:
            size = lr * stepping
        return dict(step_size=size, stepping=stepping)

    def _check_state(self, where, params, states) -> None:
        wholes = self._sharded_by_state(where.group)  # (``params`` are local shards under FSDP2; layouts are the whole's)
        for k, (param, state) in enumerate(zip(params, states)):
            if "exp_avg" not in state:
                continue
            work, dims = layout(tuple(wholes.get(id(state), param).shape), where.group)
            for key in ("exp_avg", "exp_avg_sq"):
                value = state.get(key)
                if not (isinstance(value, torch.Tensor) and distributed.local(value).shape == param.shape):
                    raise RuntimeError(f"{where(k)}: state[{key!r}] is {_describe(value)}, not a tensor of the "
                                       f"parameter's shape {tuple(param.shape)}")
            for d in range(MAX_DIMS):
                for key in (f"GG_{d}", f"Q_{d}"):
                    value = state.get(key)  # (a DTensor's shape is the whole factor's)
                    if d in dims:
                        if not (isinstance(value, torch.Tensor) and value.shape == (work[d], work[d])):
                            raise RuntimeError(f"{where(k)}: state[{key!r}] is {_describe(value)}, not the "
                                               f"{(work[d], work[d])} factor a SOAP state holds for dim {d} of "
                                               f"{work} (were max_precond_dim, merge_dims or precondition_1d changed?)")
                    elif value is not None:
                        raise RuntimeError(f"{where(k)}: state[{key!r}] exists but dim {d} of {work} has no factor "
                                           "(were max_precond_dim, merge_dims or precondition_1d changed?)")

    def _transform_grads(self, group, params, grads, states) -> list[torch.Tensor]:
        """Rotate each gradient into its eigenbasis, run Adam's moments there (the engine, all tensors at once),
        rotate the directions back; then update the factors (and, every ``precondition_frequency`` steps, the bases).
        A parameter's first step only initialises its factors: its direction is zero (and its step size too).

        Under FSDP2 (``params`` are local shards of DTensors split by rows) a parameter's whole-tensor work — the
        rotations, the factors, the refreshes — is done by one process of the shard group (the parameters dealt out
        in turn), which gathers what it needs and scatters each process its rows: the rotated gradient, the rotated-
        back direction, the factors and bases (DTensors split by rows, as the parameter), and at a refresh both
        moments. The moments themselves are elementwise, stepped on each process's rows: all of it the operations
        one process runs on the whole tensor, so the results are one process's, bit for bit. Each stage gathers for
        every parameter first, then computes, then scatters, so that the owners compute at the same time rather than
        waiting on each other's collectives."""
        beta1, beta2 = map(float, group["betas"])
        shampoo_beta = _shampoo_beta(group)
        wholes = self._sharded_by_state(group)
        entries, split = [], 0
        for k, (param, grad, state) in enumerate(zip(params, grads, states)):
            whole = wholes.get(id(state))
            entries.append(_Entry(k, param, whole, group, state, split))
            split += whole is not None
            g = grad.to(entries[-1].dtype)
            entries[-1].local_grad = -g if group["maximize"] else g
        starting = [entry for entry in entries if "exp_avg" not in entry.state]
        stepping = [entry for entry in entries if "exp_avg" in entry.state]

        # gathers: each whole gradient (in the work shape) and the bases where the step needs them
        for entry in entries:
            entry.grad = entry.gather(entry.local_grad)
        for entry in stepping:
            entry.bases = {d: entry.gather(distributed.local(entry.state[f"Q_{d}"]), d) for d in entry.dims}
        # computes (where the whole is): the first factors and bases; the rotated gradients
        for entry in starting:
            if entry.grad is not None:
                entry.factors = {d: entry.grad.new_zeros((entry.work[d],) * 2) for d in entry.dims}
                _accumulate(entry.factors, entry.grad, shampoo_beta)
                entry.bases = {d: eigenbasis(factor) for d, factor in entry.factors.items()}
        rotated = [None if entry.grad is None else rotate(entry.grad, entry.bases) for entry in stepping]
        # scatters: every process its rows
        for entry in starting:
            state = entry.state
            for key in ("exp_avg", "exp_avg_sq"):
                zeros = torch.zeros(entry.local_grad.shape, dtype=entry.dtype, device=entry.local_grad.device)
                state[key] = zeros if entry.whole is None else distributed.shard_like(entry.whole, zeros)
            for d in entry.dims:
                state[f"GG_{d}"] = entry.place(entry.factors.get(d), entry.local_grad, d)
                state[f"Q_{d}"] = entry.place(entry.bases.get(d), entry.local_grad, d)
        rotated = [entry.scatter(whole, entry.local_grad) for entry, whole in zip(stepping, rotated)]
        out: list[torch.Tensor] = [torch.zeros_like(grads[entry.index]) for entry in entries]
        if not stepping:
            return out

        directions = [torch.empty_like(r) for r in rotated]
        moments = [[distributed.local(entry.state[key]) for entry in stepping] for key in ("exp_avg", "exp_avg_sq")]
        scalars = dict(beta1=beta1, beta2=beta2, eps=float(group["eps"]))
        backend = self.backend_for(directions[0].device, [params[entry.index] for entry in stepping], group)
        engine.run(soap_moments.program(scalars), backend, directions, rotated, moments, None, None, scalars)

        # after the update (soap.py's order): the factors take this gradient; every precondition_frequency Adam steps
        # (the step count before this one: the first only initialised) the bases are refreshed
        refreshing = [entry for entry in stepping
                      if entry.dims and int(float(entry.state["step"])) % group["precondition_frequency"] == 0]
        for entry, direction in zip(stepping, directions):  # gathers
            entry.direction = entry.gather(direction)
            entry.factors = {d: entry.gather(distributed.local(entry.state[f"GG_{d}"]), d) for d in entry.dims}
        for entry in refreshing:
            entry.moments = [entry.gather(distributed.local(entry.state[key])) for key in ("exp_avg", "exp_avg_sq")]
        updates = []
        for entry in stepping:  # computes
            update = None
            if entry.direction is not None:
                update = rotate(entry.direction, entry.bases, back=True)
                if group["normalize_grads"]:
                    update = update / (1e-30 + update.square().mean().sqrt())
                _accumulate(entry.factors, entry.grad, shampoo_beta)
            updates.append(update)
        for entry in refreshing:
            if entry.grad is not None:
                entry.moments[0], entry.moments[1], entry.bases = _refreshed(entry.factors, entry.bases, *entry.moments)
        for entry, update, direction in zip(stepping, updates, directions):  # scatters
            out[entry.index] = entry.scatter(update, direction).to(grads[entry.index].dtype)
            for d in entry.dims:
                rows = entry.scatter(entry.factors[d], _rows_of(direction, entry, d), d)
                distributed.local(entry.state[f"GG_{d}"]).copy_(rows)
        for entry in refreshing:
            direction = distributed.local(entry.state["exp_avg"])
            for key, moment in zip(("exp_avg", "exp_avg_sq"), entry.moments):
                distributed.local(entry.state[key]).copy_(entry.scatter(moment, direction))
            for d in entry.dims:
                rows = entry.scatter(entry.bases[d], _rows_of(direction, entry, d), d)
                distributed.local(entry.state[f"Q_{d}"]).copy_(rows)
        return out


def _rows_of(like: torch.Tensor, entry: "_Entry", d: int) -> torch.Tensor:
    """An empty tensor standing for this process's rows of dim ``d``'s factor (its width, dtype and device)."""
    return like.new_empty((0, entry.work[d]))


class _Entry:
    """One parameter's part of a SOAP step: its shapes, and where its whole-tensor work is done. A plain tensor's is
    done here; the rows of a DTensor (FSDP2) are gathered by the process owning it, which does it and scatters the
    rows back (see :meth:`SOAP._transform_grads`)."""

    def __init__(self, index: int, param: torch.Tensor, whole: torch.Tensor | None, group: dict[str, Any],
                 state: dict[str, Any], split_index: int) -> None:
        self.index, self.whole, self.group, self.state = index, whole, group, state
        self.shape = tuple((whole if whole is not None else param).shape)
        self.work, self.dims = layout(self.shape, group)
        self.dtype = torch.float32 if param.dtype in (torch.bfloat16, torch.float16) else param.dtype
        self.split = whole is not None
        self.process_group, self.owner = distributed.row_owner(whole, split_index) if self.split else (None, 0)
        self.local_grad: torch.Tensor = None  # this process's rows of the gradient (after maximize)
        self.grad = self.direction = None  # whole tensors, work shape, where this process computes them
        self.factors: dict[int, torch.Tensor | None] = {}
        self.bases: dict[int, torch.Tensor | None] = {}
        self.moments: list[torch.Tensor | None] = []

    def _rows(self, d: int | None) -> int:
        return self.shape[0] if d is None else self.work[d]

    def gather(self, local: torch.Tensor, d: int | None = None) -> torch.Tensor | None:
        """The whole tensor of this process's ``local`` rows (of the parameter-shaped tensor, or ``d``'s factor when
        given), in the work shape for the former; None on a process that does not own it."""
        if self.split:
            local = distributed.gather_rows(local, self._rows(d), self.process_group, self.owner)
        return local if local is None or d is not None else local.reshape(self.work)

    def scatter(self, whole: torch.Tensor | None, like: torch.Tensor, d: int | None = None) -> torch.Tensor:
        """This process's rows of ``whole`` (given where it was computed: everywhere for a plain tensor, on the owner
        for a split one), shaped as ``like`` (for the parameter-shaped tensors: the parameter's local shape)."""
        if d is None and whole is not None:
            whole = whole.reshape(self.shape)
        if self.split:
            whole = distributed.scatter_rows(whole, like, self._rows(d), self.process_group, self.owner)
        return whole if d is not None else whole.reshape(like.shape)

    def place(self, whole: torch.Tensor | None, like: torch.Tensor, d: int) -> torch.Tensor:
        """A new state entry for dim ``d``'s factor or basis from ``whole`` (n × n): itself for a plain parameter; for a
        split one a DTensor split by rows as the parameter, this process's rows scattered from the owner."""
        if not self.split:
            return whole
        from torch.distributed.tensor import DTensor

        n = self.work[d]
        rows = distributed.scatter_rows(whole, like.new_empty((0, n)), n, self.process_group, self.owner)
        return DTensor.from_local(rows, self.whole.device_mesh, self.whole.placements, run_check=False, shape=(n, n),
                                  stride=(n, 1))


def _refreshed(factors: dict[int, torch.Tensor], bases: dict[int, torch.Tensor], exp_avg: torch.Tensor,
               exp_avg_sq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict[int, torch.Tensor]]:
    """New eigenbases (whole tensors, work shape): per factor one power iteration from the current basis, its columns
    first ordered by the estimated eigenvalues (descending, ``exp_avg_sq`` permuted alike), then orthonormalised by
    QR; the first moment is rotated from the old bases into the new. Returns (exp_avg, exp_avg_sq, bases)."""
    original = rotate(exp_avg, bases, back=True)
    new = {}
    for d, factor in factors.items():
        basis = bases[d]
        product = factor @ basis
        order = torch.argsort((basis * product).sum(0), descending=True)
        exp_avg_sq = exp_avg_sq.index_select(d, order)
        # (LAPACK's Q is column-major: made row-major, the layout the state keeps, so that a product with it rounds
        # the same whether the basis was just computed, read from the state, or gathered from shards)
        new[d] = torch.linalg.qr(product[:, order])[0].contiguous()
    return rotate(original, new), exp_avg_sq, new


def _describe(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"a tensor of shape {tuple(value.shape)}"
    return "missing" if value is None else type(value).__name__
