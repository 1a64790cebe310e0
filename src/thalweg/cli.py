"""The ``thalweg`` command: ``arena``, ``lr-find``, ``tune`` and ``report``.

Bad input (unknown names, an unwritable directory, a zero budget) ends with one line on stderr and
exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

EXIT_USAGE = 2


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {text}")
    return value


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line on stderr (the full usage is one ``--help`` away)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="thalweg", description="thalweg optimizers: benchmark arena and tuning tools.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    arena = sub.add_parser("arena", help="benchmark optimizers on the built-in tasks and write a report",
                           description="Run every optimizer on the built-in tasks under one protocol (same lr grid "
                                       "around each optimizer's centre, same step budget, best lr rerun with several "
                                       "seeds) and write DIR/index.html (the report, figures inline) and "
                                       "results.json.")
    arena.add_argument("--quick", action="store_true", help="4 tasks, short budgets (about 3 minutes on 2 cores)")
    arena.add_argument("--out", default="arena-report", metavar="DIR", help="report directory (default: arena-report)")
    arena.add_argument("--tasks", nargs="+", metavar="TASK", help="tasks to run (default: all, or the quick set)")
    arena.add_argument("--optimizers", nargs="+", metavar="OPT", help="optimizers to compare (default: all)")
    arena.add_argument("--seeds", type=_positive_int, default=3, metavar="N", help="seeds at each best lr (default 3)")
    arena.add_argument("--budget", type=_positive_float, default=1.0, metavar="X",
                       help="scale every task's step budget by X (default 1)")
    arena.add_argument("--backend", default="reference", help="thalweg backend for every optimizer: reference "
                       "(default: the same plain path for all, so timings compare algorithms), auto, foreach or fused")
    arena.add_argument("--jobs", type=_positive_int, metavar="N",
                       help="processes running optimizers in parallel (default: one per core; results do not depend "
                            "on it, timings share the machine)")
    arena.add_argument("--device", default="cpu", help="where runs train: cpu (default), cuda, cuda:N, or auto (the "
                       "GPU where there is one); on a GPU the runs go one at a time")
    arena.add_argument("--no-progress", action="store_true", help="no progress bar")
    arena.add_argument("--resume", action="store_true",
                       help="continue an interrupted run (same settings) from the tasks it finished")

    lrf = sub.add_parser("lr-find", help="LR range test: exponentially increasing lr, smoothed loss, suggested lr",
                         description="Raise the lr exponentially each step on one task and plot the smoothed loss; "
                                     "suggests the lr of steepest descent.")
    lrf.add_argument("--task", required=True)
    lrf.add_argument("--optimizer", required=True)
    lrf.add_argument("--lr-min", type=_positive_float, help="first lr (default: 1e-5)")
    lrf.add_argument("--lr-max", type=_positive_float, help="last lr (default: 1e2)")
    lrf.add_argument("--steps", type=_positive_int, default=200, help="steps of the test (default 200)")
    lrf.add_argument("--backend", default="reference", help="thalweg backend: reference (default), auto, foreach or fused")
    lrf.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:N or auto")
    lrf.add_argument("--out", default="lr-find", metavar="DIR", help="where the PNG and JSON go (default: lr-find)")

    tune = sub.add_parser("tune", help="grid over lr x beta1/momentum and lr x weight decay, with heat-maps",
                          description="Search lr x the momentum knob (beta1 or momentum; lr_decay for Adagrad), then "
                                      "lr x weight decay at the best knob value; draws both heat-maps.")
    tune.add_argument("--task", required=True)
    tune.add_argument("--optimizer", required=True)
    tune.add_argument("--budget", type=_positive_float, default=1.0, metavar="X", help="scale of the quick step budget")
    tune.add_argument("--backend", default="reference", help="thalweg backend: reference (default), auto, foreach or fused")
    tune.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:N or auto")
    tune.add_argument("--out", default="tune", metavar="DIR", help="where the PNG and JSON go (default: tune)")
    tune.add_argument("--no-progress", action="store_true", help="no progress bar")

    rep = sub.add_parser("report", help="redraw a report from DIR/results.json without retraining",
                         description="Rebuild DIR/index.html and DIR/figures from DIR/results.json.")
    rep.add_argument("dir", metavar="DIR")
    rep.add_argument("--out", metavar="DIR2", help="write the redrawn report here instead of DIR")
    return parser


def _run(args: argparse.Namespace) -> int:
    if args.command == "arena":
        from thalweg.arena.analysis import summary_text
        from thalweg.arena.runner import run_arena

        results = run_arena(tasks=args.tasks, optimizers=args.optimizers, seeds=args.seeds, budget=args.budget,
                            quick=args.quick, out=args.out, progress=not args.no_progress,
                            backend=args.backend, jobs=args.jobs, resume=args.resume, device=args.device)
        print(summary_text(results))
        print(f"\nreport: {args.out.rstrip('/')}/index.html")
    elif args.command == "lr-find":
        from thalweg.arena.lrfind import lr_find, write_lr_find
        from thalweg.arena.report import check_can_create

        check_can_create(args.out)  # before training, not after

        result = lr_find(args.task, args.optimizer, args.lr_min, args.lr_max, args.steps, backend=args.backend,
                         device=args.device)
        png = write_lr_find(result, args.out)
        s = result["suggestion"]
        if s["steepest"] is None:
            print("loss diverged almost at once; lower --lr-min")
        else:
            centre = f"its default lr {result['default_lr']:.3g}" if result["default_lr"] else "it has no default lr"
            print(f"suggested lr (steepest descent): {s['steepest']:.3g}   (min-loss lr / 10: {s['min_over_10']:.3g}; "
                  f"{centre})")
        print(f"plot: {png}")
    elif args.command == "tune":
        from thalweg.arena.report import check_can_create
        from thalweg.arena.tuning import runs_needed, tune, write_tune

        check_can_create(args.out)  # before training, not after

        bar = None
        if not args.no_progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=runs_needed(args.optimizer) if args.optimizer in _names() else 0, unit="run", leave=False)
        try:
            result = tune(args.task, args.optimizer, budget=args.budget, on_run=bar.update if bar else None,
                          backend=args.backend, device=args.device)
        finally:
            if bar is not None:
                bar.close()
        png = write_tune(result, args.out)
        b = result["best"]
        print("every setting diverged" if b is None else
              f"best: lr {b['lr']:.3g}, {result['knob']} {b[result['knob']]:g}, weight decay {b['weight_decay']:g} -> "
              f"{result['metric']} {b['metric']:.4g}")
        print(f"heat-maps: {png}")
    elif args.command == "report":
        from thalweg.arena.report import redraw

        print(f"report: {redraw(args.dir, args.out)}")
    return 0


# what each command imports, by module and pip name (the ``arena`` extra)
_EXTRA = {"sklearn": "scikit-learn", "matplotlib": "matplotlib", "tqdm": "tqdm"}


def missing_extras(args: argparse.Namespace) -> list[str]:
    """The pip names of the ``arena`` extra's packages that ``args``' command needs and this Python lacks (found,
    not imported), so that a plain ``pip install thalweg`` fails before any work with what to install."""
    import importlib.util

    needed = ["matplotlib"] if args.command == "report" else ["sklearn", "matplotlib"]
    if args.command in ("arena", "tune") and not args.no_progress:
        needed.append("tqdm")
    return [_EXTRA[module] for module in needed if importlib.util.find_spec(module) is None]


def _kept(args: argparse.Namespace) -> str:
    """For an interrupted arena: where its finished tasks are and how to go on from them."""
    if args.command != "arena":
        return ""
    from thalweg.arena.results import load_results, partial_path

    partial = partial_path(args.out)
    try:
        finished = list(load_results(partial)["tasks"])
    except Exception:  # nothing finished yet, or unreadable: nothing to point at
        return ""
    return (f"; {len(finished)} finished task(s) ({', '.join(finished)}) are kept in {partial}: run the same command "
            f"with --resume to continue, or `thalweg report {args.out}` to see them")


def _names() -> list[str]:
    import thalweg

    return thalweg.names()


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``thalweg`` command; returns the exit status."""
    args = build_parser().parse_args(argv)
    missing = missing_extras(args)
    if missing:
        print(f"thalweg {args.command}: error: {', '.join(missing)} {'is' if len(missing) == 1 else 'are'} not "
              "installed; pip install 'thalweg[arena]' adds what the arena needs", file=sys.stderr)
        return EXIT_USAGE
    from thalweg.arena.errors import ArenaError

    try:
        return _run(args)
    except ArenaError as exc:
        print(f"thalweg {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except OSError as exc:
        print(f"thalweg {args.command}: error: {exc.strerror or exc}: {exc.filename or ''}".rstrip(": "), file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"thalweg {args.command}: interrupted{_kept(args)}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
