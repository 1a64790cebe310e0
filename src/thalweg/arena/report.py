"""The report: results -> index.html (figures inline, as SVG) + results.json, written atomically.

``build(results)`` is pure (results in, the page out), so ``thalweg report DIR`` redraws byte
for byte what the run drew. ``write(results, out)`` builds the report in a temporary directory next
to ``out`` and renames it into place: a failure leaves the previous report (or nothing), never half.
"""

from __future__ import annotations

import html
import math
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

from . import analysis, protocol
from .errors import ArenaError
from .results import RESULTS_NAME, dumps

def figure_plan(results: dict[str, Any]) -> list[tuple[str, str, Callable[[], Any]]]:
    """(file name, caption, figure builder) of every figure, in report order."""
    from . import figures

    plan: list[tuple[str, str, Callable[[], Any]]] = []
    order = analysis.all_optimizers(results)
    for name, task in results["tasks"].items():
        if not task["centres"]:  # no optimizer ran on it: nothing to draw
            continue
        plan.append((f"{name}-curves.svg", "training loss and validation metric at each optimizer's best lr: each "
                     "family's leader, then one row per family (median over the evaluation seeds; band: their range)",
                     lambda t=task: figures.curves_figure(t, order)))
        plan.append((f"{name}-lr.svg", "lr sensitivity, one panel per family (seed-0 sweep)",
                     lambda t=task: figures.lr_figure(t, order)))
        if task["kind"] == "2d":
            plan.append((f"{name}-trajectories.svg", "one path per optimizer", lambda t=task: figures.trajectory_figure(t, order)))
    if any(task["centres"] for task in results["tasks"].values()):
        plan.append(("profile.svg", "performance profiles", lambda: figures.profile_figure(results)))
    return plan


def inline_svg(svg: str, prefix: str, titles: dict[str, str]) -> str:
    """``svg`` made ready to sit in the page: the XML prologue dropped, every id prefixed (several figures share one
    document), and each optimizer's artists (tagged by :mod:`.figures`) turned into a ``data-optimizer`` group that
    the controls toggle, with a hover title."""
    from .figures import GID_PREFIX

    svg = svg[svg.index("<svg"):]

    def group(match: re.Match) -> str:
        optimizer = match.group(1)
        title = html.escape(titles.get(optimizer, optimizer))
        return f'<g data-optimizer="{html.escape(optimizer)}"><title>{title}</title>'

    svg = re.sub(rf'<g id="{re.escape(GID_PREFIX)}([^"]+)">', group, svg)
    return re.sub(r'(\bid="|url\(#|href="#)', lambda m: m.group(1) + prefix, svg)


def _fmt(v: Any, digits: int = 4) -> str:
    if v is None:
        return "&ndash;"
    if isinstance(v, float):
        return "&ndash;" if not math.isfinite(v) else f"{v:.{digits}g}"
    return html.escape(str(v))


def _sort_value(v: Any) -> str | None:
    """What a sortable column sorts a cell by: its number ("3/4" by its count), "" for a missing one (kept last), or
    None for text (sorted as text)."""
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return ""
    if isinstance(v, bool):
        return str(int(v))
    if isinstance(v, (int, float)):
        return repr(float(v))
    if isinstance(v, str) and re.fullmatch(r"\d+/\d+", v):
        return v.split("/")[0]
    return None


def _table(rows: list[dict[str, Any]], columns: list[tuple[str, str]], sortable: bool = False) -> str:
    """An HTML table of ``rows``; ``sortable``: a click on a heading sorts by that column (the page's script), and
    each row carries its optimizer, so the controls can hide it."""
    head = "".join(f'<th title="sort by {html.escape(title)}">{html.escape(title)}</th>' if sortable
                   else f"<th>{html.escape(title)}</th>" for _, title in columns)
    body = []
    for row in rows:
        cells = []
        for key, _ in columns:
            value = row.get(key)
            order = _sort_value(value) if sortable else None
            cells.append(f"<td>{_fmt(value)}</td>" if order is None else f'<td data-value="{order}">{_fmt(value)}</td>')
        mark = f' data-optimizer="{html.escape(row["optimizer"])}"' if sortable and "optimizer" in row else ""
        body.append(f"<tr{mark}>" + "".join(cells) + "</tr>")
    kind = ' class="sortable"' if sortable else ""
    return f"<table{kind}><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


_RANK_COLUMNS = [("rank", "#"), ("optimizer", "optimizer"), ("family", "family"), ("best_lr", "best lr"),
                 ("metric_median", "median metric"), ("metric_min", "min"), ("metric_max", "max"),
                 ("reached", "seeds at target"), ("steps_to_target", "steps to target"),
                 ("time_to_target", "time to target (s)"), ("step_time_ms", "ms/step"),
                 ("memory", "state bytes/param"), ("lr_width", "good lr range (decades)"), ("good_lrs", "good lrs"),
                 ("diverged_lrs", "diverged lrs")]
_SUMMARY_COLUMNS = [("optimizer", "optimizer"), ("family", "family"), ("tasks_run", "tasks run"), ("targets", "targets reached"),
                    ("mean_rank", "mean rank"), ("wins", "tasks won"), ("steps_ratio", "steps to target / fastest"),
                    ("time_ratio", "time to target / fastest"), ("memory", "state bytes/param"),
                    ("lr_width", "good lr range (decades)"), ("profile_score", "profile area (time)"),
                    ("diverged_lrs", "diverged grid lrs")]

_ADAMW_COLUMNS = [("task", "task"), ("optimizer", "recommended"), ("pick_range", "its seed range"),
                  ("adamw_range", "AdamW's seed range"), ("adamw_lr", "AdamW's best lr"), ("verdict", "verdict")]
_INT8_COLUMNS = [("task", "task"), ("optimizer", "optimizer"), ("final_loss_float32", "final loss, float32 state"),
                 ("final_loss_int8", "8-bit state"), ("loss_change", "change"),
                 ("final_metric_float32", "metric, float32 state"), ("final_metric_int8", "8-bit state"),
                 ("metric_change", "change"), ("state_bytes_per_param_float32", "state bytes/param, float32"),
                 ("state_bytes_per_param_int8", "8-bit"), ("verdict", "verdict")]
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


def _int8_html(results: dict[str, Any]) -> str:
    """Float32 against 8-bit state (``state_dtype="int8"``) for the optimizers the arena reran with it."""
    rows = analysis.int8_comparison(results)
    if not rows:
        return ""
    for row in rows:
        row["loss_change"] = None if row["loss_change"] is None else f"{row['loss_change']:+.2%}"
        change = row["metric_change"]
        row["metric_change"] = (None if change is None else f"{change * 100:+.2f} points" if row["share"]
                                else f"{change:+.2%}")
    return ('<h2 id="int8">8-bit optimizer state</h2><p>The optimizers below were run again at their best lr, on the '
            "seeds of their reported medians, with <code>state_dtype=\"int8\"</code> (state tensors of 4096 elements or "
            "more kept in 8-bit blocks). Medians over those seeds; the final loss is the training loss averaged over "
            "the last 5 % of steps; the metric's change is in points of a share "
            f"(accuracy), else relative. <i>Within</i>: the final loss within {analysis.INT8_LOSS_TOLERANCE:.0%} and the "
            f"metric within {analysis.INT8_SHARE_TOLERANCE * 100:g} points (or {analysis.INT8_LOSS_TOLERANCE:.0%}) of "
            "the float32 state's.</p>" + _table(rows, _INT8_COLUMNS, sortable=True))


_CSS = """body{font-family:system-ui,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:.5em 0 1em;font-size:.85em}td,th{border:1px solid #ccc;padding:3px 7px;text-align:right}td{white-space:nowrap}
th{background:#f3f3f3}td:nth-child(2),th:nth-child(2){text-align:left}figure{margin:1em 0}svg{max-width:100%;height:auto}
table.sortable th{cursor:pointer}th[aria-sort=ascending]::after{content:" \\25B2"}th[aria-sort=descending]::after{content:" \\25BC"}
.rec{background:#eef7ee;border-left:4px solid #4a4;padding:.5em 1em}code{background:#f5f5f5;padding:0 3px}
.verdict{background:#eef2fb;border-left:5px solid #36c;padding:.7em 1em;font-size:1.05em}
#controls{position:sticky;top:0;background:#fff;border-bottom:1px solid #ddd;padding:.3em 0;z-index:1;font-size:.85em}
#controls .family{margin:.15em 0}#controls label{margin-right:.7em;white-space:nowrap}nav a{margin-right:1em}"""


def _protocol_html(results: dict[str, Any]) -> str:
    cfg = results["config"]
    mults = ", ".join(f"{m:.3g}" for m in cfg["grid_multipliers"])
    return (
        '<h2 id="protocol">Protocol</h2><ul>'
        f"<li>Every optimizer gets the same lr grid, multipliers <code>{mults}</code> around its own centre, and the "
        f"same step budget per task (budget scale {cfg['budget']:g}{', quick' if cfg['quick'] else ''}). The centre is "
        "found here, by the same procedure for every optimizer: a coarse search over decades of lr, each run a quarter "
        "of the budget with seed 0, starting from the decade of the optimizer's default lr (1e-3 where it has none), "
        "one decade up and one down, then on in the direction that improves while it improves, within 1e-5..1e2; its "
        "best lr is the centre (a centre given to <code>compare()</code> is used as given). No lr is kept by hand. "
        "Centres are listed per task.</li>"
        "<li>Prodigy and D-Adapt Adam estimate their own step size: they run at their documented lr 1.0, without a grid "
        "(so their seed-0 sweep is one run). Schedule-Free optimizers are evaluated in eval mode (at x, as their "
        "authors evaluate), trained in train mode. Muon runs as <code>thalweg.create(\"muon\", model)</code> builds "
        "it: the hidden matrices to Muon, embeddings, the output layer and 1-D parameters to AdamW, with "
        "<code>adjust_lr_fn=\"match_rms_adamw\"</code> so that one lr serves both (the grid tunes them together); "
        "on a task without a hidden matrix it is not run. SOAP runs with "
        f"<code>max_precond_dim={protocol.SOAP_MAX_PRECOND_DIM}</code> (default 10000): a longer dim — the sparse "
        "task's 5000-row embedding — stays in the original basis, rather than get a 5000 × 5000 factor that makes a "
        "step 850 ms.</li>"
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
    note = {"given": " (given)", "coarse search": "", "lr-free": " (lr-free, no grid)"}.get(source, "")
    return f"{optimizer} {centre:.3g}{note}"


_SCRIPT = """
// Sortable tables: a click on a heading sorts the rows by that column, again reverses; missing values stay last.
document.querySelectorAll("table.sortable th").forEach(function (th) {
  th.addEventListener("click", function () {
    var table = th.closest("table"), body = table.tBodies[0], column = th.cellIndex;
    var ascending = th.getAttribute("aria-sort") !== "ascending";
    table.querySelectorAll("th").forEach(function (other) { other.removeAttribute("aria-sort"); });
    th.setAttribute("aria-sort", ascending ? "ascending" : "descending");
    var rows = Array.prototype.slice.call(body.rows);
    function key(row) {
      var cell = row.cells[column], value = cell.getAttribute("data-value");
      if (value === null) return cell.textContent;
      return value === "" ? null : parseFloat(value);
    }
    rows.sort(function (a, b) {
      var x = key(a), y = key(b);
      if (x === null || y === null) return (x === null) - (y === null);
      var order = typeof x === "number" ? x - y : String(x).localeCompare(String(y));
      return ascending ? order : -order;
    });
    rows.forEach(function (row) { body.appendChild(row); });
  });
});
// Toggles: an optimizer's box shows or hides everything of that optimizer (table rows, lines in the figures);
// a family's box sets all of its optimizers' boxes.
function applyToggles() {
  document.querySelectorAll("input[data-optimizer]").forEach(function (box) {
    var name = box.getAttribute("data-optimizer");
    document.querySelectorAll('[data-optimizer="' + name + '"]').forEach(function (el) {
      if (el !== box && el.tagName !== "INPUT" && el.tagName !== "LABEL") el.style.display = box.checked ? "" : "none";
    });
  });
  document.querySelectorAll("input[data-family]").forEach(function (box) {
    var members = document.querySelectorAll('input[data-member-of="' + box.getAttribute("data-family") + '"]');
    var on = Array.prototype.filter.call(members, function (m) { return m.checked; }).length;
    box.checked = on === members.length;
    box.indeterminate = on > 0 && on < members.length;
  });
}
document.querySelectorAll("input[data-family]").forEach(function (box) {
  box.addEventListener("change", function () {
    document.querySelectorAll('input[data-member-of="' + box.getAttribute("data-family") + '"]')
      .forEach(function (m) { m.checked = box.checked; });
    applyToggles();
  });
});
document.querySelectorAll("input[data-optimizer]").forEach(function (box) { box.addEventListener("change", applyToggles); });
applyToggles();
"""


def _controls_html(results: dict[str, Any]) -> str:
    """One box per optimizer, grouped by family with a box for the whole family."""
    from .figures import by_family

    families: dict[str, str] = {}
    for task in results["tasks"].values():
        families.update(task.get("families", {}))
    parts = ['<details id="controls" open><summary>Show optimizers (uncheck to hide them in every table and figure; '
             "hover a line for its name)</summary>"]
    for family, members in by_family(analysis.all_optimizers(results), families):
        f = html.escape(family)
        boxes = "".join(f'<label><input type="checkbox" checked data-optimizer="{html.escape(o)}" data-member-of="{f}">'
                        f" {html.escape(o)}</label>" for o in members)
        parts.append(f'<div class="family"><label><b><input type="checkbox" checked data-family="{f}"> {f}</b></label>'
                     f" {boxes}</div>")
    parts.append("</details>")
    return "".join(parts)


def _verdict_html(results: dict[str, Any]) -> str:
    verdict = analysis.verdict(results)
    if verdict is None:
        return '<p class="verdict"><b>No verdict:</b> every run diverged.</p>'
    return f'<p class="verdict" id="verdict"><b>Verdict.</b> {html.escape(verdict["text"])}</p>'


def _titles(task: dict[str, Any]) -> dict[str, str]:
    """Hover text per optimizer on a task: its best lr and its result there."""
    out = {}
    for row in analysis.ranking(task):
        result = "every lr diverged" if row["metric_median"] is None else \
            f"median {task['metric']} {row['metric_median']:.4g}, rank {row['rank']}"
        lr = "" if row["best_lr"] is None else f" at lr {row['best_lr']:.3g}"
        out[row["optimizer"]] = f"{row['optimizer']} ({row['family']}){lr}: {result}"
    return out


def build(results: dict[str, Any]) -> str:
    """The report's HTML, from results alone. The page holds everything it shows (its figures as inline SVG, its
    script and style), so it is one file that opens from disk, without a server or a network."""
    from . import figures

    svgs: dict[str, str] = {}
    captions: dict[str, str] = {}
    for filename, caption, make in figure_plan(results):
        svgs[filename] = figures.to_svg(make())
        captions[filename] = caption
    tasks = results["tasks"]
    overall = {o: o for o in analysis.all_optimizers(results)}

    def img(filename: str, titles: dict[str, str]) -> str:
        prefix = re.sub(r"[^A-Za-z0-9]", "-", filename.rsplit(".", 1)[0]) + "-"
        return (f'<figure id="{prefix}figure">{inline_svg(svgs[filename], prefix, titles)}'
                f"<figcaption>{html.escape(captions[filename])}</figcaption></figure>")

    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>thalweg arena</title><style>{_CSS}</style></head><body>",
             f"<h1>thalweg arena</h1><p>thalweg {html.escape(results['thalweg_version'])}, run {html.escape(results['created'])}; "
             f"{len(overall)} optimizers on {len(tasks)} tasks: {html.escape(', '.join(tasks))}.</p>",
             _verdict_html(results),
             "<nav>" + "".join(f'<a href="#{html.escape(n)}">{html.escape(n)}</a>' for n in tasks)
             + '<a href="#summary">summary</a><a href="#checks">checks</a>'
             + ('<a href="#int8">8-bit state</a>' if analysis.int8_comparison(results) else "")
             + '<a href="#protocol">protocol</a></nav>',
             _controls_html(results)]
    for name, task in tasks.items():
        rec = analysis.recommendation(task)
        target = "none" if task["target"] is None else f"{task['target']:g}"
        centres = ", ".join(_centre_text(o, lr, task.get("centre_source", {}).get(o, "measured"))
                            + (f" (grid extended to {', '.join(f'{x:.3g}' for x in task['extended'][o])})"
                               if o in task.get("extended", {}) else "")
                            for o, lr in task["centres"].items())
        parts.append(f'<h2 id="{html.escape(name)}">{html.escape(name)}</h2><p>{html.escape(task["description"])}</p>'
                     f"<p>Metric: {html.escape(task['metric'])} ({'higher' if task['higher_is_better'] else 'lower'} is better); "
                     f"target {target}; {task['steps']} steps.</p>")
        if task.get("not_applicable"):
            parts.append("<p>Not run on this task: " + "; ".join(
                f"{html.escape(name)} ({html.escape(why)})" for name, why in task["not_applicable"].items()) + ".</p>")
        if rec:
            parts.append(f'<p class="rec"><b>Recommendation: {html.escape(rec["optimizer"])} at lr {rec["lr"]:.3g}</b> &mdash; '
                         f"{html.escape(rec['evidence'])}</p>")
        else:
            why = "every run diverged" if task["best_lr"] else "none of the optimizers applies to this task"
            parts.append(f'<p class="rec"><b>No recommendation:</b> {why}.</p>')
        parts.append(_table(analysis.ranking(task), _RANK_COLUMNS, sortable=True))
        titles = _titles(task)
        for filename, _, _ in figure_plan({"tasks": {name: task}}):
            if filename != "profile.svg":
                parts.append(img(filename, titles))
        parts.append(f"<details><summary>lr centres</summary><p>{html.escape(centres)}.</p></details>")
    if tasks:
        parts.append('<h2 id="summary">Across tasks</h2><p>The table ranks by targets reached, then mean rank over tasks, '
                     "then tasks won (an optimizer left out of some tasks after those that ran on all of them); click a "
                     "heading to sort by another column. Steps and time to target are relative "
                     "to the task's fastest optimizer (median over the tasks it reached); state bytes per parameter are "
                     "measured after training; the good lr range is how many decades of lr end within tolerance of the "
                     "task's best. Performance profile (AlgoPerf, Dahl et al. 2023): for each optimizer, the fraction of "
                     "tasks on which it reaches the target within &tau; times the fastest optimizer's time on that task. "
                     "Profile area: the mean of that curve over &tau; in [1, 4] (1 = fastest everywhere); made of timings "
                     "on a shared machine, it only breaks ties.</p>")
        parts.append(_table(analysis.summary_table(results), _SUMMARY_COLUMNS, sortable=True))
        if "profile.svg" in svgs:
            parts.append(img("profile.svg", overall))
        parts.append(_checks_html(results))
        parts.append(_int8_html(results))
    parts.append(_protocol_html(results))
    parts.append(f"<script>{_SCRIPT}</script></body></html>\n")
    return "\n".join(parts)


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
    """Write index.html (the whole report, figures inline) and results.json to ``out`` atomically; returns
    index.html's path."""
    out = check_writable(out)
    page = build(results)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
    try:
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
