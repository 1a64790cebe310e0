"""One step of one param group on one device, on any backend: the order of the stages.

1. The step counters are advanced (when the optimizer keeps them), and the program's host values
   computed in float64: per group from the hyper-parameters, per tensor from the step counts.
2. Fused: the tensors are split into kernel buckets (:func:`.host.partition`); the rest, and every
   tensor on the foreach backend, run the program's foreach functions (:mod:`.lists`).
3. A program with norms runs its first pass, which sums the squares of each norm's term per tensor
   (float64); the sums of the whole group are summed across processes at once (``sum_across``: one
   collective per group and step, whatever mix of buckets the group holds), the per-tensor values that
   depend on them are computed, then the last pass runs.
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Any, Callable

import numpy as np
import torch

from . import codec, host, lists, reference
from .program import Program
from .rounding import Rounding
from .vocabulary import TensorList

BACKENDS = ("reference", "foreach", "fused")
_NARROW = (torch.bfloat16, torch.float16)


def partition(backend: str, params: list[torch.Tensor], grads: list[torch.Tensor], roles: list[list[torch.Tensor]],
              steps: list[torch.Tensor] | None, *, quantised: bool = False) -> tuple[list, list[int], np.ndarray | None]:
    """Which positions the fused kernels take (in buckets) and which the foreach path does, before anything
    is written: ``(buckets, rest, step addresses)``. Nothing is written; hand the result to :func:`run`.
    With 8-bit state (``quantised``) the rest runs foreach on decoded copies."""
    if backend == "fused" and params:
        if not quantised:
            return host.partition(params, grads, roles, steps)
        return host.codec_partition(params, grads, roles, steps)
    return [], list(range(len(params))), None


def run(program: Program, backend: str, params: list[torch.Tensor], grads: list[torch.Tensor],
        roles: list[list[torch.Tensor]], steps: list[torch.Tensor] | None, first: np.ndarray | None,
        scalars: dict[str, Any], *, sum_across: Callable[[torch.Tensor], None] | None = None,
        widen_to: torch.dtype | None = None, partitioned: tuple | None = None, out_of_place: bool = False,
        quantised: bool = False, rounding: Rounding | None = None) -> None:
    """Step ``params`` (one device) with ``program``.

    ``roles``: the state tensors of ``program.state_roles``, one list per role; ``steps``: the step
    counters to advance (None when the optimizer keeps none); ``first``: per tensor, whether its state was
    created this step; ``scalars``: the rule's flags and hyper-parameters (Python numbers), and its
    :class:`PerTensor` values (float64 numpy arrays, one entry per tensor);
    ``sum_across``: the in-place cross-process sum of per-tensor squared norms (sharded tensors), or None;
    ``widen_to``: the dtype bfloat16/float16 parameters are stepped in (``state_dtype``): the fused kernels
    compute in float32 and round once anyway, the other paths step a copy and round it back once;
    ``partitioned``: what :func:`partition` returned for these tensors (it is taken again when absent);
    ``out_of_place``: run the rule function itself, out of place (reference backend only): autograd can
    record the step (``differentiable=True``), and sparse gradients go through torch's sparse arithmetic;
    ``quantised``: some entries of ``roles`` are 8-bit state (:class:`.codec.Blockwise`): they are decoded to
    float (float32, float64 for float64 parameters), stepped, and encoded again (:func:`.codec.run_through_floats`);
    ``rounding``: how the widened bfloat16 parameters take their new values (``param_update``, see
    :mod:`.rounding`; None: to nearest).
    """
    if not params:
        return
    if quantised and (backend != "fused" or out_of_place):
        def step_floats(floats: list[list[torch.Tensor]]) -> None:
            run(program, backend, params, grads, floats, steps, first, scalars, sum_across=sum_across,
                widen_to=widen_to, out_of_place=out_of_place, rounding=rounding)

        codec.run_through_floats(step_floats, roles, [p.dtype for p in params])
        return
    if quantised:
        # 8-bit state with norms: the last pass steps from the moments' float values, so it computes them again
        # (the first pass only sums); reading back what the first pass encoded would step from their codes
        program = program.recomputing()
    if out_of_place:
        if backend != "reference":
            raise ValueError(f"out-of-place steps run on the reference backend, not {backend!r}")
        reference.run_out_of_place(program, params, grads, roles, steps, None if first is None else first.tolist(),
                                   scalars)
        return
    compute = None
    if widen_to is not None:
        compute = [widen_to if p.dtype in _NARROW else None for p in params]
        if not any(d is not None for d in compute):
            compute = None
    if backend == "reference":
        reference.run(program, params, grads, roles, steps, None if first is None else first.tolist(), scalars,
                      compute_dtypes=compute, sum_across=sum_across, rounding=rounding)
        return
    buckets, rest, step_addresses = partitioned or partition(backend, params, grads, roles, steps, quantised=quantised)
    if rounding is not None and compute is not None:
        buckets = [_rounded(bucket, rounding) for bucket in buckets]
    n = len(params)
    counts = _advance(steps, step_addresses) if steps is not None else None
    if program.uses_step and counts is None:
        raise RuntimeError(f"rule {program.rule.name} reads `step` but the optimizer keeps no step counters")
    group = program.group_values(scalars)
    first_values = first if first is not None else np.zeros(n, dtype=np.bool_)
    early = program.early_values(group, counts, first_values, tuple(scalars[name] for name in program.rule.supplied))
    named = dict(zip(program.early_vars, early))
    columns = [_column(named[name], n) for name in program.columns]
    hp_values = dict(zip(program.group_vars, group))
    hp = [hp_values[name] for name in program.hp]

    device = params[0].device
    launcher = _launcher(device) if buckets else None
    if launcher is not None:
        host.mark_written(params if not rest else [params[i] for b in buckets for i in b.indices.tolist()])
    plans = [launcher.prepare(program, bucket, hp, columns, device) for bucket in buckets] if buckets else []
    lists_ = _lists(program, params, grads, roles, rest, compute) if rest else []
    n_passes = len(program.passes)
    sums = None
    on_cpu = device.type == "cpu"
    for index in range(n_passes):
        if index == n_passes - 1 and program.slots:
            if sum_across is not None:  # on CPU a tensor sharing the numpy array's memory
                sum_across(torch.from_numpy(sums) if on_cpu else sums)
            with np.errstate(divide="ignore", invalid="ignore"):  # a zero norm: where() picks the other side
                late = program.late_values(group, _on(device, early), [sums[:, j] for j in range(sums.shape[1])])
            late_named = dict(zip(program.late_vars, late))
            late_columns = [_per_tensor(late_named[name], n, device) for name in program.late_columns]
            for plan in plans:
                launcher.set_late(plan, late_columns)
        else:
            late_columns = []
        partial = index == 0 and n_passes > 1
        if partial:  # each tensor's sums of squares, one column per norm (numpy on CPU)
            sums = (np.zeros((n, len(program.slots))) if on_cpu
                    else torch.zeros((n, len(program.slots)), dtype=torch.float64, device=device))
        for plan in plans:
            launcher.run(plan, index, sums if partial else None)
        for indices, tensors in lists_:
            pass_columns = [c[indices] for c in columns] + [_take(c, indices) for c in late_columns]
            out = torch.zeros((len(indices), len(program.slots)), dtype=torch.float64, device=device) if partial else None
            lists.functions(program)[index](*tensors, hp, pass_columns, out)
            if partial:
                if on_cpu:
                    sums[indices] = out.numpy()
                else:
                    sums[torch.as_tensor(indices, device=device)] = out
    for indices, tensors in lists_:
        _round_back(params, indices, tensors[0], compute, rounding)
    if quantised and rest:
        _encode_back(roles, rest, lists_)


def _advance(steps: list[torch.Tensor], addresses: np.ndarray | None) -> np.ndarray:
    """Add 1 to every step counter and return the new counts (float64, one per tensor).

    ``addresses``: the counters' addresses when all of them are 0-d CPU tensors of one float dtype (the
    fused path checked it): one compiled loop then advances them all; otherwise one foreach call.
    """
    if addresses is not None:
        from . import cpu

        return cpu.steps_in_place(steps, addresses)
    torch._foreach_add_(steps, 1)
    return torch.stack([s.detach().reshape(()).to("cpu", torch.float64) for s in steps]).numpy()


def _lists(program: Program, params, grads, roles, indices: list[int], compute) -> list[tuple[np.ndarray, list]]:
    """The foreach work: per (dtype, state dtype, device) sub-bucket, its positions and TensorLists. 8-bit
    state (:class:`.codec.Blockwise`) is decoded into float copies here, and encoded back by :func:`_encode_back`."""
    groups: dict[tuple, list[int]] = {}
    for i in indices:
        key = (params[i].dtype, _state_dtype(roles[0][i]) if roles else None, params[i].device)
        groups.setdefault(key, []).append(i)
    out = []
    for positions in groups.values():
        dtype = compute[positions[0]] if compute is not None else None
        ps = [params[i] for i in positions]
        gs = [grads[i] for i in positions]
        if dtype is not None:  # stepped as float32 copies, rounded back once at the end
            ps = [p.to(dtype) for p in ps]
            gs = [g.to(dtype) for g in gs]
        tensors = [TensorList(ps), TensorList(gs)] + [
            TensorList([codec.as_float(role[i], params[i].dtype) for i in positions]) for role in roles]
        out.append((np.array(positions, dtype=np.int64), tensors))
    return out


def _state_dtype(entry) -> torch.dtype | str:
    return "int8" if isinstance(entry, codec.Blockwise) else entry.dtype


def _encode_back(roles, rest: list[int], lists_) -> None:
    """Encode the new values of the 8-bit state the foreach path stepped as float copies."""
    for indices, tensors in lists_:
        for role, stepped in zip(roles, tensors[2:]):
            for i, value in zip(indices.tolist(), stepped.tensors):
                entry = role[i]
                if isinstance(entry, codec.Blockwise):
                    entry.store(value)


def _round_back(params, indices: np.ndarray, stepped: TensorList, compute, rounding: Rounding | None) -> None:
    if compute is None or compute[int(indices[0])] is None:
        return
    if rounding is None:
        torch._foreach_copy_([params[i] for i in indices.tolist()], stepped.tensors)
        return
    for i, value in zip(indices.tolist(), stepped.tensors):
        rounding.store(i, params[i], value)


def _rounded(bucket: host.Bucket, rounding: Rounding) -> host.Bucket:
    """``bucket`` with its kernels storing bfloat16 parameters by ``rounding`` (the rows it needs added to its
    address table); a bucket of other dtypes as it is. (Its state is float32, or there is none: param_update
    needs state_dtype.)"""
    if bucket.dtype != torch.bfloat16:
        return bucket
    # (a new memo: what a launcher keeps there points at the address table)
    return dataclasses.replace(bucket, pointers=np.concatenate([bucket.pointers, rounding.rows(bucket.indices)]),
                               rounding=rounding.mode, memo={})


def _on(device: torch.device, values: tuple) -> tuple:
    """Per-tensor numpy values as the late stage needs them: numpy on CPU, tensors on an accelerator."""
    if device.type == "cpu":
        return values
    return tuple(torch.as_tensor(v, device=device) if isinstance(v, np.ndarray) else v for v in values)


def _column(value: Any, n: int) -> np.ndarray:
    """A per-tensor host value as a float64 array of ``n`` entries."""
    if isinstance(value, np.ndarray) and value.shape == (n,) and value.dtype == np.float64:
        return value
    return np.broadcast_to(np.asarray(value, dtype=np.float64), (n,))


def _per_tensor(value: Any, n: int, device: torch.device):
    if isinstance(value, torch.Tensor):
        if device.type == "cpu":
            return np.broadcast_to(value.numpy().astype(np.float64, copy=False), (n,))
        return value.to(torch.float64).expand(n)
    return np.broadcast_to(np.asarray(value, dtype=np.float64), (n,))


def _take(column, indices: np.ndarray):
    if isinstance(column, torch.Tensor):
        return column[torch.as_tensor(indices, device=column.device)]
    return column[indices]


def _launcher(device: torch.device):
    """The module that runs kernel buckets on ``device``."""
    name = ".cpu" if device.type == "cpu" else ".gpu"
    module = _LAUNCHERS.get(name)
    if module is None:
        module = _LAUNCHERS[name] = importlib.import_module(name, __package__)
    return module


_LAUNCHERS: dict = {}
