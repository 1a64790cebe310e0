r"""How a bfloat16 parameter takes its new value without float32 master weights (``param_update``).

A step computes a bfloat16 parameter's new value :math:`x` in float32 (``state_dtype`` float32 or "int8")
and stores it in bfloat16, whose values near :math:`w` are :math:`2^{-8}|w|` to :math:`2^{-7}|w|` apart:

- ``"nearest"``: :math:`x` rounded to the nearest bfloat16 (ties to even), as torch's cast. An update
  smaller than half that spacing is lost every step, and training stalls: with lr 1e-4 and Adam's
  normalised steps, every weight above about 0.05 stops moving.
- ``"stochastic"``: :math:`x` rounded up with probability (x - lower) / (upper - lower), down otherwise
  (Gupta et al. 2015), so that :math:`E[\mathrm{round}(x)] = x`: small updates add up in expectation. The
  float32 bits get 16 random bits added before their lower half is dropped. The random bits are a hash
  of a per-step, per-tensor key and the element's index in the whole tensor (a shard's offset added):
  the same parameter rounds the same way on 1 process or under FSDP2, and a resumed run as a run never
  stopped. The key mixes the optimizer's count of rounded steps (``rounding_steps``, checkpointed) with
  the tensor's position in the optimizer.
- ``"kahan"``: the rounding error is kept in a bfloat16 buffer :math:`c` (``state["kahan_comp"]``, 2 bytes
  per parameter) and added to the next step's update (Kahan summation, as Zamirai et al. 2020 apply it
  to bfloat16 training). With the old weight :math:`w` (bfloat16), all in float32:

  .. math::

      u = (x - w) + c, \qquad w' = \mathrm{bf16}(w + u), \qquad c' = \mathrm{bf16}(u - (w' - w))

  :math:`w' - w` is exact in float32, so :math:`c'` holds what the rounding of :math:`w'` dropped.

The functions here are the reference and foreach backends' stores; the fused kernels compute the same bits
(:mod:`.numba_runtime`, :mod:`.triton_runtime`), and every backend is tested against these.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

MODES = ("nearest", "stochastic", "kahan")
# odd multipliers below 2**31: a 32-bit value times one fits an int64 (torch has no uint32 arithmetic)
MIX1, MIX2 = 0x21F0AAAD, 0x735A2D97
_LOW32 = 0xFFFFFFFF
_GOLDEN = 0x9E3779B1


def mix(x: int) -> int:
    """A 32-bit integer hash (xor-shift-multiply; uniform low bits for consecutive inputs)."""
    x &= _LOW32
    x ^= x >> 16
    x = (x * MIX1) & _LOW32
    x ^= x >> 15
    x = (x * MIX2) & _LOW32
    return x ^ (x >> 15)


def _mix_tensor(x: torch.Tensor) -> torch.Tensor:
    """:func:`mix` elementwise on int64 tensors holding 32-bit values."""
    x = x ^ (x >> 16)
    x = (x * MIX1) & _LOW32
    x = x ^ (x >> 15)
    x = (x * MIX2) & _LOW32
    return x ^ (x >> 15)


def key(counter: int, index: int) -> int:
    """The rounding key of the tensor at ``index`` in the optimizer at rounded step ``counter``."""
    return mix(mix(counter + _GOLDEN) + index * _GOLDEN)  # (mix(0) is 0: the constant keeps key(0, 0) apart)


def noise(key_: int, offset: int, n: int, device: torch.device) -> torch.Tensor:
    """16 random bits (int64) for elements ``offset`` to ``offset + n`` of a tensor with this ``key_``."""
    index = torch.arange(offset, offset + n, dtype=torch.int64, device=device)
    return _mix_tensor(((index ^ (index >> 32)) & _LOW32) ^ key_) & 0xFFFF


def stochastic(value: torch.Tensor, key_: int, offset: int) -> torch.Tensor:
    """float32 ``value`` rounded stochastically to bfloat16 (NaN and infinities: as torch's cast)."""
    bits = value.contiguous().view(torch.int32).to(torch.int64) & _LOW32
    finite = (bits & 0x7F800000) != 0x7F800000
    rounded = (bits + noise(key_, offset, value.numel(), value.device).view(value.shape)) & 0xFFFF0000
    as_float = ((rounded ^ 0x80000000) - 0x80000000).to(torch.int32).view(torch.float32)  # back to int32's range
    return torch.where(finite, as_float, value).to(torch.bfloat16)


def kahan(param: torch.Tensor, value: torch.Tensor, comp: torch.Tensor) -> None:
    """Store float32 ``value`` into bfloat16 ``param`` with the compensation ``comp`` (in place, see above)."""
    old = param.float()
    total = (value - old) + comp.float()
    new = (old + total).to(torch.bfloat16)
    comp.copy_(total - (new.float() - old))
    param.copy_(new)


@dataclass
class Rounding:
    """A step's ``param_update`` for a list of parameters: ``mode`` ("stochastic" or "kahan"), and per parameter
    its key and flat offset (stochastic) or its compensation buffer (kahan; None for a parameter that is not
    bfloat16, which is stored as before)."""

    mode: str
    keys: np.ndarray  # int64, 32-bit values
    offsets: np.ndarray  # int64
    comps: list[torch.Tensor | None]

    def store(self, i: int, param: torch.Tensor, value: torch.Tensor) -> None:
        """Store ``value`` (float32) into parameter ``i`` of the list (a bfloat16 one: by the mode)."""
        if param.dtype != torch.bfloat16:
            param.copy_(value)
        elif self.mode == "stochastic":
            param.copy_(stochastic(value, int(self.keys[i]), int(self.offsets[i])))
        else:
            kahan(param, value, self.comps[i])

    def rows(self, indices: np.ndarray) -> np.ndarray:
        """The rows a kernel bucket's address table takes for parameters ``indices``: stochastic, the keys then
        the offsets; kahan, the compensation buffers' addresses."""
        if self.mode == "stochastic":
            return np.stack([self.keys[indices], self.offsets[indices]])
        return np.array([[self.comps[i].data_ptr() for i in indices.tolist()]], dtype=np.int64)
