"""Build an optimizer by name, with the usual no-decay group for biases, normalisation and embeddings."""

from __future__ import annotations

import inspect
from typing import Any, Iterable

from torch import nn

from . import optim
from ._base import Optimizer
from ._params import no_decay_parameter_names

# every optimizer of thalweg.optim under its own ``name``, in the package's (the README's) order
_OPTIMIZERS: dict[str, type[Optimizer]] = {cls.name: cls for cls in map(optim.__dict__.get, optim.__all__)}


def names() -> list[str]:
    """The names :func:`create` accepts, in the README's order."""
    return list(_OPTIMIZERS)


def optimizer_class(name: str) -> type[Optimizer]:
    """The class behind ``name`` (case-insensitive), or a ValueError listing the valid names."""
    if not isinstance(name, str) or name.lower() not in _OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; choose one of: {', '.join(_OPTIMIZERS)}")
    return _OPTIMIZERS[name.lower()]


def create(name: str, model_or_params: nn.Module | Iterable[Any], **hyperparams: Any) -> Optimizer:
    """Build the optimizer called ``name`` (see :func:`names`) with ``hyperparams``.

    Given an ``nn.Module``, the parameters that need gradients are split into two groups: the weights,
    with the hyper-parameters given, and biases/normalisation/embedding parameters with
    ``weight_decay=0`` (and ``trust_ratio=False`` for LARS and LAMB); an optimizer without weight decay
    (Rprop) gets one group. Names are kept, as with ``model.named_parameters()``. Given parameters or param groups, they are passed on unchanged.

    Example::

        optimizer = thalweg.create("lamb", model, lr=2e-3, weight_decay=0.01)
    """
    cls = optimizer_class(name)
    # an optimizer that needs the model itself to place its parameters (Muon: hidden matrices only, the rest to
    # AdamW) builds from the module
    builder = getattr(cls, "for_module", None) if isinstance(model_or_params, nn.Module) else None
    accepted = [p for p in inspect.signature(builder or cls.__init__).parameters if p not in ("self", "params", "model")]
    unknown = sorted(set(hyperparams) - set(accepted))
    if unknown:
        raise TypeError(f"{cls.__name__} has no hyper-parameter {', '.join(map(repr, unknown))}; it accepts: {', '.join(accepted)}")
    if not isinstance(model_or_params, nn.Module):
        return cls(model_or_params, **hyperparams)
    if builder is not None:
        return builder(model_or_params, **hyperparams)

    trainable = [(n, p) for n, p in model_or_params.named_parameters() if p.requires_grad]
    if "weight_decay" not in accepted:  # nothing to exempt (Rprop): one group, names kept
        return cls(trainable, **hyperparams)
    skipped = no_decay_parameter_names(model_or_params)
    weights = [(n, p) for n, p in trainable if n not in skipped]
    others = [(n, p) for n, p in trainable if n in skipped]
    no_decay: dict[str, Any] = {"params": others, "weight_decay": 0.0}
    if cls.layerwise:
        no_decay["trust_ratio"] = False
    groups = [group for group in ({"params": weights}, no_decay) if group["params"]]
    return cls(groups, **hyperparams)
