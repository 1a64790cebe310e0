"""Fused single-pass kernels (numba on CPU, Triton on CUDA). Imported lazily by the backend registry."""

from __future__ import annotations

import torch


def unavailable_reason(device: torch.device) -> str | None:
    """Why ``backend="fused"`` cannot run on ``device``, or None when it can."""
    return "the fused kernels are not implemented yet"
