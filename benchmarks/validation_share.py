"""Validation's share of a fused step on layout (b), 2000 tensors of 1000 (issue 16).

Every fused step re-reads what its kernels rely on — each parameter's, gradient's, state tensor's and step
counter's address, element count, strides and dtype (``engine.partition``) — and the state entries each
parameter needs (``Optimizer._states``), so that nothing replaced, resized or re-typed between steps is
written through a stale pointer. This times a 2000 x 1000 Adam step (fused) and, inside it, those two.

    python benchmarks/validation_share.py            # this checkout
    git worktree add /tmp/before b23f145 && PYTHONPATH=/tmp/before/src python benchmarks/validation_share.py --step-only
                                                     # the step before the engine and the checks, for comparison
"""

from __future__ import annotations

import argparse
import time

import torch

import thalweg


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--step-only", action="store_true", help="time the whole step only (older checkouts)")
    parser.add_argument("--steps", type=int, default=40)
    args = parser.parse_args()
    torch.manual_seed(0)
    params = [torch.randn(1000, requires_grad=True) for _ in range(2000)]
    for param in params:
        param.grad = torch.randn(1000)
    optimizer = thalweg.Adam(params, lr=1e-3, backend="fused")
    for _ in range(5):
        optimizer.step()
    spent = {"partition": 0.0, "states": 0.0}
    if not args.step_only:
        from thalweg import _base

        partition, states = _base.engine.partition, _base.Optimizer._states

        def timed_partition(*a, **k):
            start = time.perf_counter()
            result = partition(*a, **k)
            spent["partition"] += time.perf_counter() - start
            return result

        def timed_states(self, *a, **k):
            start = time.perf_counter()
            result = states(self, *a, **k)
            spent["states"] += time.perf_counter() - start
            return result

        _base.engine.partition, _base.Optimizer._states = timed_partition, timed_states
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        optimizer.step()
        times.append(time.perf_counter() - start)
    n = len(times)
    line = f"2000 x 1000 Adam, fused: step median {sorted(times)[n // 2] * 1e3:.2f} ms"
    if not args.step_only:
        line += (f"; engine.partition {spent['partition'] / n * 1e3:.2f} ms and _states {spent['states'] / n * 1e3:.2f} ms "
                 f"per step: {(spent['partition'] + spent['states']) / sum(times):.0%} of the step")
    print(line)


if __name__ == "__main__":
    main()
