"""Fused single-pass kernels: numba on CPU, Triton on CUDA, many tensors per call.

Imported lazily by the backend registry (``thalweg._backends``) the first time ``backend="fused"``
or ``"auto"`` is looked up; importing it registers ``@register(algorithm, "fused")`` for every
algorithm (:mod:`.fused`). numba and triton themselves are imported only when a kernel first runs, so
``import thalweg`` works without them and ``backend="fused"`` then says what to install.
"""

from __future__ import annotations

import importlib.util

import torch

from . import fused  # noqa: F401  (registers the fused backends)

_INSTALL = "pip install 'thalweg[fused]'"


def _missing(module: str) -> bool:
    try:
        importlib.import_module(module)
    except ImportError:
        return True
    return False


_CHECKED: dict[str, str | None] = {}


def unavailable_reason(device: torch.device) -> str | None:
    """Why ``backend="fused"`` cannot run on ``device``, or None when it can."""
    device = torch.device(device)
    if device.type in _CHECKED:
        return _CHECKED[device.type]
    if device.type == "cpu":
        reason = f"numba is not installed ({_INSTALL}, or pip install numba)" if _missing("numba") else None
    elif device.type == "cuda":
        if not torch.cuda.is_available():
            reason = "CUDA is not available"
        elif _missing("triton"):
            reason = f"triton is not installed ({_INSTALL}, or pip install triton)"
        else:  # the Triton kernels themselves (defined, not compiled, at import)
            try:
                importlib.import_module("thalweg.kernels.triton_gpu")
                reason = None
            except Exception as error:  # noqa: BLE001 - any failure means: do not offer the path
                reason = f"the Triton kernels could not be loaded: {type(error).__name__}: {error}"
    else:
        reason = f"no fused kernels exist for {device.type} tensors (numba covers CPU, Triton covers CUDA)"
    _CHECKED[device.type] = reason
    return reason
