"""The ``backend="fused"`` functions of every algorithm, registered with the same signature as the
reference and foreach backends of the algorithm's own module (``thalweg/optim/<name>.py``).

Each function sorts its tensors into kernel buckets (one per dtype, see :func:`_host.partition`) and
hands the rest — sparse gradients, strided tensors, dtypes without a kernel — to the reference
backend, so every tensor gets the reference's math either way. A bucket goes to the numba kernels on
CPU (:mod:`.numba_cpu`) and to the Triton kernels on CUDA (:mod:`.triton_gpu`), imported on first use.
"""

from __future__ import annotations

import functools
import importlib

import numpy as np
import torch

from .._backends import pick, register
from ..optim.adagrad import adagrad_reference
from ..optim.adam import adam_reference
from ..optim.lamb import lamb_reference
from ..optim.lars import lars_reference
from ..optim.rmsprop import rmsprop_reference
from ..optim.sgd import sgd_reference
from . import _host

_NUMPY = {torch.float32: (np.float32, np.float32), torch.float64: (np.float64, np.float64),
          torch.bfloat16: (np.uint16, np.float32)}  # storage (bfloat16 travels as its bits), compute


def _launcher(device: torch.device):
    """The module that runs buckets on ``device``: CPU glue below, or the Triton module for CUDA."""
    if device.type == "cpu":
        return _Cpu
    return importlib.import_module("thalweg.kernels.triton_gpu")


def _new_buffers(params: list[torch.Tensor], buffers: list[torch.Tensor | None], indices: list[int],
                 dtype: torch.dtype) -> list[bool]:
    """Create the missing momentum buffers (filled by the kernel with the first direction)."""
    new = []
    for k, i in enumerate(indices):
        if buffers[i] is None:
            buffers[i] = torch.empty_like(params[k], dtype=dtype, memory_format=torch.contiguous_format)
            new.append(True)
        else:
            new.append(False)
    return new


def _momentum_buckets(params, grads, momentum_buffers, momentum, reference) -> list[tuple[_host.Bucket, list[bool]]]:
    """Kernel buckets for the momentum algorithms (SGD, LARS), each with its buffer role filled in.

    ``reference(params, grads, momentum_buffers=...)`` updates the tensors a kernel cannot take; the
    buffers it creates are written back. Returns ``(bucket, new)``, ``new[k]`` telling the kernel that
    tensor k's buffer was just created (it takes the first direction).
    """
    buffers = momentum_buffers if momentum != 0 else []
    buckets, fallback = _host.partition([params, grads, buffers], None)
    if fallback:
        sub = pick(buffers, fallback)
        reference(pick(params, fallback), pick(grads, fallback), momentum_buffers=sub)
        for i, buffer in zip(fallback, sub):
            buffers[i] = buffer
    prepared = []
    for bucket in buckets:
        if momentum != 0:
            new = _new_buffers(bucket.roles[0], buffers, bucket.indices, bucket.state_dtype)
            bucket.roles[2] = [buffers[i] for i in bucket.indices]
        else:
            new = [False] * len(bucket.indices)
            bucket.roles[2] = []
        prepared.append((bucket, new))
    return prepared


@register("sgd", "fused")
def sgd_fused(params, grads, *, momentum_buffers, lr, momentum, dampening, weight_decay, nesterov, maximize) -> None:
    """SGD in one pass over param, grad and buffer (12 B/element in float32, 20 with momentum)."""
    options = dict(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay, nesterov=nesterov,
                   maximize=maximize)
    for bucket, new in _momentum_buckets(params, grads, momentum_buffers, momentum,
                                         functools.partial(sgd_reference, **options)):
        _launcher(bucket.roles[0][0].device).sgd(bucket, new=new, scales=None, **options)


@register("lars", "fused")
def lars_fused(params, grads, *, momentum_buffers, lr, momentum, weight_decay, trust_coefficient, eps, nesterov,
               maximize, trust_ratio) -> None:
    """LARS: a norm pass (reads w, g: 8 B/element in float32) then SGD's pass (20 B with momentum)."""
    options = dict(lr=lr, momentum=momentum, weight_decay=weight_decay, trust_coefficient=trust_coefficient, eps=eps,
                   nesterov=nesterov, maximize=maximize, trust_ratio=trust_ratio)
    for bucket, new in _momentum_buckets(params, grads, momentum_buffers, momentum,
                                         functools.partial(lars_reference, **options)):
        _launcher(bucket.roles[0][0].device).lars(bucket, new=new, **options)


@register("adam", "fused")
def adam_fused(params, grads, *, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, lr, beta1, beta2, eps, weight_decay,
               decoupled_weight_decay, amsgrad, maximize) -> None:
    """Adam/AdamW in one pass (28 B/element in float32, 36 with amsgrad)."""
    maxes = max_exp_avg_sqs if amsgrad else []
    buckets, fallback = _host.partition([params, grads, exp_avgs, exp_avg_sqs, maxes], steps)
    if fallback:
        adam_reference(pick(params, fallback), pick(grads, fallback), exp_avgs=pick(exp_avgs, fallback),
                       exp_avg_sqs=pick(exp_avg_sqs, fallback), max_exp_avg_sqs=pick(maxes, fallback),
                       steps=pick(steps, fallback), lr=lr, beta1=beta1, beta2=beta2, eps=eps,
                       weight_decay=weight_decay, decoupled_weight_decay=decoupled_weight_decay, amsgrad=amsgrad,
                       maximize=maximize)
    for bucket in buckets:
        _launcher(bucket.roles[0][0].device).adam(bucket, lr=lr, beta1=beta1, beta2=beta2, eps=eps,
                                                  weight_decay=weight_decay, decoupled=decoupled_weight_decay,
                                                  amsgrad=amsgrad, maximize=maximize)


@register("lamb", "fused")
def lamb_fused(params, grads, *, exp_avgs, exp_avg_sqs, steps, lr, beta1, beta2, eps, weight_decay, bias_correction,
               maximize, trust_ratio) -> None:
    """LAMB in two passes (moments + norms, then the step: 40 B/element in float32; see numba_cpu.lamb)."""
    buckets, fallback = _host.partition([params, grads, exp_avgs, exp_avg_sqs], steps)
    if fallback:
        lamb_reference(pick(params, fallback), pick(grads, fallback), exp_avgs=pick(exp_avgs, fallback),
                       exp_avg_sqs=pick(exp_avg_sqs, fallback), steps=pick(steps, fallback), lr=lr, beta1=beta1,
                       beta2=beta2, eps=eps, weight_decay=weight_decay, bias_correction=bias_correction,
                       maximize=maximize, trust_ratio=trust_ratio)
    for bucket in buckets:
        _launcher(bucket.roles[0][0].device).lamb(bucket, lr=lr, beta1=beta1, beta2=beta2, eps=eps,
                                                  weight_decay=weight_decay, bias_correction=bias_correction,
                                                  maximize=maximize, trust_ratio=trust_ratio)


@register("rmsprop", "fused")
def rmsprop_fused(params, grads, *, square_avgs, grad_avgs, momentum_buffers, steps, lr, alpha, eps, weight_decay,
                  momentum, centered, maximize) -> None:
    """RMSprop in one pass (20 B/element in float32, +8 centred, +8 with momentum)."""
    grad_avgs = grad_avgs if centered else []
    buffers = momentum_buffers if momentum > 0 else []
    buckets, fallback = _host.partition([params, grads, square_avgs, grad_avgs, buffers], steps)
    if fallback:
        rmsprop_reference(pick(params, fallback), pick(grads, fallback), square_avgs=pick(square_avgs, fallback),
                          grad_avgs=pick(grad_avgs, fallback), momentum_buffers=pick(buffers, fallback),
                          steps=pick(steps, fallback), lr=lr, alpha=alpha, eps=eps, weight_decay=weight_decay,
                          momentum=momentum, centered=centered, maximize=maximize)
    for bucket in buckets:
        _launcher(bucket.roles[0][0].device).rmsprop(bucket, lr=lr, alpha=alpha, eps=eps, weight_decay=weight_decay,
                                                     momentum=momentum, centered=centered, maximize=maximize)


@register("adagrad", "fused")
def adagrad_fused(params, grads, *, state_sums, steps, lr, lr_decay, weight_decay, eps, maximize) -> None:
    """Adagrad in one pass over dense tensors (20 B/element in float32); sparse gradients take the reference."""
    buckets, fallback = _host.partition([params, grads, state_sums], steps)
    if fallback:
        adagrad_reference(pick(params, fallback), pick(grads, fallback), state_sums=pick(state_sums, fallback),
                          steps=pick(steps, fallback), lr=lr, lr_decay=lr_decay, weight_decay=weight_decay, eps=eps,
                          maximize=maximize)
    for bucket in buckets:
        _launcher(bucket.roles[0][0].device).adagrad(bucket, lr=lr, lr_decay=lr_decay, weight_decay=weight_decay,
                                                     eps=eps, maximize=maximize)


def grad_sum_of_squares(grads: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[int]]:
    """Σ g² of dense CPU gradients, one numba call per dtype (float64 accumulation).

    Returns the per-dtype sums as 0-d float64 tensors, and the positions a kernel cannot read (strided
    or float16 gradients), which the caller handles with torch's own norm. Gradients only need their
    dtype and strides checked: nothing here writes, and there is no state to match.
    """
    from . import numba_cpu

    by_dtype: dict[torch.dtype, list[int]] = {}
    fallback = []
    for i, grad in enumerate(grads):
        if grad.dtype in _NUMPY and grad.layout is torch.strided and grad.is_contiguous():
            by_dtype.setdefault(grad.dtype, []).append(i)
        else:
            fallback.append(i)
    sums = []
    for dtype, indices in by_dtype.items():
        bucket = [grads[i] for i in indices]
        storage = _NUMPY[dtype][0]
        ptrs = np.fromiter((g.data_ptr() for g in bucket), dtype=np.int64, count=len(bucket)).reshape(1, -1)
        numels = [g.numel() for g in bucket]
        chunks = _host.chunk_table(bucket, numels=numels)
        pool = numba_cpu.pool(("_squares_chunk",), storage, sum(numels), len(chunks))
        total = numba_cpu.sum_of_squares(pool, ptrs, chunks, np.empty(1, dtype=storage))
        sums.append(torch.tensor(total, dtype=torch.float64))
    return sums, fallback


# Both are shared between calls (kernels only read them) and left writable: numba compiles a separate
# version of a kernel for read-only arrays.
@functools.lru_cache(maxsize=None)  # a few dozen combinations at most
def _flags(*switches) -> np.ndarray:
    return np.array(switches, dtype=np.int64)


@functools.lru_cache(maxsize=None)
def _like(dtype: type) -> np.ndarray:
    """A one-element array of ``dtype``: how a kernel is told the element type behind its raw pointers."""
    return np.empty(1, dtype=dtype)


class _Cpu:
    """Launches the numba kernels on a CPU bucket: tables and scalars in, one kernel call out."""

    @staticmethod
    def _prepare(bucket: _host.Bucket, n_roles: int, passes: tuple[str, ...]):
        from . import numba_cpu

        storage, compute = _NUMPY[bucket.dtype]
        state = _NUMPY[bucket.state_dtype][0]
        _host.mark_written(bucket)
        ptrs = _host.pointer_table(bucket, n_roles)
        chunks = bucket.memo.get("cpu chunks")
        if chunks is None:
            chunks = bucket.memo["cpu chunks"] = _host.chunk_table(bucket.roles[0], numels=bucket.numels)
        pool = numba_cpu.pool(passes, storage, sum(bucket.numels), len(chunks), state)
        steps = _host.step_pointers(bucket)
        step_like = _like(np.float64 if bucket.steps and bucket.steps[0].dtype == torch.float64 else np.float32)
        return numba_cpu, pool, compute, (_like(storage), _like(state)), ptrs, chunks, steps, step_like

    @staticmethod
    def sgd(bucket, *, new, scales, lr, momentum, dampening, weight_decay, nesterov, maximize) -> None:
        kernels, pool, compute, like, ptrs, chunks, _, _ = _Cpu._prepare(bucket, 3, ("_sgd_chunk",))
        hp = np.array([-lr, weight_decay, momentum, 1 - dampening], dtype=compute)
        coef = bucket.memo.get("sgd coef") if not any(new) else None  # the kernel only reads it
        if coef is None:
            coef = np.ones((len(bucket.indices), 2), dtype=compute)
            coef[:, 0] = new
            if not any(new):
                bucket.memo["sgd coef"] = coef
        kernels.sgd(pool, ptrs, chunks, coef, hp, _flags(maximize, weight_decay != 0, momentum != 0, nesterov), *like)

    @staticmethod
    def lars(bucket, *, new, lr, momentum, weight_decay, trust_coefficient, eps, nesterov, maximize, trust_ratio) -> None:
        kernels, pool, compute, like, ptrs, chunks, _, _ = _Cpu._prepare(bucket, 3, ("_norms_chunk", "_sgd_chunk"))
        hp = np.array([-lr, weight_decay, momentum, 1.0], dtype=compute)
        hp64 = np.array([trust_coefficient, weight_decay, eps], dtype=np.float64)
        coef = np.ones((len(bucket.indices), 2), dtype=compute)
        coef[:, 0] = new
        flags = _flags(maximize, weight_decay != 0, momentum != 0, nesterov, trust_ratio)
        kernels.lars(pool, ptrs, chunks, coef, hp, hp64, flags, *like)

    @staticmethod
    def adam(bucket, *, lr, beta1, beta2, eps, weight_decay, decoupled, amsgrad, maximize) -> None:
        kernels, pool, compute, like, ptrs, chunks, steps, step_like = _Cpu._prepare(bucket, 5, ("_adam_chunk",))
        w1 = compute(1 - beta1)
        hp = np.array([w1, w1 - compute(1), beta2, 1 - beta2, eps, weight_decay, 1 - lr * weight_decay, 0.5],
                      dtype=compute)
        hp64 = np.array([lr, beta1, beta2], dtype=np.float64)
        mode = 0 if weight_decay == 0 else 2 if decoupled else 1
        kernels.adam(pool, ptrs, steps, chunks, hp, hp64, _flags(maximize, mode, amsgrad), *like, step_like)

    @staticmethod
    def lamb(bucket, *, lr, beta1, beta2, eps, weight_decay, bias_correction, maximize, trust_ratio) -> None:
        kernels, pool, compute, like, ptrs, chunks, steps, step_like = _Cpu._prepare(
            bucket, 4, ("_lamb_moments_chunk", "_lamb_update_chunk"))
        w1 = compute(1 - beta1)
        hp = np.array([w1, w1 - compute(1), beta2, 1 - beta2, eps, weight_decay, 0.5], dtype=compute)
        hp64 = np.array([lr, beta1, beta2, 1.0 if bias_correction else 0.0], dtype=np.float64)
        flags = _flags(maximize, weight_decay != 0, trust_ratio)
        kernels.lamb(pool, ptrs, steps, chunks, hp, hp64, flags, *like, step_like)

    @staticmethod
    def rmsprop(bucket, *, lr, alpha, eps, weight_decay, momentum, centered, maximize) -> None:
        kernels, pool, compute, like, ptrs, chunks, steps, step_like = _Cpu._prepare(bucket, 5, ("_rmsprop_chunk",))
        w = compute(1 - alpha)
        hp = np.array([-lr, alpha, w, eps, weight_decay, momentum, 0.5, w - compute(1)], dtype=compute)
        flags = _flags(maximize, weight_decay != 0, centered, momentum > 0)
        kernels.rmsprop(pool, ptrs, steps, chunks, hp, flags, *like, step_like)

    @staticmethod
    def adagrad(bucket, *, lr, lr_decay, weight_decay, eps, maximize) -> None:
        kernels, pool, compute, like, ptrs, chunks, steps, step_like = _Cpu._prepare(bucket, 3, ("_adagrad_chunk",))
        hp = np.array([eps, weight_decay], dtype=compute)
        hp64 = np.array([lr, lr_decay], dtype=np.float64)
        kernels.adagrad(pool, ptrs, steps, chunks, hp, hp64, _flags(maximize, weight_decay != 0), *like, step_like)
