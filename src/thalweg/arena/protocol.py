"""The protocol: one run, an lr sweep, seeds at the best lr. Everything here *runs*; nothing draws.

DeepOBS-style (Schneider et al. 2019): every optimizer gets the same log-spaced grid of multipliers
around its own lr centre (found by :func:`coarse_search`, the same procedure for all) and the same step
budget; the lr with the best final validation metric (seed 0) is rerun with more seeds. Divergence is a
result: a run whose loss turns non-finite or explodes stops early and is recorded as diverged.
"""

from __future__ import annotations

import contextlib
import math
import statistics
import time
from typing import Any, Callable, Iterator

import torch

from .errors import ArenaError
from .tasks import Task

# Optimizers that estimate their own step size (lr is a multiplier of the estimate, 1.0 documented): they run
# at that lr, without a grid; the report says so.
LR_FREE: dict[str, float] = {"prodigy": 1.0, "dadaptadam": 1.0}
# Registry optimizers the arena cannot yet run on every task, and why (the CLI names the reason).
NOT_IN_ARENA: dict[str, str] = {
    "sparseadam": "it takes only sparse gradients, which most tasks do not produce",
}
# What an optimizer needs besides its lr to run in the arena, as a function of the lr being tried. Muon runs as
# thalweg.create("muon", model) builds it (hidden matrices to Muon, the rest to AdamW), with adjust_lr_fn
# "match_rms_adamw": its update then has AdamW's RMS, so one lr serves both halves and the grid tunes them together.
# SOAP gives every dim up to max_precond_dim (default 10000) a factor and a basis: the sparse task's 5000-row
# embedding would get 5000 x 5000 ones, an 850 ms step on one core (its 1500 steps, over the grid and the seeds, hours);
# at 1024, a dim that long stays in the original basis, as soap.py's own default does for a vocabulary.
SOAP_MAX_PRECOND_DIM = 1024
ARENA_SETTINGS: dict[str, Callable[[float], dict[str, Any]]] = {
    "muon": lambda lr: {"adamw_lr": lr, "adjust_lr_fn": "match_rms_adamw"},
    "soap": lambda lr: {"max_precond_dim": SOAP_MAX_PRECOND_DIM},
}


def _arena_optimizers() -> tuple[str, ...]:
    import thalweg

    return tuple(name for name in thalweg.names() if name not in NOT_IN_ARENA)


# Every registry optimizer the arena can run: each is centred by a coarse search in the arena run itself
# (:func:`coarse_search`), the lr-free ones run at their documented lr.
ARENA_OPTIMIZERS = _arena_optimizers()

# Optimizers run again with 8-bit state (state_dtype="int8") at their best lr, on the seeds the reported medians
# use, so the report can show what 8 bits cost in quality: one of each kind of elementwise state in the full
# arena (Adam's two moments, a momentum buffer, RMSprop's square average, Lion's sign momentum), AdamW alone in
# --quick (its budget).
INT8_CHECKED = ("adamw", "momentum", "rmsprop", "lion")
QUICK_INT8_CHECKED = ("adamw",)

# Half-decade steps over two decades: wide enough to bracket the best lr when the centre is off by
# 10x, small enough to run eight optimizers in the quick budget.
GRID_MULTIPLIERS = (0.1, 10**-0.5, 1.0, 10**0.5, 10.0)
QUICK_GRID_MULTIPLIERS = (0.1, 10**-0.5, 1.0, 10**0.5, 10.0)

# Optimizers that take sparse gradients (nn.Embedding(sparse=True)); the others get dense ones.
SPARSE_OPTIMIZERS = frozenset({"adagrad"})

# The arena compares algorithms, so every optimizer runs on the same flag-free reference path: per-step
# time then reflects the algorithm, not which optimizers happen to have a fused kernel. Pass
# backend="auto" (CLI: --backend auto) to time what users get by default.
DEFAULT_BACKEND = "reference"

MAX_CURVE_POINTS = 200
MAX_TRAJECTORY_POINTS = 400


def lr_grid(centre: float, multipliers: tuple[float, ...] = GRID_MULTIPLIERS) -> list[float]:
    """The learning rates of a sweep: ``centre`` times each multiplier, ascending, 3 significant digits."""
    if not (centre > 0 and math.isfinite(centre)):
        raise ArenaError(f"lr centre must be a positive number, got {centre!r}")
    return sorted(float(f"{centre * m:.3g}") for m in multipliers)


def centre_for(task: str, optimizer: str, table: dict[str, dict[str, float]] | None = None) -> float | None:
    """The grid centre ``table`` (a caller's own, by task then optimizer) gives ``optimizer`` on ``task``, or None:
    the arena then finds one with :func:`coarse_search`."""
    return (table or {}).get(task, {}).get(optimizer)


# The coarse search: a walk over decades of lr at a quarter of the task's budget, seed 0, from the power of ten
# nearest the optimizer's own default lr (1e-3 where it has none): one decade up and one down, then on in the
# direction that improved while it improves, within COARSE_BOUNDS (the lrs any optimizer here has used). Its best
# lr becomes the grid centre. The same rule for every optimizer on every task, a user's own task included: no table
# of centres is kept by hand. It costs 3 runs when the default's decade is the best, more as the walk goes on (the
# fixed sweep of all eight decades it replaced cost 8). An lr range test (thalweg lr-find) is cheaper but was
# measured unreliable as a centre: on the noisy sparse-bag batches its smoothed loss never dropped below the first
# batch's (every optimizer's suggestion 1e-6, against best lrs 0.03..10), and on Rosenbrock it suggested 1e-5 for
# momentum against a best of 1e-3.
COARSE_BOUNDS = (1e-5, 1e2)
COARSE_BUDGET_FRACTION = 0.25
COARSE_RUNS_EXPECTED = 4  # for progress estimates only: the walk's length is known when it ends
# A best lr at an end of its grid may not be the best: the grid grows past that end one step at a time (the grid's
# own log spacing), at most this many steps, until the best lr is inside it.
EDGE_EXTENSIONS = 2


def default_lr(optimizer: str) -> float | None:
    """The ``lr`` default of the optimizer's constructor (None where it has none, or it is not a positive number)."""
    import inspect

    from thalweg.factory import optimizer_class

    parameter = inspect.signature(optimizer_class(optimizer).__init__).parameters.get("lr")
    default = None if parameter is None else parameter.default
    return float(default) if isinstance(default, (int, float)) and default > 0 else None


def coarse_search(task: Task, optimizer: str, steps: int, backend: str = DEFAULT_BACKEND,
                  on_run: Callable[[], None] | None = None, *, device: str = "cpu") -> tuple[float | None, list[dict[str, Any]]]:
    """The best lr of the decade walk (see :data:`COARSE_BOUNDS`) at a quarter of ``steps`` (None if every lr it
    tried diverged), and a summary of each run (lr, final metric, diverged), in the order run, for the report."""
    short = max(task.eval_every, int(steps * COARSE_BUDGET_FRACTION))
    low, high = (round(math.log10(bound)) for bound in COARSE_BOUNDS)
    runs: dict[int, dict[str, Any]] = {}  # by decade: log10 of the lr

    def result(k: int) -> float:
        if k not in runs:
            runs[k] = run_one(task, optimizer, 10.0**k, 0, short, phase="coarse", backend=backend, device=device)
            if on_run:
                on_run()
        return score(runs[k], task.higher_is_better)

    start = min(max(round(math.log10(default_lr(optimizer) or 1e-3)), low), high)
    best = start
    result(start)
    for direction in (1, -1):
        k = best + direction
        while low <= k <= high and result(k) < result(best):
            best, k = k, k + direction
        if best != start:
            break  # it moved up: a decade below a start that the one above beat is not the best (lr has one valley)
    summary = [{"lr": r["lr"], "steps": short, "final_metric": r["final_metric"], "diverged": r["diverged"]}
               for r in runs.values()]
    return (10.0**best if math.isfinite(result(best)) else None), summary


def steps_to_target(steps: list[int], metrics: list[float], target: float | None, higher_is_better: bool) -> int | None:
    """First evaluated step whose metric meets ``target`` (>= when higher is better), or None."""
    if target is None:
        return None
    for step, value in zip(steps, metrics):
        if math.isfinite(value) and (value >= target if higher_is_better else value <= target):
            return step
    return None


def is_diverged(loss: float, first_loss: float, factor: float) -> bool:
    """A loss that is non-finite, or above ``factor`` x the first loss (floored at 1e-3 so a near-zero
    start does not make every wiggle an explosion)."""
    return not math.isfinite(loss) or loss > factor * max(abs(first_loss), 1e-3)


def downsample(values: list[float], max_points: int) -> tuple[list[int], list[float]]:
    """Bucket means of ``values`` (indexed by step 0..n-1) on at most ``max_points`` points; each point
    is labelled with its bucket's last step. Keeps results.json small while curves stay faithful."""
    n = len(values)
    if n <= max_points:
        return list(range(n)), list(values)
    edges = [round(i * n / max_points) for i in range(max_points + 1)]
    steps, means = [], []
    for lo, hi in zip(edges, edges[1:]):
        if hi > lo:
            chunk = values[lo:hi]
            steps.append(hi - 1)
            means.append(sum(chunk) / len(chunk))
    return steps, means


@contextlib.contextmanager
def threads(n: int) -> Iterator[None]:
    """Run with ``n`` intra-op threads, restoring the caller's setting (small models run faster on
    one thread: thread start-up costs more than the work it splits; measured 0.24 vs 0.31 ms/step)."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _finite(x: float) -> float | None:
    """JSON has no inf/NaN: store non-finite numbers as null."""
    return x if math.isfinite(x) else None


def run_one(task: Task, optimizer: str, lr: float, seed: int, steps: int,
            hyperparams: dict[str, Any] | None = None, phase: str = "sweep", backend: str = DEFAULT_BACKEND,
            device: str = "cpu") -> dict[str, Any]:
    """Train one fresh instance of ``task`` with ``optimizer`` at ``lr`` for ``steps`` steps, on the
    optimizer's ``backend`` (thalweg's ``backend=`` argument; see :data:`DEFAULT_BACKEND`), on ``device``.

    Returns the run record stored in results.json: the (downsampled) training-loss curve, validation
    metric history, final values, steps and time to the target, wall time and divergence.
    """
    import thalweg

    hyperparams = {**ARENA_SETTINGS.get(optimizer, lambda _: {})(lr), **(hyperparams or {})}
    sparse = task.has_sparse_variant and optimizer in SPARSE_OPTIMIZERS
    torch.manual_seed(seed)
    problem = task.setup(seed, sparse, torch.device(device))
    opt = thalweg.create(optimizer, problem.params, lr=lr, backend=backend, **hyperparams)
    # a GPU step is only queued when the Python call returns: wait for it, or the step times would be launch times
    settle = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)
    evaluate = _evaluator(opt, problem)
    losses: list[float] = []
    step_times: list[float] = []
    eval_steps: list[int] = [0]
    eval_values: list[float] = [evaluate()]
    path: list[tuple[float, float]] = [problem.position()] if problem.position else []
    diverged_at: int | None = None
    start = time.perf_counter()
    for step in range(steps):
        t0 = time.perf_counter()
        opt.zero_grad()
        loss = problem.loss(step)
        value = float(loss.detach())
        if is_diverged(value, losses[0] if losses else value, task.diverge_factor):
            diverged_at = step
            break
        loss.backward()
        opt.step()
        settle()
        step_times.append(time.perf_counter() - t0)
        losses.append(value)
        if problem.position:
            path.append(problem.position())
        done = step + 1
        if done % task.eval_every == 0 or done == steps:
            eval_steps.append(done)
            eval_values.append(evaluate())
    wall = time.perf_counter() - start
    memory = state_bytes_per_param(opt)
    final_metric = eval_values[-1] if diverged_at is None else math.nan
    if diverged_at is None and not math.isfinite(final_metric):
        diverged_at = steps
    hit = steps_to_target(eval_steps, eval_values, task.target, task.higher_is_better)
    # Time to target = steps x the median step time: the median shrugs off the first step's state
    # allocation and the scheduler's hiccups on a shared 2-core machine (timing discipline, STYLE 9).
    step_time = statistics.median(step_times) if step_times else math.nan
    curve_steps, curve_losses = downsample(losses, MAX_CURVE_POINTS)
    record: dict[str, Any] = {
        "optimizer": optimizer, "lr": lr, "seed": seed, "phase": phase, "hyperparams": hyperparams,
        "sparse_grads": sparse, "steps": steps, "steps_done": len(losses),
        "diverged": diverged_at is not None, "diverged_at": diverged_at,
        "curve": {"step": curve_steps, "loss": [_finite(v) for v in curve_losses]},
        "evals": {"step": eval_steps, "metric": [_finite(v) for v in eval_values]},
        "final_loss": _finite(losses[-1]) if losses and diverged_at is None else None,
        "final_metric": _finite(final_metric),
        "steps_to_target": hit if diverged_at is None or (hit is not None and hit <= diverged_at) else None,
        "step_time": _finite(step_time), "wall_time": wall, "state_bytes_per_param": memory,
    }
    record["time_to_target"] = (record["steps_to_target"] * step_time
                                if record["steps_to_target"] is not None and math.isfinite(step_time) else None)
    if path:
        idx = sorted(set(range(0, len(path), max(1, len(path) // MAX_TRAJECTORY_POINTS))) | {len(path) - 1})
        record["trajectory"] = [[_finite(path[i][0]), _finite(path[i][1])] for i in idx]
    return record


def seconds_per_step(task: Task, backend: str = DEFAULT_BACKEND, steps: int = 6, *, device: str = "cpu") -> float:
    """A task's training step, timed: the median of a few steps of SGD on one thread (setup and evaluation aside).
    Progress bars weigh each task's runs by it."""
    with threads(1):
        record = run_one(task, "sgd", 1e-3, 0, steps, phase="timing", backend=backend, device=device)
    return record["step_time"] or 1e-3


def state_bytes_per_param(opt: torch.optim.Optimizer) -> float | None:
    """What the optimizer holds, measured: the bytes of the distinct storages behind its state tensors, per element
    of the parameters it steps (None for no parameter elements)."""
    storages: dict[int, int] = {}
    for state in opt.state.values():
        for value in state.values():
            if isinstance(value, torch.Tensor) and not value.is_sparse:
                storage = value.untyped_storage()
                storages[storage.data_ptr() or id(storage)] = storage.nbytes()
    elements = sum(p.numel() for group in opt.param_groups for p in group["params"])
    return sum(storages.values()) / elements if elements else None


def _evaluator(opt: torch.optim.Optimizer, problem: Any) -> Callable[[], float]:
    """``problem.evaluate`` as the optimizer's authors evaluate: Schedule-Free optimizers (those with
    ``train()``/``eval()``) train at y but are judged at x, so evaluation switches to eval mode and back."""
    if not (callable(getattr(opt, "train", None)) and callable(getattr(opt, "eval", None))):
        return problem.evaluate

    def evaluate() -> float:
        opt.eval()
        try:
            return problem.evaluate()
        finally:
            opt.train()

    opt.train()
    return evaluate


def score(run: dict[str, Any], higher_is_better: bool) -> float:
    """Sort key, smaller is better: the final validation metric, diverged runs last."""
    m = run["final_metric"]
    if run["diverged"] or m is None:
        return math.inf
    return -m if higher_is_better else m


def pick_best(runs: list[dict[str, Any]], higher_is_better: bool) -> dict[str, Any] | None:
    """The sweep run with the best final metric; ties go to the lower final loss, then the smaller lr."""
    ok = [r for r in runs if score(r, higher_is_better) < math.inf]
    if not ok:
        return None
    return min(ok, key=lambda r: (score(r, higher_is_better), r["final_loss"] if r["final_loss"] is not None else math.inf, r["lr"]))


def run_task(task: Task, optimizers: list[str], seeds: int, steps: int,
             multipliers: tuple[float, ...] = GRID_MULTIPLIERS,
             centres: dict[str, dict[str, float]] | None = None,
             on_run: Callable[[], None] | None = None, backend: str = DEFAULT_BACKEND,
             pool: Any = None, *, device: str = "cpu", int8: tuple[str, ...] = ()) -> dict[str, Any]:
    """Sweep each optimizer's lr grid with seed 0, rerun the best lr with seeds 1..seeds-1 (and, for the optimizers
    in ``int8``, again with 8-bit state: runs of phase "int8", which no ranking reads).

    The grid is centred on the caller's centre (``centres``, by task then optimizer); without one, on the best lr
    of a :func:`coarse_search` run here; lr-free optimizers (:data:`LR_FREE`) run at their documented lr alone.
    Returns the task's entry in results.json (its settings, every run, the best lr per optimizer, where each
    centre came from and the coarse searches). ``on_run`` is called after each run (progress bars; with a
    ``pool`` of :func:`make_pool`, which runs the optimizers in parallel, as each optimizer's runs end).
    """
    skipped = not_applicable(task, optimizers)
    optimizers = [name for name in optimizers if name not in skipped]
    entry: dict[str, Any] = {
        "name": task.name, "description": task.description, "kind": task.kind, "metric": task.metric,
        "higher_is_better": task.higher_is_better, "target": task.target, "steps": steps,
        "log_metric": task.log_metric, "grid_multipliers": list(multipliers), "families": families(optimizers),
        "centres": {},
        "centre_source": {}, "coarse": {}, "extended": {}, "runs": [], "best_lr": {}, "not_applicable": skipped,
    }
    blocks = (_in_workers(pool, task, optimizers, seeds, steps, multipliers, centres, backend, on_run, device, int8)
              if pool else (run_optimizer(task, name, seeds, steps, multipliers, centres, backend, on_run, device=device,
                                          int8=name in int8)
                            for name in optimizers))
    for name, block in zip(optimizers, blocks):
        entry["centres"][name] = block["centre"]
        entry["centre_source"][name] = block["source"]
        if block["coarse"] is not None:
            entry["coarse"][name] = block["coarse"]
        entry["runs"].extend(block["runs"])
        entry["best_lr"][name] = block["best_lr"]
        if block["extended"]:
            entry["extended"][name] = block["extended"]
    return entry


def not_applicable(task: Task, optimizers: list[str]) -> dict[str, str]:
    """The optimizers that have nothing to step on ``task``, and why: one that routes a model's hidden matrices to
    itself (Muon, its ``for_module``) where the router finds none (a 2-D function's point, a logistic regression's
    one output layer). They are left out of the task and listed in its record, not ranked as if they had lost.
    (SOAP, a matrix optimizer too, steps every parameter: it runs everywhere.)"""
    from thalweg.factory import optimizer_class
    from thalweg.optim.muon import route

    matrix = [name for name in optimizers if getattr(optimizer_class(name), "for_module", None) is not None]
    if not matrix:
        return {}
    params = task.setup(0, False, torch.device("cpu")).params
    hidden = (any(to_muon for _, _, to_muon, _ in route(params)) if isinstance(params, torch.nn.Module)
              else any(p.ndim >= 2 for p in params))
    return {} if hidden else {name: "no hidden matrix in this task (embeddings, output layers, biases and 1-D "
                                    "parameters go to AdamW)" for name in matrix}


def families(optimizers: list[str]) -> dict[str, str]:
    """Each optimizer's family (its class's ``family``: SGD-like, Adam-like, ...), kept in the results so the report
    groups them without importing thalweg."""
    from thalweg.factory import optimizer_class

    return {name: optimizer_class(name).family for name in optimizers}


def run_optimizer(task: Task, name: str, seeds: int, steps: int, multipliers: tuple[float, ...],
                  centres: dict[str, dict[str, float]] | None, backend: str,
                  on_run: Callable[[], None] | None = None, *, device: str = "cpu", int8: bool = False) -> dict[str, Any]:
    """One optimizer's part of :func:`run_task`: its centre (and where it came from), the seed-0 sweep of its
    grid, then the best lr with the other seeds; with ``int8``, those seeds again with 8-bit state."""
    coarse = None
    with threads(1):
        if name in LR_FREE:
            centre, source, grid = LR_FREE[name], "lr-free", [LR_FREE[name]]
        else:
            centre, source = centre_for(task.name, name, centres), "given"
            if centre is None:
                centre, coarse = coarse_search(task, name, steps, backend, on_run, device=device)
                source = "coarse search"
            grid = lr_grid(centre, multipliers) if centre is not None else []
        sweep = []
        for lr in grid:
            sweep.append(run_one(task, name, lr, 0, steps, backend=backend, device=device))
            if on_run:
                on_run()
        extended = []
        for _ in range(EDGE_EXTENSIONS if len(grid) > 1 else 0):
            lr = beyond_the_edge(sweep, grid, task.higher_is_better)
            if lr is None:
                break
            extended.append(lr)
            sweep.append(run_one(task, name, lr, 0, steps, backend=backend, device=device))
            if on_run:
                on_run()
        runs = list(sweep)
        best = pick_best(sweep, task.higher_is_better)
        for seed in range(1, seeds):
            # every lr diverged: nothing to rerun; the optimizer's row says so
            if best:
                runs.append(run_one(task, name, best["lr"], seed, steps, phase="seed", backend=backend, device=device))
            if on_run:
                on_run()
        for seed in (_int8_seeds(seeds) if int8 else ()):
            if best:  # (on the reference backend, 8-bit state decodes and encodes with torch ops, several times
                # slower: these runs are not timed against the others, so they take the kernels every backend equals)
                runs.append(run_one(task, name, best["lr"], seed, steps, {"state_dtype": "int8"}, phase="int8",
                                    backend="auto" if backend == "reference" else backend, device=device))
            if on_run:
                on_run()
    return {"centre": centre, "source": source, "coarse": coarse, "runs": runs, "extended": extended,
            "best_lr": best["lr"] if best else None}


def _int8_seeds(seeds: int) -> range:
    """The seeds an 8-bit rerun uses: those of the reported medians (1, 2, ...; seed 0 alone in a one-seed arena)."""
    return range(1, seeds) if seeds > 1 else range(1)


def beyond_the_edge(sweep: list[dict[str, Any]], grid: list[float], higher_is_better: bool) -> float | None:
    """The next lr past the end of the swept lrs where the best one sits — ``grid`` continued with its own log
    spacing, 3 significant digits — or None when the best is inside them or every lr diverged."""
    best = pick_best(sweep, higher_is_better)
    lrs = sorted({r["lr"] for r in sweep})
    if best is None or len(grid) < 2:
        return None
    ratio = (grid[-1] / grid[0]) ** (1 / (len(grid) - 1))
    if best["lr"] == lrs[-1]:
        return float(f"{grid[-1] * ratio ** (1 + sum(lr > grid[-1] for lr in lrs)):.3g}")
    if best["lr"] == lrs[0]:
        return float(f"{grid[0] / ratio ** (1 + sum(lr < grid[0] for lr in lrs)):.3g}")
    return None


# -- running optimizers in parallel ----------------------------------------------------------------------------
# Each optimizer's block of runs is independent of the others' and seeded, so worker processes give the same
# records as one process (only the timings differ: the workers share the machine). Workers are forked, so they
# inherit the tasks, closures of compare() included, which could not be pickled.

_WORKER_TASKS: dict[str, Task] = {}


def make_pool(tasks: list[Task], jobs: int) -> Any:
    """A process pool of ``jobs`` forked workers that know ``tasks``; None for one job or where processes
    cannot be forked (then everything runs here)."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    if jobs <= 1 or "fork" not in multiprocessing.get_all_start_methods():
        return None
    _WORKER_TASKS.clear()
    _WORKER_TASKS.update({task.name: task for task in tasks})
    return ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("fork"),
                               initializer=torch.set_num_threads, initargs=(1,))


def _worker_block(task_name: str, *args: Any, device: str, int8: bool) -> tuple[dict[str, Any], int]:
    done = []
    block = run_optimizer(_WORKER_TASKS[task_name], *args, on_run=lambda: done.append(1), device=device, int8=int8)
    return block, len(done)


def _in_workers(pool: Any, task: Task, optimizers: list[str], seeds: int, steps: int, multipliers: tuple[float, ...],
                centres: dict[str, dict[str, float]] | None, backend: str,
                on_run: Callable[[], None] | None, device: str, int8: tuple[str, ...] = ()) -> Iterator[dict[str, Any]]:
    """The optimizers' blocks from ``pool``, in ``optimizers``' order; progress counted as each block ends."""
    from concurrent.futures import as_completed

    futures = [pool.submit(_worker_block, task.name, name, seeds, steps, multipliers, centres, backend, device=device,
                           int8=name in int8)
               for name in optimizers]
    for future in as_completed(futures):
        if on_run:
            for _ in range(future.result()[1]):
                on_run()
    for future in futures:
        yield future.result()[0]


def runs_per_task(optimizers: list[str], seeds: int, multipliers: tuple[float, ...],
                  centres: dict[str, dict[str, float]] | None = None, task: str = "", int8: tuple[str, ...] = ()) -> int:
    """About how many runs :func:`run_task` makes on ``task``, for progress bars: a coarse search's walk counts as
    :data:`COARSE_RUNS_EXPECTED` (its length is known only when it ends), and a grid extended past its edge
    (:data:`EDGE_EXTENSIONS`) makes more."""
    total = sum(len(_int8_seeds(seeds)) for name in optimizers if name in int8)
    for name in optimizers:
        if name in LR_FREE:
            total += seeds
        else:
            searched = COARSE_RUNS_EXPECTED if centre_for(task, name, centres) is None else 0
            total += searched + len(multipliers) + seeds - 1
    return total
