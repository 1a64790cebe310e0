"""numba kernels for CPU tensors: one call updates every tensor of a (dtype) bucket in a single pass.

How tensors reach a kernel: the host builds ``ptrs``, an int64 table ``[role, tensor]`` of
``tensor.data_ptr()`` addresses (role 0 = param, 1 = grad, then the state tensors in the order the
kernel's docstring lists), and ``chunks``, an int64 table ``[chunk, (tensor, start, stop)]`` that cuts
every tensor into pieces of at most ``CHUNK`` elements. The kernel turns an address back into an array
with an ``inttoptr`` intrinsic and ``numba.carray`` (zero-copy), and ``prange``s over the chunks of all
tensors together, so 2000 small tensors cost one call, and one 100M-element tensor still uses every core.

Storage dtypes: float32 and float64 (math in the storage dtype, as torch's for-loop path does), and
bfloat16 stored as uint16 (widened to float32 by a shift, rounded back to nearest-even with integer
operations: bf16 is the upper half of a float32). Scalars arrive in ``hp``, an array of the compute
dtype, so float32 kernels never silently compute in float64.

Per-tensor quantities come from the ``step`` tensors, read and incremented inside the kernel (the
reference does ``steps[i] += 1; t = steps[i].item()``); bias corrections are computed in float64 as
the reference's Python floats are, then rounded to the compute dtype. Layer-wise norms (LARS, LAMB) are
per-chunk partial sums of squares in float64, combined per tensor inside the same call: no host sync.

Compiled on first use, cached on disk (``cache=True``): a second process loads the machine code.
"""

from __future__ import annotations

import math
import os
import threading
import types as pytypes

import numba
import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.extending import intrinsic, overload, register_jitable

# numba's "omp" layer fights torch's own OpenMP threads for the cores (each waits for the other's
# spinning workers: a 2M-element Adam step took 12 ms instead of 1.8 ms on 2 cores). Unless the user
# chose a layer, use numba's own "workqueue" pool; it must not be entered by two threads at once, so
# every kernel call takes LOCK.
if "NUMBA_THREADING_LAYER" not in os.environ:
    from numba.np.ufunc import parallel as _parallel

    if not getattr(_parallel, "_is_initialized", False):
        numba.config.THREADING_LAYER = "workqueue"
LOCK = threading.Lock()

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


@register_jitable
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


# -- SGD / LARS ------------------------------------------------------------------------------------


@njit(parallel=True, cache=True, error_model=_ERRORS)
def sgd(ptrs, chunks, hp, coef, like, maximize, weight_decay_on, momentum_on, nesterov):
    """SGD. Roles: param, grad, momentum_buffer. ``coef[t] = (1 if the buffer is new else 0, scale)``.

    ``scale`` multiplies the direction (LARS's local learning rate; 1 for plain SGD).
    ``hp = (-lr, weight_decay, momentum, 1 - dampening)``.
    """
    neg_lr, weight_decay, momentum, undampened = hp[0], hp[1], hp[2], hp[3]
    for c in prange(chunks.shape[0]):
        t, lo, hi = chunks[c, 0], chunks[c, 1], chunks[c, 2]
        p, g, b = _pointer(ptrs[0, t], like), _pointer(ptrs[1, t], like), _pointer(ptrs[2, t], like)
        new_buffer = coef[t, 0] != 0
        scale = coef[t, 1]
        for i in range(lo, hi):
            pi = _load(p, i)
            gi = _load(g, i)
            if maximize:
                gi = -gi
            if weight_decay_on:
                gi = _fma(pi, weight_decay, gi)
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


@njit(parallel=True, cache=True, fastmath=_REDUCE, error_model=_ERRORS)
def lars(ptrs, chunks, hp, hp64, coef, like, maximize, weight_decay_on, momentum_on, nesterov, trust_ratio):
    """LARS: pass 1 sums ‖w‖², ‖g‖² per chunk (reads 2 tensors), then the SGD pass on the scaled direction.

    ``hp`` as :func:`sgd`; ``hp64 = (trust_coefficient, weight_decay, eps)``; ``coef[t, 0]`` as in :func:`sgd`.
    """
    n_tensors = ptrs.shape[1]
    if trust_ratio:
        partial = np.zeros((chunks.shape[0], 2))
        for c in prange(chunks.shape[0]):
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
        sums = _combine(chunks, partial, n_tensors)
        trust_coefficient, weight_decay, eps = hp64[0], hp64[1], hp64[2]
        for t in range(n_tensors):
            weight_norm, grad_norm = math.sqrt(sums[t, 0]), math.sqrt(sums[t, 1])
            if weight_norm > 0 and grad_norm > 0:
                coef[t, 1] = trust_coefficient * weight_norm / (grad_norm + weight_decay * weight_norm + eps)
    sgd(ptrs, chunks, hp, coef, like, maximize, weight_decay_on, momentum_on, nesterov)


# -- Adam / LAMB -----------------------------------------------------------------------------------


@register_jitable
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


@njit(parallel=True, cache=True, error_model=_ERRORS)
def adam(ptrs, steps, chunks, hp, hp64, like, step_like, maximize, weight_decay_mode, amsgrad):
    """Adam/AdamW. Roles: param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq (amsgrad).

    ``hp = (1-β1, -β1, β2, 1-β2, eps, weight_decay, 1 - lr·weight_decay, 0.5)``; ``hp64 = (lr, β1, β2)``.
    ``weight_decay_mode``: 0 none, 1 L2 in the gradient (Adam), 2 decoupled (AdamW).
    """
    counts = _increment_steps(steps, step_like)
    coef = np.empty((counts.shape[0], 2), dtype=hp.dtype)
    for t in range(counts.shape[0]):
        coef[t, 0] = -hp64[0] / (1 - hp64[1] ** counts[t])
        coef[t, 1] = math.sqrt(1 - hp64[2] ** counts[t])
    w1, w1_minus_one, beta2, w2, eps, weight_decay, decay, half = hp[0], hp[1], hp[2], hp[3], hp[4], hp[5], hp[6], hp[7]
    for c in prange(chunks.shape[0]):
        t, lo, hi = chunks[c, 0], chunks[c, 1], chunks[c, 2]
        p, g = _pointer(ptrs[0, t], like), _pointer(ptrs[1, t], like)
        m, v, vmax = _pointer(ptrs[2, t], like), _pointer(ptrs[3, t], like), _pointer(ptrs[4, t], like)
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


@njit(parallel=True, cache=True, fastmath=_REDUCE, error_model=_ERRORS)
def lamb(ptrs, steps, chunks, hp, hp64, like, step_like, maximize, weight_decay_on, trust_ratio):
    """LAMB in two passes. Roles: param, grad, exp_avg, exp_avg_sq.

    Pass 1 reads g, m, v, w and writes m, v (24 B/element in float32) and sums ‖w‖², ‖r‖² per chunk;
    pass 2 recomputes r from m, v, w and writes w (16 B): 40 B/element, against 28 for Adam, instead
    of a scratch tensor for r. ``hp = (1-β1, -β1, β2, 1-β2, eps, weight_decay, 0.5)``;
    ``hp64 = (lr, β1, β2, bias_correction)``.
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
    w1, w1_minus_one, beta2, w2, eps, weight_decay, half = hp[0], hp[1], hp[2], hp[3], hp[4], hp[5], hp[6]
    partial = np.zeros((chunks.shape[0], 2))
    for c in prange(chunks.shape[0]):
        t, lo, hi = chunks[c, 0], chunks[c, 1], chunks[c, 2]
        p, g = _pointer(ptrs[0, t], like), _pointer(ptrs[1, t], like)
        m, v = _pointer(ptrs[2, t], like), _pointer(ptrs[3, t], like)
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
        partial[c, 0] = weight_sq
        partial[c, 1] = update_sq
    if trust_ratio:
        sums = _combine(chunks, partial, n_tensors)
        for t in range(n_tensors):
            weight_norm, update_norm = math.sqrt(sums[t, 0]), math.sqrt(sums[t, 1])
            if weight_norm > 0 and update_norm > 0:
                coef[t, 2] = -hp64[0] * (weight_norm / update_norm)
    for c in prange(chunks.shape[0]):
        t, lo, hi = chunks[c, 0], chunks[c, 1], chunks[c, 2]
        p = _pointer(ptrs[0, t], like)
        m, v = _pointer(ptrs[2, t], like), _pointer(ptrs[3, t], like)
        correction1, correction2_sqrt, scale = coef[t, 0], coef[t, 1], coef[t, 2]
        for i in range(lo, hi):
            pi = _load(p, i)
            ri = (_load(m, i) / correction1) / (np.sqrt(_load(v, i)) / correction2_sqrt + eps)
            if weight_decay_on:
                ri = _fma(pi, weight_decay, ri)
            _store(p, i, _fma(ri, scale, pi))


# -- RMSprop / Adagrad -----------------------------------------------------------------------------


@njit(parallel=True, cache=True, error_model=_ERRORS)
def rmsprop(ptrs, steps, chunks, hp, like, step_like, maximize, weight_decay_on, centered, momentum_on):
    """RMSprop. Roles: param, grad, square_avg, grad_avg (centered), momentum_buffer (momentum).

    ``hp = (-lr, α, 1-α, eps, weight_decay, momentum, 0.5, -α)``.
    """
    _increment_steps(steps, step_like)
    neg_lr, alpha, w, eps, weight_decay, momentum, half, w_minus_one = hp[0], hp[1], hp[2], hp[3], hp[4], hp[5], hp[6], hp[7]
    for c in prange(chunks.shape[0]):
        t, lo, hi = chunks[c, 0], chunks[c, 1], chunks[c, 2]
        p, g, sq = _pointer(ptrs[0, t], like), _pointer(ptrs[1, t], like), _pointer(ptrs[2, t], like)
        ga, b = _pointer(ptrs[3, t], like), _pointer(ptrs[4, t], like)
        for i in range(lo, hi):
            pi = _load(p, i)
            gi = _load(g, i)
            if maximize:
                gi = -gi
            if weight_decay_on:
                gi = _fma(pi, weight_decay, gi)
            si = _load(sq, i) * alpha + w * gi * gi
            _store(sq, i, si)
            if centered:
                ai = _lerp(_load(ga, i), gi, w, w_minus_one, half)
                _store(ga, i, ai)
                denom = np.sqrt(si - ai * ai) + eps
            else:
                denom = np.sqrt(si) + eps
            if momentum_on:
                bi = _load(b, i) * momentum + gi / denom
                _store(b, i, bi)
                _store(p, i, _fma(bi, neg_lr, pi))
            else:
                _store(p, i, pi + neg_lr * gi / denom)


@njit(parallel=True, cache=True, error_model=_ERRORS)
def adagrad(ptrs, steps, chunks, hp, hp64, like, step_like, maximize, weight_decay_on):
    """Adagrad (dense). Roles: param, grad, sum. ``hp = (eps, weight_decay)``; ``hp64 = (lr, lr_decay)``."""
    counts = _increment_steps(steps, step_like)
    coef = np.empty(counts.shape[0], dtype=hp.dtype)
    for t in range(counts.shape[0]):
        coef[t] = -(hp64[0] / (1 + (counts[t] - 1) * hp64[1]))
    eps, weight_decay = hp[0], hp[1]
    for c in prange(chunks.shape[0]):
        t, lo, hi = chunks[c, 0], chunks[c, 1], chunks[c, 2]
        p, g, s = _pointer(ptrs[0, t], like), _pointer(ptrs[1, t], like), _pointer(ptrs[2, t], like)
        neg_lr = coef[t]
        for i in range(lo, hi):
            pi = _load(p, i)
            gi = _load(g, i)
            if maximize:
                gi = -gi
            if weight_decay_on:
                gi = _fma(pi, weight_decay, gi)
            si = _load(s, i) + gi * gi
            _store(s, i, si)
            _store(p, i, pi + neg_lr * gi / (np.sqrt(si) + eps))


# -- global gradient norm ----------------------------------------------------------------------------


@njit(parallel=True, cache=True, fastmath=_REDUCE, error_model=_ERRORS)
def sum_of_squares(ptrs, chunks, like):
    """Σ x² over every tensor of the table (float64 accumulation): the square of max_grad_norm's global norm,
    in one call however many tensors (torch's foreach norm loops over them on CPU)."""
    partial = np.zeros(chunks.shape[0])
    for c in prange(chunks.shape[0]):
        t, lo, hi = chunks[c, 0], chunks[c, 1], chunks[c, 2]
        x = _pointer(ptrs[0, t], like)
        total = 0.0
        for i in range(lo, hi):
            xi = np.float64(_load(x, i))
            total += xi * xi
        partial[c] = total
    return partial.sum()


# -- serial twins for small buckets ------------------------------------------------------------------
# Entering a parallel region costs ~100 µs on this 2-core machine (the workqueue pool's hand-off),
# against ~0.5 µs for a serial call of the same kernel: a small model (a few tensors, 10k elements)
# stepped 2× slower than the for-loop. Each kernel therefore also exists compiled without
# ``parallel`` (``prange`` then runs as ``range``); :func:`kernel` picks by bucket size.
SERIAL_BELOW = 1 << 18  # elements; past this, two cores repay the hand-off (measured ~200k for Adam)

_PARALLEL = {"sgd": sgd, "lars": lars, "adam": adam, "lamb": lamb, "rmsprop": rmsprop, "adagrad": adagrad,
             "sum_of_squares": sum_of_squares}
# The twins see a copy of this module's globals in which every kernel name means its twin, so the
# serial LARS calls the serial SGD.
_SERIAL_GLOBALS = dict(globals())


def _serial_twin(dispatcher):
    function = dispatcher.py_func
    twin = pytypes.FunctionType(function.__code__, _SERIAL_GLOBALS, function.__name__ + "_serial",
                                function.__defaults__, function.__closure__)
    twin.__qualname__ = function.__qualname__ + "_serial"  # its own on-disk cache entry
    twin.__doc__ = function.__doc__
    flags = {key: dispatcher.targetoptions[key] for key in ("fastmath", "error_model") if key in dispatcher.targetoptions}
    return njit(cache=True, **flags)(twin)


_SERIAL = {name: _serial_twin(dispatcher) for name, dispatcher in _PARALLEL.items()}
_SERIAL_GLOBALS.update(_SERIAL)


def kernel(name: str, n_elements: int):
    """The kernel ``name`` for a bucket of ``n_elements``: serial when small, parallel otherwise."""
    return (_SERIAL if n_elements < SERIAL_BELOW else _PARALLEL)[name]
