"""Fused CUDA kernels generated from a rule's program (Triton), and how they are launched.

One kernel per program pass and pair of storage dtypes (parameter/gradient, state), many tensors per
launch (apex's multi-tensor scheme, with tables instead of kernel arguments):

- ``ptrs``: int64 device table ``[role, tensor]`` of ``data_ptr()`` addresses; a kernel turns an entry
  back into a typed pointer with ``.to(tl.pointer_type(...))``. Uploaded once and cached while the
  addresses stay the same.
- ``chunks``: int64 device table ``[chunk, (tensor, start, stop)]``: the grid is one program per chunk,
  so 2000 small tensors are one launch and a 4M-element tensor is 256 programs.
- ``sc``: float64 device array of the step's host values: the group's, then the per-tensor ones
  (``[tensor, column]``), computed in float64 on the host. ``late``: the per-tensor values computed
  after a norm pass, on the device (no host sync).

Math is float32 for float32/bfloat16/float16 storage and float64 for float64 storage; every stored value
is rounded once to its storage dtype, and a stored value read again in the same pass is the rounded
one. Kernels are compiled with floating-point contraction off (``enable_fp_fusion=False``), so a
product and a sum round as the rule's torch ops do.
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict

import numpy as np
import torch

from . import codec, generated
from .codegen import Dialect, header, render
from .program import Program

# Elements per program. 16k keeps 256M parameters at 16k programs (every SM busy) while a norm pass's
# partial sums per tensor stay few; BLOCK elements are processed per loop iteration (4 warps x 8 floats).
CHUNK = 1 << 14
BLOCK = 1024
NUM_WARPS = 4
SEGMENT_BLOCK = 256  # partial sums read per iteration by the per-tensor reduction

_TL = {torch.float32: "tl.float32", torch.float64: "tl.float64", torch.bfloat16: "tl.bfloat16",
       torch.float16: "tl.float16", torch.uint8: "tl.uint8"}
_LOCK = threading.Lock()
_KERNELS: dict[tuple, list] = {}


class _Triton(Dialect):
    def __init__(self, compute: str) -> None:
        self.float32 = compute == "tl.float32"

    def call(self, name: str, args: list[str]) -> str:
        if name == "sqrt":
            return f"tl.sqrt_rn({args[0]})" if self.float32 else f"tl.sqrt({args[0]})"
        if name == "where":
            return f"tl.where({', '.join(args)})"
        if name in ("maximum", "minimum"):
            return f"tl.{name}({args[0]}, {args[1]}, propagate_nan=tl.PropagateNan.ALL)"
        if name == "abs":
            return f"tl.abs({args[0]})"
        return super().call(name, args)

    def binop(self, op, left: str, right: str) -> str:
        import ast

        if isinstance(op, ast.Div) and self.float32:
            return f"tl.div_rn({left}, {right})"
        return super().binop(op, left, right)

    def unary(self, op, operand: str) -> str:
        import ast

        if isinstance(op, ast.Not):
            return f"({operand} == 0)"
        return super().unary(op, operand)


def source(program: Program, dtype: torch.dtype, state_dtype: torch.dtype, codecs: tuple = (),
           rounding: str | None = None) -> str:
    """The generated module for ``program`` on ``dtype`` parameters with ``state_dtype`` state; ``codecs``: per
    state role, None or the map ("signed", "unsigned") of its 8-bit blocks (see :mod:`.codec`); ``rounding``:
    how widened bfloat16 parameters are stored, None (to nearest), "stochastic" or "kahan" (see :mod:`.rounding`)."""
    compute = "tl.float64" if dtype == torch.float64 else "tl.float32"
    eight_bit = [role for role, kind in zip(program.state_roles, codecs) if kind]
    lines = [header(program, f"Triton, {dtype} parameters, {state_dtype} state"
                             + (f", 8-bit {', '.join(eight_bit)}" if eight_bit else "")
                             + (f", {rounding} rounding" if rounding else "")),
             "import triton",
             "import triton.language as tl",
             "from thalweg.engine.triton_runtime import (decode, encode, lerp, load_bf16, round_bf16, sign, store_bf16,",
             "                                           store_bf16_kahan, store_bf16_stochastic)",
             "", ""]
    if rounding is not None and dtype != torch.bfloat16:  # pragma: no cover - driver._rounded
        raise ValueError("param_update rounds bfloat16 parameters")
    for index, kernel_pass in enumerate(program.passes):
        lines += _kernel(program, kernel_pass, index, dtype, state_dtype, compute, codecs, rounding)
    return "\n".join(lines)


# (the 8-bit tables' layout in the kernels' ``qmaps`` and ``qlookup`` arguments: see codec_tables)
_MAP_OFFSET = {"signed": 0, "unsigned": 256}
_EDGE_OFFSET = {"signed": 512, "unsigned": 768}
_LOOKUP_OFFSET = {"signed": 0, "unsigned": 1 << 16}


def _kernel(program: Program, kernel_pass, index: int, dtype, state_dtype, compute: str, codecs: tuple = (),
            rounding: str | None = None) -> list[str]:
    """Pass ``index`` as a Triton kernel. An 8-bit role (``codecs``) is decoded as it is loaded (code -> map
    value, times its block's absmax) and encoded where it is stored: the BLOCK elements in hand are QBLOCK-sized
    blocks (a chunk and a BLOCK start on a block), so each block's new absmax is a reduction over one axis."""
    from .cpu import pass_rounding, table_roles

    dialect = _Triton(compute)
    roles = table_roles(program)
    rows = {role: row for row, role in enumerate(roles)}
    maps = {role: kind for role, kind in zip(program.state_roles, codecs) if kind is not None}
    absmax_rows = {role: len(rows) + k for k, role in enumerate(maps)}
    state_roles = set(program.state_roles)
    storage = {role: torch.uint8 if role in maps else state_dtype if role in state_roles else dtype for role in roles}
    slots = {k: j for j, k in enumerate(program.slots)}
    n_hp, n_columns, n_late = len(program.hp), len(program.columns), len(program.late_columns)
    extra = ", qmaps, qlookup" if maps else ""
    out = ["@triton.jit",
           f"def pass{index}(ptrs, n, chunks, sc, late, partial{extra}, BLOCK: tl.constexpr):",
           "    _c = tl.program_id(0).to(tl.int64)",
           "    _t = tl.load(chunks + 3 * _c)",
           "    _start = tl.load(chunks + 3 * _c + 1)",
           "    _stop = tl.load(chunks + 3 * _c + 2)"]
    touched = [r for r in roles if r in kernel_pass.roles_read or r in kernel_pass.roles_written]
    out += [f"    _ptr_{role} = tl.load(ptrs + {rows[role]} * n + _t).to(tl.pointer_type({_TL[storage[role]]}))"
            for role in touched]
    out += [f"    _absmax_{role} = tl.load(ptrs + {absmax_rows[role]} * n + _t).to(tl.pointer_type(tl.float32))"
            for role in maps if role in touched]
    rounding = pass_rounding(program, kernel_pass, rounding)
    row = len(rows) + len(maps)  # its rows follow the roles' and the absmax rows (driver._rounded appends them)
    if rounding == "stochastic":
        out += [f"    _key = tl.load(ptrs + {row} * n + _t).to(tl.uint32)", f"    _flat = tl.load(ptrs + {row + 1} * n + _t)"]
    elif rounding == "kahan":
        out.append(f"    _ptr_kahan_comp = tl.load(ptrs + {row} * n + _t).to(tl.pointer_type(tl.bfloat16))")
    for name in kernel_pass.scalars:
        if name in program.hp:
            where = f"sc + {program.hp.index(name)}"
        elif name in program.columns:
            where = f"sc + {n_hp} + _t * {n_columns} + {program.columns.index(name)}"
        else:
            where = f"late + _t * {n_late} + {program.late_columns.index(name)}"
        out.append(f"    {name} = tl.load({where}).to({compute})")
    out += [f"    _acc{slots[k]} = tl.zeros([BLOCK], dtype=tl.float64)" for k in kernel_pass.reductions.values()]
    out += ["    for _off in range(_start, _stop, BLOCK):",
            "        _offs = _off + tl.arange(0, BLOCK)",
            "        _mask = _offs < _stop"]
    inner = "        "
    for var, role in kernel_pass.loads:
        if role in maps:
            out.append(f"{inner}{var} = decode(_ptr_{role}, _absmax_{role}, qmaps + {_MAP_OFFSET[maps[role]]}, _offs, "
                       f"_mask).to({compute})")
        else:
            out.append(f"{inner}{var} = {_load(role, storage[role], compute)}")
    for var, _ in kernel_pass.loads:
        out += _after(var, kernel_pass, storage, inner, slots, program.rule.roles[0], state_dtype != dtype, maps,
                      rounding)
    for statement in kernel_pass.body:
        out.append(f"{inner}{statement.target} = {render(program, statement.expr, dialect)}  # line {statement.line}")
        out += _after(statement.target, kernel_pass, storage, inner, slots, program.rule.roles[0], state_dtype != dtype,
                      maps, rounding)
    out += [f"    tl.store(partial + _c * {len(slots)} + {slots[k]}, tl.sum(_acc{slots[k]}, axis=0))"
            for k in kernel_pass.reductions.values()]
    return out + ["", ""]


def _load(role: str, dtype: torch.dtype, compute: str) -> str:
    pointer = f"_ptr_{role} + _offs"
    if dtype == torch.bfloat16:
        return f"load_bf16({pointer}, _mask)"
    return f"tl.load({pointer}, mask=_mask, other=0.0).to({compute})"


def _after(var: str, kernel_pass, storage: dict, inner: str, slots: dict[int, int], param_role: str,
           widened: bool, maps: dict[str, str] | None = None, rounding: str | None = None) -> list[str]:
    out = []
    for role in kernel_pass.stores.get(var, ()):
        if rounding == "stochastic" and role == param_role:
            out.append(f"{inner}store_bf16_stochastic(_ptr_{role} + _offs, {var}, _mask, _key, _flat + _offs)")
        elif rounding == "kahan" and role == param_role:
            out.append(f"{inner}store_bf16_kahan(_ptr_{role} + _offs, _ptr_kahan_comp + _offs, {var}, _mask)")
        elif maps and role in maps:
            kind = maps[role]
            out.append(f"{inner}encode(_ptr_{role}, _absmax_{role}, qmaps + {_EDGE_OFFSET[kind]}, "
                       f"qlookup + {_LOOKUP_OFFSET[kind]}, {var}, _off, _offs, _stop, BLOCK)")
        elif storage[role] == torch.bfloat16:
            out.append(f"{inner}store_bf16(_ptr_{role} + _offs, {var}, _mask)")
        else:
            out.append(f"{inner}tl.store(_ptr_{role} + _offs, {var}.to({_TL[storage[role]]}), mask=_mask)")
    # float32 state for bfloat16/float16 parameters: the parameter is a float32 copy until the step ends
    if var in kernel_pass.kept and not (widened and param_role in kernel_pass.stores[var]):
        dtype = storage[kernel_pass.stores[var][0]]
        if dtype == torch.bfloat16:
            out.append(f"{inner}{var} = round_bf16({var})  # read again: as stored")
        elif dtype == torch.float16:
            out.append(f"{inner}{var} = {var}.to(tl.float16).to(tl.float32)  # read again: as stored")
    if var in kernel_pass.reductions:
        j = slots[kernel_pass.reductions[var]]
        out.append(f"{inner}_acc{j} += tl.where(_mask, {var}.to(tl.float64) * {var}.to(tl.float64), 0.0)")
    return out


def kernels(program: Program, dtype: torch.dtype, state_dtype: torch.dtype, codecs: tuple = (),
            rounding: str | None = None) -> list:
    """The program's Triton kernels (``@triton.jit`` functions, one per pass) for these dtypes (8-bit roles, and
    how bfloat16 parameters are rounded)."""
    key = (program.digest, dtype, state_dtype, codecs, rounding)
    found = _KERNELS.get(key)
    if found is None:
        with _LOCK:
            module = generated.module(f"gpu_{program.rule.name}", source(program, dtype, state_dtype, codecs, rounding))
            found = _KERNELS[key] = [getattr(module, f"pass{k}") for k in range(len(program.passes))]
    return found


def codec_tables(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The 8-bit kernels' tables on ``device``: float32 ``[signed map, unsigned map, signed boundaries, unsigned
    boundaries]`` (256 each) and int32 ``[signed lookup, unsigned lookup]`` (65536 each), see :mod:`.codec`."""
    found = _CODEC_TABLES.get(device)
    if found is None:
        maps = np.concatenate([codec.dynamic_map(True).numpy(), codec.dynamic_map(False).numpy(),
                               codec.boundaries(True), codec.boundaries(False)]).astype(np.float32)
        lookups = np.concatenate([codec.lookup(True), codec.lookup(False)]).astype(np.int32)
        found = _CODEC_TABLES[device] = (_to_device(maps, device), _to_device(lookups, device))
    return found


_CODEC_TABLES: dict = {}


# -- host side: tables, scalars, launches ------------------------------------------------------------


class _Uploads:
    """Small host arrays copied to a device once and reused while their content is the same (LRU)."""

    def __init__(self, size: int) -> None:
        self._size = size
        self._entries: OrderedDict[tuple, torch.Tensor] = OrderedDict()

    def get(self, array: np.ndarray, device: torch.device) -> torch.Tensor:
        key = (device, array.dtype.str, array.shape, array.tobytes())
        tensor = self._entries.get(key)
        if tensor is None:
            tensor = self._entries[key] = _to_device(array, device)
            if len(self._entries) > self._size:
                self._entries.popitem(last=False)
        else:
            self._entries.move_to_end(key)
        return tensor


_TABLES = _Uploads(64)  # pointer and chunk tables: the same every step of a training loop
_SCALARS = _Uploads(8)  # a step's host values: unchanged for SGD, new every step for Adam's corrections


def _to_device(array: np.ndarray, device: torch.device) -> torch.Tensor:
    host = torch.from_numpy(np.ascontiguousarray(array))
    if device.type == "cpu":  # Triton's interpreter: the kernel reads host memory directly
        return host.clone()
    # pinned + non_blocking: the copy is queued behind the previous kernels without a host sync; torch's
    # caching host allocator keeps the pinned block alive until the copy has run
    return host.pin_memory().to(device, non_blocking=True)


class Plan:
    """One bucket's launches of every pass of a program, with its device tables."""

    __slots__ = ("bucket", "kernels", "device", "ptrs", "chunks", "segments", "n_chunks", "sc", "late", "tables")

    def __init__(self, program: Program, bucket, hp_values: list[float], columns: list[np.ndarray],
                 device: torch.device) -> None:
        from .host import chunk_table

        self.bucket = bucket
        self.kernels = kernels(program, bucket.dtype, bucket.state_dtype, bucket.codecs, bucket.rounding)
        self.tables = codec_tables(device) if bucket.codecs else ()
        if bucket.codecs and (CHUNK % BLOCK or BLOCK % codec.BLOCK):  # pragma: no cover - the constants above
            raise AssertionError("8-bit state needs chunks and blocks that start on a codec block")
        self.device = device
        self.ptrs = _TABLES.get(bucket.pointers, device)
        sizes = np.array(bucket.numels, dtype=np.int64)
        table = bucket.memo.get("gpu chunks")
        if table is None:
            counts = (sizes + CHUNK - 1) // CHUNK
            segments = np.stack([np.cumsum(counts) - counts, counts], axis=1).astype(np.int64)
            table = bucket.memo["gpu chunks"] = (chunk_table(bucket.numels, CHUNK), segments)
        self.chunks = _TABLES.get(table[0], device)
        self.segments = _TABLES.get(table[1], device)
        self.n_chunks = table[0].shape[0]
        values = np.array(list(hp_values) + [0.0], dtype=np.float64)
        if columns:
            per_tensor = np.stack([np.asarray(c, dtype=np.float64)[bucket.indices] for c in columns], axis=1)
            values = np.concatenate([values[:-1], per_tensor.reshape(-1), [0.0]])
        self.sc = _SCALARS.get(values, device)
        self.late = self.sc  # replaced by set_late when the program has values after a norm


def prepare(program: Program, bucket, hp_values: list[float], columns: list[np.ndarray], device: torch.device) -> Plan:
    return Plan(program, bucket, hp_values, columns, device)


def set_late(plan: Plan, late_columns: list) -> None:
    indices = torch.as_tensor(plan.bucket.indices, device=plan.device)
    values = [torch.as_tensor(np.array(c) if isinstance(c, np.ndarray) else c, dtype=torch.float64,
                              device=plan.device)[indices] for c in late_columns]
    plan.late = torch.stack(values, dim=1).contiguous()


def run(plan: Plan, index: int, sums: torch.Tensor | None) -> None:
    """Pass ``index`` over the bucket; a norm pass adds each tensor's sums of squares into ``sums`` rows."""
    if plan.n_chunks == 0:
        if sums is not None:
            sums[torch.as_tensor(plan.bucket.indices, device=sums.device)] = 0.0
        return
    device = plan.device
    slots = sums.shape[1] if sums is not None else 1
    partial = torch.empty((plan.n_chunks, slots), dtype=torch.float64, device=device) if sums is not None else plan.sc
    plan.kernels[index][(plan.n_chunks,)](plan.ptrs, len(plan.bucket.indices), plan.chunks, plan.sc, plan.late,
                                          partial, *plan.tables, BLOCK=BLOCK, num_warps=NUM_WARPS, **_options())
    if sums is not None:
        from .triton_runtime import segment_sums

        n = len(plan.bucket.indices)
        per_tensor = torch.empty((n, slots), dtype=torch.float64, device=device)
        segment_sums[(n,)](partial, plan.segments, per_tensor, SLOTS=slots, SEGMENT_BLOCK=SEGMENT_BLOCK)
        sums[torch.as_tensor(plan.bucket.indices, device=sums.device)] = per_tensor.to(sums.device)


def _options() -> dict:
    """fp contraction off: a * b + c rounds twice, as the rule's torch ops do (the interpreter takes no options)."""
    return {} if os.environ.get("TRITON_INTERPRET") == "1" else {"enable_fp_fusion": False}
