"""Host-side bookkeeping of the fused path: which tensors a kernel may take, and the tables it reads.

A kernel reads and writes raw memory through ``data_ptr()`` addresses, so everything it will touch is
checked every step before it runs: the address, element count, contiguity and dtype of every parameter,
gradient, state tensor and step counter, and the shape of every gradient and state tensor against its
parameter's. What is remembered between steps (:class:`_Layout`, keyed by the tensors' identities) is only
what those checks found last time — dtype groups, shapes, the chunk table — and it is used again only when
this step's addresses, sizes and contiguity are the ones it was built from; anything else is checked
anew. A tensor a kernel cannot take (strided, sparse, another dtype or shape than its parameter, a
dtype without a kernel) sends its parameter to the foreach path, which either handles it or raises as
torch does.
"""

from __future__ import annotations

import itertools
import operator
import weakref
from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np
import torch

CHUNK = 1 << 16
# dtypes a kernel stores, per device type: (parameter dtype, state dtype) pairs
KERNEL_DTYPES = {
    "cpu": {(torch.float32, torch.float32), (torch.float64, torch.float64), (torch.bfloat16, torch.bfloat16),
            (torch.bfloat16, torch.float32)},
    "cuda": {(torch.float32, torch.float32), (torch.float64, torch.float64), (torch.bfloat16, torch.bfloat16),
             (torch.bfloat16, torch.float32), (torch.float16, torch.float16), (torch.float16, torch.float32)},
}
STEP_DTYPES = (torch.float32, torch.float64)

_DATA_PTR = torch.Tensor.data_ptr
_NUMEL = torch.Tensor.numel
_STRIDE = torch.Tensor.stride
_DTYPE = operator.attrgetter("dtype")


@dataclass
class Bucket:
    """Tensors one kernel call updates: ``indices`` into the caller's lists, all of one (dtype, state dtype).

    ``pointers`` is the ``[role, tensor]`` address table (roles in the caller's order: param, grad, state
    roles), ``step_pointers`` the addresses of the step counters, ``chunks`` the ``[chunk, (tensor, start,
    stop)]`` table, ``memo`` what a launcher derives from the layout alone (device copies of the tables).
    """

    indices: np.ndarray
    dtype: torch.dtype
    state_dtype: torch.dtype
    numels: list[int]
    pointers: np.ndarray
    step_pointers: np.ndarray | None
    chunks: np.ndarray
    memo: dict = field(default_factory=dict)
    # per state role: None (float state) or the map of its 8-bit blocks ("signed", "unsigned"); the address
    # table then has one more row per 8-bit role, its absmax (see codec_partition)
    codecs: tuple = ()
    # how bfloat16 parameters are stored (``param_update``, see .rounding): None (to nearest), "stochastic" (the
    # address table then has two more rows, each tensor's key and flat offset) or "kahan" (one more row, the
    # compensation buffers' addresses)
    rounding: str | None = None

    @property
    def n_elements(self) -> int:
        return int(self.memo.setdefault("elements", sum(self.numels)))


@dataclass
class _Group:
    dtype: torch.dtype
    state_dtype: torch.dtype
    indices: np.ndarray
    numels: list[int]
    chunks: np.ndarray
    pointers: np.ndarray  # [role, tensor]; the gradients' row is refilled every step
    step_pointers: np.ndarray | None
    whole: bool  # the group holds every position, in order
    memo: dict = field(default_factory=dict)


@dataclass
class _Layout:
    """What the checks found for one list of tensors: valid while ``fingerprint`` is unchanged."""

    fingerprint: bytes  # addresses of params, states and steps; element counts of params and states
    strides: list[tuple]  # of params, then states
    state_dtypes: list[torch.dtype]
    steps_ok: bool  # every step counter is a 0-d CPU tensor of one float dtype (advanced by address)
    step_addresses: np.ndarray | None
    grad_dtypes: list[torch.dtype]  # what each gradient must be (its parameter's dtype)
    param_strides: list[tuple]  # what each gradient's strides must be (another shape has other strides)
    numels: list[int]
    groups: list[_Group]
    fallback: list[int]


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
        self._entries[key] = (layout, [weakref.ref(t, forget) for t in tensors])


_LAYOUTS = _Layouts()


def partition(params: list[torch.Tensor], grads: list[torch.Tensor], roles: list[list[torch.Tensor]],
              steps: list[torch.Tensor] | None) -> tuple[list[Bucket], list[int], np.ndarray | None]:
    """Split positions into kernel buckets (one per dtype pair) and the positions a kernel cannot take.

    ``params`` are on one device (the optimizer splits by device first); ``roles`` are the state
    tensors the program touches, one list per role; ``steps`` the step counters (or None). Returns the
    buckets, the other positions, and the step counters' addresses when every one of them is a 0-d CPU
    tensor of one float dtype (else None).
    """
    n = len(params)
    if not n:
        return [], [], None
    states = list(itertools.chain(*roles))
    owned = list(itertools.chain(params, states, steps or ()))
    # what a kernel relies on, read again every step: where each tensor's memory starts and how many
    # elements it spans (memory safety), and for parameters and states their strides — which, with the
    # count, fix their shape and contiguity — and the states' dtypes (a view of the same memory as
    # another shape or dtype keeps the address)
    addresses = np.fromiter(map(_DATA_PTR, owned), dtype=np.int64, count=len(owned))
    # (step counters: the address alone; a kernel touches their element 0, which any tensor at a nonzero
    # address has: an empty one's address is 0)
    numels = np.fromiter(map(_NUMEL, itertools.chain(params, states)), dtype=np.int64, count=n + len(states))
    fingerprint = addresses.tobytes() + numels.tobytes()
    strides = list(map(_STRIDE, itertools.chain(params, states)))
    state_dtypes = list(map(_DTYPE, states))
    key = tuple(map(id, owned))
    layout = _LAYOUTS.get(key)
    if layout is None or layout.fingerprint != fingerprint or layout.strides != strides \
            or layout.state_dtypes != state_dtypes:
        layout = _layout(params, roles, steps, addresses, fingerprint, numels[:n].tolist(), strides, state_dtypes)
        _LAYOUTS.put(key, layout, owned)

    # gradients are new objects every step: each is checked every step (sparse ones never reach here);
    # a gradient with its parameter's count and strides has its shape and contiguity
    grad_ok = (list(map(_DTYPE, grads)) == layout.grad_dtypes and list(map(_NUMEL, grads)) == layout.numels
               and list(map(_STRIDE, grads)) == layout.param_strides)
    groups, fallback = layout.groups, layout.fallback
    if not grad_ok:
        bad = {i for i, (g, dtype, numel, stride) in enumerate(
               zip(grads, layout.grad_dtypes, layout.numels, layout.param_strides))
               if not (g.layout is torch.strided and g.dtype is dtype and g.numel() == numel and g.stride() == stride)}
        groups, fallback = _without(layout.groups, bad), sorted(set(fallback) | bad)

    grad_addresses = np.fromiter(map(_DATA_PTR, grads), dtype=np.int64, count=n)
    buckets: list[Bucket] = []
    for group in groups:
        # the layout was built from (or checked against) these very addresses: only the gradients' move
        group.pointers[1] = grad_addresses if group.whole else grad_addresses[group.indices]
        buckets.append(Bucket(group.indices, group.dtype, group.state_dtype, group.numels, group.pointers,
                              group.step_pointers, group.chunks, group.memo))
    return buckets, fallback, layout.step_addresses if layout.steps_ok else None


def _layout(params, roles, steps, addresses: np.ndarray, fingerprint: bytes, numels: list[int],
            strides: list[tuple], state_dtypes: list[torch.dtype]) -> _Layout:
    """Check every parameter, state tensor and step counter: which a kernel can take, grouped by dtype pair."""
    n = len(params)
    device = params[0].device
    allowed = KERNEL_DTYPES.get(device.type, set())
    by_kind: dict[tuple, list[int]] = {}
    fallback = []
    for i, param in enumerate(params):
        states = [role[i] for role in roles]
        state_dtype = states[0].dtype if states else param.dtype
        ok = (param.layout is torch.strided and param.is_contiguous() and (param.dtype, state_dtype) in allowed
              and all(s.layout is torch.strided and s.dtype is state_dtype and s.device == device
                      and s.shape == param.shape and s.is_contiguous() for s in states))
        if ok and steps is not None:
            step = steps[i]
            ok = step.dtype in STEP_DTYPES and step.device.type == "cpu" and step.numel() == 1
            kind = (param.dtype, state_dtype, step.dtype)
        else:
            kind = (param.dtype, state_dtype, None)
        if ok:
            by_kind.setdefault(kind, []).append(i)
        else:
            fallback.append(i)
    # the address table of every position: params, (gradients: filled per step), then each state role
    table = np.zeros((2 + len(roles), n), dtype=np.int64)
    table[0] = addresses[:n]
    for r in range(len(roles)):
        table[2 + r] = addresses[n * (1 + r):n * (2 + r)]
    step_table = addresses[n * (1 + len(roles)):] if steps is not None else None
    groups = [_group(dtype, state_dtype, indices, numels, table, step_table, n)
              for (dtype, state_dtype, _), indices in by_kind.items()]
    steps_ok = steps is not None and len({s.dtype for s in steps}) == 1 and all(
        s.dtype in STEP_DTYPES and s.device.type == "cpu" and s.numel() == 1 for s in steps)
    return _Layout(fingerprint, strides, state_dtypes, steps_ok,
                   None if step_table is None else np.ascontiguousarray(step_table), [p.dtype for p in params],
                   strides[:n], numels, groups, fallback)


def _group(dtype, state_dtype, indices: list[int], numels: list[int], table: np.ndarray,
           step_table: np.ndarray | None, n: int) -> _Group:
    whole = len(indices) == n
    positions = np.array(indices, dtype=np.int64)
    pointers = table.copy() if whole else np.ascontiguousarray(table[:, positions])
    steps = None if step_table is None else np.ascontiguousarray(step_table if whole else step_table[positions])
    sizes = [numels[i] for i in indices]
    return _Group(dtype, state_dtype, positions, sizes, chunk_table(sizes), pointers, steps, whole)


def _without(groups: list[_Group], bad: set[int]) -> list[_Group]:
    """``groups`` without the positions in ``bad`` (a gradient a kernel cannot read this step)."""
    kept = []
    for group in groups:
        keep = [k for k, i in enumerate(group.indices.tolist()) if i not in bad]
        if keep:
            sizes = [group.numels[k] for k in keep]
            steps = None if group.step_pointers is None else np.ascontiguousarray(group.step_pointers[keep])
            kept.append(_Group(group.dtype, group.state_dtype, group.indices[keep], sizes, chunk_table(sizes),
                               np.ascontiguousarray(group.pointers[:, keep]), steps, False))
    return kept


_CHUNK_CACHE: OrderedDict[bytes, np.ndarray] = OrderedDict()


def chunk_table(numels: list[int], chunk: int | None = None) -> np.ndarray:
    """int64 ``[chunk, (tensor, start, stop)]`` cutting every tensor into pieces of at most ``chunk``
    elements (default :data:`CHUNK`; cached: a training loop asks for the same table every step)."""
    chunk = CHUNK if chunk is None else chunk
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


def mark_written(params: list[torch.Tensor]) -> None:
    """Tell autograd these parameters are about to change in place.

    A kernel writing through a raw pointer is invisible to torch, which otherwise bumps a tensor's
    version counter on every in-place op: without this, a backward pass through a graph that saved a
    parameter before the step would silently use the new values where torch raises ("modified by an
    inplace operation"). Only the parameters: state tensors are not part of a model's graph.
    """
    torch.autograd.graph.increment_version(params)


def codec_partition(params: list[torch.Tensor], grads: list[torch.Tensor], roles: list[list],
                    steps: list[torch.Tensor] | None) -> tuple[list[Bucket], list[int], np.ndarray | None]:
    """:func:`partition` for a step whose state is partly 8-bit (``roles`` hold :class:`.codec.Blockwise`
    entries): buckets by (dtype, float state dtype, which roles are 8-bit), each with the absmax
    rows after the role rows of its address table. Everything is checked every step (no layout is kept:
    an 8-bit step reads and writes half the bytes, and pays a little more host time)."""
    from .codec import BLOCK, Blockwise

    if CHUNK % BLOCK:  # pragma: no cover - a chunk must start on a block
        raise AssertionError("the chunk size must be a multiple of the codec's block")
    device = params[0].device
    allowed = KERNEL_DTYPES.get(device.type, set())
    by_kind: dict[tuple, list[int]] = {}
    fallback = []
    for i, (param, grad) in enumerate(zip(params, grads)):
        entries = [role[i] for role in roles]
        floats = [e for e in entries if not isinstance(e, Blockwise)]
        state_dtype = floats[0].dtype if floats else (torch.float32 if param.dtype in (torch.bfloat16, torch.float16)
                                                      else param.dtype)
        ok = (param.layout is torch.strided and param.is_contiguous() and (param.dtype, state_dtype) in allowed
              and grad.layout is torch.strided and grad.dtype is param.dtype and grad.shape == param.shape
              and grad.is_contiguous()
              and all(e.layout is torch.strided and e.dtype is state_dtype and e.device == device
                      and e.shape == param.shape and e.is_contiguous() for e in floats)
              and all(e.codes.is_contiguous() and e.absmax.is_contiguous() and e.max_across is None  # (a shard's
                      for e in entries if isinstance(e, Blockwise)))  # blocks span processes: through float copies)
        if ok and steps is not None:
            ok = steps[i].dtype in STEP_DTYPES and steps[i].device.type == "cpu" and steps[i].numel() == 1
        if not ok:
            fallback.append(i)
            continue
        codecs = tuple(("signed" if e.signed else "unsigned") if isinstance(e, Blockwise) else None for e in entries)
        by_kind.setdefault((param.dtype, state_dtype, codecs), []).append(i)
    buckets = []
    for (dtype, state_dtype, codecs), indices in by_kind.items():
        quantised = [k for k, kind in enumerate(codecs) if kind is not None]
        table = np.zeros((2 + len(roles) + len(quantised), len(indices)), dtype=np.int64)
        for column, i in enumerate(indices):
            table[0, column], table[1, column] = params[i].data_ptr(), grads[i].data_ptr()
            for k, role in enumerate(roles):
                entry = role[i]
                table[2 + k, column] = entry.codes.data_ptr() if isinstance(entry, Blockwise) else entry.data_ptr()
            for row, k in enumerate(quantised):
                table[2 + len(roles) + row, column] = roles[k][i].absmax.data_ptr()
        numels = [params[i].numel() for i in indices]
        buckets.append(Bucket(np.array(indices, dtype=np.int64), dtype, state_dtype, numels, table, None,
                              chunk_table(numels), codecs=codecs if quantised else ()))
    addresses = None
    if steps is not None and len({s.dtype for s in steps}) == 1 and all(
            s.dtype in STEP_DTYPES and s.device.type == "cpu" and s.numel() == 1 for s in steps):
        addresses = np.fromiter(map(_DATA_PTR, steps), dtype=np.int64, count=len(steps))
    return buckets, fallback, addresses
