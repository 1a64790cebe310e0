"""What every generated CPU kernel shares: typed raw-pointer access, bfloat16, the vocabulary, threads.

Imported by the generated modules (:mod:`.cpu` writes them) and compiled into them; it names no rule.

How a kernel reaches tensors: the host builds ``ptrs``, an int64 table ``[role, tensor]`` of
``data_ptr()`` addresses, and ``chunks``, an int64 table ``[chunk, (tensor, start, stop)]`` cutting every
tensor into pieces of at most 64k elements. A kernel is one parallel *body*: a function of a pointer to
an argument block, which takes chunks from a shared atomic counter until none are left. The host runs
it on the calling thread (small buckets: a direct call) or on a team of torch's own OpenMP pool through
``GOMP_parallel`` (see :func:`openmp_entry`), so 2000 small tensors cost one call and one 100M-element
tensor still uses every core.

Storage dtypes: float32 and float64 (math in the storage dtype, as torch's for-loop path does), and
bfloat16 stored as uint16: widened to float32 by a shift, rounded back to nearest-even with integer
operations (bfloat16 is the upper half of a float32). State tensors are typed apart from the parameter,
so bfloat16 parameters may keep float32 state (``state_dtype=torch.float32``).

Floating-point: elementwise math is IEEE (no fast-math, no contraction into fused multiply-adds), so a
kernel computes what the rule's torch ops compute; only the per-tensor sums of squares reassociate
(:func:`_accumulate`), which is what lets LLVM vectorise them. numba's "numpy" error model divides as
IEEE does (x/0 is ±inf or nan, as in torch): its default model tests every divisor for zero, and that
branch alone kept LLVM from vectorising any loop that divides (a serial Adam step on 32M float32
elements took 94 ms, 16 ms without it).
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import types
from numba.extending import intrinsic, overload, register_jitable

ERROR_MODEL = "numpy"
_jit = register_jitable(error_model=ERROR_MODEL)

I64 = np.empty(1, dtype=np.int64)  # typing dummies: a pointer to their element type
F64 = np.empty(1, dtype=np.float64)
BLOCK = 17  # the argument block's length (see cpu.launch)

# -- memory ------------------------------------------------------------------------------------------


@intrinsic
def pointer(typingctx, address, like):
    """int64 address -> pointer to ``like``'s element type (what torch's ``data_ptr()`` needs)."""
    if not isinstance(like, types.Array):
        return None
    pointer_type = types.CPointer(like.dtype)

    def codegen(context, builder, signature, args):
        return builder.inttoptr(args[0], context.get_value_type(pointer_type))

    return pointer_type(types.int64, like), codegen


@intrinsic
def address(typingctx, void_pointer):
    """void* -> int64 (a parallel body receives its argument block as a void*)."""
    def codegen(context, builder, signature, args):
        return builder.ptrtoint(args[0], ir.IntType(64))

    return types.int64(types.voidptr), codegen


@intrinsic
def fetch_add(typingctx, counter, value):
    """Atomically add ``value`` to the int64 at address ``counter``; returns the value before (work sharing)."""
    def codegen(context, builder, signature, args):
        target = builder.inttoptr(args[0], ir.IntType(64).as_pointer())
        return builder.atomic_rmw("add", target, args[1], "monotonic")

    return types.int64(types.int64, types.int64), codegen


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


def load(array, i):  # pragma: no cover - replaced by its overload inside kernels
    """Element ``i`` in the compute dtype (bfloat16 widened to float32)."""
    raise NotImplementedError


def store(array, i, value):  # pragma: no cover - replaced by its overload inside kernels
    """Store ``value`` rounded to the storage dtype (bfloat16: to nearest, ties to even, as torch)."""
    raise NotImplementedError


def round_to(array, value):  # pragma: no cover - replaced by its overload inside kernels
    """``value`` as storing it into ``array`` and loading it back gives (what the reference reads back)."""
    raise NotImplementedError


@overload(load)
def _load_impl(array, i):
    if array.dtype == types.uint16:  # bfloat16: the upper 16 bits of a float32

        def load_bf16(array, i):
            return _bits_to_f32(np.uint32(array[i]) << np.uint32(16))

        return load_bf16
    return lambda array, i: array[i]


@_jit
def _bf16_bits(value):
    bits = np.int64(_f32_to_bits(np.float32(value)))
    if (bits & 0x7FFFFFFF) > 0x7F800000:  # NaN stays a (quiet) NaN
        return np.uint16((bits >> 16) | 0x40)
    return np.uint16(((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) & 0xFFFF)  # nearest, ties to even


@overload(store)
def _store_impl(array, i, value):
    if array.dtype == types.uint16:

        def store_bf16(array, i, value):
            array[i] = _bf16_bits(value)

        return store_bf16

    def store_plain(array, i, value):
        array[i] = value

    return store_plain


@overload(round_to)
def _round_to_impl(array, value):
    if array.dtype == types.uint16:
        return lambda array, value: _bits_to_f32(np.uint32(_bf16_bits(value)) << np.uint32(16))
    return lambda array, value: value


# -- bfloat16 parameters without float32 master weights (param_update, see thalweg.engine.rounding) -----

def _rounding_constants():
    from .rounding import MIX1, MIX2

    return np.uint32(MIX1), np.uint32(MIX2)


_MIX1, _MIX2 = _rounding_constants()
_U16, _U15 = np.uint32(16), np.uint32(15)


@_jit
def _mix(x):
    """rounding.mix on a uint32 (numba widens integer arithmetic to 64 bits: each result is cut back)."""
    x = np.uint32(x ^ (x >> _U16))
    x = np.uint32(x * _MIX1)
    x = np.uint32(x ^ (x >> _U15))
    x = np.uint32(x * _MIX2)
    return np.uint32(x ^ (x >> _U15))


@_jit
def store_stochastic(array, i, value, key, index):
    """Store float32 ``value`` into bfloat16 ``array[i]`` rounded stochastically: 16 random bits (the hash of
    ``key`` and the element's flat ``index`` in the whole tensor) added to its bits, the lower half dropped;
    NaN and infinities to nearest (rounding.stochastic)."""
    bits = _f32_to_bits(np.float32(value))
    if (bits & np.uint32(0x7F800000)) == np.uint32(0x7F800000):
        array[i] = _bf16_bits(value)
        return
    folded = np.uint32((index ^ (index >> 32)) & 0xFFFFFFFF)
    noise = _mix(folded ^ np.uint32(key)) & np.uint32(0xFFFF)
    array[i] = np.uint16((bits + noise) >> _U16)


@_jit
def store_kahan(array, comp, i, value):
    """Store float32 ``value`` into bfloat16 ``array[i]`` with the compensation ``comp[i]`` (rounding.kahan)."""
    old = _bits_to_f32(np.uint32(array[i]) << _U16)
    total = (np.float32(value) - old) + _bits_to_f32(np.uint32(comp[i]) << _U16)
    bits = _bf16_bits(old + total)
    new = _bits_to_f32(np.uint32(bits) << _U16)
    comp[i] = _bf16_bits(total - (new - old))
    array[i] = bits


# -- the vocabulary -----------------------------------------------------------------------------------


@intrinsic
def _fma(typingctx, a, b, c):
    """a * b + c with one rounding (what ATen's vectorised lerp computes)."""
    if not (a == b == c and isinstance(a, types.Float)):
        return None

    def codegen(context, builder, signature, args):
        kind = args[0].type
        fma = builder.module.declare_intrinsic("llvm.fma", [kind], ir.FunctionType(kind, [kind, kind, kind]))
        return builder.call(fma, args)

    return a(a, b, c), codegen


def lerp(start, end, weight):  # pragma: no cover - replaced by its overload
    raise NotImplementedError


def _typed(numba_type, value):
    """``value`` as a numpy scalar of ``numba_type`` (a constant that keeps float32 math in float32)."""
    return np.dtype(str(numba_type)).type(value)


@overload(lerp)
def _lerp_impl(start, end, weight):
    one, half = _typed(weight, 1), _typed(weight, 0.5)

    def impl(start, end, weight):
        # ATen's lerp_vec: an fma whose form switches at |weight| = 0.5 (exact at both ends)
        if abs(weight) < half:
            return _fma(weight, end - start, start)
        return _fma(weight - one, end - start, end)

    return impl


def sign(x):  # pragma: no cover - replaced by its overload
    raise NotImplementedError


@overload(sign)
def _sign_impl(x):
    one, zero = _typed(x, 1), _typed(x, 0)

    def impl(x):
        return one if x > zero else (-one if x < zero else zero)  # 0 for NaN, as torch.sign

    return impl


@_jit
def maximum(a, b):
    """torch.maximum: NaN if either side is NaN."""
    return a if (a >= b or a != a) else b


@_jit
def minimum(a, b):
    """torch.minimum: NaN if either side is NaN."""
    return a if (a <= b or a != a) else b


@_jit
def square(x):
    return x * x


sqrt = np.sqrt  # IEEE-rounded in numba


@register_jitable(fastmath={"reassoc", "nsz"}, error_model=ERROR_MODEL)
def accumulate(total, x):
    """``total + x²`` in float64, free to reassociate (so the loop over a chunk vectorises); only these
    instructions carry the flag, the elementwise math around them stays IEEE."""
    wide = np.float64(x)
    return total + wide * wide


# -- 8-bit state (see thalweg.engine.codec) -------------------------------------------------------------

F32 = np.empty(1, dtype=np.float32)  # typing dummies: absmax and codes
Q = np.empty(1, dtype=np.uint8)
_HALF = np.float32(0.5)


def _maps():
    from .codec import BLOCK, LOOKUP_SHIFT, TINY, boundaries, dynamic_map, lookup  # (torch is loaded wherever
    # kernels are made)

    return (dynamic_map(True).numpy(), dynamic_map(False).numpy(), boundaries(True), boundaries(False), lookup(True),
            lookup(False), np.uint32(LOOKUP_SHIFT), BLOCK, np.float32(TINY))


# global arrays: numba compiles them in as constants
# (QBLOCK: elements per absmax, codec.BLOCK; _TINY: the smallest absmax, codec.TINY)
SIGNED, UNSIGNED, SIGNED_EDGES, UNSIGNED_EDGES, SIGNED_LOOKUP, UNSIGNED_LOOKUP, _LOOKUP_SHIFT, QBLOCK, _TINY = _maps()


def decode(like, table, codes, i, scale):  # pragma: no cover - replaced by its overload inside kernels
    """Element ``i`` of an 8-bit state: its code's map value times its block's absmax, in float32, then in
    ``like``'s dtype (the compute dtype: float64 for float64 parameters, exactly)."""
    raise NotImplementedError


@overload(decode)
def _decode_impl(like, table, codes, i, scale):
    if like.dtype == types.float64:
        return lambda like, table, codes, i, scale: np.float64(table[codes[i]] * scale)
    return lambda like, table, codes, i, scale: table[codes[i]] * scale


def widen(like, x):  # pragma: no cover - replaced by its overload inside kernels
    """float32 ``x`` in ``like``'s dtype (the compute dtype: float64 for float64 parameters, exactly)."""
    raise NotImplementedError


@overload(widen)
def _widen_impl(like, x):
    if like.dtype == types.float64:
        return lambda like, x: np.float64(x)
    return lambda like, x: x


@_jit
def magnitude_bits(x):
    """The bits of |x| (float32) as an unsigned integer: they order magnitudes as the floats do, with every NaN
    above infinity — so an integer maximum over a block (which LLVM vectorises) is its absmax, NaN if any is
    (as torch's amax)."""
    return _f32_to_bits(np.float32(x)) & np.uint32(0x7FFFFFFF)


@_jit
def from_bits(bits):
    return _bits_to_f32(np.uint32(bits))


@_jit
def largest(top):
    """A block's absmax as stored: at least 1e-12 (an all-zero block), NaN kept (torch's clamp_min)."""
    return top if (top >= _TINY or top != top) else _TINY


@_jit
def encode(edges, lookup, x):
    """The code of ``x`` (float32 in [-1, 1]): the number of the map's boundaries at or below it (see
    codec.boundaries), that is its interval's count plus one past the interval's boundary. Equals
    codec._nearest (the nearest map value, a tie to the larger), without a search or a branch."""
    code = np.int64(lookup[_f32_to_bits(x) >> _LOOKUP_SHIFT])
    return np.uint8(code + np.int64(x >= edges[code]))
