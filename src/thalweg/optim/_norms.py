"""Per-tensor L2 norms for the layer-wise optimizers (LARS, LAMB).

Kept in one place because this is what sharding changes: under FSDP2 a parameter is split across
processes and its norm must be reduced across them (see the distributed issue).
"""

from __future__ import annotations

import torch


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """Norms of low-precision tensors are accumulated in float32; float64 stays float64."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def norm(tensor: torch.Tensor) -> torch.Tensor:
    """L2 norm of one tensor as a 0-d float32/float64 tensor (no host sync)."""
    return torch.linalg.vector_norm(tensor, dtype=accumulation_dtype(tensor.dtype))


def norms(tensors: list[torch.Tensor]) -> torch.Tensor:
    """L2 norms of same-device, same-dtype tensors, one batched call, as a 1-d tensor."""
    if not tensors:
        return torch.zeros(0)
    return torch.stack(torch._foreach_norm(tensors, 2, dtype=accumulation_dtype(tensors[0].dtype)))


__all__ = ["accumulation_dtype", "norm", "norms"]
