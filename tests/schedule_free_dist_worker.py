"""One rank of tests/test_schedule_free.py's FSDP2 check (torchrun-style environment; dist_worker.py's model,
batches and sharding): Schedule-Free AdamW and SGD on 2 processes, each on half the batch, against one process
on the whole batch — y after the steps, x after eval(), and the group schedule on every rank; and a DCP save in
eval mode, resumed into a fresh model and optimizer, continuing as if never stopped.

    RANK=0 WORLD_SIZE=2 MASTER_ADDR=127.0.0.1 MASTER_PORT=29500 python tests/schedule_free_dist_worker.py OUT_DIR
"""

from __future__ import annotations

import os
import sys

import torch
from dist_worker import batch, fsdp2, full_params, half, make_model, relative_error, resume_through_dcp, run_cases
from torch import nn

import thalweg

STEPS = 5
OPTIMIZERS = {"adamw": (thalweg.ScheduleFreeAdamW, dict(lr=0.02, weight_decay=0.1, warmup_steps=2, r=1.0)),
              "sgd": (thalweg.ScheduleFreeSGD, dict(lr=0.1, weight_decay=0.01, warmup_steps=2, weight_lr_power=1.0))}
SCHEDULE_KEYS = ("k", "lr_max", "weight_sum", "scheduled_lr", "train_mode")


def build(name: str, model: nn.Module):
    cls, options = OPTIMIZERS[name]
    weights = [p for n, p in model.named_parameters() if n.endswith("weight")]
    biases = [p for n, p in model.named_parameters() if n.endswith("bias")]
    return cls([{"params": weights}, {"params": biases, "weight_decay": 0.0}], **options)


def train_steps(model: nn.Module, optimizer, dtype: torch.dtype, steps: range, *, sharded_batch: bool) -> None:
    optimizer.train()
    for step in steps:
        x, y = batch(step, dtype)
        if sharded_batch:
            x, y = half(x), half(y)
        optimizer.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        optimizer.step()


def run(name: str, dtype: torch.dtype, model: nn.Module, *, sharded_batch: bool) -> tuple[dict, dict, list]:
    optimizer = build(name, model)
    train_steps(model, optimizer, dtype, range(STEPS), sharded_batch=sharded_batch)
    y_params = full_params(model)
    optimizer.eval()
    groups = [{key: group[key] for key in SCHEDULE_KEYS} for group in optimizer.param_groups]
    return y_params, full_params(model), groups


def train_then_eval(model: nn.Module, optimizer, dtype: torch.dtype, steps: range) -> None:
    """The README's recipe: steps in train mode, then eval() (the parameters hold x when saved or compared)."""
    train_steps(model, optimizer, dtype, steps, sharded_batch=True)
    optimizer.eval()


def cases(mesh, out_dir: str):
    for name in OPTIMIZERS:
        for dtype in (torch.float64, torch.float32):
            def compare(name=name, dtype=dtype):
                y_expected, x_expected, expected_groups = run(name, dtype, make_model(dtype), sharded_batch=False)
                y_params, x_params, groups = run(name, dtype, fsdp2(make_model(dtype), mesh), sharded_batch=True)
                return {"y_rel_error": relative_error(y_params, y_expected),
                        "x_rel_error": relative_error(x_params, x_expected),
                        "groups": groups, "expected_groups": expected_groups}

            yield f"{name}/{str(dtype).removeprefix('torch.')}", compare

            def resume(name=name, dtype=dtype):
                path = os.path.join(out_dir, f"ckpt-{name}-{dtype}")
                return resume_through_dcp(mesh, path, dtype, lambda model: build(name, model),
                                          lambda model, optimizer, steps: train_then_eval(model, optimizer, dtype, steps),
                                          steps=STEPS)

            yield f"dcp/{name}/{str(dtype).removeprefix('torch.')}", resume


if __name__ == "__main__":
    run_cases(sys.argv[1], cases)
