"""One rank of tests/test_prodigy.py's FSDP2 check (torchrun-style environment; dist_worker.py's model, batches and
sharding): Prodigy and D-Adapt Adam on 2 processes, each on half the batch, against one process on the whole batch
— the parameters and d, on one batch throughout — and once more with the cross-shard sums patched out (each rank's d
from its own shards); and a DCP save resumed into a fresh model and optimizer, continuing as if never stopped.

    RANK=0 WORLD_SIZE=2 MASTER_ADDR=127.0.0.1 MASTER_PORT=29500 python tests/prodigy_dist_worker.py OUT_DIR
"""

from __future__ import annotations

import os
import sys
from unittest import mock

import torch
from dist_worker import batch, fsdp2, full_params, half, make_model, relative_error, resume_through_dcp, run_cases
from torch import nn

import thalweg
from thalweg import distributed

STEPS = 8
OPTIMIZERS = {"prodigy": (thalweg.Prodigy, dict(weight_decay=0.1, safeguard_warmup=True)),
              "dadaptadam": (thalweg.DAdaptAdam, dict(weight_decay=0.01, decouple=True))}


def build(name: str, model: nn.Module):
    cls, options = OPTIMIZERS[name]
    weights = [p for n, p in model.named_parameters() if n.endswith("weight")]
    biases = [p for n, p in model.named_parameters() if n.endswith("bias")]
    return cls([{"params": weights}, {"params": biases, "weight_decay": 0.0}], **options)


def train_steps(model: nn.Module, optimizer, dtype: torch.dtype, steps: range, *, sharded_batch: bool) -> None:
    for _ in steps:
        x, y = batch(0, dtype)  # one batch throughout: a steady descent, along which d grows (to 6e-4 and 4e-2)
        if sharded_batch:
            x, y = half(x), half(y)
        optimizer.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        optimizer.step()


def run(name: str, dtype: torch.dtype, model: nn.Module, *, sharded_batch: bool) -> tuple[dict, float]:
    optimizer = build(name, model)
    train_steps(model, optimizer, dtype, range(STEPS), sharded_batch=sharded_batch)
    return full_params(model), float(optimizer.param_groups[0]["d"])


def cases(mesh, out_dir: str):
    for name in OPTIMIZERS:
        for dtype in (torch.float64, torch.float32):
            def compare(name=name, dtype=dtype):
                expected, expected_d = run(name, dtype, make_model(dtype), sharded_batch=False)
                params, d = run(name, dtype, fsdp2(make_model(dtype), mesh), sharded_batch=True)
                with mock.patch.object(distributed.Sharding, "sum_across_shards_", lambda self, values: None):
                    unsummed, unsummed_d = run(name, dtype, fsdp2(make_model(dtype), mesh), sharded_batch=True)
                return {"rel_error": relative_error(params, expected), "d": d, "expected_d": expected_d,
                        "unsummed_rel_error": relative_error(unsummed, expected), "unsummed_d": unsummed_d}

            yield f"{name}/{str(dtype).removeprefix('torch.')}", compare

            def resume(name=name, dtype=dtype):
                # saved at step 4, when d has grown: the resumed run must carry d and its sums on
                path = os.path.join(out_dir, f"ckpt-{name}-{dtype}")
                return resume_through_dcp(mesh, path, dtype, lambda model: build(name, model),
                                          lambda model, optimizer, steps: train_steps(model, optimizer, dtype, steps,
                                                                                      sharded_batch=True),
                                          saved_at=4, steps=STEPS)

            yield f"dcp/{name}/{str(dtype).removeprefix('torch.')}", resume


if __name__ == "__main__":
    run_cases(sys.argv[1], cases)
