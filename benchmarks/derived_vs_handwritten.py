"""The derived CPU kernels against the hand-written ones they replaced, step for step, in one run.

    python benchmarks/derived_vs_handwritten.py [--quick]

Issue #11 asked for this line: before the rule engine, each optimizer's numba kernel was written by hand
(``benchmarks/legacy/numba_cpu.py``, kept here, outside the package, only until the derived kernels reach
0.97 of its speed). For each optimizer and layout, two identical optimizers step the same way: one through
the engine (``engine.run`` with its bucket partition done once beforehand, so the step is the per-step host
values and the kernel launches), one through the hand-written kernel with the glue that launched it
(``benchmarks/legacy/launch.py``: its scalar tables and the step counters advanced inside the kernel).
Both are timed round-robin from a cold cache (a 256 MB copy before every timed step, as in
``step_speed.py``); the ratio is hand-written time / derived time (>= 1: the derived kernel is as fast).
"""

from __future__ import annotations

import argparse
import datetime
import json
import pathlib
import sys

import numpy as np
import torch

import thalweg
from thalweg import engine
from thalweg.engine import host

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from legacy import launch as legacy  # noqa: E402
from step_speed import Copy, gpt_shapes, interleaved_medians  # noqa: E402

OPTIMIZERS = {
    "sgd": (thalweg.SGD, dict(lr=0.01)),
    "momentum": (thalweg.SGD, dict(lr=0.01, momentum=0.9)),
    "adam": (thalweg.Adam, dict(lr=1e-3)),
    "adamw": (thalweg.AdamW, dict(lr=1e-3, weight_decay=0.01)),
    "rmsprop": (thalweg.RMSprop, dict(lr=1e-3)),
    "adagrad": (thalweg.Adagrad, dict(lr=1e-2)),
    "lars": (thalweg.LARS, dict(lr=0.1)),
    "lamb": (thalweg.LAMB, dict(lr=1e-3)),
}


def layouts(quick):
    if quick:
        return {"a:4x256k": [(1 << 18,)] * 4, "b:200x1000": [(1000,)] * 200, "c:gpt-tiny": gpt_shapes(1024, 64, 2, 64)}
    return {"a:32x1M": [(1 << 20,)] * 32, "b:2000x1000": [(1000,)] * 2000, "c:gpt-small": gpt_shapes()}


def built(cls, options, shapes):
    """An optimizer over fresh parameters with gradients, after one step (its state exists)."""
    generator = torch.Generator().manual_seed(0)
    params = [torch.randn(shape, generator=generator).requires_grad_() for shape in shapes]
    for param in params:
        param.grad = torch.randn(param.shape, generator=generator) * 1e-3
    optimizer = cls(params, backend="fused", **options)
    optimizer.step()
    return optimizer


class Derived:
    """One step through the engine, the bucket partition taken once."""

    def __init__(self, optimizer):
        self.optimizer = optimizer  # owns the state (the partition below holds raw addresses)
        group = optimizer.param_groups[0]
        self.scalars = optimizer._scalars(group)
        self.program = optimizer.rule.program(self.scalars)
        self.params = group["params"]
        self.grads = [p.grad for p in self.params]
        states = [optimizer.state[p] for p in self.params]
        self.roles = [[s[r] for s in states] for r in self.program.state_roles]
        self.steps = [s["step"] for s in states] if optimizer.counts_steps else None
        self.first = np.zeros(len(self.params), dtype=np.bool_)
        self.partition = host.partition(self.params, self.grads, self.roles, self.steps)

    def step(self):
        original = host.partition
        host.partition = lambda *args: self.partition
        try:
            with torch.no_grad():
                engine.run(self.program, "fused", self.params, self.grads, self.roles, self.steps, self.first, self.scalars)
        finally:
            host.partition = original


def run(quick):
    repeats = 5 if quick else 15
    copy = Copy()
    rows = []
    for layout, shapes in layouts(quick).items():
        for name, (cls, options) in OPTIMIZERS.items():
            derived = Derived(built(cls, options, shapes))
            handwritten = legacy.HandWritten(name, built(cls, options, shapes))
            seconds = interleaved_medians({"derived": derived, "hand-written": handwritten}, repeats, flush=copy.step)
            row = {"layout": layout, "optimizer": name, "derived_ms": seconds["derived"] * 1e3,
                   "handwritten_ms": seconds["hand-written"] * 1e3}
            row["ratio"] = row["handwritten_ms"] / row["derived_ms"]
            rows.append(row)
            print(f"{layout:12s} {name:9s} derived {row['derived_ms']:8.3f} ms  hand-written {row['handwritten_ms']:8.3f} ms"
                  f"  hand-written/derived {row['ratio']:.3f}", flush=True)
    return {"torch": torch.__version__, "threads": torch.get_num_threads(), "repeats": repeats, "quick": quick,
            "rows": rows}


def markdown(result):
    lines = [f"Median of {result['repeats']} interleaved steps from a cold cache; torch {result['torch']}, "
             f"{result['threads']} threads. Ratio = hand-written ms / derived ms (>= 0.97 is the issue's bar).", "",
             "| layout | optimizer | derived ms | hand-written ms | hand-written / derived |", "|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['layout']} | {r['optimizer']} | {r['derived_ms']:.3f} | {r['handwritten_ms']:.3f} | "
                     f"{r['ratio']:.2f} |")
    return "\n".join(lines) + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", default=str(pathlib.Path(__file__).parent / "results"))
    args = parser.parse_args()
    result = run(args.quick)
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"derived-vs-handwritten-cpu-{datetime.date.today().isoformat()}" + ("-quick" if args.quick else "")
    (out / f"{stem}.json").write_text(json.dumps(result, indent=1))
    (out / f"{stem}.md").write_text(markdown(result))
    print(f"wrote {out / stem}.json and .md")


if __name__ == "__main__":
    main()
