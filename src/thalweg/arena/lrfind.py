"""LR range test (Smith 2017; fastai's lr_find): raise lr exponentially each step, watch the loss.

The suggestion is the lr where the smoothed loss falls fastest (steepest negative slope against
log lr); the lr of the minimum smoothed loss divided by 10 is reported too, as fastai does.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from . import protocol
from .errors import ArenaError
from .protocol import DEFAULT_BACKEND
from .runner import check_backend, check_device, check_optimizers, check_positive
from .tasks import get_task


def smooth(losses: list[float], beta: float = 0.98) -> list[float]:
    """Bias-corrected exponential moving average (so the first values are not pulled towards 0)."""
    avg, out = 0.0, []
    for i, v in enumerate(losses, 1):
        avg = beta * avg + (1 - beta) * v
        out.append(avg / (1 - beta**i))
    return out


def suggest(lrs: list[float], smoothed: list[float]) -> dict[str, float | None]:
    """The steepest-descent lr and the min-loss lr / 10 from a range test's smoothed curve."""
    if len(lrs) < 3:
        return {"steepest": None, "min_over_10": None}
    i_min = min(range(len(smoothed)), key=smoothed.__getitem__)
    logs = [math.log(x) for x in lrs]
    # Slope over a few points, so one noisy batch does not decide; stop at the minimum.
    k = max(1, len(lrs) // 20)
    slopes = [(smoothed[i + k] - smoothed[i]) / (logs[i + k] - logs[i]) for i in range(0, max(1, i_min - k + 1))
              if i + k < len(lrs)]
    i_steep = min(range(len(slopes)), key=slopes.__getitem__) if slopes else i_min
    return {"steepest": lrs[i_steep], "min_over_10": lrs[i_min] / 10}


def lr_find(task: str, optimizer: str, lr_min: float | None = None, lr_max: float | None = None,
            steps: int = 200, seed: int = 0, stop_factor: float = 4.0, backend: str = DEFAULT_BACKEND,
            device: str = "cpu") -> dict[str, Any]:
    """Run the range test on a built-in task; stops once the smoothed loss exceeds ``stop_factor`` x
    its minimum. The default span is the coarse search's, 1e-5..1e2 (:data:`protocol.COARSE_BOUNDS`)."""
    import thalweg

    t = get_task(task)
    check_optimizers([optimizer])
    check_positive("steps", steps, integer=True)
    check_backend(backend)
    device = check_device(device)
    lr_min = protocol.COARSE_BOUNDS[0] if lr_min is None else lr_min
    lr_max = protocol.COARSE_BOUNDS[1] if lr_max is None else lr_max
    check_positive("lr_min", lr_min)
    check_positive("lr_max", lr_max)
    if lr_max <= lr_min:
        raise ArenaError(f"lr_max must exceed lr_min, got {lr_max:g} <= {lr_min:g}")
    with protocol.threads(1):
        torch.manual_seed(seed)
        problem = t.setup(seed, t.has_sparse_variant and optimizer in protocol.SPARSE_OPTIMIZERS, torch.device(device))
        opt = thalweg.create(optimizer, problem.params, lr=lr_min, backend=backend)
        ratio = (lr_max / lr_min) ** (1 / max(1, steps - 1))
        lrs, losses, best = [], [], math.inf
        for step in range(steps):
            lr = lr_min * ratio**step
            for g in opt.param_groups:
                g["lr"] = lr
            opt.zero_grad()
            loss = problem.loss(step)
            value = float(loss.detach())
            if not math.isfinite(value):
                break
            lrs.append(lr)
            losses.append(value)
            sm = smooth(losses)[-1]
            best = min(best, sm)
            if step > 10 and sm > stop_factor * best:
                break
            loss.backward()
            opt.step()
    smoothed = smooth(losses)
    return {"task": t.name, "optimizer": optimizer, "lr": lrs, "loss": losses, "smoothed": smoothed,
            "suggestion": suggest(lrs, smoothed), "default_lr": protocol.default_lr(optimizer)}


def lr_find_figure(result: dict[str, Any]) -> Any:
    from .figures import _figure

    fig = _figure(7, 4.2)
    ax = fig.subplots()
    ax.plot(result["lr"], result["loss"], color="0.75", lw=0.8, label="loss")
    ax.plot(result["lr"], result["smoothed"], color="C0", lw=1.8, label="smoothed loss")
    s = result["suggestion"]
    if s["steepest"] is not None:
        ax.axvline(s["steepest"], color="C3", ls="--", label=f"suggested (steepest) {s['steepest']:.3g}")
        ax.axvline(s["min_over_10"], color="C2", ls=":", label=f"min / 10 {s['min_over_10']:.3g}")
    ax.set_xscale("log")
    if result["smoothed"]:
        lo = min(min(result["smoothed"]), min(result["loss"]))
        hi = max(result["smoothed"][: max(1, len(result["smoothed"]) // 2)])
        ax.set_ylim(lo - 0.1 * abs(hi - lo), hi + 0.5 * abs(hi - lo) + 1e-9)
    ax.set(xlabel="learning rate", ylabel="training loss",
           title=f"lr range test: {result['optimizer']} on {result['task']}")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    return fig


def write_lr_find(result: dict[str, Any], out: str | Path) -> Path:
    """Save the range test's JSON and PNG into ``out``; returns the PNG's path."""
    from .figures import save_result_with_figure

    return save_result_with_figure(result, out, f"lr-find-{result['task']}-{result['optimizer']}", lr_find_figure(result))
