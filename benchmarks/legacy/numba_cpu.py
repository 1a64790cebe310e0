"""numba kernels for CPU tensors: one call updates every tensor of a (dtype) bucket in a single pass.

How tensors reach a kernel: the host builds ``ptrs``, an int64 table ``[role, tensor]`` of
``tensor.data_ptr()`` addresses (role 0 = param, 1 = grad, then the state tensors in the order the
kernel's docstring lists), and ``chunks``, an int64 table ``[chunk, (tensor, start, stop)]`` that cuts
every tensor into pieces of at most ``CHUNK`` elements. A chunk function turns an address back into an
array with an ``inttoptr`` intrinsic and ``numba.carray`` (zero-copy) and updates one chunk; a kernel
runs it over the chunks of all tensors together, so 2000 small tensors cost one call, and one
100M-element tensor still uses every core.

Threads: torch's own OpenMP pool. A kernel calls ``GOMP_parallel`` of the OpenMP runtime torch is
linked with, and every thread of the team takes chunks from a shared atomic counter. numba's own
thread pools cannot do this: right after a torch op (the backward pass, say) torch's OpenMP workers
spin for a few milliseconds waiting for more work, and a second pool's threads then share the two
cores with them (a 32 x 1M Adam step took 18.4 ms after a torch ``copy_`` instead of 15.3; torch's
fused Adam, on its own pool, 15.0). On torch's pool the spinning worker is the one that takes the
work. Without a GOMP-compatible runtime (a torch built without OpenMP; Windows) kernels run on the
calling thread; so do buckets below ``PARALLEL_FROM`` elements, where waking a team costs more than
the second core gains.

Storage dtypes: float32 and float64 (math in the storage dtype, as torch's for-loop path does), and
bfloat16 stored as uint16 (widened to float32 by a shift, rounded back to nearest-even with integer
operations: bf16 is the upper half of a float32). The state roles are typed by their own ``state_like``:
bfloat16 params may keep float32 state (``state_dtype=torch.float32``), read and written without
rounding while the param is rounded once per step. Scalars arrive in ``hp``, an array of the compute
dtype, so float32 kernels never silently compute in float64; per-tensor scalars in ``coef`` (compute
dtype, ``[tensor, k]``); switches in ``flags`` (int64, read once per chunk, so LLVM unswitches them).

Per-tensor quantities come from the ``step`` tensors, read and incremented inside the kernel (the
reference does ``steps[i] += 1; t = steps[i].item()``); bias corrections are computed in float64 as
the reference's Python floats are, then rounded to the compute dtype. Layer-wise norms (LARS, LAMB) are
per-chunk partial sums of squares in float64, combined per tensor inside the same call: no host sync.

Compiled on first use, cached on disk (``cache=True``): a second process loads the machine code.
"""

from __future__ import annotations

import ctypes
import glob
import math
import os
import types as pytypes

import numba.core.ccallback
import numpy as np
import torch
from llvmlite import ir
from numba import carray, cfunc, njit, types
from numba.extending import intrinsic, overload, register_jitable

# Reductions (LARS/LAMB norms, the global grad norm) may reorder their sums, which is what lets LLVM
# vectorise them; element-wise math keeps IEEE semantics (no fastmath) so results match the reference.
_REDUCE = {"reassoc", "nsz", "contract"}
# numba's default ("python") error model tests every float division for a zero divisor so that it can
# raise ZeroDivisionError; that branch alone kept LLVM from vectorising any loop that divides (a serial
# Adam step on 32M float32 took 94 ms, 16 ms without it). "numpy" divides as IEEE and torch do (x/0 is
# ±inf or nan). The only divisions that could see a zero are element-wise ones (eps = 0 and a zero
# second moment), where torch gives inf/nan too; the per-tensor ones have nonzero divisors by the
# optimizers' argument checks (β < 1, lr_decay ≥ 0) or by their guards (norms > 0).
_ERRORS = "numpy"
# Chunk functions are compiled with their own options (not their caller's): say them every time.
_elementwise = register_jitable(error_model=_ERRORS)
_reduction = register_jitable(fastmath=_REDUCE, error_model=_ERRORS)

# -- memory access ---------------------------------------------------------------------------------


@intrinsic
def _pointer(typingctx, address, like):
    """int64 address -> pointer to ``like``'s element type (the cast torch's data_ptr() needs)."""
    if not isinstance(like, types.Array):
        return None
    pointer_type = types.CPointer(like.dtype)

    def codegen(context, builder, signature, args):
        return builder.inttoptr(args[0], context.get_value_type(pointer_type))

    return pointer_type(types.int64, like), codegen


@intrinsic
def _bits_to_f32(typingctx, bits):
    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], context.get_value_type(types.float32))

    return types.float32(types.uint32), codegen


@intrinsic
def _f32_to_bits(typingctx, value):
    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], context.get_value_type(types.uint32))

    return types.uint32(types.float32), codegen


def _load(array, i):  # pragma: no cover - replaced by the overload inside kernels
    raise NotImplementedError


def _store(array, i, value):  # pragma: no cover - replaced by the overload inside kernels
    raise NotImplementedError


@overload(_load)
def _load_impl(array, i):
    if array.dtype == types.uint16:  # bfloat16: the upper 16 bits of a float32

        def load_bf16(array, i):
            return _bits_to_f32(np.uint32(array[i]) << np.uint32(16))

        return load_bf16
    return lambda array, i: array[i]


@overload(_store)
def _store_impl(array, i, value):
    if array.dtype == types.uint16:

        def store_bf16(array, i, value):
            bits = np.int64(_f32_to_bits(np.float32(value)))
            if (bits & 0x7FFFFFFF) > 0x7F800000:  # NaN stays a (quiet) NaN
                array[i] = np.uint16((bits >> 16) | 0x40)
            else:  # round to nearest, ties to even (what torch's float -> bfloat16 conversion does)
                array[i] = np.uint16(((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) & 0xFFFF)

        return store_bf16

    def store(array, i, value):
        array[i] = value

    return store


@intrinsic
def _fma(typingctx, a, b, c):
    """a * b + c with one rounding: what torch's vectorised CPU kernels compute for ``add(x, alpha=)``
    and ``lerp``, so the fused step rounds as the reference does."""
    if not (a == b == c and isinstance(a, types.Float)):
        return None

    def codegen(context, builder, signature, args):
        kind = args[0].type
        fma = builder.module.declare_intrinsic("llvm.fma", [kind], ir.FunctionType(kind, [kind, kind, kind]))
        return builder.call(fma, args)

    return a(a, b, c), codegen


@_elementwise
def _lerp(start, end, weight, weight_minus_one, half):
    """torch.lerp (ATen Lerp.h lerp_vec): an fma that switches form at weight 0.5 for accuracy."""
    if weight < half:
        return _fma(weight, end - start, start)
    return _fma(weight_minus_one, end - start, end)


@register_jitable
def _increment_steps(steps, step_like):
    """Add 1 to every ``step`` tensor and return the new counts as float64 (the reference's ``.item()``)."""
    counts = np.empty(steps.shape[0])
    for t in range(steps.shape[0]):
        step = _pointer(steps[t], step_like)
        step[0] += 1
        counts[t] = step[0]
    return counts


@register_jitable
def _combine(chunks, partial, n_tensors):
    """Per-tensor sums of per-chunk partial sums (a segmented reduction's second, tiny stage)."""
    sums = np.zeros((n_tensors, partial.shape[1]))
    for c in range(chunks.shape[0]):
        for k in range(partial.shape[1]):
            sums[chunks[c, 0], k] += partial[c, k]
    return sums


# -- threads: a team of torch's OpenMP pool ----------------------------------------------------------


@intrinsic
def _address(typingctx, pointer):
    """void* -> int64 (a parallel body receives its argument block as a void*)."""
    def codegen(context, builder, signature, args):
        return builder.ptrtoint(args[0], ir.IntType(64))

    return types.int64(types.voidptr), codegen


@intrinsic
def _fetch_add(typingctx, address, value):
    """Atomically add ``value`` to the int64 at ``address``; returns the value before (work sharing)."""
    def codegen(context, builder, signature, args):
        counter = builder.inttoptr(args[0], ir.IntType(64).as_pointer())
        return builder.atomic_rmw("add", counter, args[1], "monotonic")

    return types.int64(types.int64, types.int64), codegen


@intrinsic
def _omp_parallel(typingctx, entry, body, data, n_threads):
    """``GOMP_parallel(body, data, n_threads, 0)`` through its address: runs ``body(data)`` on a team of
    ``n_threads`` (the calling thread included) and returns when all are done. Addresses arrive as
    arguments, never as constants, so the machine code stays valid in the on-disk cache."""
    def codegen(context, builder, signature, args):
        i8p, i32 = ir.IntType(8).as_pointer(), ir.IntType(32)
        body_type = ir.FunctionType(ir.VoidType(), [i8p])
        entry_type = ir.FunctionType(ir.VoidType(), [body_type.as_pointer(), i8p, i32, i32])
        function = builder.inttoptr(args[0], entry_type.as_pointer())
        builder.call(function, [builder.inttoptr(args[1], body_type.as_pointer()), builder.inttoptr(args[2], i8p),
                                builder.trunc(args[3], i32), ir.Constant(i32, 0)])
        return context.get_dummy_value()

    return types.void(types.int64, types.int64, types.int64, types.int64), codegen


def _openmp_entry() -> int:
    """Address of ``GOMP_parallel`` in the OpenMP runtime torch runs on, or 0 when there is none.

    torch loads its runtime (libgomp, or LLVM's libomp, which exports the same entry) into the global
    symbol scope on Linux, where the process's own lookup finds it; elsewhere the copy shipped in
    ``torch/lib`` is the one torch loaded (opening a loaded library again returns the same one).
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


OPENMP_ENTRY = _openmp_entry()
# A bucket smaller than this runs on the calling thread: waking the team and sharing out the chunks
# costs more than the second core saves below it (measured in benchmarks/thread_threshold.py).
PARALLEL_FROM = 1 << 16
# A thread takes about this many elements' worth of chunks at a time from the shared counter.
CHUNK_FOR_GRAB = 1 << 16

# The argument block a parallel body receives: the next chunk to take (the shared counter), chunks
# taken at a time, then address and sizes of each table.
_BLOCK = 17
_INT64 = np.empty(1, dtype=np.int64)
_FLOAT64 = np.empty(1, dtype=np.float64)


@register_jitable
def _parallel(pool, which, ptrs, chunks, coef, hp, flags, partial):
    """Run parallel body ``pool[3 + which]`` over every chunk on a team of ``pool[1]`` threads."""
    block = np.empty(_BLOCK, dtype=np.int64)
    block[0], block[1] = 0, pool[2]
    block[2], block[3], block[4] = np.int64(ptrs.ctypes.data), ptrs.shape[0], ptrs.shape[1]
    block[5], block[6] = np.int64(chunks.ctypes.data), chunks.shape[0]
    block[7], block[8], block[9] = np.int64(coef.ctypes.data), coef.shape[0], coef.shape[1]
    block[10], block[11] = np.int64(hp.ctypes.data), hp.shape[0]
    block[12], block[13] = np.int64(flags.ctypes.data), flags.shape[0]
    block[14], block[15], block[16] = np.int64(partial.ctypes.data), partial.shape[0], partial.shape[1]
    _omp_parallel(pool[0], pool[3 + which], np.int64(block.ctypes.data), pool[1])
    return block[0]  # read after the call: keeps the block alive until the team is done


@register_jitable
def _run(chunk, pool, which, ptrs, chunks, coef, hp, flags, partial, like, state_like):
    """Chunk function ``chunk`` over every chunk: by the team of parallel body ``which`` of ``pool``, or
    on the calling thread when the pool has one thread."""
    if pool[1] > 1:
        _parallel(pool, which, ptrs, chunks, coef, hp, flags, partial)
    else:
        for c in range(chunks.shape[0]):
            chunk(c, ptrs, chunks, coef, hp, flags, partial, like, state_like)


def _body_template(data):
    """A parallel body: take ``grab`` chunks at a time from the shared counter until none are left.

    Never compiled as it stands: :func:`_body` gives each copy its own ``_CHUNK`` (the chunk function),
    ``_STORAGE``, ``_STATE`` and ``_COMPUTE`` (arrays typing the param and grad, the state tensors and
    the scalars).
    """
    counter = _address(data)
    block = carray(_pointer(counter, _INT64), _BLOCK)
    ptrs = carray(_pointer(block[2], _INT64), (block[3], block[4]))
    chunks = carray(_pointer(block[5], _INT64), (block[6], 3))
    coef = carray(_pointer(block[7], _COMPUTE), (block[8], block[9]))
    hp = carray(_pointer(block[10], _COMPUTE), block[11])
    flags = carray(_pointer(block[12], _INT64), block[13])
    partial = carray(_pointer(block[14], _FLOAT64), (block[15], block[16]))
    n_chunks, grab = chunks.shape[0], block[1]
    first = _fetch_add(counter, grab)
    while first < n_chunks:
        for c in range(first, min(first + grab, n_chunks)):
            _CHUNK(c, ptrs, chunks, coef, hp, flags, partial, _STORAGE, _STATE)
        first = _fetch_add(counter, grab)


# The compiled bodies themselves, not only their addresses: the machine code lives as long as its
# cfunc object does.
_BODIES: dict[tuple[str, type, type], numba.core.ccallback.CFunc] = {}


def _body(name: str, storage: type, state: type) -> int:
    """Address of the parallel body running chunk function ``name`` on ``storage`` params and grads with
    ``state`` state tensors (compiled once, cached on disk under its own name)."""
    key = (name, storage, state)
    if key not in _BODIES:
        compute = np.float32 if storage is np.uint16 else storage
        scope = dict(globals(), _CHUNK=globals()[name], _STORAGE=np.empty(1, dtype=storage),
                     _STATE=np.empty(1, dtype=state), _COMPUTE=np.empty(1, dtype=compute))
        kinds = np.dtype(storage).name if state is storage else f"{np.dtype(storage).name}_{np.dtype(state).name}"
        function = pytypes.FunctionType(_body_template.__code__, scope, f"body{name}_{kinds}")
        function.__qualname__ = function.__name__  # its own on-disk cache entry
        _BODIES[key] = cfunc(types.void(types.voidptr), cache=True, error_model=_ERRORS)(function)
    return _BODIES[key].address


_SERIAL_POOLS: dict[int, np.ndarray] = {}


def pool(names: tuple[str, ...], storage: type, n_elements: int, n_chunks: int, state: type | None = None) -> np.ndarray:
    """How a kernel runs its passes (chunk functions ``names``, ``state`` the state tensors' storage when
    not ``storage``): ``[GOMP_parallel, threads, chunks per take, body addresses...]``, or one thread
    (``threads == 1``: the kernel loops on the caller)."""
    threads = torch.get_num_threads() if OPENMP_ENTRY and n_elements >= PARALLEL_FROM else 1
    if threads < 2:
        if len(names) not in _SERIAL_POOLS:
            _SERIAL_POOLS[len(names)] = np.array([0, 1, 1] + [0] * len(names), dtype=np.int64)
        return _SERIAL_POOLS[len(names)]
    # takes of ~CHUNK elements each: many small tensors do not pay one atomic per tensor
    grab = max(1, n_chunks * CHUNK_FOR_GRAB // max(n_elements, 1))
    return np.array([OPENMP_ENTRY, threads, grab] + [_body(name, storage, state or storage) for name in names], dtype=np.int64)


@_elementwise
def _param_and_grad(p, g, i, maximize, weight_decay_on, weight_decay):
    """Element ``i``'s parameter and its direction of descent: the gradient, negated to maximize, plus
    L2 weight decay (``torch.add(grad, param, alpha=weight_decay)``: one fma)."""
    pi = _load(p, i)
    gi = _load(g, i)
    if maximize:
        gi = -gi
    if weight_decay_on:
        gi = _fma(pi, weight_decay, gi)
    return pi, gi


# -- SGD / LARS ------------------------------------------------------------------------------------


@_elementwise
def _sgd_chunk(c, ptrs, chunks, coef, hp, flags, partial, like, state_like):
    """SGD. Roles: param, grad, momentum_buffer. ``coef[t] = (1 if the buffer is new else 0, scale)``:
    ``scale`` multiplies the direction (LARS's local learning rate; 1 for plain SGD).
    ``hp = (-lr, weight_decay, momentum, 1 - dampening)``; ``flags = (maximize, weight_decay, momentum,
    nesterov)``."""
    maximize, weight_decay_on, momentum_on, nesterov = flags[0] != 0, flags[1] != 0, flags[2] != 0, flags[3] != 0
    neg_lr, weight_decay, momentum, undampened = hp[0], hp[1], hp[2], hp[3]
    t, lo, hi = chunks[c, 0], chunks[c, 1], chunks[c, 2]
    p, g, b = _pointer(ptrs[0, t], like), _pointer(ptrs[1, t], like), _pointer(ptrs[2, t], state_like)
    new_buffer = coef[t, 0] != 0
    scale = coef[t, 1]
    for i in range(lo, hi):
        pi, gi = _param_and_grad(p, g, i, maximize, weight_decay_on, weight_decay)
        gi = gi * scale
        if momentum_on:
            if new_buffer:
                bi = gi
            else:
                bi = _fma(gi, undampened, _load(b, i) * momentum)
            _store(b, i, bi)
            if nesterov:
                gi = _fma(bi, momentum, gi)
            else:
                gi = bi
        _store(p, i, _fma(gi, neg_lr, pi))


@_reduction
def _norms_chunk(c, ptrs, chunks, coef, hp, flags, partial, like, state_like):
    """LARS's first pass: ``partial[c] = (Σ w², Σ g²)`` over chunk ``c`` (float64 sums)."""
    t, lo, hi = chunks[c, 0], chunks[c, 1], chunks[c, 2]
    p, g = _pointer(ptrs[0, t], like), _pointer(ptrs[1, t], like)
    weight_sq = 0.0
    grad_sq = 0.0
    for i in range(lo, hi):
        pi = np.float64(_load(p, i))
        gi = np.float64(_load(g, i))
        weight_sq += pi * pi
        grad_sq += gi * gi
    partial[c, 0] = weight_sq
    partial[c, 1] = grad_sq


@njit(cache=True, error_model=_ERRORS)
def sgd(pool, ptrs, chunks, coef, hp, flags, like, state_like):
    """SGD over every chunk (see :func:`_sgd_chunk`); ``pool`` from :func:`pool` with ``("_sgd_chunk",)``."""
    partial = np.empty((0, 2))
    _run(_sgd_chunk, pool, 0, ptrs, chunks, coef, hp, flags, partial, like, state_like)


@njit(cache=True, error_model=_ERRORS)
def lars(pool, ptrs, chunks, coef, hp, hp64, flags, like, state_like):
    """LARS: pass 1 sums ‖w‖², ‖g‖² per chunk (reads 2 tensors), then the SGD pass on the scaled direction.

    ``hp``, ``coef[t, 0]`` as :func:`_sgd_chunk`; ``hp64 = (trust_coefficient, weight_decay, eps)``;
    ``flags`` as SGD's plus ``trust_ratio``; ``pool`` with ``("_norms_chunk", "_sgd_chunk")``.
    """
    n_tensors = ptrs.shape[1]
    if flags[4] != 0:
        partial = np.zeros((chunks.shape[0], 2))
        _run(_norms_chunk, pool, 0, ptrs, chunks, coef, hp, flags, partial, like, state_like)
        sums = _combine(chunks, partial, n_tensors)
        trust_coefficient, weight_decay, eps = hp64[0], hp64[1], hp64[2]
        for t in range(n_tensors):
            weight_norm, grad_norm = math.sqrt(sums[t, 0]), math.sqrt(sums[t, 1])
            if weight_norm > 0 and grad_norm > 0:
                coef[t, 1] = trust_coefficient * weight_norm / (grad_norm + weight_decay * weight_norm + eps)
    partial = np.empty((0, 2))
    _run(_sgd_chunk, pool, 1, ptrs, chunks, coef, hp, flags, partial, like, state_like)


# -- Adam / LAMB -----------------------------------------------------------------------------------


@_elementwise
def _adam_moments(p, g, m, v, i, maximize, weight_decay_mode, weight_decay, decay, w1, w1_minus_one, half, beta2, w2):
    """Adam's element ``i`` up to the moments: stores m, v; returns the (decayed) param, m and v."""
    pi = _load(p, i)
    gi = _load(g, i)
    if maximize:
        gi = -gi
    if weight_decay_mode == 1:
        gi = _fma(pi, weight_decay, gi)
    elif weight_decay_mode == 2:
        pi = pi * decay
    mi = _lerp(_load(m, i), gi, w1, w1_minus_one, half)
    vi = _load(v, i) * beta2 + w2 * gi * gi
    _store(m, i, mi)
    _store(v, i, vi)
    return pi, mi, vi


@_elementwise
def _adam_chunk(c, ptrs, chunks, coef, hp, flags, partial, like, state_like):
    """Adam/AdamW. Roles: param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq (amsgrad).

    ``hp = (1-β1, -β1, β2, 1-β2, eps, weight_decay, 1 - lr·weight_decay, 0.5)``; ``coef[t] = (-lr / (1 - β1^t),
    sqrt(1 - β2^t))``; ``flags = (maximize, weight decay mode, amsgrad)``, the mode 0 none, 1 L2 in the
    gradient (Adam), 2 decoupled (AdamW).
    """
    maximize, weight_decay_mode, amsgrad = flags[0] != 0, flags[1], flags[2] != 0
    w1, w1_minus_one, beta2, w2, eps, weight_decay, decay, half = hp[0], hp[1], hp[2], hp[3], hp[4], hp[5], hp[6], hp[7]
    t, lo, hi = chunks[c, 0], chunks[c, 1], chunks[c, 2]
    p, g = _pointer(ptrs[0, t], like), _pointer(ptrs[1, t], like)
    m, v, vmax = _pointer(ptrs[2, t], state_like), _pointer(ptrs[3, t], state_like), _pointer(ptrs[4, t], state_like)
    step_size, correction2_sqrt = coef[t, 0], coef[t, 1]
    # Two loops rather than one with ``if amsgrad`` inside: LLVM unswitches that branch for float32
    # and float64 but not around the bfloat16 store's rounding, and left the bf16 loop scalar (2.7x).
    if amsgrad:
        for i in range(lo, hi):
            pi, mi, vi = _adam_moments(p, g, m, v, i, maximize, weight_decay_mode, weight_decay, decay, w1,
                                       w1_minus_one, half, beta2, w2)
            # torch.maximum propagates a NaN from either side; Python's max would drop one
            previous = _load(vmax, i)
            vi = vi if (vi >= previous or vi != vi) else previous
            _store(vmax, i, vi)
            _store(p, i, pi + step_size * mi / (np.sqrt(vi) / correction2_sqrt + eps))
    else:
        for i in range(lo, hi):
            pi, mi, vi = _adam_moments(p, g, m, v, i, maximize, weight_decay_mode, weight_decay, decay, w1,
                                       w1_minus_one, half, beta2, w2)
            _store(p, i, pi + step_size * mi / (np.sqrt(vi) / correction2_sqrt + eps))


@njit(cache=True, error_model=_ERRORS)
def adam(pool, ptrs, steps, chunks, hp, hp64, flags, like, state_like, step_like):
    """Adam/AdamW over every chunk (see :func:`_adam_chunk`); ``hp64 = (lr, β1, β2)``; ``pool`` with
    ``("_adam_chunk",)``."""
    counts = _increment_steps(steps, step_like)
    coef = np.empty((counts.shape[0], 2), dtype=hp.dtype)
    for t in range(counts.shape[0]):
        coef[t, 0] = -hp64[0] / (1 - hp64[1] ** counts[t])
        coef[t, 1] = math.sqrt(1 - hp64[2] ** counts[t])
    partial = np.empty((0, 2))
    _run(_adam_chunk, pool, 0, ptrs, chunks, coef, hp, flags, partial, like, state_like)


@_reduction
def _lamb_moments_chunk(c, ptrs, chunks, coef, hp, flags, partial, like, state_like):
    """LAMB's first pass. Roles: param, grad, exp_avg, exp_avg_sq. Reads g, m, v (and w), writes m, v,
    and with the trust ratio sums ``partial[c] = (Σ w², Σ r²)``, r the update direction.

    ``hp = (1-β1, -β1, β2, 1-β2, eps, weight_decay, 0.5)``; ``coef[t] = (1 - β1^t, sqrt(1 - β2^t), -lr·ratio)``;
    ``flags = (maximize, weight_decay, trust_ratio)``.
    """
    maximize, weight_decay_on, trust_ratio = flags[0] != 0, flags[1] != 0, flags[2] != 0
    w1, w1_minus_one, beta2, w2, eps, weight_decay, half = hp[0], hp[1], hp[2], hp[3], hp[4], hp[5], hp[6]
    t, lo, hi = chunks[c, 0], chunks[c, 1], chunks[c, 2]
    p, g = _pointer(ptrs[0, t], like), _pointer(ptrs[1, t], like)
    m, v = _pointer(ptrs[2, t], state_like), _pointer(ptrs[3, t], state_like)
    correction1, correction2_sqrt = coef[t, 0], coef[t, 1]
    weight_sq = 0.0
    update_sq = 0.0
    for i in range(lo, hi):
        gi = _load(g, i)
        if maximize:
            gi = -gi
        mi = _lerp(_load(m, i), gi, w1, w1_minus_one, half)
        vi = _load(v, i) * beta2 + w2 * gi * gi
        _store(m, i, mi)
        _store(v, i, vi)
        if trust_ratio:
            # what pass 2 will read back: the stored (possibly bfloat16-rounded) moments
            mi = _load(m, i)
            vi = _load(v, i)
            pi = _load(p, i)
            ri = (mi / correction1) / (np.sqrt(vi) / correction2_sqrt + eps)
            if weight_decay_on:
                ri = _fma(pi, weight_decay, ri)
            weight_sq += np.float64(pi) * np.float64(pi)
            update_sq += np.float64(ri) * np.float64(ri)
    if trust_ratio:
        partial[c, 0] = weight_sq
        partial[c, 1] = update_sq


@_elementwise
def _lamb_update_chunk(c, ptrs, chunks, coef, hp, flags, partial, like, state_like):
    """LAMB's second pass: recomputes r from m, v, w and writes w (see :func:`_lamb_moments_chunk`)."""
    weight_decay_on = flags[1] != 0
    eps, weight_decay = hp[4], hp[5]
    t, lo, hi = chunks[c, 0], chunks[c, 1], chunks[c, 2]
    p = _pointer(ptrs[0, t], like)
    m, v = _pointer(ptrs[2, t], state_like), _pointer(ptrs[3, t], state_like)
    correction1, correction2_sqrt, scale = coef[t, 0], coef[t, 1], coef[t, 2]
    for i in range(lo, hi):
        pi = _load(p, i)
        ri = (_load(m, i) / correction1) / (np.sqrt(_load(v, i)) / correction2_sqrt + eps)
        if weight_decay_on:
            ri = _fma(pi, weight_decay, ri)
        _store(p, i, _fma(ri, scale, pi))


@njit(cache=True, error_model=_ERRORS)
def lamb(pool, ptrs, steps, chunks, hp, hp64, flags, like, state_like, step_like):
    """LAMB in two passes: 40 B/element in float32 (24 + 16), against 28 for Adam, instead of a scratch
    tensor for r. ``hp64 = (lr, β1, β2, bias_correction)``; ``pool`` with ``("_lamb_moments_chunk",
    "_lamb_update_chunk")``.
    """
    counts = _increment_steps(steps, step_like)
    n_tensors = counts.shape[0]
    coef = np.empty((n_tensors, 3), dtype=hp.dtype)
    for t in range(n_tensors):
        if hp64[3] != 0:
            coef[t, 0] = 1 - hp64[1] ** counts[t]
            coef[t, 1] = math.sqrt(1 - hp64[2] ** counts[t])
        else:
            coef[t, 0] = 1.0
            coef[t, 1] = 1.0
        coef[t, 2] = -hp64[0]
    partial = np.zeros((chunks.shape[0], 2))
    _run(_lamb_moments_chunk, pool, 0, ptrs, chunks, coef, hp, flags, partial, like, state_like)
    if flags[2] != 0:
        sums = _combine(chunks, partial, n_tensors)
        for t in range(n_tensors):
            weight_norm, update_norm = math.sqrt(sums[t, 0]), math.sqrt(sums[t, 1])
            if weight_norm > 0 and update_norm > 0:
                coef[t, 2] = -hp64[0] * (weight_norm / update_norm)
    _run(_lamb_update_chunk, pool, 1, ptrs, chunks, coef, hp, flags, partial, like, state_like)


# -- RMSprop / Adagrad -----------------------------------------------------------------------------


@_elementwise
def _rmsprop_square(p, g, sq, i, maximize, weight_decay_on, weight_decay, alpha, w):
    """RMSprop's element ``i`` up to the square average: stores it; returns param, (decayed) grad, average."""
    pi, gi = _param_and_grad(p, g, i, maximize, weight_decay_on, weight_decay)
    si = _load(sq, i) * alpha + w * gi * gi
    _store(sq, i, si)
    return pi, gi, si


@_elementwise
def _rmsprop_chunk(c, ptrs, chunks, coef, hp, flags, partial, like, state_like):
    """RMSprop. Roles: param, grad, square_avg, grad_avg (centered), momentum_buffer (momentum).

    ``hp = (-lr, α, 1-α, eps, weight_decay, momentum, 0.5, -α)``; ``flags = (maximize, weight_decay,
    centered, momentum)``.
    """
    maximize, weight_decay_on, centered, momentum_on = flags[0] != 0, flags[1] != 0, flags[2] != 0, flags[3] != 0
    neg_lr, alpha, w, eps, weight_decay, momentum, half, w_minus_one = hp[0], hp[1], hp[2], hp[3], hp[4], hp[5], hp[6], hp[7]
    t, lo, hi = chunks[c, 0], chunks[c, 1], chunks[c, 2]
    p, g, sq = _pointer(ptrs[0, t], like), _pointer(ptrs[1, t], like), _pointer(ptrs[2, t], state_like)
    ga, b = _pointer(ptrs[3, t], state_like), _pointer(ptrs[4, t], state_like)
    # One loop per (centered, momentum) pair rather than branches in one loop: left to unswitch them,
    # LLVM left plain RMSprop's loop scalar (11 ns/element instead of 0.5) in one build and momentum's
    # in another.
    if centered and momentum_on:
        for i in range(lo, hi):
            pi, gi, si = _rmsprop_square(p, g, sq, i, maximize, weight_decay_on, weight_decay, alpha, w)
            ai = _lerp(_load(ga, i), gi, w, w_minus_one, half)
            _store(ga, i, ai)
            bi = _load(b, i) * momentum + gi / (np.sqrt(si - ai * ai) + eps)
            _store(b, i, bi)
            _store(p, i, _fma(bi, neg_lr, pi))
    elif centered:
        for i in range(lo, hi):
            pi, gi, si = _rmsprop_square(p, g, sq, i, maximize, weight_decay_on, weight_decay, alpha, w)
            ai = _lerp(_load(ga, i), gi, w, w_minus_one, half)
            _store(ga, i, ai)
            _store(p, i, pi + neg_lr * gi / (np.sqrt(si - ai * ai) + eps))
    elif momentum_on:
        for i in range(lo, hi):
            pi, gi, si = _rmsprop_square(p, g, sq, i, maximize, weight_decay_on, weight_decay, alpha, w)
            bi = _load(b, i) * momentum + gi / (np.sqrt(si) + eps)
            _store(b, i, bi)
            _store(p, i, _fma(bi, neg_lr, pi))
    else:
        for i in range(lo, hi):
            pi, gi, si = _rmsprop_square(p, g, sq, i, maximize, weight_decay_on, weight_decay, alpha, w)
            _store(p, i, pi + neg_lr * gi / (np.sqrt(si) + eps))


@njit(cache=True, error_model=_ERRORS)
def rmsprop(pool, ptrs, steps, chunks, hp, flags, like, state_like, step_like):
    """RMSprop over every chunk (see :func:`_rmsprop_chunk`); ``pool`` with ``("_rmsprop_chunk",)``."""
    _increment_steps(steps, step_like)
    coef = np.empty((0, 1), dtype=hp.dtype)
    partial = np.empty((0, 2))
    _run(_rmsprop_chunk, pool, 0, ptrs, chunks, coef, hp, flags, partial, like, state_like)


@_elementwise
def _adagrad_chunk(c, ptrs, chunks, coef, hp, flags, partial, like, state_like):
    """Adagrad (dense). Roles: param, grad, sum. ``hp = (eps, weight_decay)``; ``coef[t, 0]`` = -(decayed lr);
    ``flags = (maximize, weight_decay)``."""
    maximize, weight_decay_on = flags[0] != 0, flags[1] != 0
    eps, weight_decay = hp[0], hp[1]
    t, lo, hi = chunks[c, 0], chunks[c, 1], chunks[c, 2]
    p, g, s = _pointer(ptrs[0, t], like), _pointer(ptrs[1, t], like), _pointer(ptrs[2, t], state_like)
    neg_lr = coef[t, 0]
    for i in range(lo, hi):
        pi, gi = _param_and_grad(p, g, i, maximize, weight_decay_on, weight_decay)
        si = _load(s, i) + gi * gi
        _store(s, i, si)
        _store(p, i, pi + neg_lr * gi / (np.sqrt(si) + eps))


@njit(cache=True, error_model=_ERRORS)
def adagrad(pool, ptrs, steps, chunks, hp, hp64, flags, like, state_like, step_like):
    """Adagrad over every chunk (see :func:`_adagrad_chunk`); ``hp64 = (lr, lr_decay)``; ``pool`` with
    ``("_adagrad_chunk",)``."""
    counts = _increment_steps(steps, step_like)
    coef = np.empty((counts.shape[0], 1), dtype=hp.dtype)
    for t in range(counts.shape[0]):
        coef[t, 0] = -(hp64[0] / (1 + (counts[t] - 1) * hp64[1]))
    partial = np.empty((0, 2))
    _run(_adagrad_chunk, pool, 0, ptrs, chunks, coef, hp, flags, partial, like, state_like)


# -- global gradient norm ----------------------------------------------------------------------------


@_reduction
def _squares_chunk(c, ptrs, chunks, coef, hp, flags, partial, like, state_like):
    """``partial[c, 0] = Σ x²`` over chunk ``c`` of role 0 (float64 accumulation)."""
    t, lo, hi = chunks[c, 0], chunks[c, 1], chunks[c, 2]
    x = _pointer(ptrs[0, t], like)
    total = 0.0
    for i in range(lo, hi):
        xi = np.float64(_load(x, i))
        total += xi * xi
    partial[c, 0] = total


@njit(cache=True, error_model=_ERRORS)
def sum_of_squares(pool, ptrs, chunks, like):
    """Σ x² over every tensor of the table (float64 accumulation): the square of max_grad_norm's global norm,
    in one call however many tensors (torch's foreach norm loops over them on CPU); ``pool`` with
    ``("_squares_chunk",)``."""
    partial = np.zeros((chunks.shape[0], 1))
    coef = np.empty((0, 1), dtype=np.float64)
    hp = np.empty(0, dtype=np.float64)
    flags = np.empty(0, dtype=np.int64)
    _run(_squares_chunk, pool, 0, ptrs, chunks, coef, hp, flags, partial, like, like)
    return partial.sum()
