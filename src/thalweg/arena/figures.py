"""Pure functions from results to matplotlib figures. Nothing here trains or reads files.

Figures are built on ``matplotlib.figure.Figure`` with an Agg canvas, never through pyplot, so no
global backend or figure registry is touched and the same results always give the same pixels.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import re
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import LogNorm
from matplotlib.figure import Figure

from . import analysis
from .tasks_2d import SURFACES

# Styles that stay distinguishable with 25 optimizers: ten colours, then the same ten dashed, then dotted. Each
# optimizer keeps one style in every figure of a report (by its place among the report's optimizers).
_PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#17becf",
            "#7f7f7f", "#bcbd22"]
_DASHES = ["-", "--", ":", "-."]
# the report's family order: simplest methods first
FAMILY_ORDER = ["SGD-like", "RMSprop-like", "Adam-like", "layer-wise", "LR-free", "schedule-free", "matrix", "other"]
# an artist of one optimizer is tagged with this gid prefix; the report turns the tags into data-optimizer groups
# (toggled by its controls, with a hover title)
GID_PREFIX = "thalweg-opt-"


def colour(optimizer: str, optimizers: list[str]) -> str:
    """A fixed colour per optimizer: the same in every figure of a report, given the report's optimizers (a task's
    own list would shift every colour after an optimizer the task left out)."""
    return _PALETTE[optimizers.index(optimizer) % len(_PALETTE)]


def dash(optimizer: str, optimizers: list[str]) -> str:
    """With :func:`colour`, a style no other optimizer of the report shares (up to 40 optimizers)."""
    return _DASHES[(optimizers.index(optimizer) // len(_PALETTE)) % len(_DASHES)]


def by_family(optimizers: list[str], families: dict[str, str]) -> list[tuple[str, list[str]]]:
    """``optimizers`` grouped by family, in :data:`FAMILY_ORDER`, each group in the given order."""
    groups: dict[str, list[str]] = {}
    for o in optimizers:
        groups.setdefault(families.get(o, "other"), []).append(o)
    return sorted(groups.items(), key=lambda kv: FAMILY_ORDER.index(kv[0]) if kv[0] in FAMILY_ORDER else len(FAMILY_ORDER))


def _light(ax: Any) -> None:
    """A faint grid at the major ticks only: on log axes the minor ticks and their grid lines were most of an inline
    figure's bytes, and a reader takes values from the hover titles and the tables."""
    ax.minorticks_off()
    ax.grid(alpha=0.3)


def _tag(artists: Any, optimizer: str) -> None:
    """Mark ``artists`` (one or a list) as ``optimizer``'s, for the report's toggles."""
    for artist in artists if isinstance(artists, list) else [artists]:
        artist.set_gid(GID_PREFIX + optimizer)


def _figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def to_png(fig: Figure) -> bytes:
    """PNG bytes of ``fig``; the metadata carries no date, so the bytes depend only on the figure."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata={"Software": None})
    return buf.getvalue()


def to_svg(fig: Figure) -> str:
    """SVG markup of ``fig`` (text kept as text, no date, ids from a fixed salt: the same figure gives the same
    bytes, so a redrawn report is identical)."""
    import matplotlib

    buf = io.StringIO()
    # text stays text, in the page's sans-serif (the layout was measured with matplotlib's own font, of like width)
    with matplotlib.rc_context({"svg.fonttype": "none", "svg.hashsalt": "thalweg", "font.sans-serif": ["DejaVu Sans"]}):
        # dpi: of the rasterized parts only (the trajectories' contour bands), light background that 60 dpi draws
        fig.savefig(buf, format="svg", metadata={"Date": None, "Creator": None}, dpi=60)
    svg = buf.getvalue()
    # the same picture in fewer bytes (a report inlines many): coordinates to 0.1 of a point (1/720 inch) instead of
    # six decimals, path data on one line, and no ids on groups but those of our optimizer tags (nothing refers to
    # them; clip paths and markers keep theirs)
    def compact(match: re.Match) -> str:
        return re.sub(r"(-?\d+\.\d)\d+", r"\1", re.sub(r"\s*\n\s*", " ", match.group(0)))

    svg = re.sub(r'\s(?:d|x|y|width|height|transform)="[^"]*"', compact, svg)  # geometry only, never text
    svg = re.sub(rf'<g id="(?!{GID_PREFIX})[^"]*"', "<g", svg)
    return _style_classes(re.sub(r"\n +", "\n", svg))


def _style_classes(svg: str) -> str:
    """``svg`` with each style attribute that repeats (every tick, grid line and axis line carries one: a fifth of a
    report's bytes) replaced by a class, defined once in a <style> at the top. A class is named after its style's
    hash, so the same style in two inline figures of a page gets the same name and the same rule."""
    counts = Counter(re.findall(r' style="([^"]*)"', svg))
    names = {style: "s" + hashlib.blake2s(style.encode(), digest_size=5).hexdigest()
             for style, count in counts.items() if count >= 3}
    if not names:
        return svg
    svg = re.sub(r' style="([^"]*)"', lambda m: f' class="{names[m.group(1)]}"' if m.group(1) in names else m.group(0),
                 svg)
    rules = "".join(f".{name}{{{style}}}" for style, name in names.items())
    return re.sub(r"(<svg[^>]*>)", lambda m: f"{m.group(1)}<style>{rules}</style>", svg, count=1)


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


def smooth(values: np.ndarray, fraction: float = 0.05) -> np.ndarray:
    """A centred moving average over ``fraction`` of the points (at least 1; NaNs ignored): the trend of a noisy
    mini-batch loss, drawn over the faint raw curve."""
    n = len(values)
    half = max(0, int(n * fraction) // 2)
    if half == 0:
        return values
    ok = np.isfinite(values)
    filled = np.where(ok, values, 0.0)
    kernel = np.ones(2 * half + 1)
    sums = np.convolve(filled, kernel, mode="same")
    counts = np.convolve(ok.astype(float), kernel, mode="same")
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)


# points per drawn loss curve: a figure's width holds no more, and the inline figures stay small
PLOT_POINTS = 60


def _thin(values: np.ndarray, n: int) -> np.ndarray:
    """Every k-th of ``values`` (and the last) so that at most about ``n`` remain."""
    step = max(1, math.ceil(len(values) / n))
    if step == 1:
        return values
    idx = np.unique(np.r_[np.arange(0, len(values), step), len(values) - 1])
    return np.asarray(values)[idx]


def _families_of(task: dict[str, Any]) -> dict[str, str]:
    return task.get("families", {})


def _leaders(task: dict[str, Any], groups: list[tuple[str, list[str]]]) -> list[str]:
    """The best-ranked optimizer of each family on ``task`` (families whose runs all diverged have none)."""
    rank = {row["optimizer"]: row for row in analysis.ranking(task)}
    out = []
    for _, members in groups:
        trained = [o for o in members if rank[o]["metric_median"] is not None]
        if trained:
            out.append(min(trained, key=lambda o: rank[o]["rank"]))
    return out


def curves_figure(task: dict[str, Any], order: list[str] | None = None) -> Figure:
    """Training loss and validation metric against steps, at each optimizer's best lr: the first row holds each
    family's leader, then one row per family (small multiples, so no panel carries more than a family). In each
    panel the median over seeds, smoothed, with the raw median faint and the min-max over seeds as a band."""
    opts = analysis.optimizers_of(task)
    styles = order or opts  # one style per optimizer across the report's figures (see colour)
    groups = by_family(opts, _families_of(task))
    rows = [("leaders of each family", _leaders(task, groups))] + [(f"{family}", members) for family, members in groups]
    fig = _figure(11, 2.6 * len(rows) + 0.4)
    axes = np.atleast_2d(fig.subplots(len(rows), 2, sharex=True))
    data = {}
    for o in opts:
        runs = analysis.best_runs(task, o)
        if runs:
            data[o] = {key: _band([(r[key]["step"], r[key][ykey]) for r in runs])
                       for key, ykey in (("curve", "loss"), ("evals", "metric"))}
    positive = all(np.all(d["curve"][2] > 0) for d in data.values() if len(d["curve"][0]))
    for (title, members), (ax_loss, ax_metric) in zip(rows, axes):
        for o in members:
            if o not in data:
                continue
            c, ls = colour(o, styles), dash(o, styles)
            label = f"{o} (lr {task['best_lr'][o]:.3g})"
            for ax, key in ((ax_loss, "curve"), (ax_metric, "evals")):
                x, med, lo, hi = data[o][key]
                if len(x) == 0:
                    continue
                if key == "curve":  # mini-batch losses are noisy: the trend on top, the raw median faint
                    trend = smooth(med)  # at the recorded resolution, then thinned with the raw curve
                    x, med, trend = _thin(x, PLOT_POINTS), _thin(med, PLOT_POINTS), _thin(trend, PLOT_POINTS)
                    artists = ax.plot(x, med, color=c, lw=0.8, alpha=0.3)
                    artists += ax.plot(x, trend, color=c, ls=ls, lw=1.6, label=label)
                else:  # the evaluations: the median, and the range over seeds as a band
                    x, med, lo, hi = (_thin(v, PLOT_POINTS // 2) for v in (x, med, lo, hi))
                    artists = [ax.fill_between(x, lo, hi, color=c, alpha=0.12, lw=0)]
                    artists += ax.plot(x, med, color=c, ls=ls, lw=1.6)
                _tag(artists, o)
        if positive:
            ax_loss.set_yscale("log")
        if task["log_metric"]:
            ax_metric.set_yscale("symlog", linthresh=1e-4)
            ax_metric.set_ylim(bottom=0)  # function values above a minimum of 0: no negative decades
        if task["target"] is not None:
            ax_metric.axhline(task["target"], color="k", ls="--", lw=1)
        ax_loss.set_ylabel(title, fontsize=9)
        if ax_loss.get_legend_handles_labels()[0]:
            ax_loss.legend(loc="best", fontsize=7, ncol=2)
        for ax in (ax_loss, ax_metric):
            _light(ax)
    axes[0, 0].set_title(f"{task['name']}: training loss (smoothed; raw faint)")
    target = "" if task["target"] is None else f" (dashed: target {task['target']:g})"
    axes[0, 1].set_title(f"{task['name']}: {task['metric']}{target}")
    for ax in axes[-1]:
        ax.set_xlabel("step")
    return fig


def _clip_limits(values: list[float], higher_is_better: bool) -> tuple[float, float]:
    """y-limits that show the good results: the worst fifth of the finite values (a diverging lr's 0.1 accuracy, a
    loss of 40) lies beyond the bad end and is drawn on it, so one point does not squash every curve."""
    values = sorted(values, reverse=higher_is_better)  # best first
    best, bad = values[0], values[min(len(values) - 1, int(0.8 * len(values)))]
    lo, hi = min(best, bad), max(best, bad)
    pad = 0.08 * (hi - lo or abs(hi) or 1.0)
    return lo - pad, hi + pad


def lr_figure(task: dict[str, Any], order: list[str] | None = None) -> Figure:
    """Final validation metric against lr (seed-0 sweep), one panel per family on shared axes. A point beyond the
    clipped axis sits on its bad edge as an open triangle; diverged lrs are crosses on that edge; a circle marks
    each optimizer's best lr."""
    opts = analysis.optimizers_of(task)
    styles = order or opts  # one style per optimizer across the report's figures (see colour)
    groups = by_family(opts, _families_of(task))
    ncols = min(3, len(groups))
    nrows = math.ceil(len(groups) / ncols)
    fig = _figure(3.9 * ncols, 3.1 * nrows + 0.3)
    axes = np.atleast_1d(fig.subplots(nrows, ncols, sharex=True, sharey=True, squeeze=False)).ravel()
    finite = [r["final_metric"] for r in task["runs"] if r["phase"] == "sweep" and r["final_metric"] is not None]
    hib = task["higher_is_better"]
    if task["log_metric"] or not finite:  # function values over decades: all of them, from the minimum's 0
        lo, hi = (min(finite), max(finite)) if finite else (0.0, 1.0)
        lo, hi = (0.0 if lo >= 0 else lo * 1.5), hi * 1.5 if hi > 0 else hi + 1.0
    else:
        lo, hi = _clip_limits(finite, hib)
    bad_edge = lo if hib else hi
    for ax, (family, members) in zip(axes, groups):
        for o in members:
            runs = analysis.sweep_runs(task, o)
            c, ls = colour(o, styles), dash(o, styles)
            ok = [(r["lr"], r["final_metric"]) for r in runs if not r["diverged"] and r["final_metric"] is not None]
            bad = [r["lr"] for r in runs if r["diverged"] or r["final_metric"] is None]
            artists = []
            if ok:
                xs, ys = zip(*ok)
                shown = [min(max(y, lo), hi) for y in ys]
                artists += ax.plot(xs, shown, "o", ls=ls, color=c, lw=1.4, ms=3.5, label=o)
                clipped = [(x, y) for x, y, v in zip(xs, shown, ys) if y != v]
                if clipped:
                    artists += ax.plot(*zip(*clipped), "v" if hib else "^", color=c, ms=7, mfc="white")
            if bad:
                artists += ax.plot(bad, [bad_edge] * len(bad), "x", color=c, ms=7, mew=2, label=None if ok else o)
            best = task["best_lr"].get(o)
            if best is not None and best in dict(ok):
                artists += ax.plot([best], [min(max(dict(ok)[best], lo), hi)], "o", color=c, ms=9, mfc="none", mew=1.5)
            _tag(artists, o)
        if task["target"] is not None:
            ax.axhline(task["target"], color="k", ls="--", lw=1)
        ax.set_xscale("log")
        ax.set_title(family, fontsize=10)
        _light(ax)
        ax.legend(loc="best", fontsize=7)
    for ax in axes[len(groups):]:
        ax.set_visible(False)
    if task["log_metric"]:
        axes[0].set_yscale("symlog", linthresh=1e-4)
    axes[0].set_ylim(lo, hi)
    fig.suptitle(f"{task['name']}: final {task['metric']} against lr (x diverged, triangle beyond the axis, "
                 "circle best lr)", fontsize=10)
    fig.supxlabel("learning rate", fontsize=9)
    return fig


def trajectory_figure(task: dict[str, Any], order: list[str] | None = None) -> Figure:
    """One panel per optimizer (small multiples): its path at its best lr (seed 0) over the function's log-spaced
    contours, from the start (square) towards the minimum (star)."""
    surface = SURFACES[task["name"]]
    opts = analysis.optimizers_of(task)
    styles = order or opts  # one style per optimizer across the report's figures (see colour)
    ordered = [o for _, members in by_family(opts, _families_of(task)) for o in members]
    ncols = min(6, len(ordered))
    nrows = math.ceil(len(ordered) / ncols)
    fig = _figure(2.3 * ncols, 2.2 * nrows + 0.3)
    axes = np.atleast_1d(fig.subplots(nrows, ncols, sharex=True, sharey=True, squeeze=False)).ravel()
    xs = np.linspace(*surface.xlim, 120)
    ys = np.linspace(*surface.ylim, 120)
    gx, gy = np.meshgrid(xs, ys)
    z = surface.fn(gx, gy)
    levels = np.logspace(-2, math.log10(max(float(z.max()), 1.0)), 15)
    for ax, o in zip(axes, ordered):
        # filled bands of grey, as pixels: the same in every panel, they compress to a few kB where contour lines
        # would be thousands of path points each
        ax.contourf(gx, gy, z + 1e-3, levels=levels, cmap="Greys", alpha=0.45, norm=LogNorm()).set_rasterized(True)
        runs = [r for r in task["runs"] if r["optimizer"] == o and r["lr"] == task["best_lr"].get(o)
                and r["seed"] == 0 and r.get("trajectory")]
        artists = [ax.plot(*surface.start, "ks", ms=4)[0], ax.plot(*surface.minimum, "k*", ms=7)[0]]
        title = f"{o}: all diverged"
        if runs:
            path = np.array([[np.nan if v is None else v for v in p] for p in runs[0]["trajectory"]])
            artists += ax.plot(path[:, 0], path[:, 1], "-", color=colour(o, styles), lw=1.2)
            artists += ax.plot(path[-1, 0], path[-1, 1], "o", color=colour(o, styles), ms=3)
            title = f"{o} (lr {runs[0]['lr']:.3g})"
        ax.set_title(title, fontsize=8)
        ax.tick_params(labelsize=7)
        _tag(artists, o)
    for ax in axes[len(ordered):]:
        ax.set_visible(False)
    axes[0].set(xlim=surface.xlim, ylim=surface.ylim)
    fig.suptitle(f"{task['name']}: paths at each optimizer's best lr", fontsize=10)
    return fig


def profile_figure(results: dict[str, Any]) -> Figure:
    """Performance profiles (AlgoPerf): fraction of tasks solved within tau x the best, by time and by
    steps."""
    fig = _figure(11, 4.4)
    axes = fig.subplots(1, 2)
    opts = analysis.all_optimizers(results)
    n = sum(t["target"] is not None for t in results["tasks"].values())
    for ax, by, what in ((axes[0], "time_to_target", "time"), (axes[1], "steps_to_target", "steps")):
        prof = analysis.profile(results, by)
        for o in opts:
            _tag(ax.step(analysis.PROFILE_TAUS, prof[o], where="post", color=colour(o, opts), ls=dash(o, opts),
                         lw=1.5, label=o), o)
        ax.set(xlim=(1, 4), ylim=(-0.02, 1.02), xlabel=r"$\tau$ (multiple of the best " + what + ")",
               ylabel="fraction of tasks reaching the target",
               title=f"performance profile by {what} ({n} tasks with a target)")
        ax.grid(alpha=0.3)
    axes[1].legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=7, ncol=1 + len(opts) // 14)
    return fig
