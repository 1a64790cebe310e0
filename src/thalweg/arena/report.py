"""The report: results -> figures (PNG) + index.html + results.json, written atomically.

``build(results)`` is pure (results in, files as bytes out), so ``thalweg report DIR`` redraws byte
for byte what the run drew. ``write(results, out)`` builds the report in a temporary directory next
to ``out`` and renames it into place: a failure leaves the previous report (or nothing), never half.
"""

from __future__ import annotations

import base64
import html
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

from . import analysis, protocol
from .errors import ArenaError
from .results import RESULTS_NAME, dumps

FIGURE_DIR = "figures"


def figure_plan(results: dict[str, Any]) -> list[tuple[str, str, Callable[[], Any]]]:
    """(file name, caption, figure builder) of every figure, in report order."""
    from . import figures

    plan: list[tuple[str, str, Callable[[], Any]]] = []
    for name, task in results["tasks"].items():
        plan.append((f"{name}-curves.png", "loss and validation curves (median and min-max over seeds)",
                     lambda t=task: figures.curves_figure(t)))
        plan.append((f"{name}-lr.png", "lr sensitivity", lambda t=task: figures.lr_figure(t)))
        if task["kind"] == "2d":
            plan.append((f"{name}-trajectories.png", "trajectories", lambda t=task: figures.trajectory_figure(t)))
    if results["tasks"]:
        plan.append(("profile.png", "performance profiles", lambda: figures.profile_figure(results)))
    return plan


def _fmt(v: Any, digits: int = 4) -> str:
    if v is None:
        return "&ndash;"
    if isinstance(v, float):
        return "&ndash;" if not math.isfinite(v) else f"{v:.{digits}g}"
    return html.escape(str(v))


def _table(rows: list[dict[str, Any]], columns: list[tuple[str, str]]) -> str:
    head = "".join(f"<th>{html.escape(title)}</th>" for _, title in columns)
    body = "".join("<tr>" + "".join(f"<td>{_fmt(row.get(key))}</td>" for key, _ in columns) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


_RANK_COLUMNS = [("rank", "#"), ("optimizer", "optimizer"), ("best_lr", "best lr"), ("metric_median", "median metric"),
                 ("metric_min", "min"), ("metric_max", "max"), ("reached", "seeds at target"),
                 ("steps_to_target", "steps to target"), ("time_to_target", "time to target (s)"),
                 ("step_time_ms", "ms/step"), ("good_lrs", "good lrs"), ("diverged_lrs", "diverged lrs")]
_SUMMARY_COLUMNS = [("optimizer", "optimizer"), ("targets", "targets reached"), ("mean_rank", "mean rank"),
                    ("wins", "tasks won"), ("profile_score", "profile area (time)"), ("diverged_lrs", "diverged grid lrs")]

_ADAMW_COLUMNS = [("task", "task"), ("optimizer", "recommended"), ("pick_range", "its seed range"),
                  ("adamw_range", "AdamW's seed range"), ("adamw_lr", "AdamW's best lr"), ("verdict", "verdict")]
_LOTO_COLUMNS = [("task", "held-out task"), ("pick", "pick of the other tasks"), ("place", "its rank there"),
                 ("metric", "its median metric"), ("best", "best median"), ("best_optimizer", "best optimizer"),
                 ("regret", "regret")]


def _checks_html(results: dict[str, Any]) -> str:
    """The recommendations checked: each against tuned AdamW by seed ranges, and leave-one-task-out regret."""
    span = lambda pair: f"{_fmt(pair[0])}–{_fmt(pair[1])}"  # noqa: E731
    adamw = []
    for name, task in results["tasks"].items():
        check = analysis.against_adamw(task)
        if check is not None:
            adamw.append({"task": name, **check, "pick_range": span(check["pick"]), "adamw_range": span(check["adamw"])})
    loto = [{**row, "place": None if row["rank"] is None else f"{row['rank']} of {row['of']}"}
            for row in analysis.leave_one_task_out(results)]
    parts = ['<h2 id="checks">The recommendations, checked</h2>']
    if adamw:
        parts.append("<p>Each task's pick against AdamW tuned by the same rule and budget: <i>better</i> or <i>worse</i> "
                     "when their ranges over seeds are apart, <i>tie</i> when they overlap.</p>")
        parts.append(_table(adamw, _ADAMW_COLUMNS))
    if loto:
        parts.append("<p>Leave one task out: the optimizer the summary of the other tasks ranks first, on the task "
                     "left out (at its best lr there). Regret: how far its median metric is from the best one's, in "
                     "that task's metric; a large regret means the across-task pick does not transfer to it.</p>")
        parts.append(_table(loto, _LOTO_COLUMNS))
    return "\n".join(parts) if len(parts) > 1 else ""


_CSS = """body{font-family:system-ui,sans-serif;max-width:1150px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:.5em 0 1em;font-size:.9em}td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}
th{background:#f3f3f3}td:nth-child(2),th:nth-child(2){text-align:left}img{max-width:100%;border:1px solid #eee}
.rec{background:#eef7ee;border-left:4px solid #4a4;padding:.5em 1em}code{background:#f5f5f5;padding:0 3px}
nav a{margin-right:1em}"""


def _protocol_html(results: dict[str, Any]) -> str:
    cfg = results["config"]
    mults = ", ".join(f"{m:.3g}" for m in cfg["grid_multipliers"])
    return (
        "<h2>Protocol</h2><ul>"
        f"<li>Every optimizer gets the same lr grid, multipliers <code>{mults}</code> around its own centre, and the "
        f"same step budget per task (budget scale {cfg['budget']:g}{', quick' if cfg['quick'] else ''}). The centre is "
        "the measured one (<code>thalweg.arena.protocol.CENTRES</code>) where there is one; for the other optimizers, "
        "the best of a coarse search run here (lr 1e-5, 1e-4, ..., 1e2, each for a quarter of the budget, seed 0). "
        "Centres and their sources are listed per task below.</li>"
        "<li>Prodigy and D-Adapt Adam estimate their own step size: they run at their documented lr 1.0, without a grid "
        "(so their seed-0 sweep is one run). Schedule-Free optimizers are evaluated in eval mode (at x, as their "
        "authors evaluate), trained in train mode.</li>"
        "<li>All other hyper-parameters are the optimizer's defaults (e.g. AdamW and LAMB decay 0.01, LARS momentum 0.9); "
        "biases and embeddings get no weight decay and no trust ratio (<code>thalweg.create</code>). "
        f"Backend: <code>{html.escape(str(cfg.get('backend', 'auto')))}</code>.</li>"
        "<li>Where the best lr of a grid is at one of its ends, the grid is extended past that end, one step of its "
        f"spacing at a time, up to {protocol.EDGE_EXTENSIONS} steps, until the best lr is inside it; a best lr still at "
        "an end (or next to a diverged lr) is flagged in the recommendation.</li>"
        f"<li>The sweep uses seed 0; the lr with the best final validation metric is rerun with seeds 1..{cfg['seeds'] - 1} "
        f"({cfg['seeds']} seeds in all). Seeds change initialisation and batch order, never the data split.</li>"
        "<li>A run whose training loss turns non-finite or exceeds the task's factor (20x; 1000x for 2-D functions) "
        "times its first loss is stopped and recorded as diverged.</li>"
        "<li>Steps to target: the first evaluation at which the validation metric meets the task's target. Time to target: "
        "those steps times the run's median step time (one thread, CPU); evaluation time is not counted.</li>"
        "<li>Sparse task: Adagrad trains the embedding with sparse gradients; the other optimizers reject sparse "
        "gradients, so they train the same model with dense ones.</li></ul>"
    )


def _centre_text(optimizer: str, centre: float | None, source: str) -> str:
    if centre is None:
        return f"{optimizer} none (every coarse-search lr diverged)"
    note = {"measured": "", "coarse search": " (coarse search)", "lr-free": " (lr-free, no grid)"}.get(source, "")
    return f"{optimizer} {centre:.3g}{note}"


def build(results: dict[str, Any]) -> tuple[str, dict[str, bytes]]:
    """The report's HTML and its figures (file name -> PNG bytes), from results alone."""
    from . import figures

    pngs: dict[str, bytes] = {}
    captions: dict[str, str] = {}
    for filename, caption, make in figure_plan(results):
        fig = make()
        pngs[filename] = figures.to_png(fig)
        captions[filename] = caption

    def img(filename: str) -> str:
        data = base64.b64encode(pngs[filename]).decode("ascii")
        return (f'<figure><img alt="{html.escape(filename)}" src="data:image/png;base64,{data}">'
                f'<figcaption>{html.escape(captions[filename])} &mdash; <a href="{FIGURE_DIR}/{html.escape(filename)}">'
                f"{html.escape(filename)}</a></figcaption></figure>")

    tasks = results["tasks"]
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>thalweg arena</title><style>{_CSS}</style></head><body>",
             f"<h1>thalweg arena</h1><p>thalweg {html.escape(results['thalweg_version'])}, run {html.escape(results['created'])}; "
             f"optimizers: {html.escape(', '.join(analysis.all_optimizers(results)))}; tasks: {html.escape(', '.join(tasks))}.</p>",
             "<nav>" + "".join(f'<a href="#{html.escape(n)}">{html.escape(n)}</a>' for n in tasks) + '<a href="#summary">summary</a></nav>',
             _protocol_html(results)]
    for name, task in tasks.items():
        rec = analysis.recommendation(task)
        target = "none" if task["target"] is None else f"{task['target']:g}"
        centres = ", ".join(_centre_text(o, lr, task.get("centre_source", {}).get(o, "measured"))
                            + (f" (grid extended to {', '.join(f'{x:.3g}' for x in task['extended'][o])})"
                               if o in task.get("extended", {}) else "")
                            for o, lr in task["centres"].items())
        parts.append(f'<h2 id="{html.escape(name)}">{html.escape(name)}</h2><p>{html.escape(task["description"])}</p>'
                     f"<p>Metric: {html.escape(task['metric'])} ({'higher' if task['higher_is_better'] else 'lower'} is better); "
                     f"target {target}; {task['steps']} steps. lr centres: {html.escape(centres)}.</p>")
        if rec:
            parts.append(f'<p class="rec"><b>Recommendation: {html.escape(rec["optimizer"])} at lr {rec["lr"]:.3g}</b> &mdash; '
                         f"{html.escape(rec['evidence'])}</p>")
        else:
            parts.append('<p class="rec"><b>No recommendation:</b> every run diverged.</p>')
        parts.append(_table(analysis.ranking(task), _RANK_COLUMNS))
        for filename, _, _ in figure_plan({"tasks": {name: task}}):
            if filename != "profile.png":
                parts.append(img(filename))
    if tasks:
        parts.append('<h2 id="summary">Across tasks</h2><p>Performance profile (AlgoPerf, Dahl et al. 2023): for each '
                     "optimizer, the fraction of tasks on which it reaches the target within &tau; times the fastest "
                     "optimizer's time on that task. Profile area: the mean of that curve over &tau; in [1, 4] "
                     "(1 = fastest everywhere). The table ranks by targets reached, then mean rank over tasks, then tasks "
                     "won; the profile area, made of timings on a shared machine, only breaks ties.</p>")
        parts.append(_table(analysis.summary_table(results), _SUMMARY_COLUMNS))
        parts.append(img("profile.png"))
        parts.append(_checks_html(results))
    parts.append("</body></html>\n")
    return "\n".join(parts), pngs


def check_can_create(out: str | Path) -> Path:
    """Fail early, before any training, if directory ``out`` cannot be created or written (a file in the way, no
    permission): a probe directory is made and removed in its nearest existing ancestor; nothing is left behind."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ArenaError(f"output directory {out} exists and is not a directory")
    existing = next(path for path in (out, *out.absolute().parents) if path.exists())
    try:
        if not existing.is_dir():
            raise NotADirectoryError(f"{existing} is not a directory")
        os.rmdir(tempfile.mkdtemp(dir=existing, prefix=".thalweg-probe-"))
    except OSError as exc:
        raise ArenaError(f"cannot write to output directory {out}: {exc.strerror or exc}") from None
    return out


def check_writable(out: str | Path) -> Path:
    """Fail early, before any training, if the report cannot be written to ``out``."""
    out = check_can_create(out)
    if out.is_dir() and any(out.iterdir()) and not (out / "index.html").exists() and not (out / RESULTS_NAME).exists():
        # The report replaces the whole directory: never do that to a directory holding other files.
        raise ArenaError(f"output directory {out} is not empty and holds no arena report; choose a new or empty one")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ArenaError(f"cannot write to output directory {out}: {exc.strerror or exc}") from None
    return out


def write(results: dict[str, Any], out: str | Path) -> Path:
    """Write index.html, figures/*.png and results.json to ``out`` atomically; returns index.html's path."""
    out = check_writable(out)
    page, pngs = build(results)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
    try:
        (tmp / FIGURE_DIR).mkdir()
        for filename, data in pngs.items():
            (tmp / FIGURE_DIR / filename).write_bytes(data)
        (tmp / RESULTS_NAME).write_text(dumps(results), encoding="utf-8")
        (tmp / "index.html").write_text(page, encoding="utf-8")
        _swap_in(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out / "index.html"


def _swap_in(new: Path, out: Path) -> None:
    """Replace ``out`` by ``new``: the old report moves aside first and is deleted only after the
    rename, so at every moment ``out`` is either the old complete report or the new one."""
    if not out.exists():
        os.replace(new, out)
        return
    old = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.old-"))
    os.rmdir(old)
    os.replace(out, old)
    try:
        os.replace(new, out)
    except BaseException:
        os.replace(old, out)
        raise
    shutil.rmtree(old, ignore_errors=True)


def redraw(directory: str | Path, out: str | Path | None = None) -> Path:
    """Rebuild the report in ``directory`` (or into ``out``) from ``directory/results.json`` alone,
    without retraining; returns the path of index.html."""
    from .results import load

    return write(load(directory), directory if out is None else out)
