"""Blockwise 8-bit optimizer state (``state_dtype="int8"``): the quantisation maps and the codec.

A state tensor of ``n`` elements is kept as ``n`` uint8 *codes* and ``ceil(n / 256)`` float32 *absmax*
values, one per block of 256 consecutive elements (of the flattened tensor; the last block may be
shorter). An element is ``map[code] * absmax[block]``, where ``map`` is one of the two 256-entry
*dynamic* maps of Dettmers et al. (2016, "8-Bit Approximations for Parallelism in Deep Learning", and
2022, "8-bit Optimizers via Block-wise Quantization"): a sign bit (signed map only), then a run of zero
bits whose length is a decimal exponent (10⁻⁶ ... 10⁰), then a linear fraction with the bits that are
left — fine steps near the block's largest magnitude, still 1 % relative steps six decades below it.
The signed map serves first moments (momentum, ``exp_avg``), the unsigned one second moments (which
are ≥ 0, so the sign bit buys one more bit of fraction).

Encoding a block: ``absmax = max |x|`` (at least 1e-12, so an all-zero block still encodes), then each
``x / absmax`` gets the code of the nearest map value, a tie going to the larger one. The maps, the
absmax and the codes are those of bitsandbytes' ``create_dynamic_map``/``quantize_blockwise`` and of
torchao's ``OptimState8bit`` (the tests compare them).

Sharded tensors (FSDP2, Shard(0)): the blocks are the whole tensor's, so a block may span two processes; its
absmax is the maximum over both (:func:`encode_shard`, one all-reduce MAX per tensor), and 1 or N processes
store the same codes.

Tensors below :data:`SMALLEST` elements keep float state: their state is a few kilobytes, and the
quantisation error would be paid for nothing.

The optimizer steps with the state dequantised to float32, uses the *new* float32 state for the update
of the parameter, then encodes it (as torchao does): the quantisation error enters the next step's state,
not this step's update. :class:`Blockwise` is what the engine's role lists hold for such a state; the
fused CPU kernels decode and encode in the same pass over memory (:mod:`.cpu`), and the other backends
run through float32 copies (:func:`run_through_floats`), the oracle the kernels are tested against.
"""

from __future__ import annotations

import functools
import math
from typing import Callable

import numpy as np
import torch

BLOCK = 256  # elements per absmax
SMALLEST = 4096  # tensors with fewer elements keep float state
_EXPONENTS = 7  # decades the map spans: 10^-6 .. 10^0
TINY = 1e-12  # the smallest absmax: an all-zero block encodes as zeros, without 0/0


@functools.cache
def _map(signed: bool) -> torch.Tensor:
    # Decade e (0..6) covers magnitudes in (10^(e-7), 10^(e-6)]: the midpoints of 2^e (signed) or 2^(e+1)
    # (unsigned) equal steps of [0.1, 1], times 10^(e-6) — each decade one more bit of fraction. The
    # values are float32 products, as the reference packages compute them (a float32 linspace times a
    # Python float).
    values = [0.0, 1.0]
    for e in range(_EXPONENTS):
        steps = 2 ** e if signed else 2 ** (e + 1)
        edges = torch.linspace(0.1, 1, steps + 1, dtype=torch.float32)
        midpoints = (edges[:-1] + edges[1:]) / 2.0
        values += (10.0 ** (e - (_EXPONENTS - 1)) * midpoints).tolist()
        if signed:
            values += (-(10.0 ** (e - (_EXPONENTS - 1))) * midpoints).tolist()
    if len(values) != 256:  # pragma: no cover - the arithmetic above gives 2 + 2*127 or 2 + 254
        raise AssertionError(f"a dynamic map has 256 entries, got {len(values)}")
    return torch.tensor(sorted(values), dtype=torch.float32)


# The fused kernels find a code without a search. Encoding is a step function of x: the code is the number of
# *boundaries* at or below x, boundary i being the smallest float32 that _nearest rounds up from code i to
# i + 1 (its float32 tie test included, so this is exact, not a midpoint computed apart). The top 16 bits of
# a float32 (sign, exponent, 7 bits of mantissa) cut [-1, 1] into intervals of at most 0.39 %, and no two
# boundaries are closer (lookup() checks it as it builds the table), so an interval holds at most one
# boundary: the code is the interval's count, plus one if x is past that boundary — one table read and
# one comparison per element.
LOOKUP_SHIFT = 16


def _ordered(x: np.ndarray) -> np.ndarray:
    """float32 -> int64 keys in the floats' order (negative floats' bit patterns run backwards)."""
    bits = x.astype(np.float32).view(np.int32).astype(np.int64)
    return np.where(bits < 0, -(bits & 0x7FFFFFFF), bits)


def _from_ordered(keys: np.ndarray) -> np.ndarray:
    bits = np.where(keys < 0, (-keys) | 0x80000000, keys).astype(np.uint32)
    return bits.view(np.float32)


@functools.cache
def boundaries(signed: bool) -> np.ndarray:
    """float32 ``[256]``: entry i is the smallest x that encodes to a code above i (+inf for i = 255)."""
    table = _map(bool(signed))
    low, high = _ordered(table[:-1].numpy()), _ordered(table[1:].numpy())  # the answer lies in (low, high]
    while np.any(high - low > 1):
        middle = (low + high) // 2
        codes = _nearest(torch.from_numpy(_from_ordered(middle).copy()), table).numpy().astype(np.int64)
        above = codes > np.arange(255)
        high, low = np.where(above, middle, high), np.where(above, low, middle)
    return np.append(_from_ordered(high), np.float32(np.inf)).astype(np.float32)


@functools.cache
def lookup(signed: bool) -> np.ndarray:
    """uint8 ``[2**16]``: per float32 bit pattern ``>> 16``, how many boundaries lie at or below the smallest
    value of its interval in [-1, 1] (0 outside it); see :data:`LOOKUP_SHIFT`."""
    edges = boundaries(bool(signed))[:-1].astype(np.float64)
    starts = np.arange(1 << (32 - LOOKUP_SHIFT), dtype=np.uint64) << np.uint64(LOOKUP_SHIFT)
    ends = starts | np.uint64((1 << LOOKUP_SHIFT) - 1)
    with np.errstate(invalid="ignore"):  # (NaN bit patterns)
        first = starts.astype(np.uint32).view(np.float32).astype(np.float64)
        last = ends.astype(np.uint32).view(np.float32).astype(np.float64)
    low, high = np.minimum(first, last), np.maximum(first, last)  # (negative floats run backwards)
    used = np.isfinite(low) & np.isfinite(high) & (low <= 1.0) & (high >= -1.0)
    low, high = np.clip(low, -1.0, 1.0), np.clip(high, -1.0, 1.0)
    below = np.searchsorted(edges, low, side="right")
    if np.any((np.searchsorted(edges, high, side="right") - below)[used] > 1):  # pragma: no cover
        raise AssertionError("an interval of the lookup holds two boundaries")
    return np.where(used, below, 0).astype(np.uint8)


def dynamic_map(signed: bool) -> torch.Tensor:
    """The 256 sorted float32 values a code stands for (times its block's absmax): signed for first
    moments, unsigned for second moments. A fresh copy (the cached one is never handed out)."""
    return _map(bool(signed)).clone()


def n_blocks(numel: int) -> int:
    """How many absmax values a tensor of ``numel`` elements has."""
    return math.ceil(numel / BLOCK)


def quantises(numel: int) -> bool:
    """Whether a state tensor of ``numel`` elements is kept in 8 bits (else in float)."""
    return numel >= SMALLEST


def encode(values: torch.Tensor, signed: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``(codes, absmax)`` of ``values``: uint8 codes of its shape and one float32 absmax per block."""
    flat = values.detach().reshape(-1).to(torch.float32)
    n = flat.numel()
    blocks = n_blocks(n)
    if blocks * BLOCK != n:  # zeros pad the last block: they change neither its absmax nor its codes
        flat = torch.cat([flat, flat.new_zeros(blocks * BLOCK - n)])
    grid = flat.view(blocks, BLOCK)
    absmax = grid.abs().amax(dim=1).clamp_min(TINY)
    normalised = (grid / absmax[:, None]).reshape(-1)[:n]
    return _code(normalised, bool(signed)).view(values.shape), absmax


def _code(x: torch.Tensor, signed: bool) -> torch.Tensor:
    """:func:`_nearest` of float32 ``x`` in [-1, 1], found as the fused kernels find it (the lookup, then one
    comparison with a boundary): the same codes (tests/test_state_int8.py), without torch's searchsorted, which
    costs about 100 ns an element on CPU."""
    lookup_, edges = _tables(signed, x.device)
    index = (x.contiguous().view(torch.int32) >> LOOKUP_SHIFT) & ((1 << (32 - LOOKUP_SHIFT)) - 1)
    code = lookup_[index.long()]
    return (code + (x >= edges[code])).to(torch.uint8)


@functools.cache
def _tables(signed: bool, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    return (torch.from_numpy(lookup(signed).astype(np.int64)).to(device),
            torch.from_numpy(boundaries(signed)).to(device))


def _nearest(x: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """The code of the map value nearest each ``x`` (a tie: the larger value), as uint8: the definition, by a search
    of the map (what :func:`_code` and the kernels compute by a lookup, and are tested against)."""
    below = (torch.searchsorted(table, x, right=True) - 1).clamp_(0, 255)  # the last entry <= x (or the first)
    above = (below + 1).clamp_(max=255)
    low, high = table[below], table[above]
    return torch.where(x - low >= (high - low) * 0.5, above, below).to(torch.uint8)


def decode(codes: torch.Tensor, absmax: torch.Tensor, signed: bool) -> torch.Tensor:
    """The float32 values ``codes`` and ``absmax`` stand for (the codes' shape)."""
    n = codes.numel()
    table = _map(bool(signed)).to(codes.device)
    scale = absmax.repeat_interleave(BLOCK)[:n]
    return (table[codes.reshape(-1).long()] * scale).view(codes.shape)


def encode_shard(values: torch.Tensor, signed: bool, offset: int, blocks: int,
                 max_across: Callable[[torch.Tensor], None]) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`encode` of one process's shard of a tensor: ``values`` are the whole tensor's flat elements from
    ``offset`` on, and the blocks are the *whole* tensor's (``blocks`` of them): each process takes the largest
    magnitude of its part of each block, ``max_across`` (an in-place all-reduce MAX) makes them the blocks'
    maxima, then every process encodes its elements with them. Returns the shard's codes and every block's
    absmax (the same on every process): what :func:`encode` gives for the whole tensor, sliced."""
    flat = values.detach().reshape(-1).to(torch.float32)
    index = _block_index(offset, flat.numel(), flat.device)
    maxima = torch.zeros(blocks, dtype=torch.float32, device=flat.device)
    maxima.scatter_reduce_(0, index, flat.abs(), "amax")
    max_across(maxima)
    absmax = maxima.clamp_min_(TINY)
    return _code(flat / absmax[index], bool(signed)).view(values.shape), absmax


def decode_shard(codes: torch.Tensor, absmax: torch.Tensor, signed: bool, offset: int) -> torch.Tensor:
    """:func:`decode` of one process's shard: its codes are the whole tensor's flat elements from ``offset``, and
    ``absmax`` every block's."""
    table = _map(bool(signed)).to(codes.device)
    index = _block_index(offset, codes.numel(), codes.device)
    return (table[codes.reshape(-1).long()] * absmax[index]).view(codes.shape)


def _block_index(offset: int, n: int, device: torch.device) -> torch.Tensor:
    return torch.div(torch.arange(offset, offset + n, device=device), BLOCK, rounding_mode="floor")


class Blockwise:
    """An 8-bit state tensor as the engine's role lists hold it: the codes (uint8, the parameter's shape),
    one float32 absmax per block, and which map they use. The two tensors are the optimizer state's own
    entries (``state[role]`` and ``state[role + "_absmax"]``), changed in place.

    A shard (FSDP2) holds its codes, the flat ``offset`` of its first element in the whole tensor, every block's
    absmax, and ``max_across``, the all-reduce that makes a block's absmax the whole block's (see
    :func:`encode_shard`): the blocks follow the whole tensor, so 1 and N processes store the same codes."""

    __slots__ = ("codes", "absmax", "signed", "offset", "max_across")

    def __init__(self, codes: torch.Tensor, absmax: torch.Tensor, signed: bool, offset: int = 0,
                 max_across: Callable[[torch.Tensor], None] | None = None) -> None:
        self.codes, self.absmax, self.signed = codes, absmax, signed
        self.offset, self.max_across = offset, max_across

    @property
    def shape(self) -> torch.Size:
        return self.codes.shape

    @property
    def device(self) -> torch.device:
        return self.codes.device

    def decode(self) -> torch.Tensor:
        if self.max_across is not None:
            return decode_shard(self.codes, self.absmax, self.signed, self.offset)
        return decode(self.codes, self.absmax, self.signed)

    def store(self, values: torch.Tensor) -> None:
        """Encode ``values`` into this state's codes and absmax (in place; a shard: a collective)."""
        if self.max_across is not None:
            codes, absmax = encode_shard(values, self.signed, self.offset, self.absmax.numel(), self.max_across)
        else:
            codes, absmax = encode(values, self.signed)
        self.codes.copy_(codes)
        self.absmax.copy_(absmax)

    def __repr__(self) -> str:
        return f"Blockwise({tuple(self.codes.shape)}, {'signed' if self.signed else 'unsigned'}, {self.codes.device})"


def check(codes: torch.Tensor, absmax: torch.Tensor, shape: torch.Size) -> str | None:
    """What is wrong with ``codes`` and ``absmax`` as the 8-bit state of a parameter of ``shape``, or None."""
    if not isinstance(codes, torch.Tensor) or codes.dtype != torch.uint8:
        return f"its codes must be a uint8 tensor, got {_describe(codes)}"
    if codes.shape != shape:
        return f"its codes have shape {tuple(codes.shape)} but the parameter has {tuple(shape)}"
    blocks = n_blocks(math.prod(shape))
    if not isinstance(absmax, torch.Tensor) or absmax.dtype != torch.float32 or absmax.shape != (blocks,):
        return f"its absmax must be a float32 tensor of shape ({blocks},), got {_describe(absmax)}"
    if absmax.device != codes.device:
        return f"its absmax is on {absmax.device} but its codes on {codes.device}"
    return None


def _describe(value) -> str:
    if isinstance(value, torch.Tensor):
        return f"a {str(value.dtype).removeprefix('torch.')} tensor of shape {tuple(value.shape)}"
    return type(value).__name__


def as_float(entry, dtype: torch.dtype) -> torch.Tensor:
    """A state entry for a step in float: a float tensor as it is, a :class:`Blockwise` decoded (float32, float64
    for a float64 parameter: ``dtype`` is the parameter's)."""
    if not isinstance(entry, Blockwise):
        return entry
    value = entry.decode()
    return value.double() if dtype == torch.float64 else value


def run_through_floats(run, roles: list[list], dtypes: list[torch.dtype]) -> None:
    """Call ``run(float_roles)`` with every :class:`Blockwise` of ``roles`` decoded (:func:`as_float`; ``dtypes``:
    the parameters'), then encode the new values back: the reference and foreach backends' 8-bit step, and the
    oracle of the kernels."""
    decoded = [(k, i) for k, role in enumerate(roles) for i, t in enumerate(role) if isinstance(t, Blockwise)]
    floats = [list(role) for role in roles]
    for k, i in decoded:
        floats[k][i] = as_float(roles[k][i], dtypes[i])
    run(floats)
    for k, i in decoded:
        roles[k][i].store(floats[k][i])
