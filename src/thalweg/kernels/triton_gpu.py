"""Triton kernels for CUDA tensors: one launch updates every tensor of a (dtype) bucket.

The CUDA half of ``backend="fused"`` (the CPU half is :mod:`.numba_cpu`, whose math this mirrors).
How tensors reach a kernel (apex's multi-tensor scheme, with a table instead of kernel arguments):

- ``ptrs``: int64 device table ``[role, tensor]`` of ``data_ptr()`` addresses (role 0 param, 1 grad,
  then the states in the order each kernel lists); a kernel turns an entry back into a typed pointer
  with ``.to(tl.pointer_type(DTYPE))``. Uploaded once and cached while the addresses stay the same.
- ``chunks``: int64 device table ``[chunk, (tensor, start, stop)]`` cutting every tensor into pieces of
  at most :data:`CHUNK` elements; the grid is one program per chunk, so 2000 small tensors are one
  launch and a 4M-element tensor is 256 programs.
- ``sc``: a float64 device array of the step's scalars: the hyper-parameters, then per-tensor values
  (bias corrections differ per tensor, since step counts do) computed on the host in float64 as the
  reference's Python floats are. One host->device copy per step (none when nothing changed).

Variants are ``tl.constexpr`` flags (one compiled kernel per combination used). Math is float32 for
float32/bfloat16/float16 storage and float64 for float64 storage (as torch's for-loop path computes
float64 tensors); every stored value is rounded once to the storage dtype, and later math in the same
pass uses the rounded value, as the reference reads back its (bf16) state tensors. Divisions and
square roots are IEEE-rounded (``div_rn``/``sqrt_rn``: Triton's default float32 ``/`` is approximate).

Layer-wise norms (LARS, LAMB) are a segmented reduction without atomics (deterministic): per-chunk
partial sums of squares, then one program per tensor adds its chunks' partials in float64 and writes
the tensor's scale (LARS's local lr, LAMB's -lr·‖w‖/‖r‖), then the update pass reads it. No host sync.

``step`` tensors are torch's 0-d CPU tensors: incremented on the host once per step (one foreach call),
read with one ``torch.stack``; nothing is read back from the GPU.
"""

from __future__ import annotations

import math
from collections import OrderedDict

import numpy as np
import torch
import triton
import triton.language as tl

from . import _host

# Elements per program. 16k keeps 256M parameters at 16k programs (every SM busy) while a LARS/LAMB
# tensor's partial sums stay few; BLOCK elements are processed per loop iteration (4 warps x 8 floats).
CHUNK = 1 << 14
BLOCK = 1024
NUM_WARPS = 4
SEGMENT_BLOCK = 256  # partial sums read per iteration by the per-tensor reduction

_TL = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16, torch.float64: tl.float64}


# -- memory access and IEEE helpers ----------------------------------------------------------------


@triton.jit
def _pointer(ptrs, role, n, t, DTYPE: tl.constexpr):
    """Role ``role`` of tensor ``t`` as a typed pointer (the int64 address from ``data_ptr()``)."""
    return tl.load(ptrs + role * n + t).to(tl.pointer_type(DTYPE))


@triton.jit
def _load(pointer, offs, mask, COMPUTE: tl.constexpr):
    x = tl.load(pointer + offs, mask=mask, other=0.0)
    if x.dtype == tl.bfloat16:  # widen by bits: exact for subnormals, which the interpreter's cast is not
        y = (x.to(tl.uint16, bitcast=True).to(tl.uint32) << 16).to(tl.float32, bitcast=True)
    else:
        y = x.to(COMPUTE)
    return y


@triton.jit
def _round(x, DTYPE: tl.constexpr):
    """``x`` rounded to the storage dtype (and kept in the compute dtype): what a store then load gives.

    bfloat16 by integer operations, round to nearest even (torch's float -> bfloat16), NaN kept quiet:
    the same bits on CUDA and in Triton's interpreter (whose float -> bfloat16 cast truncates).
    """
    if DTYPE == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        nearest = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        bits = tl.where((bits & 0x7FFFFFFF) > 0x7F800000, bits | 0x400000, nearest)
        y = bits.to(tl.float32, bitcast=True)
    elif DTYPE == tl.float16:
        y = x.to(tl.float16).to(tl.float32)
    else:
        y = x
    return y


@triton.jit
def _store(pointer, offs, x, mask, DTYPE: tl.constexpr):
    """Store an already :func:`_round`-ed value (so the cast below is exact).

    bfloat16 as the upper half of the float32's bits: exact for subnormals too, which Triton's
    interpreter's float32 -> bfloat16 conversion is not.
    """
    if DTYPE == tl.bfloat16:
        bits = (x.to(tl.uint32, bitcast=True) >> 16).to(tl.uint16)
        tl.store(pointer + offs, bits.to(tl.bfloat16, bitcast=True), mask=mask)
    else:
        tl.store(pointer + offs, x.to(DTYPE), mask=mask)


@triton.jit
def _weight_and_gradient(p_ptr, g_ptr, offs, mask, weight_decay, COMPUTE: tl.constexpr, DTYPE: tl.constexpr,
                         MAXIMIZE: tl.constexpr, WEIGHT_DECAY: tl.constexpr):
    """The weight, and the gradient with maximize's sign and the L2 term added (rounded as torch stores it)."""
    p = _load(p_ptr, offs, mask, COMPUTE)
    g = _load(g_ptr, offs, mask, COMPUTE)
    if MAXIMIZE:
        g = -g
    if WEIGHT_DECAY:
        g = _round(g + weight_decay * p, DTYPE)
    return p, g


@triton.jit
def _div(a, b, COMPUTE: tl.constexpr):
    if COMPUTE == tl.float32:
        y = tl.div_rn(a, b)
    else:
        y = a / b
    return y


@triton.jit
def _sqrt(x, COMPUTE: tl.constexpr):
    if COMPUTE == tl.float32:
        y = tl.sqrt_rn(x)
    else:
        y = tl.sqrt(x)
    return y


@triton.jit
def _lerp(start, end, weight, weight_minus_one):
    """torch.lerp (ATen Lerp.h): the form switches at weight 0.5 for accuracy."""
    return tl.where(weight < 0.5, start + weight * (end - start), end + weight_minus_one * (end - start))


@triton.jit
def _chunk(chunks):
    c = tl.program_id(0).to(tl.int64)
    return tl.load(chunks + 3 * c), tl.load(chunks + 3 * c + 1), tl.load(chunks + 3 * c + 2)


# -- SGD / LARS ------------------------------------------------------------------------------------


@triton.jit
def _sgd_kernel(ptrs, n, chunks, sc, scales, DTYPE: tl.constexpr, COMPUTE: tl.constexpr, BLOCK: tl.constexpr,
                MAXIMIZE: tl.constexpr, WEIGHT_DECAY: tl.constexpr, MOMENTUM: tl.constexpr, NESTEROV: tl.constexpr,
                SCALED: tl.constexpr):
    """SGD. Roles: param, grad, momentum_buffer. ``sc = (-lr, weight_decay, momentum, 1 - dampening,
    new[0..n))`` (new: the buffer is fresh and takes the direction); ``scales[t]``: LARS's local lr."""
    t, start, stop = _chunk(chunks)
    p_ptr = _pointer(ptrs, 0, n, t, DTYPE)
    g_ptr = _pointer(ptrs, 1, n, t, DTYPE)
    neg_lr = tl.load(sc).to(COMPUTE)
    weight_decay = tl.load(sc + 1).to(COMPUTE)
    momentum = tl.load(sc + 2).to(COMPUTE)
    undampened = tl.load(sc + 3).to(COMPUTE)
    old = tl.load(sc + 4 + t) == 0  # 0: the buffer holds last step's momentum; 1: it is new (empty)
    if SCALED:
        scale = tl.load(scales + t).to(COMPUTE)
    if MOMENTUM:
        b_ptr = _pointer(ptrs, 2, n, t, DTYPE)
    for off in range(start, stop, BLOCK):
        offs = off + tl.arange(0, BLOCK)
        mask = offs < stop
        p, g = _weight_and_gradient(p_ptr, g_ptr, offs, mask, weight_decay, COMPUTE, DTYPE, MAXIMIZE, WEIGHT_DECAY)
        if SCALED:
            g = _round(g * scale, DTYPE)
        if MOMENTUM:
            b = _load(b_ptr, offs, mask, COMPUTE)  # a new buffer's garbage is discarded by the where
            # torch: a new buffer is a clone of the direction; then buffer·momentum + (1-dampening)·direction
            b = _round(tl.where(old, _round(b * momentum, DTYPE) + undampened * g, g), DTYPE)
            _store(b_ptr, offs, b, mask, DTYPE)
            if NESTEROV:
                g = _round(g + momentum * b, DTYPE)
            else:
                g = b
        _store(p_ptr, offs, _round(p + neg_lr * g, DTYPE), mask, DTYPE)


@triton.jit
def _sum_squares_kernel(ptrs, n, chunks, partial, DTYPE: tl.constexpr, COMPUTE: tl.constexpr, BLOCK: tl.constexpr):
    """LARS pass 1: ``partial[c] = (Σ w², Σ g²)`` over chunk ``c`` (roles param, grad)."""
    t, start, stop = _chunk(chunks)
    p_ptr = _pointer(ptrs, 0, n, t, DTYPE)
    g_ptr = _pointer(ptrs, 1, n, t, DTYPE)
    weight_sq = tl.zeros([BLOCK], dtype=COMPUTE)
    grad_sq = tl.zeros([BLOCK], dtype=COMPUTE)
    for off in range(start, stop, BLOCK):
        offs = off + tl.arange(0, BLOCK)
        mask = offs < stop
        p = _load(p_ptr, offs, mask, COMPUTE)
        g = _load(g_ptr, offs, mask, COMPUTE)
        weight_sq += p * p
        grad_sq += g * g
    c = tl.program_id(0).to(tl.int64)
    tl.store(partial + 2 * c, tl.sum(weight_sq, axis=0).to(tl.float64))
    tl.store(partial + 2 * c + 1, tl.sum(grad_sq, axis=0).to(tl.float64))


@triton.jit
def _segment_kernel(partial, segments, hp, out, LAMB: tl.constexpr, SEGMENT_BLOCK: tl.constexpr):
    """One program per tensor: add its chunks' partial sums (float64), write its scale to ``out[t]``.

    ``segments[t] = (first chunk, chunk count)``. LARS: ``hp = (trust_coefficient, weight_decay, eps)``,
    ``out = trust_coefficient·‖w‖/(‖g‖ + weight_decay·‖w‖ + eps)``, or 1 when a norm is 0.
    LAMB: ``hp = (-lr,)``, ``out = -lr·‖w‖/‖r‖``, or -lr when a norm is 0.
    """
    t = tl.program_id(0).to(tl.int64)
    first = tl.load(segments + 2 * t)
    count = tl.load(segments + 2 * t + 1)
    a = tl.zeros([SEGMENT_BLOCK], dtype=tl.float64)
    b = tl.zeros([SEGMENT_BLOCK], dtype=tl.float64)
    for k in range(first, first + count, SEGMENT_BLOCK):
        ks = k + tl.arange(0, SEGMENT_BLOCK)
        mask = ks < first + count
        a += tl.load(partial + 2 * ks, mask=mask, other=0.0)
        b += tl.load(partial + 2 * ks + 1, mask=mask, other=0.0)
    weight_norm = tl.sqrt(tl.sum(a, axis=0))
    other_norm = tl.sqrt(tl.sum(b, axis=0))
    both = (weight_norm > 0) & (other_norm > 0)
    if LAMB:
        neg_lr = tl.load(hp)
        scale = tl.where(both, neg_lr * (weight_norm / tl.where(both, other_norm, 1.0)), neg_lr)
    else:
        trust, weight_decay, eps = tl.load(hp), tl.load(hp + 1), tl.load(hp + 2)
        denominator = other_norm + weight_decay * weight_norm + eps
        scale = tl.where(both, trust * weight_norm / tl.where(both, denominator, 1.0), 1.0)
    tl.store(out + t, scale)


# -- Adam / LAMB -----------------------------------------------------------------------------------


@triton.jit
def _adam_kernel(ptrs, n, chunks, sc, DTYPE: tl.constexpr, COMPUTE: tl.constexpr, BLOCK: tl.constexpr,
                 MAXIMIZE: tl.constexpr, WEIGHT_DECAY: tl.constexpr, DECOUPLED: tl.constexpr, AMSGRAD: tl.constexpr):
    """Adam/AdamW. Roles: param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq (amsgrad).

    ``sc = (1-β1, β2, 1-β2, eps, weight_decay, 1 - lr·weight_decay, then per tensor
    (-lr/(1-β1^t), sqrt(1-β2^t)))``.
    """
    t, start, stop = _chunk(chunks)
    p_ptr = _pointer(ptrs, 0, n, t, DTYPE)
    g_ptr = _pointer(ptrs, 1, n, t, DTYPE)
    m_ptr = _pointer(ptrs, 2, n, t, DTYPE)
    v_ptr = _pointer(ptrs, 3, n, t, DTYPE)
    w1 = tl.load(sc).to(COMPUTE)
    w1_minus_one = w1 - 1.0
    beta2 = tl.load(sc + 1).to(COMPUTE)
    w2 = tl.load(sc + 2).to(COMPUTE)
    eps = tl.load(sc + 3).to(COMPUTE)
    weight_decay = tl.load(sc + 4).to(COMPUTE)
    decay = tl.load(sc + 5).to(COMPUTE)
    step_size = tl.load(sc + 6 + 2 * t).to(COMPUTE)
    correction2_sqrt = tl.load(sc + 7 + 2 * t).to(COMPUTE)
    if AMSGRAD:
        vmax_ptr = _pointer(ptrs, 4, n, t, DTYPE)
    for off in range(start, stop, BLOCK):
        offs = off + tl.arange(0, BLOCK)
        mask = offs < stop
        p = _load(p_ptr, offs, mask, COMPUTE)
        g = _load(g_ptr, offs, mask, COMPUTE)
        if MAXIMIZE:
            g = -g
        if WEIGHT_DECAY:
            if DECOUPLED:
                p = _round(p * decay, DTYPE)
            else:
                g = _round(g + weight_decay * p, DTYPE)
        m = _round(_lerp(_load(m_ptr, offs, mask, COMPUTE), g, w1, w1_minus_one), DTYPE)
        v = _round(_round(_load(v_ptr, offs, mask, COMPUTE) * beta2, DTYPE) + w2 * g * g, DTYPE)
        _store(m_ptr, offs, m, mask, DTYPE)
        _store(v_ptr, offs, v, mask, DTYPE)
        if AMSGRAD:
            previous = _load(vmax_ptr, offs, mask, COMPUTE)
            v = tl.where((v >= previous) | (v != v), v, previous)  # torch.maximum propagates NaN
            _store(vmax_ptr, offs, v, mask, DTYPE)
        denom = _round(_round(_div(_round(_sqrt(v, COMPUTE), DTYPE), correction2_sqrt, COMPUTE), DTYPE) + eps, DTYPE)
        # torch's CPU addcdiv computes value·m/denom, left to right (CUDA's: value·(m/denom))
        _store(p_ptr, offs, _round(p + _div(step_size * m, denom, COMPUTE), DTYPE), mask, DTYPE)


@triton.jit
def _lamb_kernel(ptrs, n, chunks, sc, scales, partial, DTYPE: tl.constexpr, COMPUTE: tl.constexpr,
                 BLOCK: tl.constexpr, MAXIMIZE: tl.constexpr, WEIGHT_DECAY: tl.constexpr, MOMENTS: tl.constexpr,
                 NORMS: tl.constexpr, APPLY: tl.constexpr):
    """LAMB. Roles: param, grad, exp_avg, exp_avg_sq.

    With the trust ratio: pass 1 (MOMENTS, NORMS) updates m, v and writes ``partial[c] = (Σ w², Σ r²)``;
    pass 2 (APPLY) recomputes r from m, v, w and steps by ``scales[t]`` (-lr·ratio, from
    :func:`_segment_kernel`): 40 B/element in float32 instead of a scratch tensor for r. Without it, one
    pass (MOMENTS, APPLY) at -lr. ``sc = (1-β1, β2, 1-β2, eps, weight_decay, -lr, then per tensor
    (1-β1^t, sqrt(1-β2^t)), or (1, 1) without bias correction)``.
    """
    t, start, stop = _chunk(chunks)
    p_ptr = _pointer(ptrs, 0, n, t, DTYPE)
    g_ptr = _pointer(ptrs, 1, n, t, DTYPE)
    m_ptr = _pointer(ptrs, 2, n, t, DTYPE)
    v_ptr = _pointer(ptrs, 3, n, t, DTYPE)
    w1 = tl.load(sc).to(COMPUTE)
    w1_minus_one = w1 - 1.0
    beta2 = tl.load(sc + 1).to(COMPUTE)
    w2 = tl.load(sc + 2).to(COMPUTE)
    eps = tl.load(sc + 3).to(COMPUTE)
    weight_decay = tl.load(sc + 4).to(COMPUTE)
    if MOMENTS:
        scale = tl.load(sc + 5).to(COMPUTE)  # -lr: the one-pass form (pass 1 does not step)
    else:
        scale = tl.load(scales + t).to(COMPUTE)
    correction1 = tl.load(sc + 6 + 2 * t).to(COMPUTE)
    correction2_sqrt = tl.load(sc + 7 + 2 * t).to(COMPUTE)
    weight_sq = tl.zeros([BLOCK], dtype=COMPUTE)
    update_sq = tl.zeros([BLOCK], dtype=COMPUTE)
    for off in range(start, stop, BLOCK):
        offs = off + tl.arange(0, BLOCK)
        mask = offs < stop
        p = _load(p_ptr, offs, mask, COMPUTE)
        if MOMENTS:
            g = _load(g_ptr, offs, mask, COMPUTE)
            if MAXIMIZE:
                g = -g
            m = _round(_lerp(_load(m_ptr, offs, mask, COMPUTE), g, w1, w1_minus_one), DTYPE)
            v = _round(_round(_load(v_ptr, offs, mask, COMPUTE) * beta2, DTYPE) + w2 * g * g, DTYPE)
            _store(m_ptr, offs, m, mask, DTYPE)
            _store(v_ptr, offs, v, mask, DTYPE)
        else:
            m = _load(m_ptr, offs, mask, COMPUTE)
            v = _load(v_ptr, offs, mask, COMPUTE)
        numerator = _round(_div(m, correction1, COMPUTE), DTYPE)
        denom = _round(_round(_div(_round(_sqrt(v, COMPUTE), DTYPE), correction2_sqrt, COMPUTE), DTYPE) + eps, DTYPE)
        r = _round(_div(numerator, denom, COMPUTE), DTYPE)
        if WEIGHT_DECAY:
            r = _round(r + weight_decay * p, DTYPE)
        if NORMS:
            weight_sq += p * p
            update_sq += tl.where(mask, r * r, 0.0)
        if APPLY:
            _store(p_ptr, offs, _round(p + scale * r, DTYPE), mask, DTYPE)
    if NORMS:
        c = tl.program_id(0).to(tl.int64)
        tl.store(partial + 2 * c, tl.sum(weight_sq, axis=0).to(tl.float64))
        tl.store(partial + 2 * c + 1, tl.sum(update_sq, axis=0).to(tl.float64))


# -- RMSprop / Adagrad -----------------------------------------------------------------------------


@triton.jit
def _rmsprop_kernel(ptrs, n, chunks, sc, DTYPE: tl.constexpr, COMPUTE: tl.constexpr, BLOCK: tl.constexpr,
                    MAXIMIZE: tl.constexpr, WEIGHT_DECAY: tl.constexpr, CENTERED: tl.constexpr,
                    MOMENTUM: tl.constexpr):
    """RMSprop. Roles: param, grad, square_avg, grad_avg (centered), momentum_buffer (momentum).

    ``sc = (-lr, α, 1-α, eps, weight_decay, momentum)``.
    """
    t, start, stop = _chunk(chunks)
    p_ptr = _pointer(ptrs, 0, n, t, DTYPE)
    g_ptr = _pointer(ptrs, 1, n, t, DTYPE)
    s_ptr = _pointer(ptrs, 2, n, t, DTYPE)
    neg_lr = tl.load(sc).to(COMPUTE)
    alpha = tl.load(sc + 1).to(COMPUTE)
    w = tl.load(sc + 2).to(COMPUTE)
    w_minus_one = w - 1.0
    eps = tl.load(sc + 3).to(COMPUTE)
    weight_decay = tl.load(sc + 4).to(COMPUTE)
    momentum = tl.load(sc + 5).to(COMPUTE)
    if CENTERED:
        a_ptr = _pointer(ptrs, 3, n, t, DTYPE)
    if MOMENTUM:
        b_ptr = _pointer(ptrs, 4, n, t, DTYPE)
    for off in range(start, stop, BLOCK):
        offs = off + tl.arange(0, BLOCK)
        mask = offs < stop
        p, g = _weight_and_gradient(p_ptr, g_ptr, offs, mask, weight_decay, COMPUTE, DTYPE, MAXIMIZE, WEIGHT_DECAY)
        s = _round(_round(_load(s_ptr, offs, mask, COMPUTE) * alpha, DTYPE) + w * g * g, DTYPE)
        _store(s_ptr, offs, s, mask, DTYPE)
        if CENTERED:
            a = _round(_lerp(_load(a_ptr, offs, mask, COMPUTE), g, w, w_minus_one), DTYPE)
            _store(a_ptr, offs, a, mask, DTYPE)
            denom = _round(_round(_sqrt(_round(s - a * a, DTYPE), COMPUTE), DTYPE) + eps, DTYPE)
        else:
            denom = _round(_round(_sqrt(s, COMPUTE), DTYPE) + eps, DTYPE)
        if MOMENTUM:
            b = _round(_round(_load(b_ptr, offs, mask, COMPUTE) * momentum, DTYPE) + _div(g, denom, COMPUTE), DTYPE)
            _store(b_ptr, offs, b, mask, DTYPE)
            _store(p_ptr, offs, _round(p + neg_lr * b, DTYPE), mask, DTYPE)
        else:
            _store(p_ptr, offs, _round(p + _div(neg_lr * g, denom, COMPUTE), DTYPE), mask, DTYPE)


@triton.jit
def _adagrad_kernel(ptrs, n, chunks, sc, DTYPE: tl.constexpr, COMPUTE: tl.constexpr, BLOCK: tl.constexpr,
                    MAXIMIZE: tl.constexpr, WEIGHT_DECAY: tl.constexpr):
    """Adagrad (dense). Roles: param, grad, sum. ``sc = (eps, weight_decay, then per tensor
    -lr/(1 + (t-1)·lr_decay))``."""
    t, start, stop = _chunk(chunks)
    p_ptr = _pointer(ptrs, 0, n, t, DTYPE)
    g_ptr = _pointer(ptrs, 1, n, t, DTYPE)
    s_ptr = _pointer(ptrs, 2, n, t, DTYPE)
    eps = tl.load(sc).to(COMPUTE)
    weight_decay = tl.load(sc + 1).to(COMPUTE)
    neg_lr = tl.load(sc + 2 + t).to(COMPUTE)
    for off in range(start, stop, BLOCK):
        offs = off + tl.arange(0, BLOCK)
        mask = offs < stop
        p, g = _weight_and_gradient(p_ptr, g_ptr, offs, mask, weight_decay, COMPUTE, DTYPE, MAXIMIZE, WEIGHT_DECAY)
        s = _round(_load(s_ptr, offs, mask, COMPUTE) + g * g, DTYPE)
        _store(s_ptr, offs, s, mask, DTYPE)
        denom = _round(_round(_sqrt(s, COMPUTE), DTYPE) + eps, DTYPE)
        _store(p_ptr, offs, _round(p + _div(neg_lr * g, denom, COMPUTE), DTYPE), mask, DTYPE)


# -- host side: tables, scalars, launches ------------------------------------------------------------


class _Uploads:
    """Small host arrays copied to a device once and reused while their content is the same (LRU)."""

    def __init__(self, size: int) -> None:
        self._size = size
        self._entries: OrderedDict[tuple, torch.Tensor] = OrderedDict()

    def get(self, key: tuple, make) -> torch.Tensor:
        tensor = self._entries.get(key)
        if tensor is None:
            tensor = self._entries[key] = make()
            if len(self._entries) > self._size:
                self._entries.popitem(last=False)
        else:
            self._entries.move_to_end(key)
        return tensor


_TABLES = _Uploads(64)  # pointer and chunk tables: the same every step of a training loop
_SCALARS = _Uploads(8)  # a step's scalars: unchanged for SGD/RMSprop, new every step for Adam's corrections


def _to_device(array: np.ndarray, device: torch.device) -> torch.Tensor:
    host = torch.from_numpy(np.ascontiguousarray(array))
    if device.type == "cpu":  # Triton's interpreter: the kernel reads host memory directly
        return host.clone()
    # pinned + non_blocking: the copy is queued behind the previous kernels without a host sync; torch's
    # caching host allocator keeps the pinned block alive until the copy has run
    return host.pin_memory().to(device, non_blocking=True)


def _upload(cache: _Uploads, array: np.ndarray, device: torch.device) -> torch.Tensor:
    return cache.get((device, array.dtype.str, array.shape, array.tobytes()), lambda: _to_device(array, device))


def _chunks(bucket: _host.Bucket, device: torch.device):
    """Device chunk table ``[chunk, (tensor, start, stop)]``, per-tensor ``(first chunk, count)``, chunk count."""
    sizes = np.array(bucket.numels, dtype=np.int64)
    key = ("chunks", device, CHUNK, sizes.tobytes())

    def make():
        table = _host.chunk_table(bucket.roles[0], CHUNK, numels=bucket.numels)
        counts = (sizes + CHUNK - 1) // CHUNK
        segments = np.stack([np.cumsum(counts) - counts, counts], axis=1).astype(np.int64)
        return _to_device(table, device), _to_device(segments, device), len(table)

    return _TABLES.get(key, make)


def _prepare(bucket: _host.Bucket, n_roles: int):
    if bucket.state_dtype is not bucket.dtype:  # partition keeps these to CPU buckets; the kernels type every role alike
        raise NotImplementedError(f"the Triton kernels take {bucket.dtype} params with state of the same dtype only, "
                                  f"got {bucket.state_dtype} state")
    params = bucket.roles[0]
    _host.mark_written(bucket)
    device = params[0].device
    ptrs = _upload(_TABLES, _host.pointer_table(bucket, n_roles), device)
    chunks, segments, n_chunks = _chunks(bucket, device)
    storage = _TL[bucket.dtype]
    compute = tl.float64 if bucket.dtype == torch.float64 else tl.float32
    meta = dict(DTYPE=storage, COMPUTE=compute, BLOCK=BLOCK, num_warps=NUM_WARPS)
    return device, ptrs, len(params), chunks, segments, n_chunks, meta


def _advance(steps: list[torch.Tensor]) -> list[float]:
    """Add 1 to every ``step`` (0-d CPU tensors, torch's layout) and return the new counts as floats."""
    torch._foreach_add_(steps, 1)
    return torch.stack(steps).to(torch.float64).tolist()


def _per_count(counts: list[float], fn) -> list:
    """``[fn(t) for t in counts]``, evaluated once per distinct count (usually one) with Python floats,
    so the values are bit for bit the reference's."""
    cache: dict[float, object] = {}
    return [cache[t] if t in cache else cache.setdefault(t, fn(t)) for t in counts]


def _scalars(device: torch.device, head: list[float], per_tensor: list | None = None) -> torch.Tensor:
    values = list(head)
    if per_tensor:
        for row in per_tensor:
            values.extend(row if isinstance(row, tuple) else (row,))
    return _upload(_SCALARS, np.array(values, dtype=np.float64), device)


def _segment_scales(partial, segments, hp, n, device, *, lamb: bool) -> torch.Tensor:
    scales = torch.empty(n, dtype=torch.float64, device=device)
    _segment_kernel[(n,)](partial, segments, hp, scales, LAMB=lamb, SEGMENT_BLOCK=SEGMENT_BLOCK)
    return scales


def sgd(bucket, *, new, scales, lr, momentum, dampening, weight_decay, nesterov, maximize) -> None:
    """Plain SGD (``scales`` must be None: LARS's scales come from :func:`lars`, on the device)."""
    _sgd_launch(bucket, new=new, device_scales=None, lr=lr, momentum=momentum, dampening=dampening,
                weight_decay=weight_decay, nesterov=nesterov, maximize=maximize)


def _sgd_launch(bucket, *, new, device_scales, lr, momentum, dampening, weight_decay, nesterov, maximize, prepared=None):
    device, ptrs, n, chunks, _, n_chunks, meta = prepared or _prepare(bucket, 3)
    if n_chunks == 0:
        return
    sc = _scalars(device, [-lr, weight_decay, momentum, 1 - dampening], [float(flag) for flag in new])
    _sgd_kernel[(n_chunks,)](ptrs, n, chunks, sc, device_scales if device_scales is not None else sc,
                             MAXIMIZE=bool(maximize), WEIGHT_DECAY=weight_decay != 0, MOMENTUM=momentum != 0,
                             NESTEROV=bool(nesterov), SCALED=device_scales is not None, **meta)


def lars(bucket, *, new, lr, momentum, weight_decay, trust_coefficient, eps, nesterov, maximize, trust_ratio) -> None:
    """LARS: per-chunk ‖w‖², ‖g‖², per-tensor local lr (on the device), then SGD's pass on the scaled direction."""
    prepared = _prepare(bucket, 3)
    device, ptrs, n, chunks, segments, n_chunks, meta = prepared
    if n_chunks == 0:
        return
    scales = None
    if trust_ratio:
        partial = torch.empty((n_chunks, 2), dtype=torch.float64, device=device)
        _sum_squares_kernel[(n_chunks,)](ptrs, n, chunks, partial, **meta)
        hp = _scalars(device, [trust_coefficient, weight_decay, eps])
        scales = _segment_scales(partial, segments, hp, n, device, lamb=False)
    _sgd_launch(bucket, new=new, device_scales=scales, lr=lr, momentum=momentum, dampening=0.0,
                weight_decay=weight_decay, nesterov=nesterov, maximize=maximize, prepared=prepared)


def adam(bucket, *, lr, beta1, beta2, eps, weight_decay, decoupled, amsgrad, maximize) -> None:
    counts = _advance(bucket.steps)
    device, ptrs, n, chunks, _, n_chunks, meta = _prepare(bucket, 5)
    if n_chunks == 0:
        return
    per_tensor = _per_count(counts, lambda t: (-lr / (1 - beta1**t), math.sqrt(1 - beta2**t)))
    sc = _scalars(device, [1 - beta1, beta2, 1 - beta2, eps, weight_decay, 1 - lr * weight_decay], per_tensor)
    _adam_kernel[(n_chunks,)](ptrs, n, chunks, sc, MAXIMIZE=bool(maximize), WEIGHT_DECAY=weight_decay != 0,
                              DECOUPLED=bool(decoupled), AMSGRAD=bool(amsgrad), **meta)


def lamb(bucket, *, lr, beta1, beta2, eps, weight_decay, bias_correction, maximize, trust_ratio) -> None:
    counts = _advance(bucket.steps)
    device, ptrs, n, chunks, segments, n_chunks, meta = _prepare(bucket, 4)
    if n_chunks == 0:
        return
    if bias_correction:
        per_tensor = _per_count(counts, lambda t: (1 - beta1**t, math.sqrt(1 - beta2**t)))
    else:
        per_tensor = [(1.0, 1.0)] * n
    sc = _scalars(device, [1 - beta1, beta2, 1 - beta2, eps, weight_decay, -lr], per_tensor)
    flags = dict(MAXIMIZE=bool(maximize), WEIGHT_DECAY=weight_decay != 0, **meta)
    if not trust_ratio:  # one pass: moments, then the step at -lr
        _lamb_kernel[(n_chunks,)](ptrs, n, chunks, sc, sc, sc, MOMENTS=True, NORMS=False, APPLY=True, **flags)
        return
    partial = torch.empty((n_chunks, 2), dtype=torch.float64, device=device)
    _lamb_kernel[(n_chunks,)](ptrs, n, chunks, sc, sc, partial, MOMENTS=True, NORMS=True, APPLY=False, **flags)
    scales = _segment_scales(partial, segments, sc[5:], n, device, lamb=True)
    _lamb_kernel[(n_chunks,)](ptrs, n, chunks, sc, scales, partial, MOMENTS=False, NORMS=False, APPLY=True, **flags)


def rmsprop(bucket, *, lr, alpha, eps, weight_decay, momentum, centered, maximize) -> None:
    _advance(bucket.steps)
    device, ptrs, n, chunks, _, n_chunks, meta = _prepare(bucket, 5)
    if n_chunks == 0:
        return
    sc = _scalars(device, [-lr, alpha, 1 - alpha, eps, weight_decay, momentum])
    _rmsprop_kernel[(n_chunks,)](ptrs, n, chunks, sc, MAXIMIZE=bool(maximize), WEIGHT_DECAY=weight_decay != 0,
                                 CENTERED=bool(centered), MOMENTUM=momentum > 0, **meta)


def adagrad(bucket, *, lr, lr_decay, weight_decay, eps, maximize) -> None:
    counts = _advance(bucket.steps)
    device, ptrs, n, chunks, _, n_chunks, meta = _prepare(bucket, 3)
    if n_chunks == 0:
        return
    per_tensor = _per_count(counts, lambda t: -(lr / (1 + (t - 1) * lr_decay)))
    sc = _scalars(device, [eps, weight_decay], per_tensor)
    _adagrad_kernel[(n_chunks,)](ptrs, n, chunks, sc, MAXIMIZE=bool(maximize), WEIGHT_DECAY=weight_decay != 0, **meta)
