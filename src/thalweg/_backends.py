"""Backend registry: which function performs an algorithm's update on a list of tensors.

Every algorithm (``"adam"``, ``"sgd"``, ...) registers one function per backend, all with the same
keyword-only signature, written in the algorithm's own module. Dispatch is a dict lookup, so adding a
backend (the fused kernels live in ``thalweg.kernels``) touches no optimizer's math.

- ``"reference"``: one tensor at a time, reads like the paper; torch.optim's for-loop path.
- ``"foreach"``: all tensors of a (device, dtype) bucket at once through ``torch._foreach_*``.
- ``"fused"``: single-pass kernels (numba on CPU, Triton on CUDA), registered by ``thalweg.kernels``.
- ``"auto"``: the fastest correct path for the device at hand (:func:`auto_backend`).
"""

from __future__ import annotations

import importlib
from collections import defaultdict
from typing import Callable

import torch

BACKENDS = ("auto", "reference", "foreach", "fused")

_REGISTRY: dict[tuple[str, str], Callable[..., None]] = {}


def register(algorithm: str, backend: str) -> Callable[[Callable[..., None]], Callable[..., None]]:
    """Decorator: ``fn`` performs ``algorithm``'s update for ``backend``."""
    if backend not in BACKENDS or backend == "auto":
        raise ValueError(f"backend must be one of {BACKENDS[1:]}, got {backend!r}")

    def decorate(fn: Callable[..., None]) -> Callable[..., None]:
        _REGISTRY[(algorithm, backend)] = fn
        return fn

    return decorate


def fused_unavailable_reason(device: torch.device) -> str | None:
    """Why the fused backend cannot run on ``device`` here, or None when it can."""
    try:
        kernels = importlib.import_module("thalweg.kernels")
    except ImportError as error:  # pragma: no cover - the package ships thalweg.kernels
        return str(error)
    return kernels.unavailable_reason(device)


# SGD's for-loop is already one pass per tensor (a single in-place torch op, vectorised by torch), so on
# CPU the fused kernel only wins where per-tensor dispatch dominates: many small tensors. Measured
# (benchmarks/results/cpu-2026-11-23.md, for-loop vs fused ms): 32 x 1M 6.48 vs 6.45, GPT-small (mean
# 100k elements) 1.03 vs 1.03, 2000 x 1000 5.02 vs 2.42. With a handful of tensors the kernel call's
# fixed cost loses (a 4-tensor MLP after a cache flush: 0.12 vs 0.23 ms per step).
# With momentum the for-loop makes three passes (buffer, then parameter), so fused wins on any sizeable
# model too: 32 x 1M 8.78 vs 6.83, GPT-small 2.15 vs 1.56; only small models keep the for-loop (a
# 235k-parameter MLP: 0.30 vs 0.33 ms after a cache flush, a 4.8k-parameter one: 0.19 vs 0.23).
_SGD_FUSED_BELOW_MEAN_ELEMENTS = 1 << 16
_SGD_FUSED_FROM_TENSORS = 32
_MOMENTUM_FUSED_FROM_ELEMENTS = 1 << 20


def auto_backend(device: torch.device, *, allow_fused: bool = True, algorithm: str | None = None,
                 n_tensors: int | None = None, n_elements: int | None = None, momentum: bool = False) -> str:
    """The backend ``"auto"`` picks for ``n_tensors`` tensors (``n_elements`` in all) of ``algorithm`` on ``device``
    (``momentum``: SGD's momentum is on).

    Fused when its compiler is installed and it is faster for the case (measured in
    ``benchmarks/step_speed.py``); otherwise torch.optim's own default for the device: the for-loop
    on CPU (where ``foreach`` is slower, see NOTES.md) and ``foreach`` elsewhere.
    """
    default = "reference" if device.type == "cpu" else "foreach"
    if not allow_fused or fused_unavailable_reason(device) is not None:
        return default
    if device.type == "cpu" and algorithm == "sgd" and n_tensors and n_elements is not None:
        if momentum:
            fused_wins = n_tensors >= _SGD_FUSED_FROM_TENSORS or n_elements >= _MOMENTUM_FUSED_FROM_ELEMENTS
        else:
            fused_wins = n_tensors >= _SGD_FUSED_FROM_TENSORS and n_elements / n_tensors < _SGD_FUSED_BELOW_MEAN_ELEMENTS
        if not fused_wins:
            return default
    return "fused"


def lookup(algorithm: str, backend: str, device: torch.device) -> Callable[..., None]:
    """The function that runs ``algorithm`` with ``backend`` on ``device``, or a clear error."""
    if backend == "fused":
        reason = fused_unavailable_reason(device)
        if reason is not None:
            raise RuntimeError(f"backend='fused' is not available for {device.type} tensors: {reason}")
    try:
        return _REGISTRY[(algorithm, backend)]
    except KeyError:
        raise RuntimeError(f"no {backend!r} backend is registered for {algorithm!r}") from None


def pick(tensors: list, indices: list[int]) -> list:
    """``tensors`` at ``indices`` (an empty list, an unused state, stays empty)."""
    return [tensors[i] for i in indices] if tensors else []


def group_by_device_and_dtype(tensor_lists: list[list[torch.Tensor]]) -> list[list[list[torch.Tensor]]]:
    """Split parallel tensor lists into buckets whose first list shares one device and dtype.

    ``torch._foreach_*`` needs one device and dtype per call. Returns, per bucket, the same number of
    lists as given, in the original order; an empty list (an unused state, say) stays empty.
    """
    order: dict[tuple[torch.device, torch.dtype], list[int]] = defaultdict(list)
    for index, tensor in enumerate(tensor_lists[0]):
        order[(tensor.device, tensor.dtype)].append(index)
    return [
        [[tensors[i] for i in indices] if tensors else [] for tensors in tensor_lists]
        for indices in order.values()
    ]
