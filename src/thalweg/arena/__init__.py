"""The arena: benchmark thalweg's optimizers under one fair protocol and write a static report.

Running (:mod:`.protocol`, :mod:`.runner`) writes results.json; drawing (:mod:`.figures`,
:mod:`.report`) turns results into figures and HTML and never trains, so a report can be redrawn
(``thalweg report DIR``) without retraining. matplotlib and scikit-learn load only when needed.

    from thalweg.arena import compare
    results = compare(model_fn, loss_fn, (train, val), optimizers=["adam", "sgd"], steps=500)
"""

from __future__ import annotations

import importlib
from typing import Any

from .errors import ArenaError

# name -> submodule; resolved on first access so `import thalweg.arena` stays light. No submodule
# shares a name with a function here, or importing it would shadow the function on the package.
_LAZY = {
    "compare": "custom", "run_arena": "runner", "lr_find": "lrfind", "tune": "tuning",
    "redraw": "report", "load_results": "results", "TASKS": "tasks", "QUICK_TASKS": "tasks",
    "lr_grid": "protocol", "coarse_search": "protocol",
}
__all__ = ["ArenaError", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
