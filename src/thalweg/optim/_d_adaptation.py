"""What Prodigy and D-Adapt Adam share: one step size ``d`` estimated from sums over every parameter.

Both packages (``prodigyopt`` 1.1.2, ``dadaptation`` 3.2) keep ``d`` and its accumulators in every param group,
read the step's options from group 0, and sum, per tensor, a dot product and an L1 norm over all groups'
parameters, each with a host sync (``.item()``) per tensor. Here each tensor's two values stay on the device
until the whole step's are known; then ONE ``all_reduce`` per distinct sharding (FSDP2: one per step) sums the
shards' values across processes, and ONE transfer brings them to the host, where they are added in the
package's order in float64. Under FSDP2 the result is the single-process one (the packages' ``fsdp_in_use``
is off by default, and the ranks then silently step with different ``d``).
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch

from .. import _checks, distributed


def check_step(optimizer: Any, step_wide: Sequence[str]) -> None:
    """The step-wide checks, before anything is written (the packages raise midway through their step): every
    group's hyper-parameters, the ``step_wide`` options equal in every group, and the groups' lrs."""
    for group in optimizer.param_groups:
        optimizer._check_hyperparameters(group)
    same_in_every_group(optimizer, step_wide)
    largest_lr(optimizer)


def same_in_every_group(optimizer: Any, keys: Sequence[str]) -> None:
    """Raise ValueError, naming the key and the groups, when a step-wide option differs between param groups:
    the packages read it from group 0 alone, and the other groups' value would be silently ignored."""
    first = optimizer.param_groups[0]
    for index, group in enumerate(optimizer.param_groups[1:], start=1):
        for key in keys:
            if group[key] != first[key]:
                raise ValueError(f"{key} must be the same in every param group ({type(optimizer).__name__} estimates "
                                 f"one step size d for all of them): param group 0 has {first[key]!r}, param group "
                                 f"{index} has {group[key]!r}")


def largest_lr(optimizer: Any) -> float:
    """The step's learning rate: the largest of the groups' (the packages'); every group's must be it or 0."""
    rates = [_checks.as_number("lr", group["lr"]) for group in optimizer.param_groups]
    lr = max(rates)
    for index, rate in enumerate(rates):
        if rate not in (lr, 0.0):
            raise ValueError(f"lr must be the same in every param group, or 0 (a group at lr 0 keeps its moments): "
                             f"param group {index} has lr={rate}, the largest is {lr} ({type(optimizer).__name__} "
                             f"scales one step size d for all groups)")
    return lr


def to_host(entries: list[tuple], columns: list[torch.Tensor | None]) -> list[list[list[float]] | None]:
    """Each entry's per-tensor values (``columns[i]``: a float64 tensor of shape (values, tensors), or None),
    summed across the processes that hold the other shards of a sharded entry, as Python floats.

    One ``all_reduce`` per distinct sharding (all sharded entries' values at once), one transfer per device."""
    by_sharding: dict[Any, list[int]] = {}
    for index, ((*_, sharding), column) in enumerate(zip(entries, columns)):
        if column is not None and sharding is not None:
            by_sharding.setdefault(sharding, []).append(index)
    columns = list(columns)
    for sharding, indices in by_sharding.items():
        flat = torch.cat([columns[i].reshape(-1) for i in indices])
        sharding.sum_across_shards_(flat)
        for i, part in zip(indices, flat.split([columns[i].numel() for i in indices])):
            columns[i] = part.reshape(columns[i].shape)
    present = [i for i, column in enumerate(columns) if column is not None]
    host: list[list[list[float]] | None] = [None] * len(columns)
    by_device: dict[torch.device, list[int]] = {}
    for i in present:
        by_device.setdefault(columns[i].device, []).append(i)
    for indices in by_device.values():
        flat = torch.cat([columns[i].reshape(-1) for i in indices]).cpu().tolist()
        start = 0
        for i in indices:
            rows, count = columns[i].shape
            host[i] = [flat[start + r * count:start + (r + 1) * count] for r in range(rows)]
            start += rows * count
    return host


def stage_inputs(group: dict, params: list[torch.Tensor], grads: list[torch.Tensor], *,
                 decouple: bool) -> tuple[list[torch.Tensor], list[torch.Tensor]] | None:
    """A group's local params and the gradients the estimate of d reads — negated with ``maximize``, plus the L2
    term when the decay is coupled (the packages add it into ``p.grad`` in place; ``p.grad`` is left alone here,
    the rule adds it again); None for a group that does not feed the estimate (lr 0, or nothing to step)."""
    if not _checks.as_number("lr", group["lr"]) > 0 or not params:
        return None
    params = [local(param) for param in params]
    grads = [local(grad) for grad in grads]
    if group["maximize"]:
        grads = torch._foreach_neg(grads)
    weight_decay = float(group["weight_decay"])
    if weight_decay != 0 and not decouple:
        grads = torch._foreach_add(grads, params, alpha=weight_decay)
    return params, list(grads)


# elements per batch of the estimate's foreach ops: their temporaries (a difference, a square root) stay a few MB,
# which the allocator reuses, instead of a copy of the whole model that every step faults in afresh (measured on 32
# tensors of 1M: the estimate 1.6x slower when each op ran on the whole list at once); it also bounds the step's
# extra memory
BATCH_ELEMENTS = 1 << 20


def by_batches(column: Callable[..., torch.Tensor], *lists: list[torch.Tensor]) -> torch.Tensor:
    """``column(*lists)`` — a ``[rows, len(list)]`` tensor of per-tensor values — computed on consecutive slices of the
    lists of about :data:`BATCH_ELEMENTS` elements each, and joined."""
    parts, start, size = [], 0, 0
    for end, tensor in enumerate(lists[0], 1):
        size += tensor.numel()
        if size >= BATCH_ELEMENTS or end == len(lists[0]):
            parts.append(column(*(values[start:end] for values in lists)))
            start, size = end, 0
    return torch.cat(parts, dim=1)


def dots(a: list[torch.Tensor], b: list[torch.Tensor]) -> torch.Tensor:
    """Σ a·b of each pair of tensors (in ``b``'s dtype), stacked. ``torch.dot``, as the packages: a product and its
    sum would write and read a temporary the size of the model (measured 2.7x slower on 32 tensors of 1M)."""
    return torch.stack([torch.dot(x.reshape(-1).to(y.dtype), y.reshape(-1)) for x, y in zip(a, b)])


def accumulate_(s: list[torch.Tensor], grads: list[torch.Tensor], decay: float, alpha: float) -> torch.Tensor:
    """``s ← decay·s + alpha·grad`` for every tensor; returns each new ``s``'s L1 norm, stacked."""
    torch._foreach_mul_(s, decay)
    torch._foreach_add_(s, grads, alpha=alpha)
    return torch.stack(torch._foreach_norm(s, 1))


def local(tensor: torch.Tensor) -> torch.Tensor:
    return distributed.local(tensor)


def check_group_state(group: dict[str, Any], positive: Sequence[str], numbers: Sequence[str]) -> None:
    """The estimate's group keys (from a checkpoint or set by hand): ``k`` a count, the others numbers."""
    k = group["k"]
    if isinstance(k, bool) or not isinstance(k, int) or k < 0:
        raise ValueError(f"k (the param group's step count) must be an integer >= 0, got {k!r}")
    for key in positive:
        _checks.positive(key, group[key])
    for key in numbers:
        value = _checks.as_number(key, group[key])
        if value != value or value in (float("inf"), float("-inf")):
            raise ValueError(f"{key} must be a finite number, got {value}")
