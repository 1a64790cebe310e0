"""Pure functions from results to numbers: rankings, recommendations, performance profiles.

No drawing and no training here, so the report's tables and the tests share one definition.
"""

from __future__ import annotations

import math
import statistics
from typing import Any

Runs = list[dict[str, Any]]

PROFILE_TAUS = [1 + 3 * i / 60 for i in range(61)]  # tau from 1 to 4, as in AlgoPerf


def optimizers_of(task: dict[str, Any]) -> list[str]:
    """The task's optimizers, in the order they were run."""
    return list(task["centres"])


def best_runs(task: dict[str, Any], optimizer: str) -> Runs:
    """The runs that report the optimizer's result: the seeds rerun at its best lr (seeds 1, 2, ...).

    The sweep's seed 0 chose that lr, so its result is the best of several draws and flatters the optimizer: it
    is kept out of every reported median, range and curve. It stands in only where nothing was rerun (a one-seed
    arena) or where there was no choice to flatter (a grid of one lr: the lr-free optimizers).
    """
    lr = task["best_lr"].get(optimizer)
    if lr is None:
        return []
    mine = [r for r in task["runs"] if r["optimizer"] == optimizer and r["lr"] == lr]
    reruns = [r for r in mine if r["phase"] == "seed"]
    chosen = [r for r in mine if r["phase"] == "sweep" and r["seed"] == 0]
    if not reruns:
        return chosen
    return chosen + reruns if len(sweep_runs(task, optimizer)) == 1 else reruns


def sweep_runs(task: dict[str, Any], optimizer: str) -> Runs:
    return sorted((r for r in task["runs"] if r["optimizer"] == optimizer and r["phase"] == "sweep"),
                  key=lambda r: r["lr"])


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def summarise(task: dict[str, Any], optimizer: str) -> dict[str, Any]:
    """One optimizer's row on a task: median/min/max metric over seeds at its best lr, how often it
    reached the target and how fast (median over seeds; a seed that misses counts as never), and how
    many grid lrs diverged."""
    runs = best_runs(task, optimizer)
    metrics = [r["final_metric"] for r in runs if r["final_metric"] is not None and not r["diverged"]]
    hits = [r for r in runs if r["steps_to_target"] is not None]
    reached = bool(runs) and 2 * len(hits) > len(runs)  # most seeds reached it

    def med_of(key: str) -> float | None:
        if not reached:
            return None
        values = sorted(r[key] if r[key] is not None else math.inf for r in runs)
        m = statistics.median(values)
        return m if math.isfinite(m) else None

    sweep = sweep_runs(task, optimizer)
    return {
        "optimizer": optimizer, "best_lr": task["best_lr"].get(optimizer), "seeds": len(runs),
        "metric_median": _median(metrics), "metric_min": min(metrics) if metrics else None,
        "metric_max": max(metrics) if metrics else None,
        "diverged_seeds": sum(r["diverged"] for r in runs),
        "reached": f"{len(hits)}/{len(runs)}", "reached_target": reached,
        "steps_to_target": med_of("steps_to_target"), "time_to_target": med_of("time_to_target"),
        "step_time_ms": (_median([r["step_time"] for r in runs if r["step_time"] is not None]) or math.nan) * 1e3,
        "diverged_lrs": f"{sum(r['diverged'] for r in sweep)}/{len(sweep)}",
        "good_lrs": good_lr_count(task, optimizer), "lr_width": lr_range_width(task, optimizer),
        # measured: the bytes of the optimizer's state tensors after training over the parameters' elements
        "memory": _median([r["state_bytes_per_param"] for r in runs if r.get("state_bytes_per_param") is not None]),
        "family": task.get("families", {}).get(optimizer, "other"),
    }


def good_lrs(task: dict[str, Any], optimizer: str) -> list[float]:
    """The sweep lrs whose final metric is within tolerance of the task's best: 10% of its value (for accuracy-like
    metrics, higher is better, within 2 points)."""
    values = [r["final_metric"] for r in task["runs"] if r["phase"] == "sweep" and r["final_metric"] is not None and not r["diverged"]]
    if not values:
        return []
    hib = task["higher_is_better"]
    best = max(values) if hib else min(values)
    good = []
    for r in sweep_runs(task, optimizer):
        m = r["final_metric"]
        if m is not None and not r["diverged"] and (m >= best - 0.02 if hib else m <= best + 0.1 * abs(best) + 1e-12):
            good.append(r["lr"])
    return good


def good_lr_count(task: dict[str, Any], optimizer: str) -> str:
    """Robustness: how many grid lrs are good (:func:`good_lrs`) -- a flat lr-sensitivity curve means less tuning."""
    return f"{len(good_lrs(task, optimizer))}/{len(sweep_runs(task, optimizer))}"


def lr_range_width(task: dict[str, Any], optimizer: str) -> float | None:
    """How wide the good lr range is, in decades: log10 of the largest good lr over the smallest (0 for one good lr,
    None for none). Wider means the lr matters less. Not defined for an lr-free optimizer's grid of one."""
    lrs = good_lrs(task, optimizer)
    if not lrs or len(sweep_runs(task, optimizer)) < 2:
        return None
    return math.log10(max(lrs) / min(lrs))


def ranking(task: dict[str, Any]) -> list[dict[str, Any]]:
    """Rows of :func:`summarise`, best first: by median metric, then by steps to target."""
    hib = task["higher_is_better"]

    def key(row: dict[str, Any]) -> tuple[float, float]:
        m = row["metric_median"]
        primary = math.inf if m is None else (-m if hib else m)
        return primary, row["steps_to_target"] if row["steps_to_target"] is not None else math.inf

    rows = sorted((summarise(task, o) for o in optimizers_of(task)), key=key)
    for i, row in enumerate(rows, 1):
        row["rank"] = i
    return rows


def seed_ranges_overlap(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Whether two rows of :func:`summarise` cannot be told apart by their seeds: their ranges of the metric over
    seeds overlap. With one seed each a range is a point, and only equal values overlap."""
    return (a["metric_min"] is not None and b["metric_min"] is not None
            and a["metric_min"] <= b["metric_max"] and a["metric_max"] >= b["metric_min"])


def tied_with_top(rows: list[dict[str, Any]]) -> list[str]:
    """The optimizers (of ``rows``, ranked) that the seeds cannot separate from the top one."""
    return [row["optimizer"] for row in rows[1:] if seed_ranges_overlap(row, rows[0])]


def grid_edge(task: dict[str, Any], optimizer: str) -> str | None:
    """"lowest" or "highest" when ``optimizer``'s best lr is at that end of a grid of several lrs (the optimum may
    lie beyond it), or next to an lr that diverged on the higher side ("next to a diverged lr"); else None."""
    sweep = sweep_runs(task, optimizer)
    lrs = sorted({r["lr"] for r in sweep})
    best = task["best_lr"].get(optimizer)
    if len(lrs) < 2 or best not in lrs:
        return None
    if best == lrs[-1]:
        return "highest"
    if best == lrs[0]:
        return "lowest"
    above = lrs[lrs.index(best) + 1]
    if any(r["diverged"] for r in sweep if r["lr"] == above):
        return "next to a diverged lr"
    return None


def edge_text(edge: str) -> str:
    """Where a best lr sits, for :func:`grid_edge`'s answer: "the highest of its grid", "next to a diverged lr"."""
    return edge if edge.startswith("next") else f"the {edge} of its grid"


def recommendation(task: dict[str, Any]) -> dict[str, Any] | None:
    """The top-ranked optimizer and lr, with the evidence in one sentence; None if every run diverged. ``ties``
    names the optimizers whose seed ranges overlap the top's (the ranking between them is not resolved by the
    seeds), ``edge`` flags a best lr at an end of its grid or next to a diverged lr (see :func:`grid_edge`)."""
    rows = ranking(task)
    if not rows or rows[0]["metric_median"] is None:
        return None
    top = rows[0]
    runner = rows[1] if len(rows) > 1 and rows[1]["metric_median"] is not None else None
    fmt = lambda v: f"{v:.4g}"  # noqa: E731
    evidence = (f"median {task['metric']} {fmt(top['metric_median'])} over {top['seeds']} seed(s) "
                f"(range {fmt(top['metric_min'])}-{fmt(top['metric_max'])}) at lr {top['best_lr']:.3g}; ")
    if task["target"] is not None:
        evidence += (f"target {task['target']:g} reached by {top['reached']} seeds"
                     + (f", median {top['steps_to_target']:.0f} steps; " if top["steps_to_target"] is not None else "; "))
    evidence += f"{top['good_lrs']} grid lrs within tolerance of the best"
    if runner is not None:
        evidence += f"; runner-up {runner['optimizer']} with {fmt(runner['metric_median'])}"
    ties = tied_with_top(rows)
    if ties:
        shown = ", ".join(ties[:5]) + (f" and {len(ties) - 5} more" if len(ties) > 5 else "")
        evidence += f"; a tie: the seed ranges of {shown} overlap this one's"
    edge = grid_edge(task, top["optimizer"])
    if edge is not None:
        evidence += f"; its best lr is {edge_text(edge)}, so a better one may lie beyond"
    lighter, faster = lighter_and_faster(rows)
    if lighter is not None:
        evidence += (f"; for less memory: {lighter['optimizer']} (rank {lighter['rank']}, {lighter['memory']:.3g} bytes "
                     f"of state per parameter against {top['memory']:.3g})")
    if faster is not None:
        key, what = (("time_to_target", "time to target (s)") if top["time_to_target"] is not None
                     else ("step_time_ms", "ms per step"))
        evidence += (f"; for less wall time: {faster['optimizer']} (rank {faster['rank']}, {what} "
                     f"{faster[key]:.3g} against {top[key]:.3g})")
    return {"optimizer": top["optimizer"], "lr": top["best_lr"], "evidence": evidence + ".", "ties": ties,
            "edge": edge, "lighter": None if lighter is None else lighter["optimizer"],
            "faster": None if faster is None else faster["optimizer"]}


def lighter_and_faster(rows: list[dict[str, Any]]) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """The runners-up of a ranking (best first) for memory and for wall time, among the optimizers that do about as
    well as the top one (its seeds cannot separate them, or both reach the task's target): the best-ranked that
    keeps less state per parameter, and the best-ranked that is quicker — to the target when the top one reaches it,
    else per step. None where no such optimizer beats the top."""
    top = rows[0]
    lighter = faster = None
    for row in rows[1:]:
        as_good = seed_ranges_overlap(row, top) or (top["reached_target"] and row["reached_target"])
        if row["metric_median"] is None or not as_good:
            continue
        if lighter is None and top["memory"] is not None and row["memory"] is not None and row["memory"] < top["memory"]:
            lighter = row
        if faster is None:
            if top["time_to_target"] is not None:
                quicker = row["time_to_target"] is not None and row["time_to_target"] < top["time_to_target"]
            else:
                quicker = math.isfinite(row["step_time_ms"]) and row["step_time_ms"] < top["step_time_ms"]
            if quicker:
                faster = row
    return lighter, faster


def profile(results: dict[str, Any], by: str = "time_to_target") -> dict[str, list[float]]:
    """AlgoPerf-style performance profile: for each optimizer, the fraction of tasks on which it reaches
    the target within tau x the fastest optimizer's time, for tau in :data:`PROFILE_TAUS`.

    ``by`` is ``"time_to_target"`` (seconds: steps x median step time) or ``"steps_to_target"``.
    Tasks without a target are left out; tasks no optimizer solves count against everyone.
    """
    tasks = [t for t in results["tasks"].values() if t["target"] is not None]
    optimizers = all_optimizers(results)
    ratios: dict[str, list[float]] = {o: [] for o in optimizers}
    for task in tasks:
        cost = {o: (summarise(task, o)[by] if o in task["centres"] else None) for o in optimizers}
        finite = [c for c in cost.values() if c is not None]
        best = min(finite) if finite else None
        for o in optimizers:
            c = cost[o]
            ratios[o].append(math.inf if c is None or best is None else c / best if best > 0 else 1.0)
    n = len(tasks)
    return {o: [sum(r <= tau + 1e-12 for r in ratios[o]) / n if n else 0.0 for tau in PROFILE_TAUS] for o in optimizers}


def all_optimizers(results: dict[str, Any]) -> list[str]:
    seen: dict[str, None] = {}
    for task in results["tasks"].values():
        for o in optimizers_of(task):
            seen.setdefault(o)
    return list(seen)


def summary_table(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Across tasks, per optimizer: targets reached, mean rank, wins, and what else people weigh — steps and time to
    the target relative to the task's fastest optimizer (median over the tasks where it got there), state memory per
    parameter, the width of its good lr range (mean over tasks, decades), diverged lrs, and the area under the time
    profile (1 = fastest everywhere). Ranked by what it claims to rank: most targets reached, then the lowest mean
    rank over tasks, then most wins; the profile area (timings, which share a noisy machine) only breaks what is
    still tied. An optimizer left out of some tasks (Muon, where there is no hidden matrix) ranks after those that
    ran on every task: its targets and mean rank count fewer tasks, so they do not compare."""
    optimizers = all_optimizers(results)
    prof = profile(results)
    stats = {o: {"optimizer": o, "wins": 0, "ranks": [], "targets": 0, "with_target": 0, "div": 0, "grid": 0,
                 "steps": [], "time": [], "memory": [], "width": [], "family": "other"} for o in optimizers}
    for task in results["tasks"].values():
        rows = ranking(task)
        fastest = {key: min((r[key] for r in rows if r[key] is not None), default=None)
                   for key in ("steps_to_target", "time_to_target")}
        for row in rows:
            s = stats[row["optimizer"]]
            s["family"] = row["family"]
            s["ranks"].append(row["rank"])
            s["wins"] += row["rank"] == 1
            if task["target"] is not None:
                s["with_target"] += 1
                s["targets"] += row["reached_target"]
            for key, into in (("steps_to_target", "steps"), ("time_to_target", "time")):
                if row[key] is not None and fastest[key]:
                    s[into].append(row[key] / fastest[key])
            for key, into in (("memory", "memory"), ("lr_width", "width")):
                if row[key] is not None:
                    s[into].append(row[key])
            d, g = map(int, row["diverged_lrs"].split("/"))
            s["div"] += d
            s["grid"] += g
    rows = []
    n_tasks = len(results["tasks"])
    for o, s in stats.items():
        area = sum(prof[o]) / len(PROFILE_TAUS) if prof[o] else 0.0
        rows.append({"optimizer": o, "family": s["family"], "wins": s["wins"], "tasks_run": f"{len(s['ranks'])}/{n_tasks}",
                     "everywhere": len(s["ranks"]) == n_tasks,
                     "mean_rank": statistics.mean(s["ranks"]) if s["ranks"] else None,
                     "targets": f"{s['targets']}/{s['with_target']}", "diverged_lrs": f"{s['div']}/{s['grid']}",
                     "steps_ratio": _median(s["steps"]), "time_ratio": _median(s["time"]),
                     "memory": _median(s["memory"]), "lr_width": statistics.mean(s["width"]) if s["width"] else None,
                     "profile_score": area})
    rows.sort(key=lambda r: (not r["everywhere"], -int(r["targets"].split("/")[0]),
                             r["mean_rank"] if r["mean_rank"] is not None else math.inf, -r["wins"], -r["profile_score"]))
    return rows


def verdict(results: dict[str, Any]) -> dict[str, Any] | None:
    """The report's first line: the optimizer to use across the tasks (the summary's first), why, how close the next
    one is, and each task's own pick with its ties and edge flags. None without a task that trained."""
    picks = []
    for name, task in results["tasks"].items():
        rec = recommendation(task)
        if rec is not None:
            picks.append({"task": name, **rec})
    if not picks:
        return None
    rows = summary_table(results)
    top = rows[0]
    n_tasks = len(results["tasks"])
    everywhere = sum(r["everywhere"] for r in rows)
    among = f"{len(rows)} optimizers" if everywhere == len(rows) else f"the {everywhere} optimizers that ran on every task"
    why = (f"it reached {top['targets']} targets with the best mean rank, {top['mean_rank']:.1f} among {among} over "
           f"{n_tasks} task{'s' if n_tasks > 1 else ''}")
    close = [r["optimizer"] for r in rows[1:] if r["targets"] == top["targets"] and r["mean_rank"] is not None
             and r["mean_rank"] - top["mean_rank"] <= 1.0]
    if close:
        why += f"; within one rank of it: {', '.join(close[:4])}{' and more' if len(close) > 4 else ''}"
    text = f"Use {top['optimizer']}: {why}."
    if n_tasks > 1:
        parts = []
        for pick in picks:
            notes = ([f"tie with {len(pick['ties'])}"] if pick["ties"] else []) + (["lr at an edge"] if pick["edge"] else [])
            parts.append(f"{pick['task']}: {pick['optimizer']} at lr {pick['lr']:.3g}"
                         + (f" ({', '.join(notes)})" if notes else ""))
        text += " Per task: " + "; ".join(parts) + "."
    return {"optimizer": top["optimizer"], "close": close, "picks": picks, "text": text}


def against_adamw(task: dict[str, Any]) -> dict[str, Any] | None:
    """The task's recommendation held against AdamW tuned on the same grid rule and budget, by seed ranges:
    ``verdict`` is "better" or "worse" when the ranges are apart, "tie" when they overlap, "is AdamW" when AdamW
    is the pick. None without a recommendation or without an AdamW row that trained."""
    rec = recommendation(task)
    if rec is None or "adamw" not in optimizers_of(task):
        return None
    pick, adamw = summarise(task, rec["optimizer"]), summarise(task, "adamw")
    if adamw["metric_median"] is None:
        return None
    if rec["optimizer"] == "adamw":
        verdict = "is AdamW"
    elif seed_ranges_overlap(pick, adamw):
        verdict = "tie"
    else:
        ahead = pick["metric_median"] > adamw["metric_median"]
        verdict = "better" if ahead == task["higher_is_better"] else "worse"
    return {"optimizer": rec["optimizer"], "verdict": verdict, "pick": (pick["metric_min"], pick["metric_max"]),
            "adamw": (adamw["metric_min"], adamw["metric_max"]), "adamw_lr": adamw["best_lr"]}


def leave_one_task_out(results: dict[str, Any]) -> list[dict[str, Any]]:
    """For each task: the optimizer the across-task summary of the *other* tasks ranks first, and how it does on the
    held-out task at its lr there — its rank, its median metric, the best median, and the regret (the gap between
    the two, in the task's metric, 0 when it is the best). Tasks where the held-out pick did not train get
    ``rank`` None. Empty with fewer than two tasks."""
    names = list(results["tasks"])
    out = []
    for held in names if len(names) > 1 else []:
        others = {"tasks": {n: t for n, t in results["tasks"].items() if n != held}}
        pick = summary_table(others)[0]["optimizer"]
        task = results["tasks"][held]
        rows = ranking(task)
        row = next((r for r in rows if r["optimizer"] == pick), None)
        best = rows[0]["metric_median"] if rows else None
        mine = None if row is None else row["metric_median"]
        regret = None if mine is None or best is None else abs(best - mine)
        out.append({"task": held, "pick": pick, "rank": None if mine is None else row["rank"], "of": len(rows),
                    "metric": mine, "best": best, "best_optimizer": rows[0]["optimizer"] if rows else None,
                    "regret": regret})
    return out


def summary_text(results: dict[str, Any]) -> str:
    """What the CLI and compare() print after a run: the verdict, each task's pick with its ties and edge flags, the
    checks against AdamW and leave-one-task-out, 8-bit state against float32, and the across-task summary."""
    import textwrap

    rows = summary_table(results)
    width = max([len("optimizer")] + [len(row["optimizer"]) for row in rows]) + 2
    first = verdict(results)
    lines = [] if first is None else [textwrap.fill("Verdict: " + first["text"][0].lower() + first["text"][1:],
                                                   width=110, subsequent_indent="  "), ""]
    lines.append(f"{'task':<22}{'recommendation':<{width}}{'lr':>10}  metric")
    for name, task in results["tasks"].items():
        rec = recommendation(task)
        if rec is None:
            why = "(all diverged)" if task["best_lr"] else "(none applies)"
            lines.append(f"{name:<22}{why:<{width}}")
            continue
        row = ranking(task)[0]
        notes = ([f"tie with {', '.join(rec['ties'][:3])}{' ...' if len(rec['ties']) > 3 else ''}"] if rec["ties"] else []) \
            + ([f"best lr is {edge_text(rec['edge'])}"] if rec["edge"] else [])
        lines.append(f"{name:<22}{rec['optimizer']:<{width}}{rec['lr']:>10.3g}  {row['metric_median']:.4g} ({task['metric']})"
                     + (f"  [{'; '.join(notes)}]" if notes else ""))
    checks = [(name, against_adamw(task)) for name, task in results["tasks"].items()]
    checks = [f"{name} {check['verdict']}" for name, check in checks if check is not None]
    if checks:
        lines.append(f"each pick against tuned AdamW (seed ranges): {', '.join(checks)}")
    loto = leave_one_task_out(results)
    if loto:
        lines.append("leave one task out, the other tasks' pick on it: " + ", ".join(
            f"{row['task']} {row['pick']} (rank {row['rank'] if row['rank'] is not None else '-'} of {row['of']})"
            for row in loto))
    eight = int8_comparison(results)
    if eight:
        lines.append('8-bit state (state_dtype="int8") against float32, same lr and seeds: ' + ", ".join(
            f"{row['optimizer']} on {row['task']} {row['verdict']}" for row in eight))
    lines.append("")
    lines.append(f"{'optimizer':<{width}}{'targets':>9}{'mean rank':>11}{'wins':>6}{'profile':>9}"
                 "   (ranked by targets reached, then mean rank, then wins; those left out of a task after)")
    for row in rows:
        mean_rank = "-" if row["mean_rank"] is None else f"{row['mean_rank']:.2f}"
        partial = "" if row["everywhere"] else f"   (ran on {row['tasks_run'].split('/')[0]} of the tasks: not comparable)"
        lines.append(f"{row['optimizer']:<{width}}{row['targets']:>9}{mean_rank:>11}{row['wins']:>6}{row['profile_score']:>9.2f}"
                     + partial)
    return "\n".join(lines)


# What 8-bit state may cost and still be "within": 1 % of the final training loss, and half a point of a metric
# that is a share (accuracy) or 1 % of one that is not (a validation loss).
INT8_LOSS_TOLERANCE = 0.01
INT8_SHARE_TOLERANCE = 0.005


def _tail_loss(run: dict[str, Any]) -> float | None:
    """The training loss at the end of a run: the mean over its last 5 % of steps (the last minibatch's loss alone
    moves by more than the differences looked for)."""
    losses = [v for v in run["curve"]["loss"] if v is not None] if run.get("curve") else []
    if not losses:
        return run.get("final_loss")
    tail = losses[-max(1, len(losses) // 20):]
    return sum(tail) / len(tail)


def _int8_failure(full: list[dict[str, Any]], eight: list[dict[str, Any]]) -> str:
    """Why an 8-bit rerun has no comparison, saying which side diverged: an lr chosen next to a diverging one can
    diverge on the rerun seeds with float32 state too, and that is no finding about 8-bit state."""
    lost = [label for label, runs in (("float32", full), ("8-bit", eight)) if any(r["diverged"] for r in runs)]
    if not lost:
        return "no result"
    if len(lost) == 2:
        return (f"diverged with float32 state too ({sum(r['diverged'] for r in full)} of {len(full)} seeds; "
                f"8-bit: {sum(r['diverged'] for r in eight)} of {len(eight)}): the lr, not the 8 bits")
    runs = full if lost[0] == "float32" else eight
    return f"{lost[0]} state diverged ({sum(r['diverged'] for r in runs)} of {len(runs)} seeds)"


def int8_comparison(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Per task and optimizer rerun with 8-bit state (runs of phase "int8", at its best lr, on the seeds of its reported
    median): the medians over those seeds of the final training loss (:func:`_tail_loss`) and of the task's metric with
    float32 state and
    with 8-bit state, their differences, the state bytes per parameter of each, and a verdict — "within" both
    tolerances, "outside" (saying which), or "not used" where no tensor was large enough to be kept in 8 bits (the
    8-bit runs kept as many bytes per parameter as the float ones)."""
    rows = []
    for name, task in results["tasks"].items():
        for optimizer in dict.fromkeys(r["optimizer"] for r in task["runs"] if r["phase"] == "int8"):
            eight = [r for r in task["runs"] if r["optimizer"] == optimizer and r["phase"] == "int8"]
            seeds = {r["seed"] for r in eight}
            full = [r for r in best_runs(task, optimizer) if r["seed"] in seeds]
            if not full:
                continue
            medians = {}
            for label, runs in (("float32", full), ("int8", eight)):
                trained = [r for r in runs if not r["diverged"]]
                medians[f"final_loss_{label}"] = _median([v for v in map(_tail_loss, trained) if v is not None])
                for key in ("final_metric", "state_bytes_per_param"):
                    medians[f"{key}_{label}"] = _median([r[key] for r in trained if r.get(key) is not None])
            row = {"task": name, "optimizer": optimizer, **medians, "loss_change": None, "metric_change": None,
                   "share": False}
            loss, loss8 = medians["final_loss_float32"], medians["final_loss_int8"]
            metric, metric8 = medians["final_metric_float32"], medians["final_metric_int8"]
            if loss is not None and loss8 is not None and loss != 0:
                row["loss_change"] = (loss8 - loss) / abs(loss)
            share = row["share"] = bool(task["higher_is_better"] and metric is not None and 0 <= metric <= 1)
            if metric is not None and metric8 is not None:
                row["metric_change"] = metric8 - metric if share else ((metric8 - metric) / abs(metric) if metric else None)
            used = medians["state_bytes_per_param_int8"], medians["state_bytes_per_param_float32"]
            if None not in used and used[0] >= 0.99 * used[1]:
                row["verdict"] = "not used (no tensor of 4096 elements)"
            elif row["loss_change"] is None or row["metric_change"] is None:
                row["verdict"] = _int8_failure(full, eight)
            else:
                misses = []
                if abs(row["loss_change"]) > INT8_LOSS_TOLERANCE:
                    misses.append(f"loss {row['loss_change']:+.1%}")
                limit = INT8_SHARE_TOLERANCE if share else INT8_LOSS_TOLERANCE
                if abs(row["metric_change"]) > limit:
                    misses.append(f"{task['metric']} {row['metric_change'] * (100 if share else 1):+.2f}"
                                  + (" points" if share else f" ({row['metric_change']:+.1%})"))
                row["verdict"] = "within" if not misses else "outside: " + ", ".join(misses)
            rows.append(row)
    return rows

