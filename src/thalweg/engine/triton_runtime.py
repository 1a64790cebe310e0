"""What every generated Triton kernel shares: exact bfloat16 loads and stores, the vocabulary, segment sums.

Imported by the generated modules (:mod:`.gpu` writes them); it names no rule. bfloat16 is widened and
rounded with integer operations (round to nearest, ties to even, NaN kept quiet), which gives the same
bits on a GPU and in Triton's interpreter, whose own float32 -> bfloat16 cast truncates. Division and
square root are the IEEE-rounded ones (Triton's default float32 ``/`` is approximate); ``lerp`` is ATen's
(an fma whose form switches at |weight| = 0.5), so CUDA, CPU and the interpreter round alike.
"""

from __future__ import annotations

import triton
import triton.language as tl

from . import codec, rounding


@triton.jit
def load_bf16(pointer, mask):
    """bfloat16 elements widened to float32 by their bits (exact, subnormals included)."""
    x = tl.load(pointer, mask=mask, other=0.0)
    return (x.to(tl.uint16, bitcast=True).to(tl.uint32) << 16).to(tl.float32, bitcast=True)


@triton.jit
def round_bf16(x):
    """``x`` (float32) rounded to the nearest bfloat16, ties to even, returned as float32; NaN stays NaN."""
    bits = x.to(tl.uint32, bitcast=True)
    nearest = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    bits = tl.where((bits & 0x7FFFFFFF) > 0x7F800000, bits | 0x400000, nearest)
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def store_bf16(pointer, x, mask):
    """Store float32 ``x`` as bfloat16 (rounded by :func:`round_bf16`, then its upper half stored exactly)."""
    bits = (round_bf16(x).to(tl.uint32, bitcast=True) >> 16).to(tl.uint16)
    tl.store(pointer, bits.to(tl.bfloat16, bitcast=True), mask=mask)


# -- bfloat16 parameters without float32 master weights (param_update, see thalweg.engine.rounding) -----

MIX1: tl.constexpr = tl.constexpr(rounding.MIX1)
MIX2: tl.constexpr = tl.constexpr(rounding.MIX2)


@triton.jit
def _mix(x):
    """rounding.mix on uint32 values (the products wrap at 32 bits)."""
    x = x ^ (x >> 16)
    x = (x * MIX1).to(tl.uint32)
    x = x ^ (x >> 15)
    x = (x * MIX2).to(tl.uint32)
    return x ^ (x >> 15)


@triton.jit
def store_bf16_stochastic(pointer, x, mask, key, index):
    """Store float32 ``x`` as bfloat16 rounded stochastically: 16 random bits (the hash of ``key`` and the elements'
    flat ``index`` in the whole tensor, int64) added to its bits, the lower half dropped; NaN and infinities to
    nearest (rounding.stochastic)."""
    bits = x.to(tl.uint32, bitcast=True)
    folded = ((index ^ (index >> 32)) & 0xFFFFFFFF).to(tl.uint32)
    noise = _mix(folded ^ key) & 0xFFFF
    up = (bits + noise) >> 16
    nearest = round_bf16(x).to(tl.uint32, bitcast=True) >> 16
    kept = tl.where((bits & 0x7F800000) == 0x7F800000, nearest, up).to(tl.uint16)
    tl.store(pointer, kept.to(tl.bfloat16, bitcast=True), mask=mask)


@triton.jit
def store_bf16_kahan(pointer, comp, x, mask):
    """Store float32 ``x`` as bfloat16 with the compensation buffer ``comp`` (rounding.kahan)."""
    old = load_bf16(pointer, mask)
    total = (x - old) + load_bf16(comp, mask)
    new = round_bf16(old + total)
    store_bf16(comp, total - (new - old), mask)
    store_bf16(pointer, new, mask)


@triton.jit
def lerp(start, end, weight):
    """torch.lerp (ATen's lerp: an fma, the form switching at |weight| = 0.5)."""
    difference = end - start
    return tl.where(tl.abs(weight) < 0.5, tl.fma(weight, difference, start), tl.fma(weight - 1.0, difference, end))


@triton.jit
def sign(x):
    """-1, 0 or 1, and 0 for NaN (as torch.sign)."""
    return tl.where(x > 0, 1.0, tl.where(x < 0, -1.0, 0.0)).to(x.dtype)


@triton.jit
def segment_sums(partial, segments, out, SLOTS: tl.constexpr, SEGMENT_BLOCK: tl.constexpr):
    """One program per tensor: ``out[t, s] = Σ partial[c, s]`` over tensor t's chunks (float64, no atomics:
    the same order every run). ``segments[t] = (first chunk, chunk count)``."""
    t = tl.program_id(0).to(tl.int64)
    first = tl.load(segments + 2 * t)
    count = tl.load(segments + 2 * t + 1)
    for s in tl.static_range(SLOTS):
        total = tl.zeros([SEGMENT_BLOCK], dtype=tl.float64)
        for k in range(first, first + count, SEGMENT_BLOCK):
            ks = k + tl.arange(0, SEGMENT_BLOCK)
            total += tl.load(partial + SLOTS * ks + s, mask=ks < first + count, other=0.0)
        tl.store(out + SLOTS * t + s, tl.sum(total, axis=0))


# -- 8-bit state (see thalweg.engine.codec) -------------------------------------------------------------

QBLOCK: tl.constexpr = tl.constexpr(codec.BLOCK)  # elements per absmax
TINY: tl.constexpr = tl.constexpr(codec.TINY)  # the smallest absmax


@triton.jit
def decode(codes, absmax, table, offs, mask):
    """8-bit state elements at ``offs``: the code's map value times its block's absmax (float32)."""
    code = tl.load(codes + offs, mask=mask, other=0).to(tl.int32)
    return tl.load(table + code) * tl.load(absmax + offs // QBLOCK, mask=mask, other=0.0)


@triton.jit
def encode(codes, absmax, edges, lookup, x, off, offs, stop, BLOCK: tl.constexpr):
    """Store ``x`` (the BLOCK elements from ``off``, a block boundary) as 8-bit state: each block's absmax (at
    least 1e-12), then each element's code: the lookup's count for its float32 bits, plus one past the
    interval's boundary (codec.lookup and codec.boundaries; equal to the nearest map value)."""
    mask = offs < stop
    value = x.to(tl.float32)
    blocks = tl.reshape(tl.where(mask, value, 0.0), (BLOCK // QBLOCK, QBLOCK))
    top = tl.maximum(tl.max(tl.abs(blocks), axis=1), TINY)
    index = off // QBLOCK + tl.arange(0, BLOCK // QBLOCK)
    tl.store(absmax + index, top, mask=index * QBLOCK < stop)
    normalised = tl.reshape(tl.div_rn(blocks, top[:, None]), (BLOCK,))
    entry = tl.load(lookup + ((normalised.to(tl.int32, bitcast=True) >> 16) & 0xFFFF))
    code = entry + (normalised >= tl.load(edges + entry)).to(tl.int32)
    tl.store(codes + offs, code.to(tl.uint8), mask=mask)

