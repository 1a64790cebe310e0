"""Train a small model with LAMB under FSDP2 (sharded parameters), then checkpoint it with DCP.

    torchrun --nproc_per_node=2 examples/distributed.py                     # CPU + gloo, or CUDA + nccl
    torchrun --nproc_per_node=2 examples/distributed.py --checkpoint /tmp/ckpt

Nothing in the optimizer is distributed-specific: thalweg sees DTensor parameters, updates the local
shards, and takes LAMB's trust ratios and the clipping norm over the full parameters (one all-reduce
each per step). The README's "Distributed training" section says what sharding changes per optimizer; on several
machines, torchrun's --nnodes and --rdzv-endpoint are all that changes here.
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

import thalweg


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--checkpoint", help="directory for a torch.distributed.checkpoint of model and optimizer")
    args = parser.parse_args()

    use_cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if use_cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    if use_cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    device = torch.device("cuda" if use_cuda else "cpu")
    mesh = init_device_mesh(device.type, (world,))

    # A regression teacher every rank agrees on; each rank draws its own part of the batch.
    torch.manual_seed(0)
    teacher = nn.Linear(32, 1).to(device)
    model = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.LayerNorm(64), nn.Linear(64, 1)).to(device)
    for layer in (model[0], model[3]):
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)  # parameters are now DTensors sharded on dim 0

    # create() puts biases and LayerNorm gains in a group without decay or trust ratio (You et al. 2019).
    optimizer = thalweg.create("lamb", model, lr=1e-2, weight_decay=0.01, max_grad_norm=1.0)

    generator = torch.Generator(device=device).manual_seed(1 + rank)
    for step in range(args.steps):
        x = torch.randn(64, 32, device=device, generator=generator)
        with torch.no_grad():
            y = teacher(x)
        loss = nn.functional.mse_loss(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 50 == 0 or step == args.steps - 1:
            loss = loss.detach()
            dist.all_reduce(loss)  # SUM: gloo has no AVG
            loss /= world
            if rank == 0:
                print(f"step {step:4d}  loss {loss.item():.5f}  grad norm {optimizer.last_grad_norm.item():.4f}")

    if args.checkpoint:
        state = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, optimizer)}
        dcp.save(state, checkpoint_id=args.checkpoint)
        if rank == 0:
            print(f"saved {args.checkpoint} (each rank wrote its shards)")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
