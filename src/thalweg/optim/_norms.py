"""Per-tensor L2 norms for the layer-wise optimizers (LARS, LAMB).

Kept in one place because this is what sharding changes: under FSDP2 a parameter is split across
processes and its norm must be reduced across them. While the optimizer steps a sharded param group,
:func:`thalweg.distributed.norm_sum` gives the cross-process sum: the local norms are squared, summed
across the shards (one all_reduce per call, however many tensors) and square-rooted. Otherwise the
norms are local and no collective is issued.
"""

from __future__ import annotations

import torch

from ..distributed import norm_sum


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """Norms of low-precision tensors are accumulated in float32; float64 stays float64."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _summed(local_norms: torch.Tensor) -> torch.Tensor:
    sum_ = norm_sum()
    if sum_ is None:
        return local_norms
    squares = local_norms.square()
    sum_(squares)
    return squares.sqrt()


def norm(tensor: torch.Tensor) -> torch.Tensor:
    """L2 norm of one tensor as a 0-d float32/float64 tensor (no host sync; one collective when sharded)."""
    return _summed(torch.linalg.vector_norm(tensor, dtype=accumulation_dtype(tensor.dtype)).reshape(1)).reshape(())


def norms(tensors: list[torch.Tensor]) -> torch.Tensor:
    """L2 norms of same-device, same-dtype tensors, one batched call, as a 1-d tensor."""
    return norms_together(tensors)[0]


def norms_together(*tensor_lists: list[torch.Tensor]) -> tuple[torch.Tensor, ...]:
    """:func:`norms` of each list, all from one batched call and (sharded) one reduction, e.g. weights and updates."""
    tensors = [t for tensors in tensor_lists for t in tensors]
    if not tensors:
        return tuple(torch.zeros(0) for _ in tensor_lists)
    dtype = accumulation_dtype(tensors[0].dtype)
    flat = _summed(torch.stack(torch._foreach_norm(tensors, 2, dtype=dtype)))
    return tuple(flat.split([len(tensors) for tensors in tensor_lists]))


__all__ = ["accumulation_dtype", "norm", "norms", "norms_together"]
