"""results.json: the one file between running and drawing. Saved atomically after every task."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from .errors import ArenaError

SCHEMA = 1
RESULTS_NAME = "results.json"


def partial_path(out: str | Path) -> Path:
    """Where results accumulate while the arena runs: beside the report, not in it, so an interrupted
    run leaves the previous report intact and its finished tasks on disk."""
    out = Path(out)
    return out.parent / f".{out.name}.results.partial.json"


def new_results(config: dict[str, Any], created: str) -> dict[str, Any]:
    """An empty results document; tasks are added to ``results["tasks"]`` as they finish."""
    from thalweg import __version__

    return {"schema": SCHEMA, "thalweg_version": __version__, "created": created, "config": config, "tasks": {}}


def dumps(results: dict[str, Any]) -> str:
    # allow_nan=False: a stray inf/NaN would make the file unreadable by strict JSON parsers.
    return json.dumps(results, allow_nan=False, separators=(",", ":"))


def save_json(results: dict[str, Any], path: str | Path) -> None:
    """Write ``results`` to ``path`` atomically (temp file in the same directory, then rename)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(dumps(results))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_results(path: str | Path) -> dict[str, Any]:
    """Read results from a results.json file or a report directory that holds one — or, where the last run into
    that directory was interrupted, the tasks it finished (:func:`partial_path`; a run that completes removes them,
    so their presence means they are newer than the report)."""
    path = Path(path)
    if not path.is_file():
        interrupted = partial_path(path)
        if interrupted.exists():
            path = interrupted
        elif path.is_dir():
            path = path / RESULTS_NAME
    try:
        with open(path, encoding="utf-8") as f:
            results = json.load(f)
    except FileNotFoundError:
        raise ArenaError(f"no results found: {path} does not exist") from None
    except (OSError, ValueError) as exc:
        raise ArenaError(f"cannot read results from {path}: {exc}") from None
    if not isinstance(results, dict) or results.get("schema") != SCHEMA or "tasks" not in results:
        raise ArenaError(f"{path} is not a thalweg arena results file (schema {SCHEMA})")
    return results


load = load_results
