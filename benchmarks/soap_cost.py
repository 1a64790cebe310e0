"""What SOAP costs: time per step and state memory against AdamW on one process, and under FSDP2 on 2 and 4.

    python benchmarks/soap_cost.py            # writes benchmarks/results/soap-cost-cpu-<date>.md
    python benchmarks/soap_cost.py --quick    # smaller model, fewer steps, nothing written

The transformer-shaped stack of benchmarks/muon_distributed.py (per layer attention's four width x width projections
and the MLP's width x 4·width pair), gradients fixed (random, seeded), so only the optimizer is timed:

- one process: ``thalweg.SOAP`` (defaults: a refresh of the bases every 10 Adam steps), ``thalweg.AdamW`` and, when
  installed, pytorch-optimizer's SOAP; the median step over whole refresh cycles, the refresh steps' median on their
  own, and the state's bytes per parameter (summed from the state tensors, not computed from a formula);
- FSDP2, N = 2 and 4 CPU processes (gloo): SOAP's median step (the slowest process's) and the bytes each process
  receives per step through its gathers and scatters (the most of any process, counted from the tensors handed to the
  collectives), with the parameters checked against the one-process run (the same bits expected).

The processes share this machine's cores: with more processes than cores the times include the oversubscription.
"""

from __future__ import annotations

import argparse
import datetime
import os
import pathlib
import statistics
import sys
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from muon_distributed import Counted, free_port, model_of

import thalweg

CYCLE = 10  # SOAP's default precondition_frequency


def grads_for(model: torch.nn.Module) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return [torch.randn(p.shape, generator=generator) for p in model.parameters()]


def timed_steps(model, optimizer, grads, steps: int, place=lambda p, g: g, sync=lambda t: t) -> list[float]:
    """Seconds of each step after the first (the initialising one), gradients set before each."""
    times = []
    for step in range(steps + 1):
        for p, g in zip(model.parameters(), grads):
            p.grad = place(p, g)
        start = time.perf_counter()
        optimizer.step()
        elapsed = sync(time.perf_counter() - start)
        if step:
            times.append(elapsed)
    return times


def state_bytes_per_param(optimizer, model) -> float:
    """The bytes of every state tensor (in lists too: pytorch-optimizer keeps its factors in lists) per parameter."""
    def size(value) -> int:
        if isinstance(value, torch.Tensor):
            return value.numel() * value.element_size() if value.numel() > 1 else 0
        return sum(map(size, value)) if isinstance(value, (list, tuple)) else 0

    total = sum(size(value) for state in optimizer.state.values() for value in state.values())
    return total / sum(p.numel() for p in model.parameters())


def warm_up(build) -> None:
    """Two steps on a small model first: the fused kernels compile (or load from numba's cache) outside the timing."""
    model = model_of(16, 1)
    timed_steps(model, build(model.parameters()), grads_for(model), 2)


def one_process(width: int, layers: int, cycles: int) -> dict:
    torch.set_num_threads(1)
    rows = {}
    builders = {"SOAP": lambda ps: thalweg.SOAP(ps), "AdamW": lambda ps: thalweg.AdamW(ps, lr=3e-3)}
    try:
        import pytorch_optimizer

        builders["pytorch-optimizer SOAP"] = lambda ps: pytorch_optimizer.SOAP(ps)
    except ImportError:
        pass
    for name, build in builders.items():
        warm_up(build)
        model = model_of(width, layers)
        optimizer = build(model.parameters())
        times = timed_steps(model, optimizer, grads_for(model), cycles * CYCLE)
        # the Adam steps t = 1, 2, ...: t % 10 == 0 refreshes the bases (step index i is t = i + 1)
        refreshes = [t for i, t in enumerate(times) if (i + 1) % CYCLE == 0]
        rows[name] = {"ms": statistics.mean(times) * 1e3, "median_ms": statistics.median(times) * 1e3,
                      "refresh_ms": statistics.median(refreshes) * 1e3 if name != "AdamW" else None,
                      "bytes_per_param": state_bytes_per_param(optimizer, model)}
    return rows


def worker(rank: int, size: int, port: int, width: int, layers: int, cycles: int, out: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=size)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import distribute_tensor

    mesh = init_device_mesh("cpu", (size,))
    warm_up(thalweg.SOAP)
    model = model_of(width, layers)
    for block in model:
        fully_shard(block, mesh=mesh)
    optimizer = thalweg.SOAP(model.parameters())

    def slowest(seconds: float) -> float:
        value = torch.tensor(seconds)
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
        return float(value)

    with Counted() as counted:
        times = timed_steps(model, optimizer, grads_for(model_of(width, layers)), cycles * CYCLE,
                            place=lambda p, g: distribute_tensor(g, mesh, p.placements), sync=slowest)
        received = torch.tensor(counted.bytes / (cycles * CYCLE + 1))
    dist.all_reduce(received, op=dist.ReduceOp.MAX)
    params = [p.detach().full_tensor() for p in model.parameters()]
    if rank == 0:
        single = model_of(width, layers)
        alone = thalweg.SOAP(single.parameters())
        timed_steps(single, alone, grads_for(single), cycles * CYCLE)
        same = max(float((a - b.detach()).abs().max()) for a, b in zip(params, single.parameters()))
        out[size] = {"ms": statistics.mean(times) * 1e3, "bytes_per_step": float(received), "max_abs_diff": same}
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    width, layers, cycles = (64, 1, 1) if args.quick else (256, 2, 2)
    alone = one_process(width, layers, cycles)
    manager = mp.Manager()
    out = manager.dict()
    for size in (2, 4):
        mp.spawn(worker, args=(size, free_port(), width, layers, cycles, out), nprocs=size, join=True)
    params = sum(p.numel() for p in model_of(width, layers).parameters())
    today = datetime.date.today().isoformat()
    adamw = alone["AdamW"]["ms"]
    lines = [f"# What SOAP costs, on CPU, {today}", "",
             f"torch {torch.__version__}; {os.cpu_count()} cores; one torch thread per process; `python benchmarks/"
             f"soap_cost.py{' --quick' if args.quick else ''}`. {6 * layers} matrices ({params / 1e6:.2f}M parameters, "
             f"width {width}), fixed gradients; {cycles * CYCLE} Adam steps after the initialising one ({cycles} "
             f"refresh{'es' if cycles > 1 else ''} of the bases, every {CYCLE}).", "",
             "## One process", "",
             "| optimizer | mean ms/step | against AdamW | median ms/step | refresh step ms | state bytes/param |",
             "|---|---|---|---|---|---|"]
    for name, row in alone.items():
        refresh = f"{row['refresh_ms']:.1f}" if row["refresh_ms"] is not None else "–"
        lines.append(f"| {name} | {row['ms']:.1f} | {row['ms'] / adamw:.1f}× | {row['median_ms']:.1f} | {refresh} "
                     f"| {row['bytes_per_param']:.2f} |")
    lines += ["", "## FSDP2 (every matrix sharded by rows)", "",
              "| processes | mean ms/step (slowest process) | against one process | MB received/step (most of any "
              "process) | parameters against one process |", "|---|---|---|---|---|"]
    for size in sorted(out.keys()):
        row = out[size]
        lines.append(f"| {size} | {row['ms']:.1f} | {row['ms'] / alone['SOAP']['ms']:.2f}× "
                     f"| {row['bytes_per_step'] / 1e6:.2f} | "
                     f"{'the same bits' if row['max_abs_diff'] == 0 else row['max_abs_diff']} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if not args.quick:
        path = pathlib.Path(__file__).parent / "results" / f"soap-cost-cpu-{today}.md"
        path.write_text(text)
        print(f"written: {path}")


if __name__ == "__main__":
    sys.exit(main())
