"""bfloat16 parameters without float32 master weights (``param_update``): memory measured, step time, and a task
where rounding to nearest stalls.

    python benchmarks/bf16_params.py            # writes benchmarks/results/bf16-params-<device>-<date>.md
    python benchmarks/bf16_params.py --quick    # smoke run: small tensors, few repeats

Memory: optimizer state bytes per parameter of a bfloat16 GPT-style model (the storages the state holds after
one step, nothing computed from formulas), AdamW with float32 and 8-bit state, each with param_update
"nearest", "stochastic" and "kahan": the compensation is the difference.

Speed: AdamW steps on 32 bfloat16 tensors of 1M (``--quick``: 8 of 64k), fused backend, float32 and 8-bit
state, the three modes timed round-robin in one run (median of the repeats; ratios to "nearest").

Quality: least squares on 16 weights of magnitude 1-2 started 0.05 off, full batch, 600 steps of Adam at lr 2e-4
(updates of about 2e-4 where bfloat16's spacing is 2^-7): the final loss of float32 parameters, and of bfloat16
ones with each mode (the same task as tests/test_param_update.py).
"""

from __future__ import annotations

import argparse
import datetime
import pathlib
import sys

import torch

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from int8_state import report_header, state_bytes_per_param, timed, write_report  # noqa: E402

import thalweg  # noqa: E402

MODES = ("nearest", "stochastic", "kahan")


def candidates(n_tensors: int, numel: int) -> dict:
    def make(state_dtype, mode):
        generator = torch.Generator().manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(numel, generator=generator).bfloat16()) for _ in range(n_tensors)]
        for p in params:
            p.grad = torch.randn(numel, generator=generator).bfloat16()
        return thalweg.AdamW(params, lr=1e-3, backend="fused", state_dtype=state_dtype, param_update=mode)

    return {(state, mode): (lambda state=state, mode=mode: make(torch.float32 if state == "float32" else "int8", mode))
            for state in ("float32", "8-bit") for mode in MODES}


def regression(dtype: torch.dtype, **options) -> float:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(1024, 16, generator=generator)
    target = (torch.rand(16, generator=generator) + 1) * torch.sign(torch.randn(16, generator=generator))
    y = x @ target + 0.3 * torch.randn(1024, generator=generator)
    weight = torch.nn.Parameter((target + 0.1 * (torch.rand(16, generator=generator) - 0.5)).to(dtype))
    optimizer = thalweg.Adam([weight], lr=2e-4, backend="fused", **options)
    for _ in range(600):
        optimizer.zero_grad()
        ((x @ weight.float() - y) ** 2).mean().backward()
        optimizer.step()
    return float(((x @ weight.detach().float() - y) ** 2).mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    n_tensors, numel, repeats = (8, 1 << 16, 5) if args.quick else (32, 1 << 20, 15)

    memory = {(state, mode): state_bytes_per_param(torch.bfloat16, state_dtype=state_dtype, param_update=mode)
              for state, state_dtype in (("float32", torch.float32), ("8-bit", "int8")) for mode in MODES}
    median, first = timed(candidates(n_tensors, numel), repeats)
    float32 = regression(torch.float32)
    losses = {mode: regression(torch.bfloat16, state_dtype=torch.float32, param_update=mode) for mode in MODES}

    today = datetime.date.today().isoformat()
    lines = report_header("bfloat16 parameters without float32 master weights", "bf16_params.py", args.quick) + [
             "## Memory: AdamW state bytes per parameter (measured storages, bfloat16 GPT-style model)", "",
             "| state | nearest | stochastic | kahan | compensation (kahan - nearest) |", "|---|---|---|---|---|"]
    lines += [f"| {state} | " + " | ".join(f"{memory[state, mode]:.3f}" for mode in MODES)
              + f" | {memory[state, 'kahan'] - memory[state, 'nearest']:.3f} |" for state in ("float32", "8-bit")]
    lines += ["", f"## Speed: fused AdamW, {n_tensors} bfloat16 tensors of {numel} (median of {repeats}, round-robin)",
              "", "| state | mode | ms/step | vs nearest | first step s |", "|---|---|---|---|---|"]
    lines += [f"| {state} | {mode} | {median[state, mode]:.2f} | {median[state, mode] / median[state, 'nearest']:.2f}× "
              f"| {first[state, mode]:.2f} |" for state, mode in median]
    lines += ["", "## Quality: least squares where rounding to nearest stalls (final loss, 600 Adam steps)", "",
              "| parameters | final loss | vs float32 |", "|---|---|---|", f"| float32 | {float32:.5f} | |"]
    lines += [f"| bfloat16, {mode} | {loss:.5f} | {100 * (loss - float32) / float32:+.2f} % |"
              for mode, loss in losses.items()]
    write_report(lines, f"bf16-params-cpu-{today}.md", args.quick)


if __name__ == "__main__":
    main()
