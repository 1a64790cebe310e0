"""Host-side bookkeeping shared by the numba and Triton kernels: which tensors a kernel may take, and
the pointer and chunk tables that let one kernel call update many tensors.

No numba or triton import here: this module is loaded by ``import thalweg.kernels``.
"""

from __future__ import annotations

from collections import OrderedDict
import weakref
from dataclasses import dataclass

import numpy as np
import torch

# Chunks of at most 64k elements (apex's multi-tensor size): small enough to balance the cores over a
# few huge tensors, large enough that the per-chunk work dwarfs its bookkeeping.
CHUNK = 1 << 16
KERNEL_DTYPES = (torch.float32, torch.float64, torch.bfloat16)
STEP_DTYPES = (torch.float32, torch.float64)


@dataclass
class Bucket:
    """Tensors one kernel call updates: ``roles[r][k]`` is role ``r`` (param, grad, states...) of tensor ``k``."""

    indices: list[int]
    dtype: torch.dtype
    roles: list[list[torch.Tensor | None]]
    steps: list[torch.Tensor]


class _StateChecks:
    """Which state tensors passed :func:`partition`'s checks, remembered by identity.

    State tensors (``exp_avg``, ``sum``, ``step``...) belong to the optimizer and keep their identity,
    storage and layout from step to step; a checkpoint load replaces them with new objects. Checking
    each of them again every step was most of the host time with 2000 small tensors, so the verdicts
    are kept per list of objects, and dropped as soon as one of those objects dies (a dead tensor's
    ``id`` can be reused by a new one). Parameters and gradients are checked every step: ``.data``
    assignments (``model.to``, ``model.half``) and ``zero_grad`` change them.
    """

    def __init__(self) -> None:
        self._entries: dict[tuple, tuple[list[bool], list[weakref.ref]]] = {}

    def __len__(self) -> int:
        return len(self._entries)

    def verdicts(self, key: tuple, tensors: list[torch.Tensor], check) -> list[bool]:
        """``[check(k) for k]`` for ``tensors``, computed once while all of them live (``key`` names them)."""
        entry = self._entries.get(key)
        if entry is None:
            forget = lambda _, key=key: self._entries.pop(key, None)  # noqa: E731
            # the weak references (kept with the entry) call `forget` when a tensor dies
            entry = ([check(k) for k in range(len(tensors))], [weakref.ref(t, forget) for t in tensors])
            self._entries[key] = entry
        return entry[0]


_STATE_CHECKS = _StateChecks()


def partition(roles: list[list[torch.Tensor | None]], steps: list[torch.Tensor] | None) -> tuple[list[Bucket], list[int]]:
    """Split tensor positions into kernel buckets (one per dtype) and the positions a kernel cannot take.

    ``roles[0]`` are the params, ``roles[1]`` the grads; an empty role list is an unused state; a
    ``None`` entry is a state the caller will create (SGD's first momentum buffer). A kernel needs, for
    every role, a dense contiguous tensor of the param's dtype, device and size: anything else (a
    sparse or strided gradient, a float16 param, a state loaded in another dtype) goes to the
    reference path.
    """
    params = roles[0]
    if not params:
        return [], []
    device = params[0].device
    dtypes = [p.dtype for p in params]
    numels = [p.numel() for p in params]
    strided = torch.strided
    ok = [d in KERNEL_DTYPES and p.layout is strided and p.is_contiguous() and p.device == device
          for p, d in zip(params, dtypes)]
    # gradients: torch's .grad setter guarantees dtype, size and device; layout and strides it does not
    ok = [good and g.layout is strided and g.is_contiguous() for good, g in zip(ok, roles[1])]

    # state tensors, role after role, then the step counters: position k belongs to parameter k % n
    n = len(params)
    state_roles = [role for role in roles[2:] if role]
    states = [t for role in state_roles for t in role] + (list(steps) if steps is not None else [])

    def check(k: int) -> bool:
        tensor, i = states[k], k % n
        if tensor is None:  # a buffer the caller creates to match its parameter
            return True
        if k >= len(state_roles) * n:  # a step counter
            return tensor.dtype in STEP_DTYPES and tensor.device.type == "cpu" and tensor.numel() == 1
        return (tensor.layout is strided and tensor.dtype is dtypes[i] and tensor.numel() == numels[i]
                and tensor.device == device and tensor.is_contiguous())

    if states:
        if any(t is None for t in states):  # a buffer about to be created: nothing stable to remember
            verdicts = [check(k) for k in range(len(states))]
        else:  # a verdict depends on the state itself and on its parameter's dtype and size
            key = (tuple(map(id, states)), tuple(dtypes), tuple(numels), device)
            verdicts = _STATE_CHECKS.verdicts(key, states, check)
        for start in range(0, len(verdicts), n):
            ok = [good and verdict for good, verdict in zip(ok, verdicts[start:start + n])]

    step_dtypes: list[torch.dtype | None] = [s.dtype for s in steps] if steps is not None else [None] * len(params)
    groups: dict[tuple, list[int]] = {}
    fallback = []
    for i, good in enumerate(ok):
        if good:
            groups.setdefault((dtypes[i], step_dtypes[i]), []).append(i)
        else:
            fallback.append(i)
    buckets = []
    for (dtype, _), indices in groups.items():
        if len(indices) == len(params):
            picked = [list(role) if role else [] for role in roles]
            picked_steps = list(steps) if steps is not None else []
        else:
            picked = [[role[i] for i in indices] if role else [] for role in roles]
            picked_steps = [steps[i] for i in indices] if steps is not None else []
        buckets.append(Bucket(indices, dtype, picked, picked_steps))
    return buckets, fallback


def pick(tensors: list, indices: list[int]) -> list:
    """``tensors`` at ``indices`` (an empty list, an unused state, stays empty)."""
    return [tensors[i] for i in indices] if tensors else []


def pointer_table(roles: list[list[torch.Tensor | None]], n_roles: int) -> np.ndarray:
    """int64 ``[role, tensor]`` table of data addresses; 0 for a role the kernel will not touch."""
    n = len(roles[0])
    table = np.zeros((n_roles, n), dtype=np.int64)
    for r, role in enumerate(roles[:n_roles]):
        if role:
            table[r] = [t.data_ptr() for t in role]
    return table


_CHUNK_CACHE: OrderedDict[bytes, np.ndarray] = OrderedDict()


def chunk_table(tensors: list[torch.Tensor], chunk: int = CHUNK) -> np.ndarray:
    """int64 ``[chunk, (tensor, start, stop)]`` cutting every tensor into pieces of at most ``chunk``.

    Depends only on the sizes, so it is cached (a training loop asks for the same table every step).
    """
    sizes = np.fromiter((t.numel() for t in tensors), dtype=np.int64, count=len(tensors))
    key = sizes.tobytes() + chunk.to_bytes(8, "little")
    table = _CHUNK_CACHE.get(key)
    if table is None:
        counts = (sizes + chunk - 1) // chunk
        owner = np.repeat(np.arange(len(sizes), dtype=np.int64), counts)
        first = np.repeat(np.cumsum(counts) - counts, counts)
        start = (np.arange(owner.size, dtype=np.int64) - first) * chunk
        stop = np.minimum(start + chunk, sizes[owner])
        table = np.ascontiguousarray(np.stack([owner, start, stop], axis=1))
        _CHUNK_CACHE[key] = table
        if len(_CHUNK_CACHE) > 64:
            _CHUNK_CACHE.popitem(last=False)
    return table


def chunk_elements(chunks: np.ndarray) -> int:
    """How many elements a chunk table covers."""
    return int(chunks[:, 2].sum() - chunks[:, 1].sum()) if len(chunks) else 0
