"""Fused CPU kernels generated from a rule's program (numba), and how they are launched.

For each program pass and pair of storage dtypes (parameter/gradient, state) a parallel *body* is
generated (see :mod:`.numba_runtime` for the argument block, pointer and chunk tables), compiled once by
numba with its on-disk cache, and run on the calling thread or on a team of torch's OpenMP pool. The
body loads each role once per element, runs the pass's statements in the compute dtype (float32 for
float32 and bfloat16 storage, float64 for float64), stores each output as soon as its final value is
known, and sums the squares of a reduction pass's terms per chunk in float64.
"""

from __future__ import annotations

import ctypes
import glob
import os
import threading

import numpy as np
import torch

from . import generated
from .codec import BLOCK as _QBLOCK  # (numba_runtime.QBLOCK in the generated code)
from .codegen import Dialect, header, render
from .program import Program

STORAGE = {torch.float32: "float32", torch.float64: "float64", torch.bfloat16: "uint16"}  # bfloat16 as its bits
COMPUTE = {torch.float32: "float32", torch.float64: "float64", torch.bfloat16: "float32"}
# A bucket smaller than this runs on the calling thread: waking the team and sharing out the chunks
# costs more than the second core saves below it (measured in benchmarks/thread_threshold.py).
PARALLEL_FROM = 1 << 16
# A thread takes about this many elements' worth of chunks at a time from the shared counter.
CHUNK_FOR_GRAB = 1 << 16
CHUNK = 1 << 16  # elements per chunk: apex's multi-tensor size

def openmp_entry() -> int:
    """Address of ``GOMP_parallel`` in the OpenMP runtime torch runs on, or 0 when there is none.

    Why torch's own pool: right after a torch op (the backward pass, say) torch's OpenMP workers spin for
    a few milliseconds waiting for more work, and a second pool's threads would share the cores with them
    (a 32 x 1M Adam step took 18.4 ms after a torch ``copy_`` on numba's pool, 15.3 on torch's). torch
    loads its runtime (libgomp, or LLVM's libomp, which exports the same entry) into the global symbol
    scope on Linux; elsewhere the copy shipped in ``torch/lib`` is the one torch loaded.
    """
    if os.environ.get("THALWEG_NO_OPENMP") or not torch.backends.openmp.is_available():
        return 0
    shipped = sorted(glob.glob(os.path.join(os.path.dirname(torch.__file__), "lib", "*omp*")))
    for name in [None, *shipped]:
        try:
            function = getattr(ctypes.CDLL(name), "GOMP_parallel")
        except (OSError, AttributeError):
            continue
        return ctypes.cast(function, ctypes.c_void_p).value or 0
    return 0


OPENMP_ENTRY = openmp_entry()
# GOMP_parallel(body, data, threads, flags): called through ctypes, which releases the GIL for the call
GOMP_PARALLEL = (ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_uint, ctypes.c_uint)(OPENMP_ENTRY)
                 if OPENMP_ENTRY else None)


_LOCK = threading.Lock()
_BODIES: dict[tuple, object] = {}  # compiled kernels by what they were made from


class _Numba(Dialect):
    pass


_DIALECT = _Numba()


def table_roles(program: Program) -> list[str]:
    """Rows of the pointer table: the parameter, the gradient, then the state roles the program touches."""
    return [program.rule.roles[0], program.rule.roles[1], *program.state_roles]


def pass_rounding(program: Program, kernel_pass, rounding: str | None) -> str | None:
    """``param_update``'s rounding in this pass: None where the pass does not store the parameter."""
    return rounding if program.rule.roles[0] in kernel_pass.roles_written else None


def source(program: Program, dtype: torch.dtype, state_dtype: torch.dtype, codecs: tuple = (),
           rounding: str | None = None) -> str:
    """The generated module for ``program`` on ``dtype`` parameters with ``state_dtype`` state; ``codecs``: per
    state role, None or the map ("signed", "unsigned") of its 8-bit blocks (see :mod:`.codec`); ``rounding``:
    how widened bfloat16 parameters are stored, None (to nearest), "stochastic" or "kahan" (see :mod:`.rounding`)."""
    eight_bit = [kind for kind in codecs if kind is not None]
    lines = [header(program, f"numba, {dtype} parameters, {state_dtype} state"
                             + (f", 8-bit {', '.join(r for r, k in zip(program.state_roles, codecs) if k)}" if eight_bit else "")
                             + (f", {rounding} rounding" if rounding else "")),
             "import numpy as np",
             "from numba import carray",
             "from thalweg.engine.numba_runtime import (BLOCK, F32, F64, I64, Q, QBLOCK, SIGNED, SIGNED_EDGES, SIGNED_LOOKUP,",
             "                                          UNSIGNED, UNSIGNED_EDGES, UNSIGNED_LOOKUP, accumulate, address,",
             "                                          decode, encode, fetch_add, from_bits, largest, lerp, load,",
             "                                          magnitude_bits, maximum, minimum, pointer, round_to, sign, sqrt,",
             "                                          square, store, store_kahan, store_stochastic, widen)",
             "",
             f"P = np.empty(1, dtype=np.{STORAGE[dtype]})  # parameter and gradient storage",
             f"S = np.empty(1, dtype=np.{STORAGE[state_dtype]})  # state storage",
             f"C = np.empty(1, dtype=np.{COMPUTE[dtype]})  # compute dtype: the scalar tables", ""]
    # float32 state for bfloat16/float16 parameters: the parameter is a float32 copy until the step ends
    widened = state_dtype != dtype
    if rounding is not None and dtype != torch.bfloat16:  # pragma: no cover - driver._rounded
        raise ValueError("param_update rounds bfloat16 parameters")
    for index, kernel_pass in enumerate(program.passes):
        lines += _body(program, kernel_pass, index, widened, codecs, rounding)
    return "\n".join(lines) + "\n"


def _body(program: Program, kernel_pass, index: int, widened: bool, codecs: tuple = (),
          rounding: str | None = None) -> list[str]:
    """Pass ``index`` as a parallel body. With 8-bit roles (``codecs``) each chunk is walked block by block
    (a chunk starts on a block), in loops LLVM can vectorise apart from those it cannot: a block's codes are
    decoded with its absmax into the chunk's row of float32 scratch (``_scr``), the rule runs over the block reading them and writes
    its new values there, then each new block's absmax is taken (an integer maximum of the magnitudes' bits,
    which orders them as floats and NaN above all) and its codes encoded — one pass over memory. (One loop
    doing it all measured 6× slower: the table lookups and the running maximum kept it from vectorising.)"""
    rows = {role: row for row, role in enumerate(table_roles(program))}
    maps = {role: kind for role, kind in zip(program.state_roles, codecs) if kind is not None}
    absmax_rows = {role: len(rows) + k for k, role in enumerate(maps)}
    state_roles = set(program.state_roles)
    columns = program.columns + program.late_columns
    slots = {k: j for j, k in enumerate(program.slots)}
    out = [f"def pass{index}(data):",
           "    _counter = address(data)",
           "    _block = carray(pointer(_counter, I64), BLOCK)",
           "    _ptrs = carray(pointer(_block[2], I64), (_block[3], _block[4]))",
           "    _chunks = carray(pointer(_block[5], I64), (_block[6], 3))",
           "    _coef = carray(pointer(_block[7], C), (_block[8], _block[9]))",
           "    _hp = carray(pointer(_block[10], C), _block[11])",
           "    _partial = carray(pointer(_block[12], F64), (_block[13], _block[14]))",
           "    _n_chunks = _block[6]",
           "    _grab = _block[1]"]
    per_tensor = []
    for name in kernel_pass.scalars:
        if name in program.hp:
            out.append(f"    {name} = _hp[{program.hp.index(name)}]")
        else:
            per_tensor.append(f"            {name} = _coef[_t, {columns.index(name)}]")
    touched = [role for role in table_roles(program) if role in kernel_pass.roles_read or role in kernel_pass.roles_written]
    out += ["    _next = fetch_add(_counter, _grab)",
            "    while _next < _n_chunks:",
            "        for _c in range(_next, min(_next + _grab, _n_chunks)):",
            "            _t = _chunks[_c, 0]",
            "            _lo = _chunks[_c, 1]",
            "            _hi = _chunks[_c, 2]"]
    out += [f"            _ptr_{role} = pointer(_ptrs[{rows[role]}, _t], {'Q' if role in maps else 'S' if role in state_roles else 'P'})"
            for role in touched]
    read = [role for role in maps if role in touched and role in kernel_pass.roles_read]
    written = [role for role in maps if role in touched and role in kernel_pass.roles_written]
    out += [f"            _absmax_{role} = pointer(_ptrs[{absmax_rows[role]}, _t], F32)" for role in maps if role in touched]
    rounding = pass_rounding(program, kernel_pass, rounding)
    row = len(rows) + len(maps)  # its rows follow the roles' and the absmax rows (driver._rounded appends them)
    if rounding == "stochastic":
        out += [f"            _key = np.uint32(_ptrs[{row}, _t])", f"            _flat = _ptrs[{row + 1}, _t]"]
    elif rounding == "kahan":
        out.append(f"            _ptr_kahan_comp = pointer(_ptrs[{row}, _t], P)")
    out += per_tensor
    out += [f"            _acc{slots[k]} = 0.0" for k in kernel_pass.reductions.values()]
    if maps:
        # the chunk's row of scratch: each written role's new values, then each read role's decoded values
        scratch = {role: k * _QBLOCK for k, role in enumerate(written)}
        decoded = {role: (len(written) + k) * _QBLOCK for k, role in enumerate(read)}
        out += ["            _scr = pointer(_block[15] + 4 * _c * _block[16], F32)",
                "            for _b in range(_lo, _hi, QBLOCK):",
                "                _e = min(_b + QBLOCK, _hi)",
                "                _k = _b // QBLOCK"]
        for role in read:
            out += [f"                _scale_{role} = _absmax_{role}[_k]",
                    "                for _j in range(_e - _b):",
                    f"                    _scr[{decoded[role]} + _j] = decode(F32, {maps[role].upper()}, _ptr_{role}, "
                    f"_b + _j, _scale_{role})"]
        out.append("                for _i in range(_b, _e):")
        inner = "                    "
    else:
        scratch = {}
        out.append("            for _i in range(_lo, _hi):")
        inner = "                "
    for var, role in kernel_pass.loads:
        if role in maps:
            out.append(f"{inner}{var} = widen(C, _scr[{decoded[role]} + _i - _b])")
        else:
            out.append(f"{inner}{var} = load(_ptr_{role}, _i)")
    for var, _ in kernel_pass.loads:
        out += _after(var, kernel_pass, inner, slots, program, widened, scratch, rounding)
    for statement in kernel_pass.body:
        out.append(f"{inner}{statement.target} = {render(program, statement.expr, _DIALECT)}  # line {statement.line}")
        out += _after(statement.target, kernel_pass, inner, slots, program, widened, scratch, rounding)
    for role in written:  # the block's new absmax (never below 1e-12), then its codes
        out += [f"                _bits_{role} = np.uint32(0)",
                "                for _j in range(_e - _b):",
                f"                    _bits_{role} = max(_bits_{role}, magnitude_bits(_scr[{scratch[role]} + _j]))",
                f"                _top_{role} = largest(from_bits(_bits_{role}))",
                f"                _absmax_{role}[_k] = _top_{role}",
                "                for _j in range(_e - _b):  # (the divisions apart: this loop vectorises, the next cannot)",
                f"                    _scr[{scratch[role]} + _j] = _scr[{scratch[role]} + _j] / _top_{role}",
                "                for _j in range(_e - _b):",
                f"                    _ptr_{role}[_b + _j] = encode({maps[role].upper()}_EDGES, {maps[role].upper()}_LOOKUP, "
                f"_scr[{scratch[role]} + _j])"]
    out += [f"            _partial[_c, {slots[k]}] = _acc{slots[k]}" for k in kernel_pass.reductions.values()]
    out += ["        _next = fetch_add(_counter, _grab)", "", ""]
    return out


def _after(var: str, kernel_pass, inner: str, slots: dict[int, int], program: Program, widened: bool,
           scratch: dict[str, int] | None = None, rounding: str | None = None) -> list[str]:
    """Stores and sums that follow the definition (or load) of ``var``; an 8-bit role's new value goes to
    its scratch (``scratch``: role -> offset in the chunk's row), encoded at the block's end; the parameter is
    stored by ``rounding`` when set."""
    out = []
    for role in kernel_pass.stores.get(var, ()):
        if scratch and role in scratch:
            out.append(f"{inner}_scr[{scratch[role]} + _i - _b] = {var}")
            continue
        if rounding == "stochastic" and role == program.rule.roles[0]:
            out.append(f"{inner}store_stochastic(_ptr_{role}, _i, {var}, _key, _flat + _i)")
            continue
        if rounding == "kahan" and role == program.rule.roles[0]:
            out.append(f"{inner}store_kahan(_ptr_{role}, _ptr_kahan_comp, _i, {var})")
            continue
        out.append(f"{inner}store(_ptr_{role}, _i, {var})")
    if var in kernel_pass.kept and not (widened and program.rule.roles[0] in kernel_pass.stores[var]):
        role = kernel_pass.stores[var][0]
        out.append(f"{inner}{var} = round_to(_ptr_{role}, {var})  # read again: as stored")
    if var in kernel_pass.reductions:
        j = slots[kernel_pass.reductions[var]]
        out.append(f"{inner}_acc{j} = accumulate(_acc{j}, {var})")
    return out


class Kernel:
    """A compiled parallel body: its address (for GOMP_parallel) and a direct call (the calling thread)."""

    __slots__ = ("address", "call", "_keep")

    def __init__(self, address: int, keep=None) -> None:
        self.address = address
        self.call = ctypes.CFUNCTYPE(None, ctypes.c_void_p)(address)
        self._keep = keep  # what owns the machine code (a numba cfunc), when not the native cache


def compiled(module_source: str, stem: str, name: str) -> Kernel:
    """Function ``name`` of a generated module, compiled: loaded from the native cache, else compiled by
    numba (and its machine code cached for the next process, see :mod:`.native`)."""
    key = (stem, name, module_source)
    kernel = _BODIES.get(key)
    if kernel is not None:
        return kernel
    with _LOCK:  # two threads stepping at once compile once
        kernel = _BODIES.get(key)
        if kernel is None:
            kernel = _BODIES[key] = _compile(module_source, stem, name)
    return kernel


def _compile(module_source: str, stem: str, name: str) -> Kernel:
    from . import native

    try:
        cache_key = native.key(module_source, name)
        address = native.load(cache_key)
        if address is not None:
            return Kernel(address)
    except Exception:  # noqa: BLE001 - no llvmlite, an unreadable cache: numba compiles (and caches) instead
        cache_key = None
    from numba import cfunc, types

    from .numba_runtime import ERROR_MODEL

    module = generated.module(stem, module_source)
    function = cfunc(types.void(types.voidptr), cache=cache_key is None, error_model=ERROR_MODEL)(getattr(module, name))
    if cache_key is not None:
        try:
            native.save(cache_key, function)
        except Exception:  # noqa: BLE001 - numba's internals moved: this process still runs the cfunc
            pass
    return Kernel(function.address, keep=function)


def body(program: Program, index: int, dtype: torch.dtype, state_dtype: torch.dtype, codecs: tuple = (),
         rounding: str | None = None) -> Kernel:
    """The compiled parallel body of pass ``index`` (generated, compiled or loaded once)."""
    key = (program.digest, index, dtype, state_dtype, codecs, rounding)
    kernel = _BODIES.get(key)
    if kernel is None:
        kernel = _BODIES[key] = compiled(source(program, dtype, state_dtype, codecs, rounding),
                                         f"cpu_{program.rule.name}", f"pass{index}")
    return kernel


def threads_for(n_elements: int) -> int:
    """Threads a bucket of ``n_elements`` runs on: torch's, from PARALLEL_FROM elements where there is a team."""
    return torch.get_num_threads() if GOMP_PARALLEL is not None and n_elements >= PARALLEL_FROM else 1


def launch(kernel, ptrs: np.ndarray, chunks: np.ndarray, coef: np.ndarray, hp: np.ndarray, partial: np.ndarray,
           n_elements: int) -> None:
    """Run a compiled body over every chunk: on the calling thread, or on a team of torch's OpenMP pool."""
    block = _arguments(ptrs, chunks, coef, hp, partial, _NO_SCRATCH)
    _launch(kernel, block, _address(block), chunks.shape[0], n_elements)


def _arguments(ptrs, chunks, coef, hp, partial, scratch) -> np.ndarray:
    """A body's argument block: [next chunk, chunks per take, then address and sizes of the pointer table, the chunk
    table, the per-tensor values, the hyper-parameters, the per-chunk sums (float64) and the 8-bit roles' per-chunk
    scratch (float32)] (numba_runtime.BLOCK entries)."""
    return np.array([0, 1, _address(ptrs), ptrs.shape[0], ptrs.shape[1], _address(chunks), chunks.shape[0],
                     _address(coef), coef.shape[0], coef.shape[1], _address(hp), hp.shape[0],
                     _address(partial), partial.shape[0], partial.shape[1], _address(scratch), scratch.shape[1]],
                    dtype=np.int64)


def _launch(kernel, block: np.ndarray, block_address: int, n_chunks: int, n_elements: int) -> None:
    threads = threads_for(n_elements)
    block[0] = 0  # the shared counter of the next chunk to take
    # takes of ~CHUNK_FOR_GRAB elements each: many small tensors do not pay one atomic per tensor
    block[1] = max(1, n_chunks * CHUNK_FOR_GRAB // max(n_elements, 1)) if threads > 1 else max(n_chunks, 1)
    if threads > 1:
        GOMP_PARALLEL(kernel.address, block_address, threads, 0)
    else:
        kernel.call(block_address)


def steps_in_place(steps: list[torch.Tensor], addresses: np.ndarray | None = None) -> np.ndarray:
    """Add 1 to every step counter (0-d CPU tensors of one float dtype) and return the new counts (float64)."""
    if addresses is None:
        addresses = np.fromiter(map(torch.Tensor.data_ptr, steps), dtype=np.int64, count=len(steps))
    if not len(steps):
        return np.empty(0, dtype=np.float64)
    kernel = _STEP_KERNELS.get(steps[0].dtype)
    if kernel is None:
        dtype = "float32" if steps[0].dtype == torch.float32 else "float64"
        kernel = _STEP_KERNELS[steps[0].dtype] = compiled(_STEPS_SOURCE.replace("DTYPE", dtype), "cpu_steps", "steps")
    # a layout's address array lives as long as the layout: its counts and argument block are kept with it
    entry = _STEP_BLOCKS.get(id(addresses))
    if entry is None or entry[0] is not addresses:
        counts = np.empty(len(steps), dtype=np.float64)
        block = np.array([_address(addresses), len(steps), _address(counts)], dtype=np.int64)
        entry = _STEP_BLOCKS[id(addresses)] = (addresses, counts, _address(block), block)
        if len(_STEP_BLOCKS) > 64:
            _STEP_BLOCKS.pop(next(iter(_STEP_BLOCKS)))
    kernel.call(entry[2])
    return entry[1].copy()


_STEP_KERNELS: dict[torch.dtype, Kernel] = {}
_STEP_BLOCKS: dict[int, tuple] = {}


_STEPS_SOURCE = """# Generated by thalweg.engine: step counters of dtype DTYPE advanced by their addresses; do not edit.
import numpy as np
from numba import carray
from thalweg.engine.numba_runtime import F64, I64, address, pointer
S = np.empty(1, dtype=np.DTYPE)


def steps(data):
    _block = carray(pointer(address(data), I64), 3)
    _addresses = carray(pointer(_block[0], I64), _block[1])
    _counts = carray(pointer(_block[2], F64), _block[1])
    for _k in range(_block[1]):
        _step = pointer(_addresses[_k], S)
        _step[0] += 1
        _counts[_k] = _step[0]
"""


_F32 = np.empty(1, dtype=np.float32)
_F64 = np.empty(1, dtype=np.float64)


def sum_of_squares_source(dtype: torch.dtype) -> str:
    """A body summing x² per chunk of role 0 (float64): the global gradient norm on the fused CPU path."""
    return "\n".join([
        f"# Generated by thalweg.engine: sum of squares of {dtype} tensors; do not edit.",
        "import numpy as np",
        "from numba import carray",
        "from thalweg.engine.numba_runtime import BLOCK, F64, I64, accumulate, address, fetch_add, load, pointer",
        f"P = np.empty(1, dtype=np.{STORAGE[dtype]})",
        "",
        "def squares(data):",
        "    _counter = address(data)",
        "    _block = carray(pointer(_counter, I64), BLOCK)",
        "    _ptrs = carray(pointer(_block[2], I64), (_block[3], _block[4]))",
        "    _chunks = carray(pointer(_block[5], I64), (_block[6], 3))",
        "    _partial = carray(pointer(_block[12], F64), (_block[13], _block[14]))",
        "    _n_chunks = _block[6]",
        "    _next = fetch_add(_counter, _block[1])",
        "    while _next < _n_chunks:",
        "        for _c in range(_next, min(_next + _block[1], _n_chunks)):",
        "            _x = pointer(_ptrs[0, _chunks[_c, 0]], P)",
        "            _acc = 0.0",
        "            for _i in range(_chunks[_c, 1], _chunks[_c, 2]):",
        "                _acc = accumulate(_acc, load(_x, _i))",
        "            _partial[_c, 0] = _acc",
        "        _next = fetch_add(_counter, _block[1])",
        ""])


def sum_of_squares_body(dtype: torch.dtype) -> Kernel:
    return compiled(sum_of_squares_source(dtype), "cpu_squares", "squares")


# -- the driver's interface (see driver.run) ------------------------------------------------------------


class Plan:
    """One bucket's launches of every pass of a program: its scalar tables and argument blocks, kept with
    the bucket (so their addresses, written into the blocks once, stay valid) and refilled every step."""

    __slots__ = ("bucket", "kernels", "hp", "coef", "n_early", "partial", "scratch", "blocks", "addresses")

    def __init__(self, program: Program, bucket) -> None:
        compute = np.float64 if bucket.dtype == torch.float64 else np.float32
        self.bucket = bucket
        self.kernels = [body(program, k, bucket.dtype, bucket.state_dtype, bucket.codecs, bucket.rounding)
                        for k in range(len(program.passes))]
        self.hp = np.zeros(max(len(program.hp), 1), dtype=compute)
        self.n_early = len(program.columns)
        self.coef = np.zeros((len(bucket.indices), max(self.n_early + len(program.late_columns), 1)), dtype=compute)
        self.partial = np.zeros((bucket.chunks.shape[0], max(len(program.slots), 1)))
        # a row of float32 scratch per chunk: a block of each 8-bit role, decoded and new
        self.scratch = (np.zeros((bucket.chunks.shape[0], 2 * _QBLOCK * sum(map(bool, bucket.codecs))), dtype=np.float32)
                        if bucket.codecs else _NO_SCRATCH)
        ptrs, chunks, coef, hp, partial = bucket.pointers, bucket.chunks, self.coef, self.hp, self.partial
        self.blocks = []
        for index in range(len(program.passes)):
            out = partial if index == 0 and len(program.passes) > 1 else _NO_PARTIAL
            self.blocks.append(_arguments(ptrs, chunks, coef, hp, out, self.scratch))
        self.addresses = [_address(block) for block in self.blocks]

    def fill(self, hp_values: list[float], columns: list[np.ndarray]) -> None:
        if hp_values:
            self.hp[:len(hp_values)] = hp_values
        indices = self.bucket.indices
        for j, column in enumerate(columns):
            self.coef[:, j] = column[indices] if len(column) != len(indices) else column


def _address(array: np.ndarray) -> int:
    return array.ctypes.data


def prepare(program: Program, bucket, hp_values: list[float], columns: list[np.ndarray], device=None) -> Plan:
    key = ("cpu plan", program.digest)
    plan = bucket.memo.get(key)
    if plan is None:
        plan = bucket.memo[key] = Plan(program, bucket)
    plan.fill(hp_values, columns)
    return plan


def set_late(plan: Plan, late_columns: list[np.ndarray]) -> None:
    indices = plan.bucket.indices
    for j, column in enumerate(late_columns):
        plan.coef[:, plan.n_early + j] = column[indices]


_NO_PARTIAL = np.empty((0, 1), dtype=np.float64)
_NO_SCRATCH = np.empty((0, 1), dtype=np.float32)


def run(plan: Plan, index: int, sums: np.ndarray | None) -> None:
    """Pass ``index`` over the bucket; a reduction pass puts each tensor's sums of squares into ``sums`` rows."""
    bucket = plan.bucket
    if sums is not None:
        plan.partial[:] = 0.0
    _launch(plan.kernels[index], plan.blocks[index], plan.addresses[index], bucket.chunks.shape[0], bucket.n_elements)
    if sums is not None:
        per_tensor = np.zeros((len(bucket.indices), sums.shape[1]))
        np.add.at(per_tensor, bucket.chunks[:, 0], plan.partial[:, :sums.shape[1]])  # chunk -> its tensor
        sums[bucket.indices] = per_tensor


def sum_of_squares(grads: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[int]]:
    """Σ g² of dense CPU gradients, one kernel call per dtype (float64 accumulation): the square of the
    global gradient norm on the fused CPU path (torch's foreach norm loops over the tensors on CPU).

    Returns the per-dtype sums as 0-d float64 tensors, and the positions a kernel cannot read (strided or
    float16 gradients), which the caller sums with torch.
    """
    from .host import chunk_table

    by_dtype: dict[torch.dtype, list[int]] = {}
    fallback = []
    for i, grad in enumerate(grads):
        if grad.dtype in STORAGE and grad.layout is torch.strided and grad.is_contiguous():
            by_dtype.setdefault(grad.dtype, []).append(i)
        else:
            fallback.append(i)
    sums = []
    for dtype, indices in by_dtype.items():
        tensors = [grads[i] for i in indices]
        ptrs = np.fromiter(map(torch.Tensor.data_ptr, tensors), dtype=np.int64, count=len(tensors)).reshape(1, -1)
        numels = [t.numel() for t in tensors]
        chunks = chunk_table(numels)
        partial = np.zeros((chunks.shape[0], 1))
        launch(sum_of_squares_body(dtype), ptrs, chunks, _NO_COEF, _NO_HP, partial, sum(numels))
        sums.append(torch.tensor(partial.sum(), dtype=torch.float64))
    return sums, fallback


_NO_COEF = np.zeros((1, 1), dtype=np.float32)
_NO_HP = np.zeros(1, dtype=np.float32)
