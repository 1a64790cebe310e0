"""One rank of tests/test_distributed.py's 4-process check of the matrix optimizers under FSDP2 (Muon, Adafactor, SOAP).

A model whose weights FSDP2 splits over 4 processes unevenly, some shards empty (9 rows: 3, 3, 3, 0; 6 rows: 2, 2, 2,
0; 1 row: 1, 0, 0, 0), trained on the whole batch on every rank; the parameters (and Adafactor's factors, Muon's
momentum, SOAP's moments, factors and bases) gathered from the shards against one process's. Muon's and SOAP's
matrices are dealt out to their owners in turn, so with 4 processes each owns some. Every rank trains on the whole
batch, so FSDP2's averaged gradients are the single process's bit for bit: SOAP's first factors here are singular
(a 9 x 7 gradient's 9 x 9 factor has rank 7), and their bases are chosen by rounding, so only the same bits give the
same bases (tests/test_soap.py says more).

    RANK=0 WORLD_SIZE=4 MASTER_ADDR=127.0.0.1 MASTER_PORT=29500 python tests/matrix_dist_worker.py OUT_DIR
"""

from __future__ import annotations

import os
import sys

import torch
from dist_worker import resume_through_dcp, run_cases
from dist_worker import train as dist_train
from torch import nn
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

import thalweg

STEPS = 4


def make_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(7, 9), nn.Tanh(), nn.Linear(9, 6), nn.Tanh(), nn.Linear(6, 1)).double()


def train(model: nn.Module, optimizer) -> None:
    for step in range(STEPS):
        generator = torch.Generator().manual_seed(100 + step)
        x = torch.randn(16, 7, generator=generator, dtype=torch.float64)
        y = torch.randn(16, 1, generator=generator, dtype=torch.float64)
        optimizer.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        optimizer.step()


def whole(tensor: torch.Tensor) -> torch.Tensor:
    return (tensor.full_tensor() if isinstance(tensor, DTensor) else tensor).detach().clone()


def compare(mesh, build, state: bool = True) -> dict:
    expected_model = make_model()
    expected = build(expected_model)
    train(expected_model, expected)
    model = make_model()
    for index in (0, 2, 4):
        fully_shard(model[index], mesh=mesh)
    fully_shard(model, mesh=mesh)
    optimizer = build(model)
    train(model, optimizer)
    errors = {}
    for (name, p), q in zip(model.named_parameters(), expected_model.parameters()):
        errors[name] = float((whole(p) - q).abs().max() / q.abs().max())
        for key, value in expected.state[q].items() if state else ():
            if key != "step":
                errors[f"{name}/{key}"] = float((whole(optimizer.state[p][key]) - value).abs().max()
                                                / max(float(value.abs().max()), 1e-300))
    return {"max_rel_error": max(errors.values()), "errors": errors}


def cases(mesh, out_dir: str):
    weights = lambda model: [p for n, p in model.named_parameters() if n.endswith("weight")]  # noqa: E731
    yield "muon", lambda: compare(mesh, lambda model: thalweg.Muon(weights(model), lr=0.05, weight_decay=0.01))
    yield "adafactor", lambda: compare(mesh, lambda model: thalweg.Adafactor(model.parameters(), lr=1e-2,
                                                                             weight_decay=0.01))
    yield "router", lambda: compare(mesh, lambda model: thalweg.create("muon", model, lr=0.05, max_grad_norm=0.3))
    soap = lambda model: thalweg.SOAP(model.parameters(), lr=1e-2, precondition_frequency=1,  # noqa: E731
                                      precondition_1d=True, normalize_grads=True)
    yield "soap", lambda: compare(mesh, soap)
    yield "soap-zero", lambda: compare_zero(soap)
    yield "soap-ddp", lambda: compare_ddp(soap)
    yield "muon-ddp", lambda: compare_ddp(lambda model: thalweg.Muon(weights(model), lr=0.05, weight_decay=0.01))

    def soap_per_shard():  # each process's rows taken for the whole tensor: what a hand-written FSDP2 SOAP gets wrong
        original = thalweg.SOAP._sharded_by_state
        thalweg.SOAP._sharded_by_state = lambda self, group: {}
        try:
            return compare(mesh, soap, state=False)
        finally:
            thalweg.SOAP._sharded_by_state = original

    yield "naive/soap-per-shard", soap_per_shard

    # HSDP: a 2 x 2 mesh, each weight replicated over one dimension and sharded over the other (2 processes each)
    from torch.distributed.device_mesh import init_device_mesh

    hsdp = init_device_mesh("cpu", (2, 2), mesh_dim_names=("replicate", "shard"))
    yield "muon-hsdp", lambda: compare(hsdp, lambda model: thalweg.Muon(weights(model), lr=0.05, weight_decay=0.01))
    yield "soap-hsdp", lambda: compare(hsdp, soap)
    yield "soap-dcp", lambda: resume_through_dcp(
        mesh, os.path.join(out_dir, "ckpt-soap"), torch.float64,
        lambda model: thalweg.SOAP(model.parameters(), lr=1e-2, precondition_frequency=2),
        lambda model, optimizer, steps: dist_train(model, optimizer, torch.float64, steps, sharded_batch=False),
        saved_at=2, steps=5)


def compare_ddp(build) -> dict:
    """DistributedDataParallel around the model: gradients averaged over the processes, whole parameters everywhere."""
    from torch.nn.parallel import DistributedDataParallel

    expected_model = make_model()
    expected = build(expected_model)
    train(expected_model, expected)
    model = DistributedDataParallel(make_model())
    train(model, build(model.module))
    errors = {name: float((p.detach() - q).abs().max() / q.abs().max())
              for (name, p), q in zip(model.module.named_parameters(), expected_model.parameters())}
    return {"max_rel_error": max(errors.values()), "errors": errors}


def compare_zero(build) -> dict:
    """ZeroRedundancyOptimizer around the optimizer: each rank steps its partition of whole parameters."""
    from torch.distributed.optim import ZeroRedundancyOptimizer

    expected_model = make_model()
    expected = build(expected_model)
    train(expected_model, expected)
    model = make_model()
    template = build(nn.Linear(1, 1).double())
    zero = ZeroRedundancyOptimizer(model.parameters(), optimizer_class=type(template),
                                   **{k: v for k, v in template.defaults.items() if k not in ("foreach",)})
    train(model, zero)
    errors = {name: float((p.detach() - q).abs().max() / q.abs().max())
              for (name, p), q in zip(model.named_parameters(), expected_model.parameters())}
    return {"max_rel_error": max(errors.values()), "errors": errors}


if __name__ == "__main__":
    run_cases(sys.argv[1], cases)
