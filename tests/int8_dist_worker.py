"""One rank of tests/test_state_int8.py's FSDP2 check: 8-bit state (state_dtype="int8") on 2 processes against one.

A model whose 99 x 50 weight (4950 elements, 8-bit state) is split by FSDP2 at row 50, that is at element 2500 —
inside a 256-element block, which then spans both processes. Every rank trains on the whole batch (so the averaged
gradient is the one-process gradient, bit for bit) with AdamW(state_dtype="int8"):

- the 8-bit state gathered from the shards equals the one-process state bit for bit (codes and absmax), and the
  parameters equal it;
- with the cross-process maximum patched out (each process's blocks from its own shard, as bitsandbytes and torchao
  decide them), the codes differ;
- a DCP checkpoint resumes into a fresh model and optimizer exactly;
- the same with a bfloat16 model and param_update "stochastic" and "kahan" (compensation and parameters equal one
  process's; each shard drawing its random bits as if it began the tensor gives other parameters), DCP included.

    RANK=0 WORLD_SIZE=2 MASTER_ADDR=127.0.0.1 MASTER_PORT=29500 python tests/int8_dist_worker.py OUT_DIR
"""

from __future__ import annotations

import os
import sys
from unittest import mock

import torch
from dist_worker import resume_through_dcp, run_cases
from torch import nn
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

import thalweg
import dist_worker
from thalweg import distributed

STEPS = 5


def make_model(dtype: torch.dtype, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(50, 99), nn.Tanh(), nn.Linear(99, 1)).to(dtype)


def shard(model: nn.Module, mesh) -> nn.Module:
    fully_shard(model[0], mesh=mesh)
    fully_shard(model[2], mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(100 + step)
    return torch.randn(16, 50, generator=generator), torch.randn(16, 1, generator=generator)


def build(model: nn.Module):
    return thalweg.AdamW(model.parameters(), lr=1e-2, weight_decay=0.01, state_dtype="int8", backend="foreach")


def train(model: nn.Module, optimizer, steps: range) -> None:
    for step in steps:
        x, y = batch(step)  # the whole batch on every rank
        optimizer.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        optimizer.step()


def state_of(model: nn.Module, optimizer) -> dict[str, torch.Tensor]:
    weight = model[0].weight
    return {key: (value.full_tensor() if isinstance(value, DTensor) else value).clone()
            for key, value in optimizer.state[weight].items() if key != "step"}


def compare(mesh, *, patched: bool) -> dict:
    expected_model = make_model(torch.float32)
    expected = build(expected_model)
    train(expected_model, expected, range(STEPS))
    model = shard(make_model(torch.float32), mesh)
    optimizer = build(model)
    if patched:
        with mock.patch.object(distributed.Sharding, "max_across_shards_", lambda self, values: None):
            train(model, optimizer, range(STEPS))
    else:
        train(model, optimizer, range(STEPS))
    ours, theirs = state_of(model, optimizer), state_of(expected_model, expected)
    params = dist_worker.full_params(model)
    return {"local_shape": list(distributed.local(model[0].weight).shape),
            "offset": distributed.flat_offset(model[0].weight),
            "codes_dtype": str(ours["exp_avg"].dtype),
            "state_equal": {key: bool(torch.equal(ours[key], theirs[key])) for key in theirs},
            "param_max_abs_diff": max(float((params[n] - p).abs().max()) for n, p in expected_model.named_parameters())}


def build_rounded(mode: str, state_dtype="int8"):
    return lambda model: thalweg.AdamW(model.parameters(), lr=1e-2, weight_decay=0.01, state_dtype=state_dtype,
                                       param_update=mode, backend="foreach")


def train_bf16(model: nn.Module, optimizer, steps: range) -> None:
    for step in steps:
        x, y = batch(step)
        optimizer.zero_grad()
        nn.functional.mse_loss(model(x.bfloat16()).float(), y).backward()
        optimizer.step()


def compare_rounded(mesh, mode: str, *, offsets_of_each_shard: bool = False) -> dict:
    """bfloat16 parameters with param_update=mode on 2 processes against one; with ``offsets_of_each_shard``
    (float32 state, each shard's random bits drawn as if it began the tensor) the parameters must differ."""
    state_dtype = torch.float32 if offsets_of_each_shard else "int8"
    expected_model = make_model(torch.bfloat16)
    expected = build_rounded(mode, state_dtype)(expected_model)
    train_bf16(expected_model, expected, range(STEPS))
    model = shard(make_model(torch.bfloat16), mesh)
    optimizer = build_rounded(mode, state_dtype)(model)
    if offsets_of_each_shard:
        with mock.patch.object(distributed, "flat_offset", lambda param: 0):
            train_bf16(model, optimizer, range(STEPS))
    else:
        train_bf16(model, optimizer, range(STEPS))
    ours, theirs = state_of(model, optimizer), state_of(expected_model, expected)
    params = dist_worker.full_params(model)
    return {"state_equal": {key: bool(torch.equal(ours[key], theirs[key])) for key in theirs},
            "params_equal": all(bool(torch.equal(params[n], p)) for n, p in expected_model.named_parameters()),
            "rounding_steps": optimizer.rounding_steps}


def cases(mesh, out_dir: str):
    yield "fsdp2", lambda: compare(mesh, patched=False)
    yield "blocks_of_each_shard", lambda: compare(mesh, patched=True)
    for mode in ("stochastic", "kahan"):
        yield f"bf16_{mode}", lambda mode=mode: compare_rounded(mesh, mode)
    yield "bf16_stochastic_offsets_of_each_shard", lambda: compare_rounded(mesh, "stochastic", offsets_of_each_shard=True)

    def resume():
        original = dist_worker.make_model, dist_worker.fsdp2  # (resume_through_dcp builds its models with these)
        dist_worker.make_model, dist_worker.fsdp2 = make_model, shard
        try:
            return resume_through_dcp(mesh, os.path.join(out_dir, "ckpt"), torch.float32, build,
                                      lambda model, optimizer, steps: train(model, optimizer, steps),
                                      saved_at=2, steps=STEPS)
        finally:
            dist_worker.make_model, dist_worker.fsdp2 = original

    yield "dcp", resume

    for mode in ("stochastic", "kahan"):
        def resume_rounded(mode=mode):
            original = dist_worker.make_model, dist_worker.fsdp2
            dist_worker.make_model, dist_worker.fsdp2 = make_model, shard
            try:
                return resume_through_dcp(mesh, os.path.join(out_dir, f"ckpt-{mode}"), torch.bfloat16,
                                          build_rounded(mode), train_bf16, saved_at=2, steps=STEPS)
            finally:
                dist_worker.make_model, dist_worker.fsdp2 = original

        yield f"dcp_bf16_{mode}", resume_rounded


if __name__ == "__main__":
    run_cases(sys.argv[1], cases)
