"""What sharding changes in a step: DTensor (FSDP2) parameters, and norms that span processes.

Every thalweg optimizer runs unchanged under DDP, FSDP2 (``fully_shard``), ``ZeroRedundancyOptimizer``
and ``torch.distributed.checkpoint``. The shared base (:meth:`thalweg.Optimizer.step`) calls this
module for param groups whose parameters are DTensors:

- Elementwise math runs on each process's local shard: the engine is handed plain local tensors
  (:func:`local`); state stays DTensors, so ``torch.distributed.checkpoint`` saves and reshards it.
- A norm of a sharded tensor needs every shard (NOTES.md: the local ``_foreach_norm`` of a shard is a
  *partial* result). The engine sums each tensor's local squares in float64 and hands all of a group's
  sums to :meth:`Sharding.sum_across_shards_` at once: ONE ``all_reduce`` per group and step, whatever the
  backend (the fused kernels included), then takes the square roots.
- ``max_grad_norm``/``skip_nonfinite`` use :func:`total_grad_norm`: one ``all_reduce`` per step.

``ZeroRedundancyOptimizer`` gives each process whole parameters, so per-tensor norms are already right.
The process cannot tell its parameters are one partition of a larger set, so a global gradient norm
needs the explicit :func:`reduce_grad_norm_over`.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

def _dtensor_class() -> type | None:
    # No parameter can be a DTensor unless torch.distributed.tensor was imported by someone (FSDP2
    # imports it), so plain training never pays for importing it, and builds without distributed work.
    module = sys.modules.get("torch.distributed.tensor")
    return getattr(module, "DTensor", None)


def is_sharded(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` is a DTensor (an FSDP2 / tensor-parallel parameter or gradient)."""
    dtensor = _dtensor_class()
    return dtensor is not None and isinstance(tensor, dtensor)


def local(tensor: torch.Tensor) -> torch.Tensor:
    """This process's shard of a DTensor (sharing its storage: in-place updates land in the DTensor); a plain tensor as is."""
    # Under no_grad (as in step) ``to_local()`` returns the local tensor itself, not a copy.
    return tensor.to_local() if is_sharded(tensor) else tensor


@dataclass(frozen=True)
class Sharding:
    """How one param group's DTensors are split: their device mesh and the mesh dimensions they are sharded over.

    The squares of a tensor are summed over exactly the sharded dimensions (FSDP2: the one data-parallel
    dimension; HSDP: the shard dimension, not the replicate one).
    """

    mesh: Any  # torch.distributed.device_mesh.DeviceMesh
    shard_dims: tuple[int, ...]

    def sum_across_shards_(self, values: torch.Tensor) -> None:
        """Sum ``values`` in place over the processes holding the other shards: one all_reduce per sharded mesh dimension."""
        for dim in self.shard_dims:
            torch.distributed.all_reduce(values, group=self.mesh.get_group(dim))

    def max_across_shards_(self, values: torch.Tensor) -> None:
        """The elementwise maximum of ``values`` over the processes holding the other shards, in place."""
        for dim in self.shard_dims:
            torch.distributed.all_reduce(values, op=torch.distributed.ReduceOp.MAX, group=self.mesh.get_group(dim))


def flat_offset(param: torch.Tensor) -> int | None:
    """Where this process's shard of DTensor ``param`` starts in the whole tensor's flat elements, or None when its
    shard is not one contiguous run of them (a placement other than Shard(0) on the sharded mesh dimensions, as
    FSDP2 shards)."""
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    if any(placement.is_shard() and placement.dim != 0 for placement in param.placements) or \
            sum(placement.is_shard() for placement in param.placements) > 1:
        return None
    _, offset = compute_local_shape_and_global_offset(param.shape, param.device_mesh, param.placements)
    rows = offset[0] if offset else 0
    return int(rows) * math.prod(param.shape[1:])


def group_sharding(group_index: int, params: list[torch.Tensor]) -> Sharding | None:
    """The :class:`Sharding` of a param group's parameters, None when none is a DTensor.

    Raises ValueError when the group cannot have one global norm per tensor computed with one
    reduction: plain and DTensor parameters mixed, different device meshes, or different sharded
    mesh dimensions (e.g. tensor-parallel and replicated weights together). Separate groups fix it.
    """
    dtensor = _dtensor_class()
    # the set of classes first: isinstance on each of thousands of parameters costs more than the step
    if dtensor is None or not any(issubclass(kind, dtensor) for kind in set(map(type, params))):
        return None
    first: Sharding | None = None
    for index, param in enumerate(params):
        if not isinstance(param, dtensor):
            raise ValueError(
                f"param group {group_index} mixes sharded (DTensor) and plain parameters: params[{index}] is a plain "
                f"tensor. Shard every module whose parameters the group holds (fully_shard), or put the plain "
                f"parameters in a param group of their own"
            )
        dims = []
        for dim, placement in enumerate(param.placements):
            if placement.is_replicate():
                continue
            if not placement.is_shard() and type(placement).__name__ != "_StridedShard":
                raise ValueError(f"param group {group_index}: params[{index}] has placement {placement!r} on mesh "
                                 f"dimension {dim}; a parameter must be sharded or replicated, not partial")
            dims.append(dim)
        this = Sharding(param.device_mesh, tuple(dims))
        if first is None:
            first = this
        elif this.mesh != first.mesh:
            raise ValueError(f"param group {group_index}: params[{index}] is on device mesh {this.mesh} but params[0] "
                             f"is on {first.mesh}; put parameters of different meshes in different param groups")
        elif this.shard_dims != first.shard_dims:
            raise ValueError(f"param group {group_index}: params[{index}] is sharded over mesh dimensions "
                             f"{list(this.shard_dims)} but params[0] over {list(first.shard_dims)}; a group's norms are "
                             f"reduced over one set of processes, so put them in different param groups")
    return first


def total_grad_norm(
    norm_of: Callable[[list[torch.Tensor]], torch.Tensor],
    parts: list[tuple[Sharding | None, list[torch.Tensor]]],
    process_group: Any = None,
) -> torch.Tensor:
    """The L2 norm of all gradients of all groups, each sharded tensor counted whole.

    ``norm_of`` is the local norm (``thalweg._base.global_grad_norm``); ``parts`` pairs each group's
    :class:`Sharding` (None: plain) with its gradients. Squares of the local norms are summed with one
    all_reduce per distinct sharding (one per step under FSDP2), and with one more over
    ``process_group`` (ZeRO: each process holds some whole parameters).
    """
    if process_group is None and all(sharding is None for sharding, _ in parts):
        grads = [g for _, group_grads in parts for g in group_grads]
        return norm_of(grads)
    by_sharding: dict[Sharding | None, list[torch.Tensor]] = {}
    for sharding, grads in parts:
        by_sharding.setdefault(sharding, []).extend(local(g) for g in grads)
    device, dtype = None, torch.float64  # the local norms are float64; a rank without gradients must match
    squares = []
    for sharding, grads in by_sharding.items():
        if not grads:
            continue
        square = norm_of(grads).square()
        if sharding is not None:
            square = square.reshape(1)
            sharding.sum_across_shards_(square)
        squares.append(square.reshape(()))
        device = device or grads[0].device
        dtype = torch.promote_types(dtype, square.dtype)
    if device is None:  # this process holds no gradient (a ZeRO partition left unused)
        device = torch.device("cuda", torch.cuda.current_device()) if _backend_wants_cuda(process_group) else torch.device("cpu")
    total = torch.zeros((1,), device=device, dtype=dtype)
    for square in squares:
        total += square.to(device=device, dtype=dtype)
    if process_group is not None:
        torch.distributed.all_reduce(total, group=process_group)
    return total.sqrt().reshape(())


def _backend_wants_cuda(process_group: Any) -> bool:
    return process_group is not None and torch.distributed.get_backend(process_group) == "nccl"


def reduce_grad_norm_over(optimizer: Any, process_group: Any = None) -> None:
    """Make ``max_grad_norm``/``skip_nonfinite`` use the norm of the gradients of all processes' parameters.

    For ``ZeroRedundancyOptimizer``: each process steps a thalweg optimizer over its own partition of
    the parameters, so the gradient norm it sees is its partition's. Pass the ZeRO wrapper (its process
    group is used) or a thalweg optimizer and a process group; the step then sums the squared norms of
    the partitions with one all_reduce. Every process must step (they do under ZeRO).

        zero = ZeroRedundancyOptimizer(ddp.parameters(), optimizer_class=thalweg.LAMB, lr=2e-3, max_grad_norm=1.0)
        thalweg.distributed.reduce_grad_norm_over(zero)
    """
    inner = getattr(optimizer, "optim", optimizer)
    if process_group is None:
        process_group = getattr(optimizer, "process_group", None) or torch.distributed.group.WORLD
    # thalweg.Optimizer declares the attribute (this module does not import it: the base imports this one)
    if not hasattr(type(inner), "grad_norm_process_group"):
        raise TypeError(f"optimizer must be a thalweg optimizer or a ZeroRedundancyOptimizer around one, got {type(inner).__name__}")
    inner.grad_norm_process_group = process_group


__all__ = ["Sharding", "group_sharding", "is_sharded", "local", "reduce_grad_norm_over", "total_grad_norm"]


def shard_layout(param: torch.Tensor) -> tuple[int, Any]:
    """For 8-bit state of DTensor ``param``: the flat offset of this process's shard in the whole tensor, and the
    in-place all-reduce MAX over the processes holding the other shards (see thalweg.engine.codec.encode_shard)."""
    offset = flat_offset(param)
    if offset is None:
        raise NotImplementedError(f"state_dtype='int8' needs parameters sharded on dim 0 (as FSDP2 shards), got "
                                  f"placements {tuple(param.placements)}: its blocks follow the whole tensor's elements")
    dims = tuple(dim for dim, placement in enumerate(param.placements) if not placement.is_replicate())
    return offset, Sharding(param.device_mesh, dims).max_across_shards_


def shard_like(param: torch.Tensor, local_tensor: torch.Tensor) -> torch.Tensor:
    """``local_tensor`` (this process's shard, ``param``'s local shape) as a DTensor placed as ``param``."""
    from torch.distributed.tensor import DTensor

    return DTensor.from_local(local_tensor, param.device_mesh, param.placements, run_check=False, shape=param.shape,
                              stride=param.stride())


def replicated_like(param: torch.Tensor, tensor: torch.Tensor) -> torch.Tensor:
    """``tensor``, the same on every process, as a DTensor replicated over ``param``'s mesh."""
    from torch.distributed.tensor import DTensor, Replicate

    return DTensor.from_local(tensor, param.device_mesh, [Replicate()] * param.device_mesh.ndim, run_check=False)


def refuse_unless_split_by_rows(optimizer: str, param: torch.Tensor, position: int, group_index: int) -> None:
    """A ValueError, naming the parameter, unless ``param`` is plain or a DTensor split by rows over one mesh
    dimension (FSDP2's Shard(0), HSDP's shard dimension): what a stage done whole by one owner process needs."""
    if is_sharded(param) and (flat_offset(param) is None or sum(
            not placement.is_replicate() for placement in param.placements) != 1):
        raise ValueError(f"{optimizer} on a parameter sharded other than by rows over one mesh dimension (FSDP2's "
                         f"Shard(0)) is not supported: params[{position}] of param group {group_index} has placements "
                         f"{tuple(param.placements)}")


def row_owner(param: torch.Tensor, index: int) -> tuple[Any, int]:
    """For the ``index``-th of a param group's DTensors whose rows (dim 0) are split over one mesh dimension (FSDP2):
    the process group holding its shards and the rank in it that owns the whole (``index`` mod its size: the
    tensors dealt out in turn, so every process owns some)."""
    dims = [d for d, placement in enumerate(param.placements) if not placement.is_replicate()]
    group = param.device_mesh.get_group(dims[0])
    return group, index % torch.distributed.get_world_size(group)


def _row_counts(rows: int, size: int) -> tuple[int, list[int]]:
    # FSDP2 (torch.chunk) splits R rows in chunks of ceil(R / N): the last processes' chunks short or empty
    chunk = -(-rows // size)
    return chunk, [max(0, min(chunk, rows - r * chunk)) for r in range(size)]


def gather_rows(local_rows: torch.Tensor, rows: int, group: Any, owner: int) -> torch.Tensor | None:
    """The whole tensor of ``rows`` rows on rank ``owner`` of ``group`` (None on the others), from each process's
    rows of it (``local_rows``: this process's chunk, FSDP2's split of dim 0)."""
    dist = torch.distributed
    size, rank = dist.get_world_size(group), dist.get_rank(group)
    chunk, counts = _row_counts(rows, size)
    padded = local_rows.new_zeros((chunk, *local_rows.shape[1:]))
    padded[:counts[rank]] = local_rows
    pieces = [torch.empty_like(padded) for _ in range(size)] if rank == owner else None
    dist.gather(padded, pieces, dst=dist.get_global_rank(group, owner), group=group)
    return torch.cat([piece[:count] for piece, count in zip(pieces, counts)]) if rank == owner else None


def scatter_rows(whole: torch.Tensor | None, like: torch.Tensor, rows: int, group: Any, owner: int) -> torch.Tensor:
    """This process's rows of ``whole`` (a tensor of ``rows`` rows, given on rank ``owner`` of ``group``; None on the
    others), as FSDP2 splits dim 0; ``like`` is this process's chunk of it (its shape, dtype and device)."""
    dist = torch.distributed
    size, rank = dist.get_world_size(group), dist.get_rank(group)
    chunk, counts = _row_counts(rows, size)
    pieces = None
    if rank == owner:
        pieces = [whole.new_zeros((chunk, *whole.shape[1:])) for _ in range(size)]
        for r, count in enumerate(counts):
            pieces[r][:count] = whole[r * chunk:r * chunk + count]
    received = like.new_empty((chunk, *like.shape[1:]))
    dist.scatter(received, pieces, src=dist.get_global_rank(group, owner), group=group)
    return received[:counts[rank]]
