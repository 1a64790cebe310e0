"""``compare``: the arena protocol on the user's own model and data, with the same report."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import nn

from .errors import ArenaError
from .protocol import DEFAULT_BACKEND
from .runner import check_positive, run_arena
from .tasks import Problem, Task, batch_indices

Split = Sequence[torch.Tensor]


def _split(name: str, part: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """An (inputs, targets) pair of tensors, from such a pair, a map-style Dataset of (input, target) items or a
    DataLoader of (inputs, targets) batches (read once, into memory: every optimizer then draws the same seeded
    batches from it)."""
    from torch.utils.data import DataLoader, Dataset

    if isinstance(part, (DataLoader, Dataset)):
        try:
            items = list(part) if isinstance(part, DataLoader) else [part[i] for i in range(len(part))]
            pairs = [item for item in items if isinstance(item, (tuple, list)) and len(item) == 2
                     and all(isinstance(t, torch.Tensor) for t in item)]
            if len(pairs) != len(items):
                raise TypeError("every item must be an (input, target) pair of tensors")
            join = torch.cat if isinstance(part, DataLoader) else torch.stack
            part = (join([x for x, _ in pairs]), join([y for _, y in pairs])) if pairs else part
        except (TypeError, RuntimeError) as exc:
            raise ArenaError(f"data's {name} part ({type(part).__name__}) could not be read as (inputs, targets) "
                             f"tensors: {exc}") from None
    if not (isinstance(part, (tuple, list)) and len(part) == 2 and all(isinstance(t, torch.Tensor) for t in part)):
        raise ArenaError(f"data's {name} part must be an (inputs, targets) pair of tensors, a Dataset or a DataLoader "
                         f"of such pairs, got {type(part).__name__}")
    x, y = part
    if len(x) != len(y) or len(x) == 0:
        raise ArenaError(f"data's {name} inputs and targets must be non-empty and of equal length, got {len(x)} and {len(y)}")
    return x, y


def compare(model_fn: Callable[[], nn.Module], loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
            data: tuple[Split, Split], optimizers: Sequence[str] | None = None, steps: int = 500, *,
            batch_size: int = 64, seeds: int = 3,
            metric_fn: Callable[[nn.Module, torch.Tensor, torch.Tensor], float] | None = None,
            metric: str = "validation loss", higher_is_better: bool = False, target: float | None = None,
            centres: dict[str, float] | None = None, eval_every: int | None = None, name: str = "custom",
            out: str | Path = "thalweg-compare", progress: bool = True, backend: str = DEFAULT_BACKEND,
            jobs: int | None = None, device: str = "cpu", show: bool = True) -> dict[str, Any]:
    """Compare optimizers on your problem under the arena protocol and write the report to ``out``.

    Args:
        model_fn: builds a fresh model (called once per run, after ``torch.manual_seed(seed)``).
        loss_fn: ``loss_fn(model(x), y)`` -> scalar training loss.
        data: ``((x_train, y_train), (x_val, y_val))``; each part may also be a map-style Dataset of (input, target)
            items or a DataLoader of (inputs, targets) batches, read once into memory (its own batching and
            shuffling are not used: every optimizer draws the same seeded batches of ``batch_size``).
        optimizers: names from ``thalweg.arena.protocol.ARENA_OPTIMIZERS`` (default: all of them).
        steps: step budget per run; batches of ``batch_size`` drawn in seeded shuffled epochs.
        metric_fn: ``metric_fn(model, x_val, y_val)`` -> float; default: ``loss_fn`` on the validation set.
        higher_is_better, target: how to read the metric; ``target`` enables steps/time to target.
        centres: lr-grid centre per optimizer (default: found by the arena's coarse search on your problem, the
            same procedure as for its own tasks).
        seeds: seeds at each optimizer's best lr.
        backend: thalweg backend for every optimizer ("auto", "reference", "foreach", "fused").
        jobs: processes running optimizers in parallel (default: one per core; the records do not depend on it).
        show: print the verdict, the summary and the report's path when done (as ``thalweg arena`` does).
        device: where every run trains: "cpu", "cuda", "cuda:N", or "auto" (the GPU where there is one); the model
            from ``model_fn`` and the data are moved there. On a GPU the runs go one at a time.

    Returns the results dict also saved as ``out/results.json``.

    Example::

        results = thalweg.arena.compare(lambda: nn.Linear(10, 2), F.cross_entropy,
                                        ((x, y), (xv, yv)), optimizers=["sgd", "adam"], steps=200)
    """
    x_tr, y_tr = _split("training", data[0] if len(data) == 2 else None)
    x_va, y_va = _split("validation", data[1])
    check_positive("steps", steps, integer=True)
    check_positive("batch_size", batch_size, integer=True)
    if metric_fn is None:
        def metric_fn(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
            return float(loss_fn(model(x), y))

    def setup(seed: int, sparse: bool, device: torch.device) -> Problem:
        torch.manual_seed(seed)
        model = model_fn().to(device)
        batch = batch_indices(len(x_tr), batch_size, seed)
        train_x, train_y, val_x, val_y = (t.to(device) for t in (x_tr, y_tr, x_va, y_va))

        def loss(step: int) -> torch.Tensor:
            idx = batch(step).to(device)
            return loss_fn(model(train_x[idx]), train_y[idx])

        def evaluate() -> float:
            # eval mode (Dropout off, BatchNorm on its running statistics, which validation data must not
            # update), then the training mode the model had
            training = model.training
            model.eval()
            try:
                with torch.no_grad():
                    return float(metric_fn(model, val_x, val_y))
            finally:
                model.train(training)

        return Problem(model, loss, evaluate)

    every = eval_every or max(1, steps // 20)
    task = Task(name, f"User problem: {len(x_tr)} training / {len(x_va)} validation samples, batch {batch_size}.",
                metric, higher_is_better, target, steps, steps, every, setup)
    table = {name: dict(centres or {})}
    results = run_arena([name], optimizers, seeds=seeds, out=out, progress=progress, extra_tasks={name: task},
                        centres=table, backend=backend, jobs=jobs, device=device)
    if show:
        from .analysis import summary_text

        print(summary_text(results))
        print(f"\nreport: {Path(out) / 'index.html'}")
    return results
