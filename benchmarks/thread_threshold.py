"""Where a fused CPU step starts to gain from torch's thread team: ``thalweg.engine.cpu.PARALLEL_FROM``.

    python benchmarks/thread_threshold.py

For Adam and SGD on one float32 tensor of n elements, times the fused step run on the calling thread
and on the team, round-robin, each after a torch op as in training (the backward pass comes just
before the step, so torch's OpenMP workers are awake or still spinning). Prints the ratio per size.
"""

from __future__ import annotations

import statistics
import time

import torch

import thalweg
from thalweg.engine import cpu as numba_cpu

SIZES = [1 << k for k in range(12, 21)]


def median_ms(optimizer, parallel_from, before, repeats):
    numba_cpu.PARALLEL_FROM = parallel_from
    times = []
    for _ in range(repeats):
        before()
        start = time.perf_counter()
        optimizer.step()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def main(repeats=200):
    work = torch.randn(1 << 20)
    out = torch.empty_like(work)
    before = lambda: out.copy_(work)  # noqa: E731 - one torch op on its thread team, like a backward pass
    print(f"torch threads: {torch.get_num_threads()}; OpenMP entry found: {bool(numba_cpu.OPENMP_ENTRY)}")
    print(f"{'optimizer':>9} {'elements':>9} {'caller ms':>10} {'team ms':>8} {'team speed-up':>14}")
    for name, cls, options in [("adam", thalweg.Adam, dict(lr=1e-3)), ("sgd", thalweg.SGD, dict(lr=1e-2))]:
        for size in SIZES:
            param = torch.randn(size, requires_grad=True)
            param.grad = torch.randn(size)
            optimizer = cls([param], backend="fused", **options)
            optimizer.step()
            caller, team = [], []
            for _ in range(5):  # alternate in blocks, so both see the same machine noise
                caller.append(median_ms(optimizer, 1 << 62, before, repeats // 5))
                team.append(median_ms(optimizer, 0, before, repeats // 5))
            caller_ms, team_ms = statistics.median(caller), statistics.median(team)
            print(f"{name:>9} {size:>9} {caller_ms:>10.4f} {team_ms:>8.4f} {caller_ms / team_ms:>14.2f}")


if __name__ == "__main__":
    main()
