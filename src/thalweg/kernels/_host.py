"""Host-side bookkeeping shared by the numba and Triton kernels: which tensors a kernel may take, and
the pointer and chunk tables that let one kernel call update many tensors.

No numba or triton import here: this module is loaded by ``import thalweg.kernels``.
"""

from __future__ import annotations

from collections import OrderedDict
import itertools
import operator
import weakref
from dataclasses import dataclass, field

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

    ``dtype`` is the params' and grads' dtype, ``state_dtype`` the state tensors' (float32 for bfloat16
    params with ``state_dtype=torch.float32`` on CPU, else ``dtype``). ``pointers``, when known, is the
    ``[role, tensor]`` table of data addresses (0 for an unused role), and ``step_pointers`` those of
    the step counters. ``memo`` keeps what a launcher derives from the sizes alone (its chunk table)
    for as long as the layout behind the bucket is remembered.
    """

    indices: list[int]
    dtype: torch.dtype
    state_dtype: torch.dtype
    roles: list[list[torch.Tensor | None]]
    steps: list[torch.Tensor]
    numels: list[int]
    pointers: np.ndarray | None = None
    step_pointers: np.ndarray | None = None
    memo: dict = field(default_factory=dict)


@dataclass
class _Group:
    """Parameters of one dtype (and state and step dtype) whose params and states a kernel can take."""

    dtype: torch.dtype
    state_dtype: torch.dtype
    indices: list[int]
    numels: list[int]
    pointers: np.ndarray  # [role, tensor]: the states' rows filled, the param and grad rows filled per step
    step_pointers: np.ndarray | None
    memo: dict = field(default_factory=dict)


@dataclass
class _Layout:
    """What :func:`partition` found out about a list of parameters and their state tensors.

    Everything here holds as long as the same tensor objects keep the same storage: the ``key`` (the
    tensors' identities) says the objects are the same, and ``param_pointers`` is compared every step
    because a ``.data`` assignment (``model.to``, ``model.half``) gives a parameter new storage, maybe
    of another dtype or size. State tensors belong to the optimizer and are only ever replaced, never
    re-pointed (a checkpoint load makes new objects). Gradients are not in it: ``zero_grad`` makes new
    ones every step, so they are checked every step.
    """

    param_pointers: np.ndarray
    dtypes: list[torch.dtype]
    numels: list[int]
    groups: list[_Group]
    fallback: list[int]  # parameters whose param or state a kernel cannot take


class _Layouts:
    """Layouts by the identities of the tensors they describe, each forgotten as soon as one of those
    tensors dies (a dead tensor's ``id`` can be reused by a new one)."""

    def __init__(self) -> None:
        self._entries: dict[tuple, tuple[_Layout, list[weakref.ref]]] = {}

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: tuple) -> _Layout | None:
        entry = self._entries.get(key)
        return None if entry is None else entry[0]

    def put(self, key: tuple, layout: _Layout, tensors) -> None:
        forget = lambda _, key=key: self._entries.pop(key, None)  # noqa: E731
        # the weak references (kept with the entry) call `forget` when a tensor dies
        self._entries[key] = (layout, [weakref.ref(t, forget) for t in tensors])


_LAYOUTS = _Layouts()
_NONE = id(None)  # among the tensors' identities: a buffer the caller has yet to create
_DATA_PTR = torch.Tensor.data_ptr
_IS_CONTIGUOUS = torch.Tensor.is_contiguous
_NUMEL = torch.Tensor.numel
_LAYOUT_OF = operator.attrgetter("layout")
_DTYPE_OF = operator.attrgetter("dtype")


def _layout(params, states, *, state_rows, n_roles, steps, param_pointers) -> _Layout:
    """Check every parameter and state tensor: which a kernel can take, grouped by dtype, with their addresses.

    A kernel needs, for every role, a dense contiguous tensor of the param's device and size, and of
    its dtype — or, on CPU, float32 state for a bfloat16 param (``state_dtype=torch.float32``): the
    numba kernels type the state roles separately, the Triton ones do not. Anything else (a float16
    param, a state loaded in another dtype or layout) goes to the reference path.
    """
    n, n_states = len(params), len(state_rows) * len(params)
    device = params[0].device
    dtypes = list(map(_DTYPE_OF, params))
    numels = list(map(_NUMEL, params))
    strided = torch.strided
    # each param's state dtype: that of its first state tensor (None: a buffer the caller creates)
    state_dtypes = list(dtypes)
    for k in reversed(range(n_states)):
        if states[k] is not None:
            state_dtypes[k % n] = states[k].dtype
    float32_state_ok = device.type == "cpu"  # for bfloat16 params: the numba kernels type state roles apart

    def state_ok(tensor, i: int) -> bool:
        return tensor is None or (
            tensor.layout is strided and tensor.dtype is state_dtypes[i] and tensor.numel() == numels[i]
            and tensor.device == device and tensor.is_contiguous())

    def dtypes_ok(i: int) -> bool:
        return dtypes[i] in KERNEL_DTYPES and (state_dtypes[i] is dtypes[i] or (
            float32_state_ok and dtypes[i] is torch.bfloat16 and state_dtypes[i] is torch.float32))

    def step_ok(step) -> bool:
        return step.dtype in STEP_DTYPES and step.device.type == "cpu" and step.numel() == 1

    # state tensors come role after role, then the step counters: position k belongs to parameter k % n
    passed = [state_ok(states[k], k % n) for k in range(n_states)] + [step_ok(s) for s in states[n_states:]]
    addresses = np.array([0 if t is None else t.data_ptr() for t in states], dtype=np.int64).reshape(-1, n)
    by_kind: dict[tuple, list[int]] = {}
    fallback = []
    for i, param in enumerate(params):
        if all(passed[i::n]) and dtypes_ok(i) and param.layout is strided and param.is_contiguous():
            kind = (dtypes[i], state_dtypes[i], steps[i].dtype if steps is not None else None)
            by_kind.setdefault(kind, []).append(i)
        else:
            fallback.append(i)
    groups = []
    for (dtype, state_dtype, _), indices in by_kind.items():
        pointers = np.zeros((n_roles, len(indices)), dtype=np.int64)
        pointers[state_rows] = addresses[:len(state_rows), indices]
        step_pointers = np.ascontiguousarray(addresses[-1, indices]) if steps is not None else None
        groups.append(_Group(dtype, state_dtype, indices, [numels[i] for i in indices], pointers, step_pointers))
    return _Layout(param_pointers, dtypes, numels, groups, fallback)


def partition(roles: list[list[torch.Tensor | None]], steps: list[torch.Tensor] | None) -> tuple[list[Bucket], list[int]]:
    """Split tensor positions into kernel buckets (one per dtype) and the positions a kernel cannot take.

    ``roles[0]`` are the params, all on one device (the optimizer splits its tensors by device first),
    ``roles[1]`` the grads; an empty role list is an unused state; a ``None`` entry is a state the
    caller will create (SGD's first momentum buffer). Params and states are checked when they are new
    to it (see :class:`_Layout`), gradients every call: a sparse, strided or mismatched one (a ``.data``
    assignment can give a gradient another dtype or size than its parameter) sends its parameter to the
    reference path.
    """
    params, grads = roles[0], roles[1]
    n = len(params)
    if not n:
        return [], []
    state_rows = [r for r in range(2, len(roles)) if roles[r]]
    state_lists = [roles[r] for r in state_rows] + ([steps] if steps is not None else [])
    param_pointers = np.fromiter(map(_DATA_PTR, params), dtype=np.int64, count=n)
    # chained, not concatenated: a list of every tensor would touch each object once more, and with
    # thousands of tensors after the backward pass has flushed the caches, each touch is a cache miss
    key = tuple(map(id, itertools.chain(params, *state_lists)))
    layout = _LAYOUTS.get(key)
    pending = False  # a buffer the caller is about to create (never in a remembered layout)
    if layout is None or layout.param_pointers.tobytes() != param_pointers.tobytes():
        states = list(itertools.chain(*state_lists))
        layout = _layout(params, states, state_rows=state_rows, n_roles=len(roles), steps=steps,
                         param_pointers=param_pointers)
        pending = _NONE in key
        if not pending:  # nothing stable to remember while a buffer is missing
            _LAYOUTS.put(key, layout, params + states)

    strided = torch.strided
    if (set(map(_LAYOUT_OF, grads)) == {strided} and all(map(_IS_CONTIGUOUS, grads))
            and list(map(_DTYPE_OF, grads)) == layout.dtypes and list(map(_NUMEL, grads)) == layout.numels):
        groups, fallback = layout.groups, layout.fallback
    else:  # some gradient a kernel cannot read: its parameter joins the fallback
        bad = {i for i, (grad, dtype, numel) in enumerate(zip(grads, layout.dtypes, layout.numels))
               if not (grad.layout is strided and grad.is_contiguous() and grad.dtype is dtype and grad.numel() == numel)}
        groups, fallback = [], sorted(set(layout.fallback) | bad)
        for group in layout.groups:
            keep = [k for k, i in enumerate(group.indices) if i not in bad]
            if keep:
                groups.append(_Group(group.dtype, group.state_dtype, [group.indices[k] for k in keep],
                                     [group.numels[k] for k in keep],
                                     group.pointers[:, keep],
                                     None if group.step_pointers is None else group.step_pointers[keep]))
    buckets = []
    for group in groups:
        indices = group.indices
        pointers = group.pointers.copy()
        if len(indices) == n:  # the caller's lists themselves: nothing writes into them
            picked = list(roles)
            picked_steps = steps if steps is not None else []
            pointers[0] = param_pointers
        else:
            picked = [[role[i] for i in indices] if role else [] for role in roles]
            picked_steps = [steps[i] for i in indices] if steps is not None else []
            pointers[0] = param_pointers[indices]
        pointers[1] = np.fromiter(map(_DATA_PTR, picked[1]), dtype=np.int64, count=len(indices))
        if pending:  # the addresses of the buffers created after this call are not known yet
            pointers = None
        buckets.append(Bucket(indices, group.dtype, group.state_dtype, picked, picked_steps, group.numels, pointers,
                              group.step_pointers, group.memo))
    return buckets, fallback


def mark_written(bucket: Bucket) -> None:
    """Tell autograd the bucket's parameters are about to change in place.

    A kernel writing through a raw pointer is invisible to torch, which otherwise bumps a tensor's
    version counter on every in-place op: without this, a backward pass through a graph that saved a
    parameter before the step would silently use the new values where torch raises ("modified by an
    inplace operation"). Only the parameters: state tensors are not part of a model's graph.
    """
    torch.autograd.graph.increment_version(bucket.roles[0])


def pointer_table(bucket: Bucket, n_roles: int) -> np.ndarray:
    """int64 ``[role, tensor]`` table of data addresses; 0 for a role the kernel will not touch."""
    if bucket.pointers is not None:
        return bucket.pointers[:n_roles]
    table = np.zeros((n_roles, len(bucket.roles[0])), dtype=np.int64)
    for r, role in enumerate(bucket.roles[:n_roles]):
        if role:
            table[r] = [t.data_ptr() for t in role]
    return table


def step_pointers(bucket: Bucket) -> np.ndarray:
    """int64 addresses of the bucket's step counters."""
    if bucket.step_pointers is not None:
        return bucket.step_pointers
    if not bucket.steps:
        return _NO_STEPS
    return np.fromiter((s.data_ptr() for s in bucket.steps), dtype=np.int64, count=len(bucket.steps))


_NO_STEPS = np.empty(0, dtype=np.int64)
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
