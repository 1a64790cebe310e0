"""``tune``: a grid over the tuning knobs of one optimizer on one task, drawn as heat-maps.

The lr axis is the arena's grid around the centre its coarse search finds on the task. Two grids share
it: lr x the momentum knob (``betas[0]`` for Adam-family, ``momentum`` for
SGD-family and RMSprop; Adagrad has none, so its grid is lr x ``lr_decay``) at the default weight
decay, then lr x weight decay at the best momentum value. Cells hold the final validation metric
(seed 0); diverged cells are marked.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable

from . import protocol
from .errors import ArenaError
from .protocol import DEFAULT_BACKEND
from .runner import check_backend, check_device, check_optimizers, check_positive
from .tasks import get_task

_BETA_LIKE = {"adam", "adamw", "lamb"}
# the optimizers whose second knob is defined here
TUNABLE = ("sgd", "momentum", "adam", "adamw", "rmsprop", "adagrad", "lars", "lamb")
MOMENTA = [0.0, 0.5, 0.9, 0.99]
WEIGHT_DECAYS = [0.0, 1e-4, 1e-3, 1e-2, 1e-1]


def knob(optimizer: str) -> tuple[str, list[float], Callable[[float], dict[str, Any]]]:
    """(label, values, value -> hyper-parameters) of the optimizer's second tuning knob."""
    if optimizer in _BETA_LIKE:
        return "beta1", MOMENTA, lambda v: {"betas": (v, 0.999)}
    if optimizer == "adagrad":
        return "lr_decay", [0.0, 1e-4, 1e-3, 1e-2], lambda v: {"lr_decay": v}
    return "momentum", MOMENTA, lambda v: {"momentum": v}


def tune(task: str, optimizer: str, budget: float = 1.0, quick: bool = True,
         multipliers: tuple[float, ...] = protocol.GRID_MULTIPLIERS,
         on_run: Callable[[], None] | None = None, backend: str = DEFAULT_BACKEND, device: str = "cpu") -> dict[str, Any]:
    """Run both grids; returns a JSON-ready dict with the cells and the best setting."""
    t = get_task(task)
    check_optimizers([optimizer], TUNABLE, "tune's second knob is defined for " + ", ".join(TUNABLE))
    check_positive("budget", budget)
    check_backend(backend)
    device = check_device(device)
    steps = t.budget(quick, budget)
    with protocol.threads(1):
        centre, _ = protocol.coarse_search(t, optimizer, steps, backend, on_run, device=device)
    if centre is None:
        raise ArenaError(f"every lr the coarse search tried for {optimizer} on {t.name} diverged: nothing to tune around")
    lrs = protocol.lr_grid(centre, multipliers)
    label, values, make = knob(optimizer)
    out: dict[str, Any] = {"task": t.name, "optimizer": optimizer, "metric": t.metric,
                           "higher_is_better": t.higher_is_better, "steps": steps, "centre": centre, "lr": lrs,
                           "knob": label, "knob_values": values, "weight_decays": WEIGHT_DECAYS}

    def cell(lr: float, hp: dict[str, Any]) -> float | None:
        r = protocol.run_one(t, optimizer, lr, 0, steps, hp, backend=backend, device=device)
        if on_run:
            on_run()
        return None if r["diverged"] else r["final_metric"]

    def best_of(grid: list[list[float | None]], rows: list[float]) -> tuple[float, float, float] | None:
        sign = -1 if t.higher_is_better else 1
        cells = [(sign * v, rows[i], lrs[j], v) for i, row in enumerate(grid) for j, v in enumerate(row) if v is not None]
        if not cells:
            return None
        _, r, lr, v = min(cells)
        return r, lr, v

    with protocol.threads(1):
        out["knob_grid"] = [[cell(lr, make(v)) for lr in lrs] for v in values]
        b = best_of(out["knob_grid"], values)
        best_knob = b[0] if b else values[0]
        wd_grid = [[cell(lr, {**make(best_knob), "weight_decay": wd}) for lr in lrs] for wd in WEIGHT_DECAYS]
    out["wd_grid"] = wd_grid
    bw = best_of(wd_grid, WEIGHT_DECAYS)
    out["best"] = None if bw is None else {"lr": bw[1], label: best_knob, "weight_decay": bw[0], "metric": bw[2]}
    return out


def runs_needed(optimizer: str) -> int:
    return protocol.COARSE_RUNS_EXPECTED + len(protocol.GRID_MULTIPLIERS) * (len(knob(optimizer)[1]) + len(WEIGHT_DECAYS))


def tune_figure(result: dict[str, Any]) -> Any:
    import numpy as np

    from .figures import _figure

    fig = _figure(11, 4.2)
    axes = fig.subplots(1, 2)
    cmap = "viridis" if result["higher_is_better"] else "viridis_r"
    for ax, key, rows, name in ((axes[0], "knob_grid", result["knob_values"], result["knob"]),
                                (axes[1], "wd_grid", result["weight_decays"], "weight decay")):
        grid = np.array([[np.nan if v is None else v for v in row] for row in result[key]], dtype=float)
        im = ax.imshow(grid, cmap=cmap, aspect="auto", origin="lower")
        for i in range(grid.shape[0]):
            for j in range(grid.shape[1]):
                text = "div" if math.isnan(grid[i, j]) else f"{grid[i, j]:.3g}"
                ax.text(j, i, text, ha="center", va="center", fontsize=8, color="w" if math.isnan(grid[i, j]) else "k",
                        bbox=dict(boxstyle="round,pad=0.1", fc="0.3" if math.isnan(grid[i, j]) else "w", alpha=0.6, lw=0))
        ax.set_xticks(range(len(result["lr"])), [f"{lr:.3g}" for lr in result["lr"]])
        ax.set_yticks(range(len(rows)), [f"{v:g}" for v in rows])
        ax.set(xlabel="learning rate", ylabel=name, title=f"{result['optimizer']} on {result['task']}: lr x {name}")
        fig.colorbar(im, ax=ax, label=result["metric"])
    return fig


def write_tune(result: dict[str, Any], out: str | Path) -> Path:
    """Save the search's JSON and heat-map PNG into ``out``; returns the PNG's path."""
    from .figures import save_result_with_figure

    return save_result_with_figure(result, out, f"tune-{result['task']}-{result['optimizer']}", tune_figure(result))
