"""Muon under FSDP2: thalweg's owner-computes orthogonalisation against the naive all-gather-everywhere approach.

    python benchmarks/muon_distributed.py            # 2 and 4 CPU processes (gloo); writes benchmarks/results/
    python benchmarks/muon_distributed.py --quick    # smaller model, fewer repeats, nothing written

A transformer-shaped stack of weight matrices (``--quick``: smaller), every one sharded by rows with ``fully_shard``,
stepped by ``thalweg.Muon``. Two ways to orthogonalise a matrix whose rows are split between N processes:

- thalweg: matrix j is done by process j mod N, which gathers its rows and scatters the result's rows back (every
  matrix orthogonalised once);
- naive: every process all-gathers every matrix and orthogonalises all of them, keeping its rows (N times the work).

Both give the single process's update (checked here: the parameters after the timed steps are compared). Reported per
N: the optimizer step's median time (the slowest process's, after warm-up), and the bytes each process receives through the
collectives of the orthogonalisation per step, the most of any process (counted from the tensors handed to them;
gloo's own traffic pattern is not measured). Processes share this machine's cores: with more processes than cores the times
include the oversubscription; the ratio between the two approaches is what the run measures.
"""

from __future__ import annotations

import argparse
import datetime
import os
import pathlib
import socket
import statistics
import sys
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn


def model_of(width: int, layers: int) -> nn.Module:
    torch.manual_seed(0)
    blocks = []
    for _ in range(layers):  # attention's four projections and the MLP's two matrices
        blocks += [nn.Linear(width, width, bias=False) for _ in range(4)]
        blocks += [nn.Linear(width, 4 * width, bias=False), nn.Linear(4 * width, width, bias=False)]
    return nn.ModuleList(blocks)


def naive_split(split, coefficients, steps, eps):
    """Every process all-gathers every matrix and orthogonalises all of them (what the issue calls N x the work)."""
    from thalweg.optim import muon

    for position, whole, update in split:
        size, rank = dist.get_world_size(), dist.get_rank()
        rows, columns = whole.shape[0], update[0].numel() if update.shape[0] else whole.shape[1:].numel()
        chunk = -(-rows // size)
        counts = [max(0, min(chunk, rows - r * chunk)) for r in range(size)]
        padded = update.new_zeros((chunk, columns))
        padded[:counts[rank]] = update.reshape(counts[rank], columns)
        pieces = [torch.empty_like(padded) for _ in range(size)]
        dist.all_gather(pieces, padded)
        matrix = torch.cat([piece[:count] for piece, count in zip(pieces, counts)])
        ortho = muon.orthogonalize(matrix, coefficients, steps, eps).to(update.dtype)
        yield position, ortho[rank * chunk:rank * chunk + counts[rank]].reshape(update.shape)


class Counted:
    """Bytes this process receives through the orthogonalisation's collectives (from the tensors handed to them)."""

    def __init__(self) -> None:
        self.bytes = 0
        self.originals = {name: getattr(dist, name) for name in ("gather", "scatter", "all_gather")}

    def __enter__(self):
        def gather(tensor, gather_list=None, dst=0, group=None):
            if gather_list is not None:  # the owner receives every other process's rows
                self.bytes += tensor.nbytes * (len(gather_list) - 1)
            return self.originals["gather"](tensor, gather_list, dst=dst, group=group)

        def scatter(tensor, scatter_list=None, src=0, group=None):
            if scatter_list is None:  # every other process receives its rows
                self.bytes += tensor.nbytes
            return self.originals["scatter"](tensor, scatter_list, src=src, group=group)

        def all_gather(tensor_list, tensor, group=None):
            self.bytes += tensor.nbytes * (len(tensor_list) - 1)
            return self.originals["all_gather"](tensor_list, tensor, group=group)

        dist.gather, dist.scatter, dist.all_gather = gather, scatter, all_gather
        return self

    def __exit__(self, *exc) -> None:
        for name, fn in self.originals.items():
            setattr(dist, name, fn)


def worker(rank: int, size: int, port: int, width: int, layers: int, repeats: int, out: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=size)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    import thalweg
    from thalweg.optim import muon

    mesh = init_device_mesh("cpu", (size,))
    results = {}
    finals = {}
    for mode in ("thalweg", "naive"):
        model = model_of(width, layers)
        for block in model:
            fully_shard(block, mesh=mesh)
        optimizer = thalweg.Muon(model.parameters(), lr=0.02)
        generator = torch.Generator().manual_seed(1)
        grads = [torch.randn(p.shape, generator=generator) for p in model.parameters()]
        original = muon._orthogonalize_split
        if mode == "naive":
            muon._orthogonalize_split = naive_split
        try:
            times = []
            with Counted() as counted:
                for step in range(repeats + 2):
                    from torch.distributed.tensor import distribute_tensor

                    for p, g in zip(model.parameters(), grads):
                        p.grad = distribute_tensor(g, mesh, p.placements)
                    dist.barrier()
                    start = time.perf_counter()
                    optimizer.step()
                    elapsed = torch.tensor(time.perf_counter() - start)
                    dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)  # the slowest process's
                    if step >= 2:
                        times.append(float(elapsed))
                received = torch.tensor(counted.bytes / (repeats + 2))
                dist.all_reduce(received, op=dist.ReduceOp.MAX)
        finally:
            muon._orthogonalize_split = original
        results[mode] = {"ms": statistics.median(times) * 1e3, "bytes_per_step": float(received)}
        finals[mode] = [p.detach().full_tensor() for p in model.parameters()]
    same = max(float((a - b).abs().max()) for a, b in zip(finals["thalweg"], finals["naive"]))
    if rank == 0:
        out[size] = {**results, "max_abs_diff": same}
    dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    width, layers, repeats = (64, 1, 2) if args.quick else (256, 2, 5)
    manager = mp.Manager()
    out = manager.dict()
    for size in (2, 4):
        mp.spawn(worker, args=(size, free_port(), width, layers, repeats, out), nprocs=size, join=True)
    params = sum(p.numel() for p in model_of(width, layers).parameters())
    today = datetime.date.today().isoformat()
    lines = [f"# Muon under FSDP2 on CPU processes (gloo), {today}", "",
             f"torch {torch.__version__}; {os.cpu_count()} cores shared by the processes; `python benchmarks/"
             f"muon_distributed.py{' --quick' if args.quick else ''}`. {6 * layers} matrices ({params / 1e6:.2f}M "
             f"parameters, width {width}), each sharded by rows; median of {repeats} steps, the slowest process's.", "",
             "| processes | thalweg ms/step | naive all-gather ms/step | naive / thalweg | thalweg MB received/step "
             "| naive MB received/step (most of any process) | same parameters |", "|---|---|---|---|---|---|---|"]
    for size in sorted(out.keys()):
        r = out[size]
        lines.append(f"| {size} | {r['thalweg']['ms']:.1f} | {r['naive']['ms']:.1f} | {r['naive']['ms'] / r['thalweg']['ms']:.2f}× "
                     f"| {r['thalweg']['bytes_per_step'] / 1e6:.2f} | {r['naive']['bytes_per_step'] / 1e6:.2f} "
                     f"| {'yes' if r['max_abs_diff'] == 0 else r['max_abs_diff']} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if not args.quick:
        path = pathlib.Path(__file__).parent / "results" / f"muon-distributed-cpu-{today}.md"
        path.write_text(text)
        print(f"written: {path}")


if __name__ == "__main__":
    sys.exit(main())
