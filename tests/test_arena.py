"""The arena: protocol pieces, results -> report, redraw identity, compare(), and a tiny end-to-end run.

Runs are kept tiny (a few steps, two optimizers, two tasks) so the file stays fast on 2 cores.
"""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from thalweg.arena import analysis, figures, protocol, report
from thalweg.arena.errors import ArenaError
from thalweg.arena.report import redraw
from thalweg.arena.results import load
from thalweg.arena.runner import run_arena
from thalweg.arena.tasks import QUICK_TASKS, TASKS, batch_indices, get_task

OPTS = ["sgd", "adam"]
# The reference backend: these tests are about the arena, not about the fused kernels (tested elsewhere),
# and it spares each test the kernels' first-call compilation.
REF = "reference"
TINY = dict(tasks=["rosenbrock", "logreg"], optimizers=OPTS, seeds=2, budget=0.05, progress=False,
            created="2024-01-01T00:00:00", backend=REF)


@pytest.fixture(scope="module")
def tiny_report(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("arena") / "report"
    results = run_arena(out=out, **TINY)
    return out, results


# ---------------------------------------------------------------- protocol pieces


def test_lr_grid_is_log_spaced_around_the_centre() -> None:
    grid = protocol.lr_grid(1e-3)
    assert grid == sorted(grid) and len(grid) == len(protocol.GRID_MULTIPLIERS)
    assert 1e-3 in grid and grid[0] == pytest.approx(1e-4) and grid[-1] == pytest.approx(1e-2)
    ratios = [b / a for a, b in zip(grid, grid[1:])]
    assert all(r == pytest.approx(10**0.5, rel=1e-2) for r in ratios)
    with pytest.raises(ArenaError, match="centre"):
        protocol.lr_grid(0.0)


def test_no_lr_is_kept_by_hand_every_centre_is_searched_unless_given() -> None:
    assert not hasattr(protocol, "CENTRES")
    for task in TASKS:
        for opt in protocol.ARENA_OPTIMIZERS:
            assert protocol.centre_for(task, opt) is None  # the arena searches for it
    assert protocol.centre_for("logreg", "sgd", {"logreg": {"sgd": 0.3}}) == 0.3  # a caller's own centre
    # the walk starts from the decade of each optimizer's own default lr (LARS has none: 1e-3)
    assert protocol.default_lr("adam") == 1e-3 and protocol.default_lr("lion") == 1e-4 and protocol.default_lr("lars") is None
    from thalweg.factory import names, optimizer_class

    assert all(optimizer_class(name).family in figures.FAMILY_ORDER[:-1] for name in names())


def test_the_arena_runs_every_registry_optimizer_but_those_it_names_a_reason_for() -> None:
    import thalweg

    assert set(protocol.ARENA_OPTIMIZERS) | set(protocol.NOT_IN_ARENA) == set(thalweg.names())
    assert not set(protocol.ARENA_OPTIMIZERS) & set(protocol.NOT_IN_ARENA)
    assert set(protocol.LR_FREE) <= set(protocol.ARENA_OPTIMIZERS)


def test_an_optimizer_left_out_is_refused_with_its_reason() -> None:
    from thalweg.arena.runner import check_optimizers

    with pytest.raises(ArenaError, match="'sparseadam' is a thalweg optimizer the arena does not run yet \\(it takes only "
                                         "sparse gradients"):
        check_optimizers(["adam", "sparseadam"])
    with pytest.raises(ArenaError, match="unknown optimizer 'adamm'"):
        check_optimizers(["adamm"])
    assert check_optimizers(["lion", "adam", "lion"]) == ["lion", "adam"]


@pytest.mark.parametrize("task", ["rosenbrock", "sparse-bag", "digits-cnn", "char-lm", "char-transformer",
                                  "noisy-quadratic"])
def test_every_arena_optimizer_trains_on_every_kind_of_task(task: str) -> None:
    """A 2-D point, an embedding bag (sparse gradients where the optimizer takes them), convolutions and a
    character LM: every arena optimizer makes its steps and is evaluated (no refusal, no crash), but the matrix
    optimizers on a task without a hidden matrix, which the arena leaves out of it."""
    skipped = protocol.not_applicable(get_task(task), list(protocol.ARENA_OPTIMIZERS))
    assert set(skipped) == ({"muon"} if task in ("rosenbrock", "sparse-bag", "noisy-quadratic") else set())
    for name in protocol.ARENA_OPTIMIZERS:
        if name in skipped:
            continue
        run = protocol.run_one(get_task(task), name, 1e-3, 0, 3, backend=REF)
        assert run["steps_done"] == 3 and not run["diverged"], (name, run)
        assert run["final_metric"] is not None and len(run["evals"]["metric"]) == 2, name


def test_the_transformer_is_causal_and_predicts_every_next_character() -> None:
    """Changing a character changes no prediction before it (causal attention), and does change later ones."""
    from thalweg.arena.tasks import CharTransformer, _char_data

    torch.manual_seed(0)
    model = CharTransformer(_char_data()[2]).eval()
    tokens = torch.randint(0, 10, (2, 32))
    changed = tokens.clone()
    changed[:, 20] = (changed[:, 20] + 1) % 10
    with torch.no_grad():
        before, after = model(tokens), model(changed)
    assert before.shape == (2, 32, _char_data()[2])
    assert torch.equal(before[:, :20], after[:, :20]) and not torch.allclose(before[:, 20:], after[:, 20:])


def test_the_noisy_quadratic_has_the_curvatures_and_noise_it_describes() -> None:
    """At the start (x = 1): loss 0.5 * sum(1/i) = 3.74; the mini-batch gradient's mean is h * x and its variance
    0.01 * h per coordinate (h_i = 1/i), estimated over 4000 draws."""
    from thalweg.arena.tasks import _NQM_DIM, _NQM_NOISE

    problem = get_task("noisy-quadratic").setup(0, False, torch.device("cpu"))
    (x,) = problem.params
    h = 1.0 / torch.arange(1, _NQM_DIM + 1, dtype=torch.float64)
    assert problem.evaluate() == pytest.approx(0.5 * float(h.sum()), rel=1e-6)
    grads = []
    for step in range(4000):
        x.grad = None
        problem.loss(step).backward()
        grads.append(x.grad.double().clone())
    grads = torch.stack(grads)
    assert torch.allclose(grads.mean(0), h, atol=4 * (_NQM_NOISE / 4000) ** 0.5)
    ratio = grads.var(0) / (_NQM_NOISE * h)
    assert 0.9 < float(ratio.mean()) < 1.1 and float(ratio.min()) > 0.8


def test_coarse_search_walks_decades_from_the_default_lr_to_the_best() -> None:
    """Lion (default lr 1e-4) on Rosenbrock: the walk tries 1e-4, then 1e-3 and on upwards while each decade beats
    the last, and stops at the first that does not (or diverges); its best is the centre. A walk that went up never
    tries below the start."""
    task = get_task("rosenbrock")
    calls = []
    centre, summary = protocol.coarse_search(task, "lion", 200, REF, on_run=lambda: calls.append(1))
    lrs = [s["lr"] for s in summary]
    assert len(calls) == len(summary) and all(s["steps"] == 50 for s in summary)  # a quarter of the budget
    assert lrs[:2] == [1e-4, 1e-3] and lrs == sorted(lrs)  # it went up, one decade at a time
    finished = [s for s in summary if not s["diverged"] and s["final_metric"] is not None]
    assert centre == min(finished, key=lambda s: s["final_metric"])["lr"] == lrs[-2]  # the last one was worse
    values = [s["final_metric"] for s in summary[:-1]]
    assert values == sorted(values, reverse=True)  # each decade up to the best improved on the one before


def test_coarse_search_goes_down_when_the_decade_above_is_worse(monkeypatch: pytest.MonkeyPatch) -> None:
    """A made-up valley at 1e-5 (the lowest decade): from adam's 1e-3 the walk tries 1e-2 (worse), then 1e-4, 1e-5,
    and ends at the bound; with every lr diverging it gives no centre after three runs."""
    def fake_run(task, optimizer, lr, seed, steps, phase, backend, device):
        return {"lr": lr, "final_metric": abs(math.log10(lr) + 5), "diverged": False, "final_loss": 0.0}

    monkeypatch.setattr(protocol, "run_one", fake_run)
    task = get_task("logreg")  # lower is better
    centre, summary = protocol.coarse_search(task, "adam", 100, REF)
    assert centre == 1e-5 and [s["lr"] for s in summary] == [1e-3, 1e-2, 1e-4, 1e-5]
    monkeypatch.setattr(protocol, "run_one", lambda task, optimizer, lr, *a, **k: {
        "lr": lr, "final_metric": None, "diverged": True, "final_loss": None})
    centre, summary = protocol.coarse_search(task, "adam", 100, REF)
    assert centre is None and [s["lr"] for s in summary] == [1e-3, 1e-2, 1e-4]


def test_run_task_searches_every_centre_and_runs_lr_free_optimizers_once() -> None:
    task = get_task("rosenbrock")
    entry = protocol.run_task(task, ["adam", "lion", "prodigy"], seeds=2, steps=40, backend=REF)
    assert entry["centre_source"] == {"adam": "coarse search", "lion": "coarse search", "prodigy": "lr-free"}
    assert set(entry["coarse"]) == {"adam", "lion"}
    for name in ("adam", "lion"):
        assert entry["centres"][name] in [s["lr"] for s in entry["coarse"][name]]
        swept = [r for r in entry["runs"] if r["optimizer"] == name and r["phase"] == "sweep"]
        assert sorted(r["lr"] for r in swept) == sorted(protocol.lr_grid(entry["centres"][name])
                                                        + entry["extended"].get(name, []))
    prodigy = [r for r in entry["runs"] if r["optimizer"] == "prodigy"]
    assert [(r["lr"], r["phase"]) for r in prodigy] == [(1.0, "sweep"), (1.0, "seed")]
    assert entry["best_lr"]["prodigy"] == 1.0
    assert entry["families"] == {"adam": "Adam-like", "lion": "Adam-like", "prodigy": "LR-free"}
    given = protocol.run_task(task, ["adam"], seeds=1, steps=40, centres={"rosenbrock": {"adam": 0.1}}, backend=REF)
    assert given["centre_source"] == {"adam": "given"} and given["coarse"] == {} and given["centres"]["adam"] == 0.1


def test_muon_runs_routed_where_there_is_a_hidden_matrix_and_is_left_out_elsewhere(monkeypatch: pytest.MonkeyPatch) -> None:
    """On the digits MLP, Muon is thalweg.create("muon", model): its hidden layer to Muon, the output layer to AdamW,
    one lr for both (match_rms_adamw). On the logistic regression (one output layer) it is not run, and the task's
    record says why."""
    import thalweg

    built = []
    create = thalweg.create
    monkeypatch.setattr(thalweg, "create", lambda *a, **k: built.append(create(*a, **k)) or built[-1])
    entry = protocol.run_task(get_task("digits-mlp"), ["muon"], seeds=1, steps=10, centres={"digits-mlp": {"muon": 0.01}},
                              multipliers=(1.0,), backend=REF)
    assert entry["not_applicable"] == {} and entry["best_lr"]["muon"] == 0.01
    optimizer = built[0]
    assert [g["use_muon"] for g in optimizer.param_groups] == [True, False, False]
    assert all(g["lr"] == 0.01 for g in optimizer.param_groups) and optimizer.param_groups[0]["adjust_lr_fn"] == "match_rms_adamw"
    entry = protocol.run_task(get_task("logreg"), ["sgd", "muon"], seeds=1, steps=10, multipliers=(1.0,),
                              centres={"logreg": {"sgd": 0.1}}, backend=REF)
    assert list(entry["best_lr"]) == ["sgd"] and "no hidden matrix" in entry["not_applicable"]["muon"]


def test_a_task_no_chosen_optimizer_applies_to_says_so(tmp_path: Path) -> None:
    results = run_arena(tasks=["logreg"], optimizers=["muon"], out=tmp_path / "r", progress=False, backend=REF, jobs=1)
    assert results["tasks"]["logreg"]["runs"] == [] and "muon" in results["tasks"]["logreg"]["not_applicable"]
    page = (tmp_path / "r" / "index.html").read_text()
    assert "none of the optimizers applies to this task" in page and "Not run on this task: muon (no hidden matrix" in page
    assert "(none applies)" in analysis.summary_text(results)


def test_a_best_lr_at_the_grid_edge_extends_the_grid_then_is_flagged() -> None:
    """Adam centred 100x too low on Rosenbrock: its best lr is the grid's highest, so the grid grows by its own
    spacing (x10^0.5) twice; the best is then still the highest, and the recommendation says so. Centred at 0.1 (200
    steps): the best, 1.0, is the highest; the one step past it diverges, and 1.0 is flagged as next to it."""
    task = get_task("rosenbrock")
    entry = protocol.run_task(task, ["adam"], seeds=1, steps=200, centres={"rosenbrock": {"adam": 1e-5}}, backend=REF)
    assert entry["extended"] == {"adam": [3.16e-4, 1e-3]}
    assert sorted(r["lr"] for r in entry["runs"]) == [1e-6, 3.16e-6, 1e-5, 3.16e-5, 1e-4, 3.16e-4, 1e-3]
    assert entry["best_lr"]["adam"] == 1e-3
    assert analysis.grid_edge(entry, "adam") == "highest"
    near = protocol.run_task(task, ["adam"], seeds=1, steps=200, centres={"rosenbrock": {"adam": 0.1}}, backend=REF)
    assert near["extended"] == {"adam": [3.16]} and near["best_lr"]["adam"] == 1.0
    assert [r["diverged"] for r in near["runs"] if r["lr"] == 3.16] == [True]
    assert analysis.grid_edge(near, "adam") == "next to a diverged lr"


def test_beyond_the_edge_continues_the_grid_on_the_side_of_the_best() -> None:
    grid = [0.01, 0.0316, 0.1]

    def sweep(metrics):  # lower is better
        return [{"lr": lr, "diverged": m is None, "final_metric": m, "final_loss": m} for lr, m in metrics.items()]

    assert protocol.beyond_the_edge(sweep({0.01: 1.0, 0.0316: 2.0, 0.1: 3.0}), grid, False) == 0.00316
    assert protocol.beyond_the_edge(sweep({0.00316: 0.5, 0.01: 1.0, 0.0316: 2.0, 0.1: 3.0}), grid, False) == 0.001
    assert protocol.beyond_the_edge(sweep({0.01: 3.0, 0.0316: 2.0, 0.1: 1.0}), grid, False) == 0.316
    assert protocol.beyond_the_edge(sweep({0.01: 3.0, 0.0316: 1.0, 0.1: 2.0}), grid, False) is None
    assert protocol.beyond_the_edge(sweep({0.01: None, 0.0316: None, 0.1: None}), grid, False) is None


_TIMINGS = ("step_time", "wall_time", "time_to_target")


def _without_timings(results: dict) -> dict:
    tasks = {name: {**task, "runs": [{k: v for k, v in run.items() if k not in _TIMINGS} for run in task["runs"]]}
             for name, task in results["tasks"].items()}
    return {"config": {k: v for k, v in results["config"].items() if k != "jobs"}, "tasks": tasks}


def test_device_is_checked_before_any_work_and_auto_picks_the_gpu_where_there_is_one(tmp_path: Path) -> None:
    from thalweg.arena.runner import check_device

    assert check_device("cpu") == "cpu"
    assert check_device("auto") == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ArenaError, match=r"device 'cuda' is not available here \(torch.cuda.is_available\(\) is False\)"):
            run_arena(tasks=["logreg"], optimizers=["sgd"], out=tmp_path / "r", progress=False, device="cuda")
        assert not (tmp_path / "r").exists()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_the_arena_trains_on_the_gpu(tmp_path: Path) -> None:
    """Every task's model and data on the GPU (its records say so through the parameters' device), one job."""
    results = run_arena(tasks=["rosenbrock", "logreg", "sparse-bag"], optimizers=["sgd", "adam"], seeds=2, budget=0.02,
                        out=tmp_path / "r", progress=False, device="cuda", jobs=2)
    assert results["config"]["device"] == "cuda" and results["config"]["jobs"] == 1
    task = get_task("sparse-bag")
    problem = task.setup(0, False, torch.device("cuda"))
    assert all(p.is_cuda for p in problem.params.parameters())
    for entry in results["tasks"].values():
        assert all(entry["best_lr"][o] is not None for o in ("sgd", "adam"))


def test_progress_weighs_each_task_by_its_timed_step(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The bar counts estimated seconds: every run of a task adds that task's timed step x its budget, so a slow
    task moves the ETA as much as it costs (here logreg's step is made 100x Rosenbrock's)."""
    from thalweg.arena import runner

    class Bar:
        def __init__(self, total: float) -> None:
            self.total, self.n, self.updates = total, 0.0, []

        def update(self, amount: float) -> None:
            self.n += amount
            self.updates.append(amount)

        def set_description(self, _: str) -> None: ...
        def refresh(self) -> None: ...
        def close(self) -> None: ...

    bars = []
    monkeypatch.setattr(protocol, "seconds_per_step", lambda task, backend, device: {"rosenbrock": 1e-4, "logreg": 1e-2}[task.name])
    monkeypatch.setattr(runner, "_progress", lambda total, enabled: bars.append(Bar(total)) or bars[-1])
    results = run_arena(tasks=["rosenbrock", "logreg"], optimizers=["sgd"], seeds=2, budget=0.02, quick=True,
                        out=tmp_path / "r", progress=True, backend=REF, jobs=1)
    steps = {name: get_task(name).budget(True, 0.02) for name in ("rosenbrock", "logreg")}
    weights = {name: {"rosenbrock": 1e-4, "logreg": 1e-2}[name] * steps[name] for name in steps}
    runs = {name: len(task["runs"]) + len(task["coarse"].get("sgd", [])) for name, task in results["tasks"].items()}
    (bar,) = bars
    assert bar.updates == [pytest.approx(weights["rosenbrock"])] * runs["rosenbrock"] + \
        [pytest.approx(weights["logreg"])] * runs["logreg"]
    # the estimate is redone as each task starts (what is done, plus the estimated runs of what is left), and grows
    # with the work when a coarse walk ran longer than estimated
    expected = protocol.runs_per_task(["sgd"], 2, protocol.QUICK_GRID_MULTIPLIERS, None, "logreg")
    assert bar.total == pytest.approx(max(runs["rosenbrock"] * weights["rosenbrock"] + expected * weights["logreg"], bar.n))


def test_an_interrupted_arena_keeps_its_finished_tasks_and_resumes(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """Ctrl-C during the second task: the first is kept and named with what to do; `thalweg report` draws it;
    `--resume` runs only the missing task (refused with other settings, or with nothing to resume), and its results
    are an uninterrupted run's (timings aside)."""
    import thalweg.arena.protocol as protocol
    from thalweg.cli import main

    def argv(out, *more):
        return ["arena", "--tasks", "beale", "rosenbrock", "--optimizers", "adagrad", "momentum", "--seeds", "2",
                "--budget", "0.03", "--no-progress", "--jobs", "1", "--out", str(out), *more]

    def error_line():
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1, err
        return err[0]

    real_run_task, ran, interrupt_at = protocol.run_task, [], ["rosenbrock"]

    def run_task(task, *args, **kwargs):
        if task.name in interrupt_at:
            raise KeyboardInterrupt
        ran.append(task.name)
        return real_run_task(task, *args, **kwargs)

    monkeypatch.setattr(protocol, "run_task", run_task)
    out = tmp_path / "rep"
    assert main(argv(out)) == 130
    line = error_line()
    assert "interrupted; 1 finished task(s) (beale) are kept in" in line and "--resume" in line
    assert not out.exists()  # no report written (a previous one would be left as it was)
    assert main(["report", str(out)]) == 0  # draws what finished
    assert list(json.loads((out / "results.json").read_text())["tasks"]) == ["beale"]

    assert main(argv(out, "--seeds", "3", "--resume")) == 2
    assert "cannot resume" in error_line()
    interrupt_at.clear()
    assert main(argv(out, "--resume")) == 0
    assert ran == ["beale", "rosenbrock"]  # beale was not run again
    assert not list(tmp_path.glob(".*"))  # the completed run removed the partial results
    assert main(argv(out, "--resume")) == 2
    assert "nothing to resume" in error_line()

    assert main(argv(tmp_path / "uninterrupted")) == 0
    resumed, uninterrupted = (json.loads((tmp_path / d / "results.json").read_text()) for d in ("rep", "uninterrupted"))
    assert _without_timings(resumed) == _without_timings(uninterrupted)


def test_parallel_jobs_give_the_records_of_one_process(tmp_path: Path) -> None:
    """Two worker processes (forked, so compare()'s closures travel too) against one: the same runs, in the same
    order, with the same curves and metrics; only the timings may differ."""
    settings = dict(TINY, optimizers=["sgd", "adam", "lion", "prodigy"])
    one = run_arena(out=tmp_path / "one", jobs=1, **settings)
    two = run_arena(out=tmp_path / "two", jobs=2, **settings)
    assert one["config"]["jobs"] == 1 and two["config"]["jobs"] == 2
    assert _without_timings(one) == _without_timings(two)
    assert [r["optimizer"] for r in two["tasks"]["logreg"]["runs"]][:5] == ["sgd"] * 5

    from thalweg.arena import compare

    x = torch.randn(60, 4, generator=torch.Generator().manual_seed(0))
    y = x @ torch.arange(4.0)
    data = ((x[:40], y[:40]), (x[40:], y[40:]))
    by_jobs = [compare(lambda: nn.Linear(4, 1), lambda out, target: F.mse_loss(out.squeeze(1), target), data,
                       optimizers=["sgd", "adamw"], steps=20, seeds=2, out=tmp_path / f"compare-{jobs}",
                       progress=False, backend=REF, jobs=jobs) for jobs in (1, 2)]
    assert _without_timings(by_jobs[0]) == _without_timings(by_jobs[1])


def test_schedule_free_is_evaluated_at_x_in_eval_mode() -> None:
    """The record's metric is the function at x (eval mode), not at y, where the gradients were taken."""
    import thalweg

    task = get_task("rosenbrock")
    run = protocol.run_one(task, "schedulefree_adamw", 0.02, 0, 30, backend=REF)
    problem = task.setup(0, False, torch.device("cpu"))
    torch.manual_seed(0)
    optimizer = thalweg.create("schedulefree_adamw", problem.params, lr=0.02, backend=REF)
    optimizer.train()
    for step in range(30):
        optimizer.zero_grad()
        problem.loss(step).backward()
        optimizer.step()
    at_y = problem.evaluate()
    optimizer.eval()
    at_x = problem.evaluate()
    assert at_x != at_y
    assert run["final_metric"] == at_x


def test_steps_to_target_first_hit_and_direction() -> None:
    steps, values = [0, 10, 20, 30], [0.1, 0.5, 0.96, 0.97]
    assert protocol.steps_to_target(steps, values, 0.95, True) == 20
    assert protocol.steps_to_target(steps, values, 0.99, True) is None
    assert protocol.steps_to_target(steps, [3.0, 2.0, math.nan, 0.5], 1.0, False) == 30
    assert protocol.steps_to_target(steps, values, None, True) is None


def test_divergence_detection() -> None:
    assert protocol.is_diverged(math.nan, 1.0, 20)
    assert protocol.is_diverged(math.inf, 1.0, 20)
    assert protocol.is_diverged(25.0, 1.0, 20)
    assert not protocol.is_diverged(15.0, 1.0, 20)
    assert not protocol.is_diverged(0.01, 0.0, 20)  # a start at 0 loss is not an explosion of anything


def test_diverging_run_is_a_result_not_a_crash() -> None:
    run = protocol.run_one(get_task("rosenbrock"), "sgd", 1.0, 0, 50, backend=REF)
    assert run["diverged"] and run["diverged_at"] is not None and run["diverged_at"] < 50
    assert run["final_metric"] is None and run["steps_to_target"] is None
    json.dumps(run, allow_nan=False)  # no inf/NaN leaks into the record
    assert protocol.pick_best([run], False) is None


def test_run_records_curve_evals_and_target() -> None:
    task = get_task("rosenbrock")
    run = protocol.run_one(task, "adam", 0.3, 0, 1000, backend=REF)
    assert not run["diverged"] and run["steps_done"] == 1000
    assert run["evals"]["step"][0] == 0 and run["evals"]["step"][-1] == 1000
    assert run["final_metric"] < 1e-2  # Adam at lr 0.3 reaches the minimum (1, 1)
    assert run["steps_to_target"] == protocol.steps_to_target(run["evals"]["step"], run["evals"]["metric"], task.target, False)
    assert run["time_to_target"] == pytest.approx(run["steps_to_target"] * run["step_time"])
    assert len(run["curve"]["loss"]) <= protocol.MAX_CURVE_POINTS
    assert run["trajectory"][0] == list(task.setup(0, False, torch.device("cpu")).position())
    assert run["trajectory"][-1][0] == pytest.approx(1.0, abs=0.1)


def test_same_seed_same_run_and_seeds_differ() -> None:
    task = get_task("digits-mlp")
    a, b = (protocol.run_one(task, "adam", 1e-2, 0, 20, backend=REF) for _ in range(2))
    c = protocol.run_one(task, "adam", 1e-2, 1, 20, backend=REF)
    assert a["curve"]["loss"] == b["curve"]["loss"]
    assert a["curve"]["loss"] != c["curve"]["loss"]


def test_batches_are_seeded_epochs() -> None:
    batch = batch_indices(10, 3, seed=0)
    epoch = torch.cat([batch(i) for i in range(3)])
    assert len(set(epoch.tolist())) == 9  # without replacement within an epoch
    assert torch.equal(batch(4), batch_indices(10, 3, seed=0)(4))
    assert not torch.equal(batch(0), batch_indices(10, 3, seed=1)(0))


def test_sparse_task_gives_adagrad_sparse_gradients_only() -> None:
    task = get_task("sparse-bag")
    assert protocol.run_one(task, "adagrad", 0.1, 0, 3, backend=REF)["sparse_grads"] is True
    assert protocol.run_one(task, "adam", 0.01, 0, 3, backend=REF)["sparse_grads"] is False
    problem = task.setup(0, True, torch.device("cpu"))
    problem.loss(0).backward()
    assert problem.params.bag.weight.grad.is_sparse


def test_downsample_keeps_means_and_last_step() -> None:
    steps, values = protocol.downsample([float(i) for i in range(1000)], 100)
    assert len(steps) == 100 and steps[-1] == 999
    assert values[0] == pytest.approx(4.5)


def test_threads_context_restores_setting() -> None:
    before = torch.get_num_threads()
    with protocol.threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before


def test_quick_set_has_the_required_kinds() -> None:
    kinds = {TASKS[n].kind for n in QUICK_TASKS}
    assert kinds == {"2d", "model"} and "logreg" in QUICK_TASKS and "sparse-bag" in QUICK_TASKS
    assert any(n.startswith("digits") for n in QUICK_TASKS)


# ---------------------------------------------------------------- analysis


def _fake_task(metric_by_opt: dict[str, list[float | None]], hits: dict[str, list[int | None]]) -> dict:
    runs = []
    for o, values in metric_by_opt.items():
        for seed, (v, h) in enumerate(zip(values, hits[o])):
            runs.append({"optimizer": o, "lr": 0.1, "seed": seed, "phase": "sweep" if seed == 0 else "seed",
                         "diverged": v is None, "final_metric": v, "final_loss": v, "steps_to_target": h,
                         "time_to_target": None if h is None else h * 0.001, "step_time": 0.001})
    return {"name": "t", "metric": "acc", "higher_is_better": True, "target": 0.9,
            "centres": {o: 0.1 for o in metric_by_opt}, "best_lr": {o: 0.1 for o in metric_by_opt}, "runs": runs}


def test_ranking_recommendation_and_profile() -> None:
    task = _fake_task({"sgd": [0.91, 0.92, 0.93], "adam": [0.95, 0.96, 0.94], "lamb": [0.5, 0.6, None]},
                      {"sgd": [100, 120, None], "adam": [50, 60, 40], "lamb": [None, None, None]})
    rows = analysis.ranking(task)
    assert [r["optimizer"] for r in rows] == ["adam", "sgd", "lamb"]
    assert rows[0]["metric_median"] == pytest.approx(0.95) and rows[0]["steps_to_target"] == 50
    assert rows[1]["reached"] == "2/3" and rows[1]["steps_to_target"] == 120  # the miss counts as never
    assert rows[2]["reached_target"] is False and rows[2]["diverged_seeds"] == 1
    rec = analysis.recommendation(task)
    assert rec["optimizer"] == "adam" and "runner-up sgd" in rec["evidence"]
    prof = analysis.profile({"tasks": {"t": task}}, "steps_to_target")
    taus = analysis.PROFILE_TAUS
    assert prof["adam"][0] == 1.0  # fastest
    assert prof["sgd"][taus.index(2.35)] == 0.0 and prof["sgd"][taus.index(2.4)] == 1.0  # 120/50 = 2.4
    assert max(prof["lamb"]) == 0.0


def test_recommendation_declares_ties_and_flags_a_best_lr_at_the_grid_edge() -> None:
    task = _fake_task({"adam": [0.95, 0.96, 0.93], "sgd": [0.94, 0.92, 0.925], "lamb": [0.5, 0.6, 0.55]},
                      {o: [10] * 3 for o in ("adam", "sgd", "lamb")})
    rec = analysis.recommendation(task)
    assert rec["optimizer"] == "adam" and rec["ties"] == ["sgd"]  # 0.92-0.94 overlaps 0.93-0.96; lamb does not
    assert "a tie: the seed ranges of sgd overlap" in rec["evidence"]
    assert rec["edge"] is None  # a single lr is no grid
    separated = _fake_task({"adam": [0.95, 0.96, 0.955], "sgd": [0.94, 0.92, 0.93]}, {"adam": [10] * 3, "sgd": [10] * 3})
    assert analysis.recommendation(separated)["ties"] == []

    def grid(lrs, diverged=()):  # adam's sweep over lrs, best at 0.1
        runs = [{"optimizer": "adam", "lr": lr, "seed": 0, "phase": "sweep", "diverged": lr in diverged,
                 "final_metric": None if lr in diverged else (0.95 if lr == 0.1 else 0.8), "final_loss": 0.1,
                 "steps_to_target": 10, "time_to_target": 0.01, "step_time": 0.001} for lr in lrs]
        return {**task, "runs": runs, "centres": {"adam": 0.1}, "best_lr": {"adam": 0.1}}

    assert analysis.grid_edge(grid([0.01, 0.03, 0.1]), "adam") == "highest"
    assert analysis.grid_edge(grid([0.1, 0.3, 1.0]), "adam") == "lowest"
    assert analysis.grid_edge(grid([0.03, 0.1, 0.3]), "adam") is None
    assert analysis.grid_edge(grid([0.03, 0.1, 0.3], diverged={0.3}), "adam") == "next to a diverged lr"
    assert "its best lr is the highest of its grid" in analysis.recommendation(grid([0.01, 0.03, 0.1]))["evidence"]


def test_each_pick_is_held_against_adamw_by_seed_ranges() -> None:
    def verdict(adam, adamw, higher=True):
        task = _fake_task({"adam": adam, "adamw": adamw}, {"adam": [10] * 3, "adamw": [10] * 3})
        return analysis.against_adamw({**task, "higher_is_better": higher})

    assert verdict([0.95, 0.96, 0.97], [0.90, 0.91, 0.92])["verdict"] == "better"
    assert verdict([0.95, 0.96, 0.97], [0.90, 0.91, 0.955])["verdict"] == "tie"
    check = verdict([0.95, 0.96, 0.97], [0.90, 0.91, 0.92], higher=False)  # lower is better: adamw picked
    assert check["verdict"] == "is AdamW" and check["optimizer"] == "adamw"
    assert check["pick"] == check["adamw"] == (0.90, 0.92)
    without = _fake_task({"adam": [0.9] * 3}, {"adam": [10] * 3})
    assert analysis.against_adamw(without) is None


def test_leave_one_task_out_recommends_from_the_other_tasks() -> None:
    """"a" wins tasks one and two and misses three's target; "b" reaches every target, second on one and two. Holding
    out three, the other tasks pick "a" (both reach both targets; "a" ranks first), last there: regret 0.9 - 0.1.
    Holding out one, "b" reaches both remaining targets and "a" one: "b" is picked, second on one: regret 0.03."""
    t1 = _fake_task({"a": [0.95] * 3, "b": [0.92] * 3}, {"a": [10] * 3, "b": [20] * 3})
    t3 = _fake_task({"a": [0.1] * 3, "b": [0.9] * 3}, {"a": [None] * 3, "b": [20] * 3})
    rows = {r["task"]: r for r in analysis.leave_one_task_out({"tasks": {"one": t1, "two": t1, "three": t3}})}
    assert rows["three"]["pick"] == "a" and rows["three"]["rank"] == 2 and rows["three"]["of"] == 2
    assert rows["three"]["regret"] == pytest.approx(0.8) and rows["three"]["best_optimizer"] == "b"
    assert rows["one"]["pick"] == "b" and rows["one"]["rank"] == 2 and rows["one"]["regret"] == pytest.approx(0.03)
    assert analysis.leave_one_task_out({"tasks": {"one": t1}}) == []


def _swept_task(sweeps: dict[str, dict[float, float | None]], reruns: dict[str, list[float]],
                memory: dict[str, float] | None = None, step_ms: dict[str, float] | None = None) -> dict:
    """A task whose optimizers swept several lrs with seed 0 (``sweeps``: lr -> final metric, None diverged) and
    reran their best lr with ``reruns`` (seeds 1, 2, ...)."""
    runs, best_lr = [], {}
    for o, sweep in sweeps.items():
        best_lr[o] = max((lr for lr, v in sweep.items() if v is not None), key=lambda lr: sweep[lr])
        for seed, (lr, v) in [(0, item) for item in sweep.items()] + [(k, (best_lr[o], v)) for k, v in enumerate(reruns[o], 1)]:
            runs.append({"optimizer": o, "lr": lr, "seed": seed, "phase": "sweep" if seed == 0 else "seed",
                         "diverged": v is None, "final_metric": v, "final_loss": v, "steps_to_target": None,
                         "time_to_target": None, "step_time": (step_ms or {}).get(o, 1.0) / 1e3,
                         "state_bytes_per_param": (memory or {}).get(o)})
    return {"name": "t", "metric": "acc", "higher_is_better": True, "target": None, "centres": dict.fromkeys(sweeps, 0.1),
            "best_lr": best_lr, "runs": runs, "families": {}}


def _with_int8(task: dict, optimizer: str, metrics: list[float], losses: list[float], memory: float) -> dict:
    """``task`` with ``optimizer`` rerun with 8-bit state on seeds 1, 2, ... (``metrics``, ``losses``: per seed)."""
    for seed, (metric, loss) in enumerate(zip(metrics, losses), 1):
        task["runs"].append({"optimizer": optimizer, "lr": task["best_lr"][optimizer], "seed": seed, "phase": "int8",
                             "diverged": False, "final_metric": metric, "final_loss": loss,
                             "curve": {"step": [1, 2], "loss": [9.0, loss]}, "steps_to_target": None,
                             "time_to_target": None, "step_time": 1e-3, "state_bytes_per_param": memory})
    return task


def test_8bit_state_is_compared_with_float32_on_the_same_seeds() -> None:
    """Each 8-bit rerun against the float32 runs of the same seeds: within both tolerances, outside one (named), or
    not used at all (as many bytes per parameter: no tensor was large enough). No ranking reads the 8-bit runs."""
    def task(reruns, name):
        out = _swept_task({"adam": {0.01: 0.5, 0.1: 0.9}}, {"adam": reruns}, memory={"adam": 8.0})
        for run in out["runs"]:
            run["curve"] = {"step": [1, 2], "loss": [9.0, 1.0]}  # float32 training losses: 1.0 at the end
        return {**out, "name": name}

    results = {"tasks": {"close": _with_int8(task([0.90, 0.92], "close"), "adam", [0.902, 0.918], [1.005, 1.0], 2.0),
                         "apart": _with_int8(task([0.90, 0.92], "apart"), "adam", [0.89, 0.90], [1.05, 1.03], 2.0),
                         "small": _with_int8(task([0.90, 0.92], "small"), "adam", [0.90, 0.92], [1.0, 1.0], 8.0)}}
    # the lr chosen on seed 0 diverges on the rerun seeds with float32 state, then with 8-bit state as well (or only
    # with 8-bit state): the verdict says which side diverged, not just "diverged"
    for name, float32_seeds, int8_diverged in (("both", [None, None], True), ("only8", [0.90, 0.92], True)):
        rerun = _with_int8(task(float32_seeds, name), "adam", [0.9, 0.9], [1.0, 1.0], 2.0)
        for run in rerun["runs"]:
            if run["phase"] == "int8":
                run.update(diverged=int8_diverged, final_metric=None, final_loss=None)
        results["tasks"][name] = rerun
    rows = {row["task"]: row for row in analysis.int8_comparison(results)}
    assert rows["both"]["verdict"] == ("diverged with float32 state too (2 of 2 seeds; 8-bit: 2 of 2): the lr, not "
                                       "the 8 bits")
    assert rows["only8"]["verdict"] == "8-bit state diverged (2 of 2 seeds)"
    assert rows["close"]["verdict"] == "within"
    assert rows["close"]["loss_change"] == pytest.approx(0.0025) and rows["close"]["metric_change"] == pytest.approx(0.0)
    assert rows["apart"]["verdict"] == "outside: loss +4.0%, acc -1.50 points"
    assert rows["small"]["verdict"] == "not used (no tensor of 4096 elements)"
    assert analysis.ranking(results["tasks"]["apart"])[0]["metric_median"] == pytest.approx(0.91)  # float32's alone


def test_the_arena_reruns_adamw_with_8bit_state_and_reports_it(tmp_path: Path) -> None:
    results = run_arena(tasks=["digits-mlp"], optimizers=["adamw"], seeds=2, budget=0.05, quick=True, progress=False,
                        backend=REF, out=tmp_path / "report")
    task = results["tasks"]["digits-mlp"]
    eight = [r for r in task["runs"] if r["phase"] == "int8"]
    full = analysis.best_runs(task, "adamw")
    assert results["config"]["int8_checked"] == ["adamw"]
    assert [r["seed"] for r in eight] == [r["seed"] for r in full] == [1]
    assert eight[0]["hyperparams"] == {"state_dtype": "int8"} and eight[0]["lr"] == task["best_lr"]["adamw"]
    assert eight[0]["state_bytes_per_param"] < 0.5 * full[0]["state_bytes_per_param"]
    page = (tmp_path / "report" / "index.html").read_text()
    assert 'id="int8"' in page and '<a href="#int8">' in page
    row = analysis.int8_comparison(results)[0]
    assert f"adamw on digits-mlp {row['verdict']}" in analysis.summary_text(results)  # the CLI prints it too
    assert len(re.findall(r'<tr data-optimizer="adamw"><td[^>]*>digits-mlp</td>', page)) == 1


def test_the_seed_that_chose_the_lr_is_kept_out_of_the_reported_results() -> None:
    """Seed 0 picked adam's lr 0.1 with a lucky 0.99; the reruns at 0.1 give 0.90 and 0.92. The reported median and
    range are the reruns' alone (with seed 0 the median would be 0.92 and the range would reach 0.99)."""
    task = _swept_task({"adam": {0.01: 0.8, 0.1: 0.99, 1.0: None}}, {"adam": [0.90, 0.92]})
    row = analysis.ranking(task)[0]
    assert row["metric_median"] == pytest.approx(0.91) and (row["metric_min"], row["metric_max"]) == (0.90, 0.92)
    assert [r["seed"] for r in analysis.best_runs(task, "adam")] == [1, 2]
    # an lr-free optimizer's single run chose nothing: it counts, with the reruns
    lr_free = _swept_task({"prodigy": {1.0: 0.95}}, {"prodigy": [0.93, 0.94]})
    assert analysis.ranking(lr_free)[0]["metric_median"] == pytest.approx(0.94)
    # a one-seed arena has only the choosing run to show
    assert analysis.ranking(_swept_task({"adam": {0.1: 0.9, 1.0: 0.8}}, {"adam": []}))[0]["metric_median"] == 0.9


def test_lr_range_width_memory_and_the_runners_up_for_memory_and_time() -> None:
    """Per task: the good lr range in decades (lrs within 2 points of the best metric), the measured memory, and the
    recommendation's runners-up among those the seeds cannot separate from the pick: the best-ranked optimizer
    lighter than it, and the best-ranked quicker one. Rprop, lighter still but clearly worse, is not offered."""
    task = _swept_task({"adam": {1e-3: 0.95, 1e-2: 0.96, 1e-1: 0.90}, "sgd": {1e-2: 0.93, 1e-1: 0.95, 1.0: 0.955},
                        "lion": {1e-4: 0.94, 1e-3: 0.5}, "rprop": {1e-3: 0.7, 1e-2: 0.8}},
                       {"adam": [0.955, 0.965], "sgd": [0.95, 0.96], "lion": [0.94, 0.958], "rprop": [0.8, 0.8]},
                       memory={"adam": 8.0, "sgd": 4.0, "lion": 4.0, "rprop": 0.0},
                       step_ms={"adam": 2.0, "sgd": 3.0, "lion": 1.0, "rprop": 0.5})
    rows = {r["optimizer"]: r for r in analysis.ranking(task)}
    assert rows["adam"]["lr_width"] == pytest.approx(1.0)  # 1e-3 and 1e-2 are good, 1e-1 (0.90) is not
    assert rows["sgd"]["lr_width"] == pytest.approx(1.0) and rows["lion"]["lr_width"] == 0.0
    assert rows["adam"]["memory"] == 8.0 and rows["sgd"]["memory"] == 4.0
    rec = analysis.recommendation(task)
    assert rec["optimizer"] == "adam" and rec["lighter"] == "sgd" and rec["faster"] == "lion"
    assert "for less memory: sgd (rank 2, 4 bytes" in rec["evidence"] and "for less wall time: lion (rank 3" in rec["evidence"]


def test_an_optimizer_left_out_of_some_tasks_ranks_after_those_that_ran_on_all() -> None:
    """"m" ran on one task only (Muon where the others have no hidden matrix) and won it: its 1/1 target and mean rank
    1 count one task, so it ranks after the optimizers that ran everywhere, and the verdict is not it."""
    both = _fake_task({"a": [0.95] * 3, "b": [0.92] * 3, "m": [0.97] * 3}, {o: [10] * 3 for o in "abm"})
    without = _fake_task({"a": [0.95] * 3, "b": [0.92] * 3}, {o: [10] * 3 for o in "ab"})
    results = {"tasks": {"one": both, "two": without, "three": without}}
    rows = analysis.summary_table(results)
    assert [r["optimizer"] for r in rows] == ["a", "b", "m"] and rows[2]["tasks_run"] == "1/3"
    assert rows[2]["mean_rank"] < rows[0]["mean_rank"]  # a better mean rank, over fewer tasks
    assert analysis.verdict(results)["optimizer"] == "a"
    assert "ran on 1 of the tasks: not comparable" in analysis.summary_text(results)


def test_the_verdict_names_the_summary_pick_and_each_task_pick() -> None:
    one = _fake_task({"adam": [0.95] * 3, "sgd": [0.92] * 3}, {"adam": [10] * 3, "sgd": [20] * 3})
    two = _fake_task({"adam": [0.90] * 3, "sgd": [0.93] * 3}, {"adam": [10] * 3, "sgd": [20] * 3})
    verdict = analysis.verdict({"tasks": {"one": one, "two": one, "three": two}})
    assert verdict["optimizer"] == "adam" and verdict["text"].startswith("Use adam: it reached 3/3 targets")
    assert "one: adam at lr 0.1" in verdict["text"] and "three: sgd at lr 0.1" in verdict["text"]
    assert verdict["close"] == ["sgd"]  # mean rank 1.67 against 1.33: within one rank
    assert analysis.verdict({"tasks": {"x": _fake_task({"adam": [None] * 3}, {"adam": [None] * 3})}}) is None


def test_summary_ranks_by_targets_then_mean_rank_not_by_timings() -> None:
    """"fast" is quickest to the target on two tasks and misses the third; "steady" reaches all three, slowly. The
    time profile favours fast; the summary ranks steady first (more targets), as its heading says it does."""
    quick = _fake_task({"fast": [0.95] * 3, "steady": [0.92] * 3}, {"fast": [10] * 3, "steady": [50] * 3})
    missed = _fake_task({"fast": [0.5] * 3, "steady": [0.92] * 3}, {"fast": [None] * 3, "steady": [50] * 3})
    results = {"tasks": {"a": quick, "b": quick, "c": missed}}
    rows = analysis.summary_table(results)
    assert [r["optimizer"] for r in rows] == ["steady", "fast"]
    assert [r["targets"] for r in rows] == ["3/3", "2/3"]
    assert rows[1]["profile_score"] > rows[0]["profile_score"]  # the old ordering would have put fast first
    assert rows[1]["mean_rank"] < rows[0]["mean_rank"]  # and so would the mean rank alone


# ---------------------------------------------------------------- report


def test_report_contains_every_task_optimizer_and_figure(tiny_report: tuple[Path, dict]) -> None:
    out, results = tiny_report
    page = (out / "index.html").read_text()
    figures = re.findall(r'<figure id="([^"]+)-figure"><svg', page)  # drawn inline: the page stands alone
    assert figures == ["rosenbrock-curves", "rosenbrock-lr", "rosenbrock-trajectories", "logreg-curves", "logreg-lr",
                       "profile"]
    assert sorted(p.name for p in out.iterdir()) == ["index.html", "results.json"]
    assert "<img" not in page and "<link" not in page and "src=" not in page  # nothing fetched from outside
    for opt in OPTS:  # every figure has each optimizer's lines as a group the controls toggle, with a hover title
        assert len(re.findall(rf'<g data-optimizer="{opt}"><title>{opt}', page)) >= len(figures)
        assert f'<tr data-optimizer="{opt}">' in page and f'<input type="checkbox" checked data-optimizer="{opt}"' in page
    assert 'id="verdict"' in page and page.index('id="verdict"') < page.index('id="rosenbrock"')
    for task in TINY["tasks"]:
        assert f'id="{task}"' in page
        assert "Recommendation:" in page
    for opt in OPTS:
        assert f"<td>{opt}</td>" in page
    saved = json.loads((out / "results.json").read_text())
    assert saved == results
    assert set(saved["tasks"]) == set(TINY["tasks"])
    for task in saved["tasks"].values():
        # sweep (5 lrs) per optimizer + one extra seed at the best lr
        assert len(task["runs"]) == len(OPTS) * (len(protocol.GRID_MULTIPLIERS) + 1) + sum(map(len, task["extended"].values()))
        assert {r["seed"] for r in task["runs"] if r["phase"] == "seed"} == {1}
        assert set(task["best_lr"]) == set(OPTS)
    assert not list(out.parent.glob(".*"))  # no temp dirs or partial results left behind


def test_an_optimizer_keeps_its_colour_in_every_figure_when_a_task_leaves_another_out(tiny_report: tuple[Path, dict]) -> None:
    """logreg without sgd (as a task without a hidden matrix leaves Muon out): adam's lines keep the colour they have
    on rosenbrock, which ran both (styles follow the report's optimizers, not each task's)."""
    import copy

    _, results = tiny_report
    results = copy.deepcopy(results)
    logreg = results["tasks"]["logreg"]
    logreg["runs"] = [r for r in logreg["runs"] if r["optimizer"] != "sgd"]
    for key in ("centres", "best_lr", "centre_source", "coarse", "extended", "families"):
        logreg.get(key, {}).pop("sgd", None)
    page = report.build(results)
    groups = re.findall(r'<g data-optimizer="adam">(.*?)</g>', page, flags=re.S)
    colours = {c for body in groups for c in re.findall(r"stroke: (#[0-9a-f]{6})", body)} - {"#000000"}  # start, minimum
    assert len(groups) >= 5 and len(colours) == 1, colours


def test_report_redraws_identically(tiny_report: tuple[Path, dict], tmp_path: Path) -> None:
    out, _ = tiny_report
    redraw(out, tmp_path / "again")
    assert (tmp_path / "again" / "index.html").read_text() == (out / "index.html").read_text()
    assert load(tmp_path / "again") == load(out)


def test_report_write_is_atomic(tiny_report: tuple[Path, dict], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out, results = tiny_report
    target = tmp_path / "r"
    report.write(results, target)
    before = (target / "index.html").read_text()
    broken = dict(results, tasks={**results["tasks"], "rosenbrock": {**results["tasks"]["rosenbrock"], "kind": "2d", "name": "x"}})

    from thalweg.arena import figures

    def boom(task: dict, order: list | None = None) -> None:
        raise RuntimeError("drawing failed")

    monkeypatch.setattr(figures, "lr_figure", boom)
    with pytest.raises(RuntimeError, match="drawing failed"):
        report.write(broken, target)
    assert (target / "index.html").read_text() == before  # the old report is untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r"]  # and no temp dir is left


def test_report_refuses_a_foreign_non_empty_directory(tiny_report: tuple[Path, dict], tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ArenaError, match="not empty"):
        report.write(tiny_report[1], tmp_path)
    assert (tmp_path / "notes.txt").read_text() == "mine"


# ---------------------------------------------------------------- compare()


def test_compare_on_user_model(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from thalweg.arena import compare

    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 5, generator=g)
    y = (x[:, 0] - x[:, 1] > 0).long()
    accuracy = lambda m, xv, yv: float((m(xv).argmax(1) == yv).float().mean())  # noqa: E731
    results = compare(lambda: nn.Linear(5, 2), F.cross_entropy, ((x[:150], y[:150]), (x[150:], y[150:])),
                      optimizers=["sgd", "adam"], steps=60, seeds=2, metric_fn=accuracy, metric="accuracy",
                      higher_is_better=True, target=0.8, out=tmp_path / "cmp", progress=False, name="toy", backend=REF)
    task = results["tasks"]["toy"]
    assert set(task["best_lr"]) == {"sgd", "adam"}
    assert analysis.recommendation(task)["optimizer"] in {"sgd", "adam"}
    assert max(r["final_metric"] or 0 for r in task["runs"]) > 0.8  # a linearly separable toy is learnt
    page = (tmp_path / "cmp" / "index.html").read_text()
    assert 'id="toy"' in page and '<figure id="toy-lr-figure">' in page
    printed = capsys.readouterr().out  # what it found, and where the report is, as the CLI prints them
    assert printed.startswith("Verdict: use ") and f"report: {tmp_path / 'cmp' / 'index.html'}" in printed
    assert "toy" in printed and "sgd" in printed and "adam" in printed


def test_compare_evaluates_in_eval_mode_and_restores_training(tmp_path: Path) -> None:
    """With Dropout(0.5), a metric taken in training mode is random; in eval mode it is one number. The metric
    records the mode it saw, and the loss (training) still sees training mode."""
    from thalweg.arena import compare

    modes = {"metric": set(), "loss": set()}

    def model_fn() -> nn.Module:
        return nn.Sequential(nn.Linear(3, 8), nn.Dropout(0.5), nn.Linear(8, 1))

    def loss_fn(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.mse_loss(prediction, target)

    def metric_fn(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
        modes["metric"].add(model.training)
        return float(F.mse_loss(model(x), y))

    x = torch.randn(40, 3, generator=torch.Generator().manual_seed(0))
    y = x.sum(1, keepdim=True)
    original = nn.Sequential.forward

    def forward(self, inputs):  # records the mode of every training-loss forward
        if torch.is_grad_enabled():
            modes["loss"].add(self.training)
        return original(self, inputs)

    nn.Sequential.forward = forward
    try:
        compare(model_fn, loss_fn, ((x[:30], y[:30]), (x[30:], y[30:])), optimizers=["adam"], steps=6, seeds=1,
                metric_fn=metric_fn, eval_every=2, out=tmp_path / "cmp", progress=False, backend=REF)
    finally:
        nn.Sequential.forward = original
    assert modes == {"metric": {False}, "loss": {True}}


def test_compare_takes_datasets_and_dataloaders_as_the_same_data(tmp_path: Path) -> None:
    """A TensorDataset, and a shuffling DataLoader over it, give the records of the tensors themselves (read once;
    the arena's own seeded batches are drawn from them). A Dataset of something else is refused by name."""
    from torch.utils.data import DataLoader, TensorDataset

    from thalweg.arena import compare

    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(60, 3, generator=g), torch.randn(60, generator=g)
    model_fn = lambda: nn.Linear(3, 1)  # noqa: E731
    loss_fn = lambda out, target: F.mse_loss(out.squeeze(1), target)  # noqa: E731
    settings = dict(optimizers=["adam"], steps=8, seeds=1, progress=False, backend=REF, jobs=1)
    tensors = compare(model_fn, loss_fn, ((x[:40], y[:40]), (x[40:], y[40:])), out=tmp_path / "t", **settings)
    datasets = compare(model_fn, loss_fn, (TensorDataset(x[:40], y[:40]), DataLoader(TensorDataset(x[40:], y[40:]),
                       batch_size=7)), out=tmp_path / "d", **settings)
    assert _without_timings(datasets) == _without_timings(tensors)
    with pytest.raises(ArenaError, match="validation part .*could not be read"):
        compare(model_fn, loss_fn, ((x, y), TensorDataset(x)), out=tmp_path / "bad", **settings)
    assert not (tmp_path / "bad").exists()


def test_compare_rejects_malformed_data(tmp_path: Path) -> None:
    from thalweg.arena import compare

    assert not isinstance(compare, type(sys))  # the function, not a submodule of the same name
    with pytest.raises(ArenaError, match="training"):
        compare(lambda: nn.Linear(2, 1), F.mse_loss, ((torch.ones(3, 2),), (torch.ones(3, 2), torch.ones(3))),
                out=tmp_path / "x", progress=False)
    assert not (tmp_path / "x").exists()


def test_import_thalweg_arena_is_light() -> None:
    # (tqdm is left out: torch itself imports it, through torch.hub.)
    code = ("import sys, thalweg, thalweg.arena; heavy = [m for m in ('matplotlib', 'sklearn') if m in sys.modules];"
            "print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_repeated_svg_styles_become_classes_defined_once() -> None:
    """figures._style_classes: a style used 3 times or more turns into a class named after it (the same name in every
    figure), defined in one rule; a style used once stays; nothing else changes."""
    from thalweg.arena.figures import _style_classes

    svg = ('<svg width="1"><path d="M0" style="stroke: #000"/><path d="M1" style="stroke: #000"/>'
           '<path d="M2" style="stroke: #000"/><text style="font-size: 9px">a</text></svg>')
    out = _style_classes(svg)
    names = set(re.findall(r'class="(s[0-9a-f]+)"', out))
    assert len(names) == 1 and out.count(f'class="{names.pop()}"') == 3
    assert out.count("stroke: #000") == 1 and 'style="font-size: 9px"' in out and out.count("<style>") == 1
    assert re.sub(r"<style>.*?</style>", "", out).replace(re.findall(r'class="s[0-9a-f]+"', out)[0],
                                                          'style="stroke: #000"') == svg
    assert _style_classes(svg) == out and re.findall(r"\.(s[0-9a-f]+)\{", _style_classes(svg.replace("M0", "M9")))[0] \
        == re.findall(r"\.(s[0-9a-f]+)\{", out)[0]
