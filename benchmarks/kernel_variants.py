"""Every option combination of every fused CPU kernel, in ns per element: finds a variant LLVM left scalar.

    python benchmarks/kernel_variants.py [float32|float64|bfloat16] [float32]

(the second argument: ``state_dtype``, for bfloat16 params with float32 state)

A kernel is one loop per chunk with the options as run-time switches that LLVM moves out of the loop
("unswitches") and then vectorises; when it gives up on one combination, that combination alone runs
10-20x slower. This scan found plain RMSprop at 11 ns/element against 0.2-0.6 for its other variants.
One 2M-element tensor, run on the calling thread, best of 5 steps; the variants of one optimizer
should sit within ~2x of each other.
"""

from __future__ import annotations

import itertools
import sys
import time

import torch

import thalweg
from thalweg.engine import cpu as numba_cpu

OPTIONS = {
    "SGD": (thalweg.SGD, dict(lr=[0.1], momentum=[0, 0.9], nesterov=[False, True], maximize=[False, True],
                              weight_decay=[0, 0.1])),
    "Adam": (thalweg.Adam, dict(lr=[1e-3], amsgrad=[False, True], maximize=[False, True], weight_decay=[0, 0.1])),
    "AdamW": (thalweg.AdamW, dict(lr=[1e-3], amsgrad=[False, True], weight_decay=[0, 0.1])),
    "RMSprop": (thalweg.RMSprop, dict(lr=[1e-3], centered=[False, True], momentum=[0, 0.9], maximize=[False, True],
                                      weight_decay=[0, 0.1])),
    "Adagrad": (thalweg.Adagrad, dict(lr=[1e-3], maximize=[False, True], weight_decay=[0, 0.1])),
    "LARS": (thalweg.LARS, dict(lr=[0.1], momentum=[0, 0.9], nesterov=[False, True], weight_decay=[0, 0.1])),
    "LAMB": (thalweg.LAMB, dict(lr=[1e-3], maximize=[False, True], weight_decay=[0, 0.1])),
}


def ns_per_element(cls, dtype, state_dtype, n=1 << 21, **options):
    param = torch.randn(n, dtype=dtype, requires_grad=True)
    param.grad = torch.randn(n, dtype=dtype)
    optimizer = cls([param], backend="fused", state_dtype=state_dtype, **options)
    optimizer.step()
    optimizer.step()  # SGD's first momentum step creates its buffer outside the kernel
    times = []
    for _ in range(5):
        start = time.perf_counter()
        optimizer.step()
        times.append(time.perf_counter() - start)
    return min(times) / n * 1e9


def main():
    dtype = getattr(torch, sys.argv[1] if len(sys.argv) > 1 else "float32")
    state_dtype = getattr(torch, sys.argv[2]) if len(sys.argv) > 2 else None
    numba_cpu.PARALLEL_FROM = 1 << 62  # one thread: the loop's own speed
    for name, (cls, grid) in OPTIONS.items():
        results = []
        for values in itertools.product(*grid.values()):
            options = dict(zip(grid, values))
            if options.get("nesterov") and not options.get("momentum"):
                continue
            results.append((ns_per_element(cls, dtype, state_dtype, **options), options))
        fastest = min(ns for ns, _ in results)
        for ns, options in results:
            mark = "   <-- more than 3x the fastest variant" if ns > 3 * fastest else ""
            print(f"{name:8s} {ns:6.2f} ns/element  {options}{mark}")


if __name__ == "__main__":
    main()
