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
    """Tensors one kernel call updates: ``roles[r][k]`` is role ``r`` (param, grad, states...) of tensor ``k``.

    ``state_pointers``, when known, holds the data addresses of the state roles (``[r, k]``, rows 0 and 1
    unused) and ``step_pointers`` those of the step counters, remembered with the state checks.
    """

    indices: list[int]
    dtype: torch.dtype
    roles: list[list[torch.Tensor | None]]
    steps: list[torch.Tensor]
    numels: list[int]
    state_pointers: np.ndarray | None = None
    step_pointers: np.ndarray | None = None


class _StateChecks:
    """Which state tensors passed :func:`partition`'s checks, and their addresses, remembered by identity.

    State tensors (``exp_avg``, ``sum``, ``step``...) belong to the optimizer and keep their identity,
    storage and layout from step to step; a checkpoint load replaces them with new objects. Checking
    each of them again every step was most of the host time with 2000 small tensors, so the verdicts
    (and the data addresses the kernels need) are kept per list of objects, and dropped as soon as one
    of those objects dies (a dead tensor's ``id`` can be reused by a new one). Parameters and gradients
    are checked every step: ``.data`` assignments (``model.to``, ``model.half``) and ``zero_grad``
    change them.
    """

    def __init__(self) -> None:
        self._entries: dict[tuple, tuple[list[bool], np.ndarray, list[weakref.ref]]] = {}

    def __len__(self) -> int:
        return len(self._entries)

    def verdicts(self, key: tuple, tensors: list[torch.Tensor], check, n: int) -> tuple[list[bool], np.ndarray]:
        """Per parameter (``tensors[k]`` belongs to parameter ``k % n``): did all its state tensors pass
        ``check``; and every tensor's data address. Computed once while all of them live (``key`` names them)."""
        entry = self._entries.get(key)
        if entry is None:
            forget = lambda _, key=key: self._entries.pop(key, None)  # noqa: E731
            passed = [check(k) for k in range(len(tensors))]
            per_param = [all(passed[k::n]) for k in range(n)]
            addresses = np.fromiter((t.data_ptr() for t in tensors), dtype=np.int64, count=len(tensors))
            # the weak references (kept with the entry) call `forget` when a tensor dies
            entry = (per_param, addresses.reshape(-1, n), [weakref.ref(t, forget) for t in tensors])
            self._entries[key] = entry
        return entry[0], entry[1]


_STATE_CHECKS = _StateChecks()
_NONE = id(None)  # among a state list's identities: a buffer the caller has yet to create


def partition(roles: list[list[torch.Tensor | None]], steps: list[torch.Tensor] | None) -> tuple[list[Bucket], list[int]]:
    """Split tensor positions into kernel buckets (one per dtype) and the positions a kernel cannot take.

    ``roles[0]`` are the params, all on one device (the optimizer splits its tensors by device first),
    ``roles[1]`` the grads; an empty role list is an unused state; a ``None`` entry is a state the
    caller will create (SGD's first momentum buffer). A kernel needs, for every role, a dense
    contiguous tensor of the param's dtype, device and size: anything else (a sparse or strided
    gradient, a float16 param, a state loaded in another dtype) goes to the reference path.
    """
    params, grads = roles[0], roles[1]
    n = len(params)
    if not n:
        return [], []
    device = params[0].device
    dtypes = [p.dtype for p in params]
    numels = [p.numel() for p in params]

    # state tensors, role after role, then the step counters: position k belongs to parameter k % n
    state_rows = [r for r in range(2, len(roles)) if roles[r]]
    states = [t for r in state_rows for t in roles[r]] + (list(steps) if steps is not None else [])
    strided = torch.strided

    def check(k: int) -> bool:
        tensor, i = states[k], k % n
        if tensor is None:  # a buffer the caller creates to match its parameter
            return True
        if k >= len(state_rows) * n:  # a step counter
            return tensor.dtype in STEP_DTYPES and tensor.device.type == "cpu" and tensor.numel() == 1
        return (tensor.layout is strided and tensor.dtype is dtypes[i] and tensor.numel() == numels[i]
                and tensor.device == device and tensor.is_contiguous())

    addresses = None
    identities = tuple(map(id, states))
    if not states:
        state_ok = [True] * n
    elif _NONE in identities:  # a buffer about to be created: nothing stable to remember
        passed = [check(k) for k in range(len(states))]
        state_ok = [all(passed[k::n]) for k in range(n)]
    else:  # a verdict depends on the state itself and on its parameter's dtype and size
        key = (identities, tuple(dtypes), tuple(numels), device)
        state_ok, addresses = _STATE_CHECKS.verdicts(key, states, check, n)

    kernel_dtypes = KERNEL_DTYPES
    step_dtypes = [s.dtype for s in steps] if steps is not None else None
    groups: dict[tuple, list[int]] = {}
    fallback = []
    # gradients: torch's .grad setter guarantees dtype, size and device; layout and strides it does not
    for i, (param, grad) in enumerate(zip(params, grads)):
        if (state_ok[i] and dtypes[i] in kernel_dtypes and param.layout is strided and grad.layout is strided
                and param.is_contiguous() and grad.is_contiguous()):
            groups.setdefault((dtypes[i], step_dtypes[i] if step_dtypes else None), []).append(i)
        else:
            fallback.append(i)
    buckets = []
    for (dtype, _), indices in groups.items():
        state_pointers = step_pointers = None
        if len(indices) == n:
            picked = [list(role) if role else [] for role in roles]
            picked_steps = list(steps) if steps is not None else []
            picked_numels = numels
            if addresses is not None:
                state_pointers, step_pointers = _state_pointers(addresses, state_rows, len(roles), steps, slice(None))
        else:
            picked = [[role[i] for i in indices] if role else [] for role in roles]
            picked_steps = [steps[i] for i in indices] if steps is not None else []
            picked_numels = [numels[i] for i in indices]
            if addresses is not None:
                state_pointers, step_pointers = _state_pointers(addresses, state_rows, len(roles), steps, indices)
        buckets.append(Bucket(indices, dtype, picked, picked_steps, picked_numels, state_pointers, step_pointers))
    return buckets, fallback


def _state_pointers(addresses, state_rows, n_roles, steps, columns):
    """Split remembered addresses (state roles' rows, then the steps' row) into a ``[role, tensor]``
    table (rows 0, 1 and unused roles zero) and the steps' addresses, for the bucket's ``columns``."""
    picked = addresses[:, columns]
    table = np.zeros((n_roles, picked.shape[1]), dtype=np.int64)
    table[state_rows] = picked[:len(state_rows)]
    return table, (np.ascontiguousarray(picked[-1]) if steps is not None else None)


def pick(tensors: list, indices: list[int]) -> list:
    """``tensors`` at ``indices`` (an empty list, an unused state, stays empty)."""
    return [tensors[i] for i in indices] if tensors else []


def pointer_table(bucket: Bucket, n_roles: int) -> np.ndarray:
    """int64 ``[role, tensor]`` table of data addresses; 0 for a role the kernel will not touch."""
    roles = bucket.roles
    n = len(roles[0])
    if bucket.state_pointers is not None:  # the states' addresses were remembered with their checks
        table = bucket.state_pointers[:n_roles].copy()
        for r in (0, 1):
            table[r] = np.fromiter((t.data_ptr() for t in roles[r]), dtype=np.int64, count=n)
        return table
    table = np.zeros((n_roles, n), dtype=np.int64)
    for r, role in enumerate(roles[:n_roles]):
        if role:
            table[r] = [t.data_ptr() for t in role]
    return table


def step_pointers(bucket: Bucket) -> np.ndarray:
    """int64 addresses of the bucket's step counters."""
    if bucket.step_pointers is not None:
        return bucket.step_pointers
    return np.fromiter((s.data_ptr() for s in bucket.steps), dtype=np.int64, count=len(bucket.steps))


_CHUNK_CACHE: OrderedDict[bytes, np.ndarray] = OrderedDict()


def chunk_table(tensors: list[torch.Tensor], chunk: int = CHUNK, *, numels: list[int] | None = None) -> np.ndarray:
    """int64 ``[chunk, (tensor, start, stop)]`` cutting every tensor into pieces of at most ``chunk``.

    Depends only on the sizes (``numels``, when the caller has them), so it is cached (a training loop
    asks for the same table every step).
    """
    if numels is None:
        numels = [t.numel() for t in tensors]
    sizes = np.array(numels, dtype=np.int64)
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
