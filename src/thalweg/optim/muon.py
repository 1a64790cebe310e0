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

Under FSDP2 (parameters sharded by rows, dim 0) a matrix's rows are split between processes, and orthogonalising
each shard on its own would be another update altogether: each such matrix is orthogonalised once, whole, by one
process of the shard group (the matrices dealt out in turn), which gathers its rows and scatters the result's rows
back — the single process's update, with the work spread. The momentum is elementwise (local) and a DTensor.

State (torch's name): ``momentum_buffer``. No ``step`` (as torch's). Checkpoints cross-load with
``torch.optim.Muon``.
"""

from __future__ import annotations

import fnmatch
import math
from collections import defaultdict
from typing import Any, Iterable

import numpy as np
import torch
from torch import nn

from .. import _checks, distributed
from .._base import Optimizer, clip_grads_, global_grad_norm, report_dtype
from .._params import no_decay_parameter_names
from ..engine import PerTensor, rule
from .adam import AdamW

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


def _as_matrices(update: torch.Tensor, batch_dims: int) -> torch.Tensor:
    """One matrix takes torch's 2-D path (a convolution's weight then steps exactly as torch's Muon would step its
    flattened matrix); a stack, the batched one."""
    matrices, rows, columns = matrix_shape(update.shape, batch_dims)
    return update.reshape(rows, columns) if matrices == 1 else update.reshape(matrices, rows, columns)


def _orthogonalize_split(split: list[tuple[int, torch.Tensor, torch.Tensor]], coefficients, steps: int, eps: float):
    """Orthogonalise matrices whose rows are split between processes (FSDP2's Shard(0); ``split``: (position, whole
    DTensor parameter, this process's rows of the update), in the same order on every process). Matrix j is done by
    process j mod N of the shard group: every matrix's rows are gathered by its owner first, then each owner
    orthogonalises its whole matrices as one process would (all owners at once), then each process is scattered its
    rows of every result. Yields (position, this process's rows of the result)."""
    gathered = []
    for j, (position, whole, update) in enumerate(split):
        group, owner = distributed.row_owner(whole, j)
        local_rows = update.reshape(update.shape[0], math.prod(whole.shape[1:]))
        gathered.append((group, owner, local_rows, distributed.gather_rows(local_rows, whole.shape[0], group, owner)))
    results = [None if matrix is None else orthogonalize(matrix, coefficients, steps, eps).to(local_rows.dtype)
               for group, owner, local_rows, matrix in gathered]
    for (position, whole, update), (group, owner, local_rows, _), ortho in zip(split, gathered, results):
        yield position, distributed.scatter_rows(ortho, local_rows, whole.shape[0], group, owner).reshape(update.shape)


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
    # what thalweg.create("muon", model, ...) builds from a whole model: MuonWithAdamW.for_model (set below it)
    for_module: Any
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

    def _check_parameters(self, group: dict[str, Any], params: list[torch.Tensor], g: int) -> None:
        batch_dims = group["batch_dims"]
        if isinstance(batch_dims, bool) or not isinstance(batch_dims, int) or batch_dims < 0:
            raise ValueError(f"batch_dims must be an integer >= 0, got {batch_dims!r}")
        for k, param in enumerate(params):
            distributed.refuse_unless_split_by_rows("Muon", param, k, g)
            if param.ndim < 2 + batch_dims:
                raise ValueError(f"Muon steps matrices: params[{k}] of param group {g} has shape {tuple(param.shape)}, "
                                 f"which with batch_dims={batch_dims} holds no matrix (give biases, norms and "
                                 "embeddings to AdamW)")

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
        wholes = self._sharded_by_state(group)  # (a shard's lr is scaled by its whole matrix's shape)
        shapes = [wholes.get(id(state), param).shape for param, state in zip(params, states)]
        return dict(adjusted_lr=np.array([adjusted_lr(lr, group["adjust_lr_fn"], shape, batch_dims) for shape in shapes]))

    def _transform_grads(self, group, params, grads, states) -> list[torch.Tensor]:
        """Momentum, then the orthogonalisation of each matrix. Under FSDP2 (local shards of DTensors sharded by rows)
        a matrix whose rows are split is orthogonalised once, whole, by one process — the matrices of the group dealt
        out in turn — which gathers its rows from every process and scatters the result's rows back; a stack
        (``batch_dims`` > 0, split by matrix) is orthogonalised where it lies."""
        momentum, nesterov, batch_dims = float(group["momentum"]), group["nesterov"], group.get("batch_dims", 0)
        coefficients = tuple(float(c) for c in group["ns_coefficients"])
        steps, eps = int(group["ns_steps"]), float(group["eps"])
        wholes = self._sharded_by_state(group)
        out, split = [], []
        for param, grad, state in zip(params, grads, states):
            whole = wholes.get(id(state))
            if state.get("momentum_buffer") is None:
                buffer = torch.zeros_like(grad, memory_format=torch.preserve_format)
                state["momentum_buffer"] = buffer if whole is None else distributed.shard_like(whole, buffer)
            buffer = distributed.local(state["momentum_buffer"])
            buffer.lerp_(grad, 1 - momentum)
            update = grad.lerp(buffer, momentum) if nesterov else buffer
            if whole is not None and batch_dims == 0:  # its rows are split between processes
                split.append((len(out), whole, update))
                out.append(None)
                continue
            out.append(orthogonalize(_as_matrices(update, batch_dims), coefficients, steps, eps)
                       .reshape(update.shape).to(param.dtype))
        for position, ortho in _orthogonalize_split(split, coefficients, steps, eps):
            out[position] = ortho.to(params[position].dtype)
        return out


# -- Muon for a whole model: the hidden matrices to Muon, everything else to AdamW ----------------------------------

_NORMS = (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm)
_CONVOLUTIONS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)


def route(model: nn.Module, overrides: dict[str, str] | None = None) -> list[tuple[str, torch.Tensor, bool, str]]:
    """Which of ``model``'s trainable parameters Muon steps and which AdamW does, and why: a list of (name,
    parameter, to Muon, reason), in ``named_parameters()`` order.

    Muon takes the hidden matrices: the weights of linear layers and convolutions inside the network. AdamW takes
    the rest, as every reference setup does: parameters of fewer than two dims (biases, norm gains), embeddings
    (a lookup table's rows are not a linear map of the input), the output layer (the model's last linear layer:
    its rows are per-class scores, which Muon's equal-singular-value step would flatten), depthwise convolutions
    (one filter per channel: no matrix to orthogonalise) and normalisation layers. ``overrides`` maps a
    parameter's name, or a glob pattern of names, to "muon" or "adamw"; a pattern that matches nothing is an error.
    """
    overrides = dict(overrides or {})
    for pattern, where in overrides.items():
        if where not in ("muon", "adamw"):
            raise ValueError(f"overrides[{pattern!r}] must be 'muon' or 'adamw', got {where!r}")
    owner: dict[int, nn.Module] = {}
    last_linear = None
    for module in model.modules():
        for param in module.parameters(recurse=False):
            owner.setdefault(id(param), module)
        if isinstance(module, nn.Linear):
            last_linear = module
    routes, used = [], set()
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        module = owner[id(param)]
        matched = [pattern for pattern in overrides if fnmatch.fnmatchcase(name, pattern)]
        used.update(matched)
        if matched:
            to_muon, reason = overrides[matched[0]] == "muon", f"override {matched[0]!r}"
            if to_muon and param.ndim < 2:
                raise ValueError(f"overrides[{matched[0]!r}] sends {name} to Muon, but its shape {tuple(param.shape)} "
                                 "holds no matrix")
        elif param.ndim < 2:
            to_muon, reason = False, f"{param.ndim}-D: a bias or a gain"
        elif isinstance(module, (nn.Embedding, nn.EmbeddingBag)):
            to_muon, reason = False, "embedding"
        elif isinstance(module, _NORMS):
            to_muon, reason = False, "normalisation layer"
        elif module is last_linear and param is module.weight:
            to_muon, reason = False, "output layer (the model's last linear layer)"
        elif isinstance(module, _CONVOLUTIONS) and module.groups > 1 and module.groups == module.in_channels:
            to_muon, reason = False, "depthwise convolution"
        elif isinstance(module, _CONVOLUTIONS):
            to_muon, reason = True, "convolution (stepped as out x in*kernel)"
        else:
            to_muon, reason = True, "hidden matrix"
        routes.append((name, param, to_muon, reason))
    unused = sorted(set(overrides) - used)
    if unused:
        raise ValueError(f"overrides name no parameter of the model: {', '.join(map(repr, unused))}")
    return routes


class MuonWithAdamW(torch.optim.Optimizer):
    """One optimizer for a whole model: :class:`Muon` steps the hidden matrices, :class:`AdamW` everything else.

    Built by ``thalweg.create("muon", model, ...)``, which routes the parameters (:func:`route`; ``print(optimizer)``
    and :meth:`routing` show where each went and why), or from param groups that each say ``use_muon`` (True or
    False), as Keller Jordan's ``MuonWithAuxAdam`` takes them. It is one ``torch.optim.Optimizer``: schedulers,
    ``GradScaler``, step hooks, ``state_dict`` (torch's per-parameter layout, each group keeping its ``use_muon``)
    and ``zero_grad`` see one object, whose ``param_groups`` are the two optimizers' own groups, in the given order.

    Args:
        params: param groups (dicts), each with ``use_muon``; other keys are Muon's or AdamW's hyper-parameters.
        muon: Muon's defaults (lr, weight_decay, momentum, nesterov, ns_coefficients, eps, ns_steps, adjust_lr_fn,
            batch_dims).
        adamw: AdamW's defaults (lr, betas, eps, weight_decay, amsgrad).
        backend: as for every thalweg optimizer, for both.
        max_grad_norm, skip_nonfinite: the norm of *all* gradients together, Muon's and AdamW's (each optimizer
            alone would see half of them).
        routes: what :func:`route` decided (for :meth:`routing`); None when given groups.
    """

    def __init__(self, params: Iterable[dict[str, Any]], muon: dict[str, Any] | None = None,
                 adamw: dict[str, Any] | None = None, *, backend: str = "auto", max_grad_norm: float | None = None,
                 skip_nonfinite: bool = False, routes: list[tuple[str, torch.Tensor, bool, str]] | None = None) -> None:
        _checks.optional_positive("max_grad_norm", max_grad_norm)
        _checks.flag("skip_nonfinite", skip_nonfinite)
        for what, given in (("muon", muon), ("adamw", adamw)):
            if given is not None and not isinstance(given, dict):
                raise TypeError(f"{what} must be a dict of hyper-parameters, got {type(given).__name__}")
        self._settings = {True: dict(muon or {}), False: dict(adamw or {})}
        self._backend = backend
        self._parts: dict[bool, Optimizer] = {}  # the Muon and the AdamW, made with their first group
        self.max_grad_norm = None if max_grad_norm is None else float(max_grad_norm)
        self.skip_nonfinite = skip_nonfinite
        self.skipped_steps = 0
        self.last_grad_norm: torch.Tensor | None = None  # the norm max_grad_norm clipped by (as every thalweg optimizer)
        self._routes = routes
        groups = list(params)
        if not all(isinstance(group, dict) for group in groups):
            raise TypeError("MuonWithAdamW takes param groups (dicts with 'params' and 'use_muon'); "
                            "thalweg.create('muon', model) routes a model's parameters for you")
        super().__init__(groups, {})

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """A group for Muon (``use_muon=True``) or for AdamW (``use_muon=False``), checked by that optimizer."""
        group = dict(param_group)
        use_muon = group.pop("use_muon", None)
        if not isinstance(use_muon, bool):
            raise ValueError(f"param group {len(self.param_groups)} needs 'use_muon': True (Muon) or False (AdamW), got "
                             f"{use_muon!r}")
        part = self._parts.get(use_muon)
        if part is None:
            part = self._parts[use_muon] = (Muon if use_muon else AdamW)([group], backend=self._backend,
                                                                          **self._settings[use_muon])
        else:
            part.add_param_group(group)
        ours = {id(p) for other in self.param_groups for p in other["params"]}
        added = part.param_groups[-1]
        if any(id(p) in ours for p in added["params"]):
            part.param_groups.pop()
            raise ValueError(f"param group {len(self.param_groups)} repeats a parameter of another group")
        added["use_muon"] = use_muon
        part.state = self.state  # one state for the whole model, each parameter's entry kept by its optimizer
        self.param_groups.append(added)

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        """One step of both: every group checked first (a bad hyper-parameter changes nothing), then the norm of all
        gradients (``max_grad_norm``, ``skip_nonfinite``), then Muon's step and AdamW's."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for part in self._parts.values():
            for group in part.param_groups:
                part._check_hyperparameters(group)
        if self.max_grad_norm is not None or self.skip_nonfinite:
            # (each group's DTensor gradients counted whole: their local squares summed across the shards)
            parts = [(distributed.group_sharding(index, group["params"]),
                      [p.grad for p in group["params"] if p.grad is not None])
                     for index, group in enumerate(self.param_groups)]
            norm = distributed.total_grad_norm(global_grad_norm, parts)
            grads = [distributed.local(g) for _, group_grads in parts for g in group_grads]
            if self.skip_nonfinite and not bool(torch.isfinite(norm)):
                if self.max_grad_norm is not None:
                    self.last_grad_norm = norm.to(report_dtype(grads))
                self.skipped_steps += 1
                return loss
            if self.max_grad_norm is not None:
                self.last_grad_norm = norm.to(report_dtype(grads))
                clip_grads_(grads, norm, self.max_grad_norm)
        for part in self._parts.values():
            part.step()
        return loss

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """torch's ``load_state_dict``: each group's part goes to the optimizer of its ``use_muon``, checked by it
        first; a checkpoint that does not fit changes nothing."""
        for hook in self._optimizer_load_state_dict_pre_hooks.values():
            state_dict = hook(self, state_dict) or state_dict
        saved = state_dict["param_groups"]
        if len(saved) != len(self.param_groups):
            raise ValueError(f"the checkpoint has {len(saved)} param groups, this optimizer {len(self.param_groups)}")
        for index, (theirs, ours) in enumerate(zip(saved, self.param_groups)):
            if theirs.get("use_muon") != ours["use_muon"]:
                raise ValueError(f"param group {index} of the checkpoint is for "
                                 f"{'Muon' if theirs.get('use_muon') else 'AdamW'}, this optimizer's for "
                                 f"{'Muon' if ours['use_muon'] else 'AdamW'}")
        parts = {}
        for use_muon, part in self._parts.items():
            groups, state, numbering = [], {}, 0
            for theirs in saved:
                if theirs["use_muon"] != use_muon:
                    continue
                indices = list(range(numbering, numbering + len(theirs["params"])))
                for new, old in zip(indices, theirs["params"]):
                    if old in state_dict["state"]:
                        state[new] = state_dict["state"][old]
                groups.append({**{k: v for k, v in theirs.items() if k != "use_muon"}, "params": indices})
                numbering += len(indices)
            parts[use_muon] = {"state": state, "param_groups": groups}
            part._check_checkpoint(parts[use_muon])
        for use_muon, part in self._parts.items():
            part.load_state_dict(parts[use_muon])
        self.state = defaultdict(dict)
        taken = {use_muon: iter(part.param_groups) for use_muon, part in self._parts.items()}
        self.param_groups = []
        for theirs in saved:
            group = next(taken[theirs["use_muon"]])
            group["use_muon"] = theirs["use_muon"]
            self.param_groups.append(group)
        for part in self._parts.values():
            self.state.update(part.state)
            part.state = self.state
        for hook in self._optimizer_load_state_dict_post_hooks.values():
            hook(self)

    def routing(self) -> str:
        """Where each parameter went and why, one line each (given groups: by group)."""
        if self._routes is None:
            return "\n".join(f"group {i}: {len(g['params'])} parameters -> {'Muon' if g['use_muon'] else 'AdamW'}"
                             for i, g in enumerate(self.param_groups))
        width = max(len(name) for name, *_ in self._routes)
        return "\n".join(f"{name:<{width}}  {str(tuple(p.shape)):<16} -> {'Muon ' if to_muon else 'AdamW'}  ({reason})"
                         for name, p, to_muon, reason in self._routes)

    def __repr__(self) -> str:
        return f"{super().__repr__()}\nRouting:\n{self.routing()}"

    @classmethod
    def for_model(cls, model: nn.Module, overrides: dict[str, str] | None = None, *, lr: float = 1e-3,
                  weight_decay: float = 0.1, momentum: float = 0.95, nesterov: bool = True,
                  ns_coefficients: tuple[float, float, float] = (3.4445, -4.775, 2.0315), eps: float = 1e-7,
                  ns_steps: int = 5, adjust_lr_fn: str | None = None, adamw_lr: float = 3e-4,
                  adamw_betas: tuple[float, float] = (0.9, 0.999), adamw_eps: float = 1e-8,
                  adamw_weight_decay: float = 0.01, backend: str = "auto", max_grad_norm: float | None = None,
                  skip_nonfinite: bool = False) -> MuonWithAdamW:
        """The optimizer of :func:`route`'s split of ``model``: Muon's hyper-parameters by their own names, AdamW's
        prefixed ``adamw_``. AdamW's biases, gains and embeddings get no weight decay (as ``thalweg.create`` does for
        every optimizer); its other weights (the output layer) ``adamw_weight_decay``."""
        routes = route(model, overrides)
        matrices = [p for _, p, to_muon, _ in routes if to_muon]
        skipped = no_decay_parameter_names(model)
        decayed = [p for name, p, to_muon, _ in routes if not to_muon and name not in skipped]
        quiet = [p for name, p, to_muon, _ in routes if not to_muon and name in skipped]
        groups = [group for group in ({"params": matrices, "use_muon": True},
                                      {"params": decayed, "use_muon": False},
                                      {"params": quiet, "use_muon": False, "weight_decay": 0.0}) if group["params"]]
        muon = dict(lr=lr, weight_decay=weight_decay, momentum=momentum, nesterov=nesterov,
                    ns_coefficients=ns_coefficients, eps=eps, ns_steps=ns_steps, adjust_lr_fn=adjust_lr_fn)
        adamw = dict(lr=adamw_lr, betas=adamw_betas, eps=adamw_eps, weight_decay=adamw_weight_decay)
        return cls(groups, muon, adamw, backend=backend, max_grad_norm=max_grad_norm, skip_nonfinite=skip_nonfinite,
                   routes=routes)


Muon.for_module = staticmethod(MuonWithAdamW.for_model)
