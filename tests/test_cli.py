"""The ``thalweg`` command: a tiny end-to-end arena, report redraw, lr-find, tune, and bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from thalweg.cli import build_parser, main


def _err_line(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    return lines[0]


def test_every_command_has_help(capsys: pytest.CaptureFixture[str]) -> None:
    for cmd in (["--help"], ["arena", "--help"], ["lr-find", "--help"], ["tune", "--help"], ["report", "--help"]):
        with pytest.raises(SystemExit) as exc:
            main(cmd)
        assert exc.value.code == 0
        assert "usage: thalweg" in capsys.readouterr().out


def test_arena_end_to_end_then_report(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "rep"
    rc = main(["arena", "--tasks", "beale", "sparse-bag", "--optimizers", "adagrad", "momentum",
               "--seeds", "2", "--budget", "0.03", "--out", str(out), "--no-progress", "--backend", "reference"])
    printed = capsys.readouterr().out
    assert rc == 0
    assert f"report: {out}/index.html" in printed
    assert "beale" in printed and "sparse-bag" in printed and "adagrad" in printed and "momentum" in printed
    assert printed.startswith("Verdict: use adagrad") or printed.startswith("Verdict: use momentum")
    results = json.loads((out / "results.json").read_text())
    assert results["config"]["optimizers"] == ["adagrad", "momentum"] and results["config"]["seeds"] == 2
    page = (out / "index.html").read_text()
    for name in ("beale-trajectories", "sparse-bag-curves", "profile"):
        assert f'<figure id="{name}-figure"><svg' in page
    assert main(["report", str(out)]) == 0
    assert f"report: {out}/index.html" in capsys.readouterr().out
    assert (out / "index.html").read_text() == page


def test_lr_find_writes_plot_and_suggestion(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["lr-find", "--task", "logreg", "--optimizer", "adam", "--steps", "80", "--out", str(tmp_path),
               "--backend", "reference"])
    assert rc == 0
    assert "suggested lr" in capsys.readouterr().out
    data = json.loads((tmp_path / "lr-find-logreg-adam.json").read_text())
    assert data["lr"] == sorted(data["lr"]) and data["lr"][-1] / data["lr"][0] > 100
    assert data["lr"][0] <= data["suggestion"]["steepest"] <= data["lr"][-1]
    assert (tmp_path / "lr-find-logreg-adam.png").read_bytes().startswith(b"\x89PNG")


def test_lr_find_suggestion_on_a_known_curve() -> None:
    from thalweg.arena.lrfind import smooth, suggest

    lrs = [10 ** (-4 + i * 0.05) for i in range(100)]
    # flat, then a drop centred at lr 1e-2, then a blow-up
    loss = [1.0 if lr < 3e-3 else 0.2 if lr > 3e-2 else 0.6 for lr in lrs]
    loss[-10:] = [5.0] * 10
    s = suggest(lrs, loss)
    assert 1.5e-3 <= s["steepest"] <= 3.5e-2
    assert smooth([2.0, 2.0, 2.0]) == pytest.approx([2.0, 2.0, 2.0])  # bias-corrected: no pull towards 0


def test_tune_writes_heatmaps(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["tune", "--task", "rosenbrock", "--optimizer", "momentum", "--budget", "0.05", "--out", str(tmp_path),
               "--no-progress", "--backend", "reference"])
    assert rc == 0
    assert "best: lr" in capsys.readouterr().out
    data = json.loads((tmp_path / "tune-rosenbrock-momentum.json").read_text())
    assert data["knob"] == "momentum" and len(data["knob_grid"]) == len(data["knob_values"]) == 4
    assert len(data["wd_grid"]) == len(data["weight_decays"]) and len(data["wd_grid"][0]) == len(data["lr"])
    assert (tmp_path / "tune-rosenbrock-momentum.png").exists()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["arena", "--tasks", "mnist"], "unknown task 'mnist'; valid tasks: rosenbrock, beale"),
        (["arena", "--optimizers", "adam", "adamz"], "unknown optimizer 'adamz'; valid optimizers: sgd, momentum, adam"),
        (["arena", "--optimizers", "adam", "sparseadam"], "'sparseadam' is a thalweg optimizer the arena does not run yet"),
        (["arena", "--budget", "0"], "argument --budget: must be > 0, got 0"),
        (["arena", "--seeds", "0"], "argument --seeds: must be >= 1, got 0"),
        (["arena", "--jobs", "0"], "argument --jobs: must be >= 1, got 0"),
        (["arena", "--backend", "gpu"], "unknown backend 'gpu'; valid backends: auto, reference"),
        (["arena", "--device", "tpu"], "unknown device 'tpu'; use cpu, cuda, cuda:N or auto"),
        (["arena", "--device", "meta"], "the arena runs on cpu or cuda, got device 'meta'"),
        (["lr-find", "--task", "logreg", "--optimizer", "adam", "--device", "gpu"], "unknown device 'gpu'"),
        (["lr-find", "--task", "nope", "--optimizer", "adam"], "unknown task 'nope'"),
        (["tune", "--task", "logreg", "--optimizer", "nope", "--no-progress"], "unknown optimizer 'nope'"),
        (["tune", "--task", "logreg", "--optimizer", "lion", "--no-progress"], "tune's second knob is defined for"),
        (["report", "/nonexistent/dir"], "no results found"),
    ],
)
def test_bad_input_is_one_line_and_non_zero(argv: list[str], message: str, tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    argv = [*argv, "--out", str(tmp_path / "o")] if argv[0] in ("arena",) else argv
    try:
        rc = main(argv)
    except SystemExit as exc:  # argparse's own usage errors
        rc = exc.code
    assert rc == 2
    assert message in _err_line(capsys)
    assert not (tmp_path / "o").exists()


def test_unwritable_output_directory(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert main(["arena", "--quick", "--out", str(blocker / "sub")]) == 2
    assert "cannot write to output directory" in _err_line(capsys)
    assert main(["arena", "--quick", "--out", str(blocker)]) == 2
    assert "is not a directory" in _err_line(capsys)


@pytest.mark.parametrize("command", ["lr-find", "tune"])
def test_lr_find_and_tune_check_their_output_directory_before_training(command: str, tmp_path: Path,
                                                                       capsys: pytest.CaptureFixture[str],
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    import thalweg.arena.lrfind
    import thalweg.arena.tuning

    def no_training(*args, **kwargs):
        raise AssertionError("trained before checking the output directory")

    monkeypatch.setattr(thalweg.arena.lrfind, "lr_find", no_training)
    monkeypatch.setattr(thalweg.arena.tuning, "tune", no_training)
    blocker = tmp_path / "file"
    blocker.write_text("x")
    argv = [command, "--task", "logreg", "--optimizer", "adam", "--no-progress"][:-1 if command == "lr-find" else None]
    assert main([*argv, "--out", str(blocker / "sub")]) == 2
    assert "cannot write to output directory" in _err_line(capsys)
    assert main([*argv, "--out", str(blocker)]) == 2
    assert "exists and is not a directory" in _err_line(capsys)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]  # no probe left behind


def test_a_missing_extra_is_named_before_any_work(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """A plain ``pip install thalweg`` lacks the arena extra: each command names what is missing and the install
    line, before training or writing anything (``sys.modules[name] = None`` makes a module unimportable)."""
    monkeypatch.setitem(sys.modules, "tqdm", None)
    out = tmp_path / "o"
    assert main(["arena", "--quick", "--out", str(out)]) == 2
    line = _err_line(capsys)
    assert line.startswith("thalweg arena: error: tqdm is not installed") and "pip install 'thalweg[arena]'" in line
    assert not out.exists()
    # without a progress bar tqdm is not needed: the command gets as far as its own checks
    assert main(["arena", "--tasks", "nope", "--no-progress", "--out", str(out)]) == 2
    assert "unknown task 'nope'" in _err_line(capsys)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "sklearn", None)
    assert main(["tune", "--task", "logreg", "--optimizer", "adam", "--out", str(out)]) == 2
    assert "scikit-learn, matplotlib, tqdm are not installed" in _err_line(capsys)
    assert main(["report", str(tmp_path)]) == 2
    assert "thalweg report: error: matplotlib is not installed" in _err_line(capsys)
    assert not out.exists()


def test_console_script_runs_without_traceback(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "thalweg.cli", "arena", "--tasks", "nope"],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.startswith("thalweg arena: error: unknown task 'nope'") and "Traceback" not in proc.stderr


def test_parser_defaults() -> None:
    args = build_parser().parse_args(["arena"])
    assert (args.seeds, args.budget, args.quick, args.out) == (3, 1.0, False, "arena-report")
