"""The rule engine: each optimizer's elementwise math written once, every backend derived from it.

An optimizer states its update as a *rule* (:func:`rule`, :mod:`.rules`): a plain Python function of the
parameter, its gradient and its state tensors, with keyword-only hyper-parameters and flags. From that one
definition the engine runs

- ``reference``: the rule itself on torch tensors, one parameter at a time (the oracle);
- ``foreach``: the rule's program on lists of tensors, one ``torch._foreach_*`` call per operation;
- ``fused``: kernels generated from the program — numba on CPU, Triton on CUDA — each updating every
  tensor of a bucket in one pass over memory (two when the rule takes norms).

Everything here imports numba and Triton lazily and names no optimizer: ``thalweg.optim`` imports this
package, never the reverse. See ``CONTRIBUTING.md`` ("Adding an optimizer") for a walk-through.
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import Any

import torch

from .driver import BACKENDS, partition, run
from .language import Flag, PerTensor, RuleError
from .program import Program
from .rules import Rule, rule
from .vocabulary import abs, lerp, maximum, minimum, norm, sign, sqrt, where  # noqa: A004

_INSTALL = "pip install 'thalweg[fused]'"
_CHECKED: dict[str, str | None] = {}


def _missing(module: str) -> bool:
    """Whether ``module`` is not installed (found, not imported: numba takes 0.4 s to import, and a
    kernel loaded from the native cache never needs it)."""
    try:
        return importlib.util.find_spec(module) is None
    except (ImportError, ValueError):
        return True


def unavailable_reason(device: torch.device | str) -> str | None:
    """Why ``backend="fused"`` cannot run on ``device`` here, or None when it can."""
    device = torch.device(device)
    if device.type in _CHECKED:
        return _CHECKED[device.type]
    if device.type == "cpu":
        reason = f"numba is not installed ({_INSTALL}, or pip install numba)" if _missing("numba") else None
    elif device.type == "cuda":
        if not torch.cuda.is_available():
            reason = "CUDA is not available"
        elif _missing("triton"):
            reason = ("triton is not installed (torch's CUDA wheels bring it; pip install 'thalweg[cuda]' or "
                      "pip install triton)")
        else:
            reason = None
    else:
        reason = f"no fused kernels exist for {device.type} tensors (numba covers CPU, Triton covers CUDA)"
    _CHECKED[device.type] = reason
    return reason


def show(rule_: Rule, backend: str = "fused", *, device: str = "cpu", dtype: torch.dtype = torch.float32,
         state_dtype: torch.dtype | str | None = None, state_codecs: dict[str, str] | None = None,
         param_update: str = "nearest", **scalars: Any) -> str:
    """The code ``rule_`` becomes for ``backend`` (and, for ``"fused"``, ``device`` and dtypes) with the given
    flags and hyper-parameters: the specialised program, then the generated source.

        print(thalweg.engine.show(thalweg.optim.adam.adam, "fused", lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8,
                                  weight_decay=0.0, amsgrad=False, decoupled=True, maximize=False))

    The fused kernels of 8-bit state: ``state_dtype="int8"`` with the optimizer's ``state_codecs`` (e.g.
    ``thalweg.Adam.state_codecs``); of bfloat16 parameters rounded by ``param_update`` ("stochastic", "kahan").
    """
    missing = [name for name in rule_.scalars if name not in scalars]
    if missing:
        raise TypeError(f"show() needs a value for every flag and hyper-parameter of rule {rule_.name}: missing "
                        f"{', '.join(missing)}")
    program = rule_.program(scalars)
    if backend == "reference":
        return program.describe() + "\n\n# reference: the rule itself, one tensor at a time\n" + rule_.source
    if backend == "foreach":
        from . import lists

        return lists.source(program)
    if backend != "fused":
        raise ValueError(f"backend must be one of {', '.join(map(repr, BACKENDS))}, got {backend!r}")
    codecs: tuple = ()
    if state_dtype == "int8":
        if not state_codecs:
            raise TypeError("show() with state_dtype='int8' needs the optimizer's state_codecs (e.g. thalweg.Adam.state_codecs)")
        codecs = tuple(kind if kind in ("signed", "unsigned") else None
                       for kind in map(state_codecs.get, program.state_roles))
        state_dtype = torch.float32 if dtype != torch.float64 else dtype
    rounding = None if param_update == "nearest" else param_update
    if rounding is not None and dtype != torch.bfloat16:
        raise ValueError(f"param_update={param_update!r} rounds bfloat16 parameters: pass dtype=torch.bfloat16")
    state_dtype = state_dtype or dtype
    if torch.device(device).type == "cuda":
        from . import gpu

        return gpu.source(program, dtype, state_dtype, codecs, rounding)
    from . import cpu

    return cpu.source(program, dtype, state_dtype, codecs, rounding)


__all__ = ["BACKENDS", "Flag", "PerTensor", "Program", "Rule", "RuleError", "abs", "lerp", "maximum", "minimum", "norm", "partition",
           "rule", "run", "show", "sign", "sqrt", "unavailable_reason", "where"]
