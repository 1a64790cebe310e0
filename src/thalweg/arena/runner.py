"""``run_arena``: the protocol over several tasks, results saved after each task, then the report."""

from __future__ import annotations

import datetime as _dt
from pathlib import Path
from typing import Any

from . import protocol, report
from .errors import ArenaError
from .protocol import DEFAULT_BACKEND
from .results import load_results, new_results, partial_path, save_json
from .tasks import QUICK_TASKS, TASKS, Task, get_task


def check_optimizers(names: list[str], valid: tuple[str, ...] | None = None, why_not: str = "") -> list[str]:
    """Validate optimizer names against ``valid`` (default: the arena's optimizers); an ArenaError lists the
    valid ones, and says why for a thalweg optimizer that is left out (``why_not``, or the arena's reason)."""
    import thalweg

    valid = protocol.ARENA_OPTIMIZERS if valid is None else valid
    if not names:
        raise ArenaError(f"no optimizers given; valid optimizers: {', '.join(valid)}")
    for n in names:
        if n in thalweg.names() and n not in valid:
            reason = why_not or protocol.NOT_IN_ARENA.get(n, "")
            raise ArenaError(f"{n!r} is a thalweg optimizer the arena does not run yet ({reason}); "
                             f"valid here: {', '.join(valid)}")
        if n not in valid:
            raise ArenaError(f"unknown optimizer {n!r}; valid optimizers: {', '.join(valid)}")
    return list(dict.fromkeys(names))


def check_positive(name: str, value: float, integer: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0 or (integer and int(value) != value):
        kind = "a positive integer" if integer else "a positive number"
        raise ArenaError(f"{name} must be {kind}, got {value!r}")


def check_backend(backend: str) -> None:
    from thalweg._base import BACKENDS

    if backend not in BACKENDS:
        raise ArenaError(f"unknown backend {backend!r}; valid backends: {', '.join(BACKENDS)}")


def check_device(device: str) -> str:
    """The device runs go to: ``device`` as torch spells it ("cpu", "cuda", "cuda:1"), "auto" for the GPU where
    there is one (else the CPU). A GPU that is not there is an ArenaError before any work."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        kind = torch.device(device).type
    except (RuntimeError, TypeError):
        raise ArenaError(f"unknown device {device!r}; use cpu, cuda, cuda:N or auto") from None
    if kind not in ("cpu", "cuda"):
        raise ArenaError(f"the arena runs on cpu or cuda, got device {device!r}")
    if kind == "cuda" and not torch.cuda.is_available():
        raise ArenaError(f"device {device!r} is not available here (torch.cuda.is_available() is False); "
                         "use --device cpu, or auto")
    return device


def default_jobs() -> int:
    """The cores this process may run on (its CPU affinity where the platform says, else the CPU count)."""
    import os

    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def run_arena(tasks: list[str] | None = None, optimizers: list[str] | None = None, seeds: int = 3,
              budget: float = 1.0, quick: bool = False, out: str | Path = "arena-report",
              progress: bool = True, created: str | None = None,
              extra_tasks: dict[str, Task] | None = None,
              centres: dict[str, dict[str, float]] | None = None, backend: str = DEFAULT_BACKEND,
              jobs: int | None = None, resume: bool = False, device: str = "cpu") -> dict[str, Any]:
    """Run the arena protocol and write the report to ``out``; returns the results.

    ``tasks`` default to every built-in task (``QUICK_TASKS`` with ``quick``); ``optimizers`` to
    ``protocol.ARENA_OPTIMIZERS``; ``budget`` scales every task's step budget; ``seeds`` is the number of seeds at
    each optimizer's best lr. ``extra_tasks`` lets :func:`compare` run the user's own task, and
    ``centres`` gives lr centres (by task, then optimizer) that replace the coarse search; ``backend`` is passed to
    every optimizer (thalweg's ``backend=``: auto, reference, foreach or fused). ``jobs`` processes run the
    optimizers in parallel (default: one per core this process may use); the records are the same for any
    ``jobs``, only the timings share the machine. ``device`` is where every run trains (see :func:`check_device`);
    on a GPU the runs go one at a time (one device; forked workers cannot share CUDA).

    Results accumulate beside ``out`` (:func:`partial_path`) as each task finishes; an interrupted run leaves them
    there, and ``resume=True`` continues from them with the same settings (``jobs`` aside), running only the tasks
    they lack.
    """
    known = dict(TASKS, **(extra_tasks or {}))
    names = list(tasks) if tasks else (QUICK_TASKS if quick else list(TASKS))
    task_objs = [known[n] if n in known else get_task(n) for n in dict.fromkeys(names)]
    optimizers = check_optimizers(list(optimizers) if optimizers else list(protocol.ARENA_OPTIMIZERS))
    check_positive("seeds", seeds, integer=True)
    check_positive("budget", budget)
    check_backend(backend)
    jobs = default_jobs() if jobs is None else jobs
    check_positive("jobs", jobs, integer=True)
    device = check_device(device)
    if device != "cpu":
        jobs = 1
    out = report.check_writable(out)
    multipliers = protocol.QUICK_GRID_MULTIPLIERS if quick else protocol.GRID_MULTIPLIERS
    config = {"tasks": [t.name for t in task_objs], "optimizers": optimizers, "seeds": int(seeds),
              "budget": float(budget), "quick": bool(quick), "grid_multipliers": list(multipliers), "backend": backend,
              "jobs": int(jobs), "device": device,
              "int8_checked": [name for name in (protocol.QUICK_INT8_CHECKED if quick else protocol.INT8_CHECKED)
                               if name in optimizers]}
    created = created or _dt.datetime.now().isoformat(timespec="seconds")
    results = new_results(config, created)
    partial = partial_path(out)
    if resume:
        results = _resumed(partial, config)
    todo = [t for t in task_objs if t.name not in results["tasks"]]  # with resume, the tasks still to run
    int8 = tuple(config["int8_checked"])  # rerun with 8-bit state (see protocol.INT8_CHECKED)
    runs = {t.name: protocol.runs_per_task(optimizers, int(seeds), multipliers, centres, t.name, int8) for t in todo}
    # the bar counts estimated seconds, not runs: a run of the character LM costs a hundred of Rosenbrock's, and an
    # ETA from counting runs would be off by that much (each task's step is timed first, in a few steps)
    cost = ({t.name: protocol.seconds_per_step(t, backend, device=device) * t.budget(quick, budget) for t in todo}
            if progress else {})
    bar = _progress(sum(runs[n] * cost[n] for n in cost), progress)
    pool = protocol.make_pool(task_objs, min(int(jobs), len(optimizers)))
    try:
        for index, task in enumerate(todo):
            if bar is not None:
                bar.set_description(task.name)
                bar.total = bar.n + sum(runs[t.name] * cost[t.name] for t in todo[index:])  # estimates redone
                bar.refresh()
            steps = task.budget(quick, budget)
            results["tasks"][task.name] = protocol.run_task(
                task, optimizers, int(seeds), steps, multipliers, centres,
                on_run=(lambda seconds=cost[task.name]: _advance(bar, seconds)) if bar is not None else None,
                backend=backend, pool=pool, device=device, int8=int8)
            save_json(results, partial)
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)
        if bar is not None:
            bar.close()
    report.write(results, out)
    partial.unlink(missing_ok=True)
    return results


def _resumed(partial: Path, config: dict[str, Any]) -> dict[str, Any]:
    """The interrupted run's results in ``partial``, if they were made with ``config`` (its ``jobs`` aside)."""
    if not partial.exists():
        raise ArenaError(f"nothing to resume: {partial} does not exist (an interrupted arena run leaves its finished "
                         "tasks there)")
    results = load_results(partial)
    theirs = {k: v for k, v in results.get("config", {}).items() if k != "jobs"}
    ours = {k: v for k, v in config.items() if k != "jobs"}
    if theirs != ours:
        differ = sorted(k for k in set(theirs) | set(ours) if theirs.get(k) != ours.get(k))
        raise ArenaError(f"cannot resume: {partial} was made with other settings ({', '.join(differ)}); run with the "
                         "same ones, or without --resume to start over")
    results["config"] = config
    return results


def _progress(total: int, enabled: bool) -> Any:
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, leave=False, dynamic_ncols=True,
                bar_format="{desc}{percentage:3.0f}%|{bar}| {elapsed} elapsed, about {remaining} left")


def _advance(bar: Any, seconds: float) -> None:
    """One run done: its estimated seconds on the bar (whose total grows if a coarse walk ran longer than
    estimated)."""
    bar.update(seconds)
    if bar.n > bar.total:
        bar.total = bar.n
