"""Pure functions from results to matplotlib figures. Nothing here trains or reads files.

Figures are built on ``matplotlib.figure.Figure`` with an Agg canvas, never through pyplot, so no
global backend or figure registry is touched and the same results always give the same pixels.
"""

from __future__ import annotations

import io
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from . import analysis
from .tasks_2d import SURFACES

_ORDER = ["sgd", "momentum", "adam", "adamw", "rmsprop", "adagrad", "lars", "lamb"]
_PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#17becf",
            "#7f7f7f", "#bcbd22"]


def colour(optimizer: str, optimizers: list[str]) -> str:
    """A fixed colour per optimizer: the same in every figure of every report."""
    i = _ORDER.index(optimizer) if optimizer in _ORDER else len(_ORDER) + optimizers.index(optimizer)
    return _PALETTE[i % len(_PALETTE)]


def _figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def to_png(fig: Figure) -> bytes:
    """PNG bytes of ``fig``; the metadata carries no date, so the bytes depend only on the figure."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata={"Software": None})
    return buf.getvalue()


def save_result_with_figure(result: dict[str, Any], out: str | Path, stem: str, fig: Figure) -> Path:
    """Write ``result`` as ``out/stem.json`` and ``fig`` as ``out/stem.png`` (lr-find, tune); returns the PNG."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(result, allow_nan=False), encoding="utf-8")
    png = out / f"{stem}.png"
    png.write_bytes(to_png(fig))
    return png


def _band(curves: list[tuple[list[int], list[float | None]]]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Median, min and max over seeds at each recorded step (a seed that stopped early drops out)."""
    steps = sorted({s for xs, _ in curves for s in xs})
    table = np.full((len(curves), len(steps)), np.nan)
    where = {s: i for i, s in enumerate(steps)}
    for k, (xs, ys) in enumerate(curves):
        for x, y in zip(xs, ys):
            table[k, where[x]] = np.nan if y is None else y
    keep = ~np.all(np.isnan(table), axis=0)
    table = table[:, keep]
    return (np.asarray(steps)[keep], np.nanmedian(table, axis=0), np.nanmin(table, axis=0),
            np.nanmax(table, axis=0))


def curves_figure(task: dict[str, Any]) -> Figure:
    """Training loss and validation metric against steps, at each optimizer's best lr: the median over
    seeds as a line, the min-max over seeds as a band."""
    fig = _figure(11, 4)
    ax_loss, ax_metric = fig.subplots(1, 2)
    opts = analysis.optimizers_of(task)
    positive = True
    for o in opts:
        runs = analysis.best_runs(task, o)
        if not runs:
            continue
        c = colour(o, opts)
        label = f"{o} (lr {task['best_lr'][o]:.3g}, {len(runs)} seeds)"
        for ax, key, ykey in ((ax_loss, "curve", "loss"), (ax_metric, "evals", "metric")):
            x, med, lo, hi = _band([(r[key]["step"], r[key][ykey]) for r in runs])
            if len(x) == 0:
                continue
            positive &= ax is not ax_loss or bool(np.all(lo > 0))
            ax.plot(x, med, color=c, lw=1.5, label=label if ax is ax_loss else None)
            ax.fill_between(x, lo, hi, color=c, alpha=0.2, lw=0)
    if positive:
        ax_loss.set_yscale("log")
    if task["log_metric"]:
        ax_metric.set_yscale("symlog", linthresh=1e-4)
    if task["target"] is not None:
        ax_metric.axhline(task["target"], color="k", ls="--", lw=1, label=f"target {task['target']:g}")
        ax_metric.legend(loc="best", fontsize=8)
    ax_loss.set(title=f"{task['name']}: training loss", xlabel="step", ylabel="loss")
    ax_metric.set(title=f"{task['name']}: {task['metric']}", xlabel="step", ylabel=task["metric"])
    ax_loss.legend(loc="best", fontsize=8)
    for ax in (ax_loss, ax_metric):
        ax.grid(alpha=0.3)
    return fig


def lr_figure(task: dict[str, Any]) -> Figure:
    """Final validation metric against lr, one line per optimizer (seed 0 sweep). Diverged lrs are
    drawn as crosses on the top or bottom edge (the bad end of the axis)."""
    fig = _figure(7, 4.2)
    ax = fig.subplots()
    opts = analysis.optimizers_of(task)
    finite = [r["final_metric"] for r in task["runs"] if r["phase"] == "sweep" and r["final_metric"] is not None]
    if task["log_metric"]:
        ax.set_yscale("symlog", linthresh=1e-4)
    lo, hi = (min(finite), max(finite)) if finite else (0.0, 1.0)
    pad = 0.05 * (hi - lo or 1.0)
    bad_edge = (lo - pad) if task["higher_is_better"] else (hi + pad)
    any_div = False
    for o in opts:
        runs = analysis.sweep_runs(task, o)
        c = colour(o, opts)
        ok = [(r["lr"], r["final_metric"]) for r in runs if not r["diverged"] and r["final_metric"] is not None]
        bad = [r["lr"] for r in runs if r["diverged"] or r["final_metric"] is None]
        if ok:
            ax.plot(*zip(*ok), "o-", color=c, lw=1.5, ms=4, label=o)
        if bad:
            any_div = True
            ax.plot(bad, [bad_edge] * len(bad), "x", color=c, ms=8, mew=2, label=None if ok else o)
        best = task["best_lr"].get(o)
        if best is not None:
            ax.plot([best], [dict(ok)[best]], "o", color=c, ms=9, mfc="none", mew=1.5)
    if task["target"] is not None:
        ax.axhline(task["target"], color="k", ls="--", lw=1)
    ax.set_xscale("log")
    note = " (x = diverged, circle = best lr)" if any_div else " (circle = best lr)"
    ax.set(title=f"{task['name']}: lr sensitivity{note}", xlabel="learning rate",
           ylabel=f"final {task['metric']}")
    ax.grid(alpha=0.3, which="both")
    ax.legend(loc="best", fontsize=8, ncol=2)
    return fig


def trajectory_figure(task: dict[str, Any]) -> Figure:
    """Paths of each optimizer at its best lr (seed 0) over the function's log-spaced contours."""
    surface = SURFACES[task["name"]]
    fig = _figure(7, 6)
    ax = fig.subplots()
    xs = np.linspace(*surface.xlim, 300)
    ys = np.linspace(*surface.ylim, 300)
    gx, gy = np.meshgrid(xs, ys)
    z = surface.fn(gx, gy)
    levels = np.logspace(-2, math.log10(max(float(z.max()), 1.0)), 25)
    ax.contour(gx, gy, z + 1e-3, levels=levels, cmap="Greys", linewidths=0.6, alpha=0.7)
    opts = analysis.optimizers_of(task)
    for o in opts:
        runs = [r for r in analysis.best_runs(task, o) if r["seed"] == 0 and r.get("trajectory")]
        if not runs:
            continue
        path = np.array([[np.nan if v is None else v for v in p] for p in runs[0]["trajectory"]])
        ax.plot(path[:, 0], path[:, 1], "-", color=colour(o, opts), lw=1.4, label=f"{o} (lr {runs[0]['lr']:.3g})")
        ax.plot(path[-1, 0], path[-1, 1], "o", color=colour(o, opts), ms=4)
    ax.plot(*surface.start, "ks", ms=7, label="start")
    ax.plot(*surface.minimum, "k*", ms=13, label="minimum")
    ax.set(xlim=surface.xlim, ylim=surface.ylim, xlabel="x", ylabel="y",
           title=f"{task['name']}: paths at each optimizer's best lr")
    ax.legend(loc="best", fontsize=8)
    return fig


def profile_figure(results: dict[str, Any]) -> Figure:
    """Performance profiles (AlgoPerf): fraction of tasks solved within tau x the best, by time and by
    steps."""
    fig = _figure(11, 4)
    axes = fig.subplots(1, 2)
    opts = analysis.all_optimizers(results)
    n = sum(t["target"] is not None for t in results["tasks"].values())
    for ax, by, what in ((axes[0], "time_to_target", "time"), (axes[1], "steps_to_target", "steps")):
        prof = analysis.profile(results, by)
        for o in opts:
            ax.step(analysis.PROFILE_TAUS, prof[o], where="post", color=colour(o, opts), lw=1.6, label=o)
        ax.set(xlim=(1, 4), ylim=(-0.02, 1.02), xlabel=r"$\tau$ (multiple of the best " + what + ")",
               ylabel="fraction of tasks reaching the target",
               title=f"performance profile by {what} ({n} tasks with a target)")
        ax.grid(alpha=0.3)
    axes[0].legend(loc="lower right", fontsize=8)
    return fig
