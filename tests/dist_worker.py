"""One rank of the distributed checks (run by tests/test_distributed.py, torchrun-style environment).

    RANK=0 WORLD_SIZE=2 MASTER_ADDR=127.0.0.1 MASTER_PORT=29500 python tests/dist_worker.py OUT_DIR

Every rank builds the same small model from the same seed, runs the single-process reference on the
whole global batch locally, then the same steps under FSDP2, DDP and ZeroRedundancyOptimizer (each
rank on its half of the batch), DCP save/resume, the naive per-shard norm and the bad-input checks.
Each check is recorded in OUT_DIR/rank{R}.json (an error message instead of a crash), so that one
process launch serves all tests and a failing check fails only its own test.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
import traceback

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.optim import ZeroRedundancyOptimizer
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor
from torch.nn.parallel import DistributedDataParallel

import thalweg
import thalweg.distributed
from thalweg import engine

STEPS = 4
GLOBAL_BATCH = 8
# max_grad_norm is below the gradients' norm on the first steps, so clipping (and its global norm) acts.
MAX_GRAD_NORM = 0.3
# Hyper-parameters that exercise each optimizer's weight decay, momentum and trust ratio.
OPTIMIZERS = {
    "sgd": (thalweg.SGD, dict(lr=0.1, weight_decay=1e-2)),
    "momentum": (thalweg.Momentum, dict(lr=0.05, weight_decay=1e-2, nesterov=True)),
    "adam": (thalweg.Adam, dict(lr=1e-2, weight_decay=1e-2)),
    "adamw": (thalweg.AdamW, dict(lr=1e-2, weight_decay=0.1)),
    "rmsprop": (thalweg.RMSprop, dict(lr=1e-2, momentum=0.5, centered=True, weight_decay=1e-2)),
    "adagrad": (thalweg.Adagrad, dict(lr=0.1, lr_decay=0.01, weight_decay=1e-2)),
    "lars": (thalweg.LARS, dict(lr=0.5, weight_decay=1e-3, trust_coefficient=0.02)),
    "lamb": (thalweg.LAMB, dict(lr=1e-2, weight_decay=0.01)),
    "nadam": (thalweg.NAdam, dict(lr=1e-2, weight_decay=1e-2)),
    "radam": (thalweg.RAdam, dict(lr=1e-2, weight_decay=1e-2, decoupled_weight_decay=True)),
    "adamax": (thalweg.Adamax, dict(lr=1e-2, weight_decay=1e-2)),
    "adadelta": (thalweg.Adadelta, dict(lr=1.0, weight_decay=1e-2)),
    "asgd": (thalweg.ASGD, dict(lr=1e-2, t0=1.0, lambd=1e-2, weight_decay=1e-2)),
    "rprop": (thalweg.Rprop, dict(lr=1e-2)),
    # cautious masks and StableAdamW's RMS are means over whole tensors: summed across the shards
    "lion": (thalweg.Lion, dict(lr=1e-3, weight_decay=0.1, cautious=True)),
    "adan": (thalweg.Adan, dict(lr=1e-2, weight_decay=1e-2, cautious=True)),
    "ademamix": (thalweg.AdEMAMix, dict(lr=1e-2, weight_decay=1e-2, alpha_warmup=3, beta3_warmup=3, cautious=True)),
    "adopt": (thalweg.ADOPT, dict(lr=1e-2, weight_decay=1e-2, decoupled=True)),
    "stableadamw": (thalweg.StableAdamW, dict(lr=1e-2, betas=(0.5, 0.6), weight_decay=1e-2, cautious=True)),
    # a matrix's column statistics and the mean of its row factor: sums over every process's rows
    "adafactor": (thalweg.Adafactor, dict(lr=1e-2, weight_decay=1e-2)),
}


# the optimizers whose step reduces over whole tensors (norms, means)
NORM_USERS = ("lars", "lamb", "lion", "stableadamw", "adafactor")


def make_model(dtype: torch.dtype, seed: int = 0) -> nn.Module:
    # 5 and 3 output rows do not split evenly over 2 processes, and the 1-row head leaves rank 1 an
    # empty shard: FSDP2's uneven and empty shards are covered.
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3), nn.Tanh(), nn.Linear(3, 1)).to(dtype)


def batch(step: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1000 + step)
    x = torch.randn(GLOBAL_BATCH, 6, generator=generator, dtype=torch.float64).to(dtype)
    y = torch.randn(GLOBAL_BATCH, 1, generator=generator, dtype=torch.float64).to(dtype)
    return x, y


def half(tensor: torch.Tensor) -> torch.Tensor:
    rows = GLOBAL_BATCH // dist.get_world_size()
    return tensor[dist.get_rank() * rows:(dist.get_rank() + 1) * rows]


def param_groups(name: str, model: nn.Module) -> list[dict]:
    """Weights in the default group, biases without decay (and, for LARS/LAMB, without trust ratio)."""
    weights = [p for n, p in model.named_parameters() if n.endswith("weight")]
    biases = [p for n, p in model.named_parameters() if n.endswith("bias")]
    no_decay = dict(weight_decay=0.0, trust_ratio=False) if name in ("lars", "lamb") else dict(weight_decay=0.0)
    if name == "rprop":  # no weight decay to exempt anything from
        no_decay = {}
    return [{"params": weights}, {"params": biases, **no_decay}]


def make_optimizer(name: str, model: nn.Module, **extra) -> thalweg.Optimizer:
    cls, kwargs = OPTIMIZERS[name]
    return cls(param_groups(name, model), **kwargs, max_grad_norm=MAX_GRAD_NORM, **extra)


def train(model: nn.Module, optimizer, dtype: torch.dtype, steps: range, *, sharded_batch: bool) -> list[float]:
    """Run ``steps``; returns the gradient norms the optimizer clipped with (as floats)."""
    grad_norms = []
    for step in steps:
        x, y = batch(step, dtype)
        if sharded_batch:
            x, y = half(x), half(y)
        loss = nn.functional.mse_loss(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        inner = getattr(optimizer, "optim", optimizer)
        grad_norms.append(float(inner.last_grad_norm) if inner.last_grad_norm is not None else float("nan"))
    return grad_norms


def full_params(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n.replace("module.", ""): (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone()
            for n, p in model.named_parameters()}


def relative_error(params: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> float:
    """Largest ‖a − b‖ / ‖b‖ over the tensors."""
    return max(float((params[n] - expected[n]).norm() / expected[n].norm()) for n in expected)


def fsdp2(model: nn.Module, mesh) -> nn.Module:
    fully_shard(model[0], mesh=mesh)
    fully_shard(model[2], mesh=mesh)
    fully_shard(model[4], mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def single_run(name: str, dtype: torch.dtype, **extra):
    model = make_model(dtype)
    optimizer = make_optimizer(name, model, **extra)
    norms = train(model, optimizer, dtype, range(STEPS), sharded_batch=False)
    return full_params(model), norms


def compare(name: str, dtype: torch.dtype, model: nn.Module, optimizer, expected) -> dict:
    norms = train(model, optimizer, dtype, range(STEPS), sharded_batch=True)
    params = full_params(model)
    expected_params, expected_norms = expected
    norm_error = max(abs(a - b) / b for a, b in zip(norms, expected_norms))
    return {"param_rel_error": relative_error(params, expected_params), "grad_norm_rel_error": norm_error}


@contextlib.contextmanager
def counting_all_reduces(counter: list[int]):
    original = dist.all_reduce

    def counted(*args, **kwargs):
        counter.append(1)
        return original(*args, **kwargs)

    dist.all_reduce = counted
    try:
        yield
    finally:
        dist.all_reduce = original


def check_equivalence(record, mesh) -> None:
    for dtype in (torch.float64, torch.float32):
        dtype_name = str(dtype).removeprefix("torch.")
        for name in OPTIMIZERS:
            expected = single_run(name, dtype)

            def fsdp2_run(**extra):
                model = fsdp2(make_model(dtype), mesh)
                return compare(name, dtype, model, make_optimizer(name, model, **extra), expected)

            def ddp_run():
                model = DistributedDataParallel(make_model(dtype))
                return compare(name, dtype, model, make_optimizer(name, model), expected)

            def zero_run():
                model = DistributedDataParallel(make_model(dtype))
                cls, kwargs = OPTIMIZERS[name]
                zero = ZeroRedundancyOptimizer(param_groups(name, model), optimizer_class=cls, **kwargs,
                                               max_grad_norm=MAX_GRAD_NORM)
                thalweg.distributed.reduce_grad_norm_over(zero)
                return compare(name, dtype, model, zero, expected)

            record(f"fsdp2/{name}/{dtype_name}", fsdp2_run)
            record(f"ddp/{name}/{dtype_name}", ddp_run)
            record(f"zero/{name}/{dtype_name}", zero_run)
            if name in NORM_USERS:
                record(f"fsdp2-reference/{name}/{dtype_name}", lambda: fsdp2_run(backend="reference"))
                record(f"fsdp2-foreach/{name}/{dtype_name}", lambda: fsdp2_run(backend="foreach"))
            # The fused kernels run on the local shards; LARS/LAMB sum their norms across them between passes.
            if engine.unavailable_reason(torch.device("cpu")) is None:
                record(f"fsdp2-fused/{name}/{dtype_name}", lambda: fsdp2_run(backend="fused"))


def check_naive_norm_differs(record, mesh) -> None:
    """The same FSDP2 run with the cross-shard sums switched off: per-shard norms, a different answer."""
    for name in NORM_USERS:
        expected = single_run(name, torch.float64)

        def naive():
            original = thalweg.distributed.Sharding.sum_across_shards_
            thalweg.distributed.Sharding.sum_across_shards_ = lambda self, values: None
            try:
                model = fsdp2(make_model(torch.float64), mesh)
                return compare(name, torch.float64, model, make_optimizer(name, model), expected)
            finally:
                thalweg.distributed.Sharding.sum_across_shards_ = original

        record(f"naive/{name}/float64", naive)

    # ZeRO without reduce_grad_norm_over clips each partition by its own norm: the documented limitation.
    def zero_unreduced():
        model = DistributedDataParallel(make_model(torch.float64))
        cls, kwargs = OPTIMIZERS["lamb"]
        zero = ZeroRedundancyOptimizer(param_groups("lamb", model), optimizer_class=cls, **kwargs, max_grad_norm=MAX_GRAD_NORM)
        return compare("lamb", torch.float64, model, zero, single_run("lamb", torch.float64))

    record("naive/zero-unreduced-grad-norm/float64", zero_unreduced)

    # Adafactor with only its column statistics (and row-factor mean) taken from each shard's own rows; the engine's
    # norms still summed: what a hand-written FSDP2 Adafactor gets wrong
    def adafactor_columns_per_shard():
        import types

        import thalweg.optim.adafactor as module

        class PerShard:
            def __getattr__(self, name):
                return getattr(thalweg.distributed, name)

            @staticmethod
            def group_sharding(*args):
                sharding = thalweg.distributed.group_sharding(*args)
                return None if sharding is None else types.SimpleNamespace(sum_across_shards_=lambda values: None)

        original, module.distributed = module.distributed, PerShard()
        try:
            model = fsdp2(make_model(torch.float64), mesh)
            return compare("adafactor", torch.float64, model, make_optimizer("adafactor", model),
                           single_run("adafactor", torch.float64))
        finally:
            module.distributed = original

    record("naive/adafactor-columns-per-shard/float64", adafactor_columns_per_shard)


def check_collectives(record, mesh) -> None:
    """All-reduces per LAMB step under FSDP2: one for the clipping norm, one for the weight group's trust ratios."""

    def count():
        model = fsdp2(make_model(torch.float32), mesh)
        optimizer = make_optimizer("lamb", model)
        x, y = batch(0, torch.float32)
        nn.functional.mse_loss(model(half(x)), half(y)).backward()
        calls: list[int] = []
        with counting_all_reduces(calls):
            optimizer.step()
        return {"all_reduces": len(calls)}

    record("collectives/lamb", count)


def check_skip_nonfinite(record, mesh) -> None:
    """An inf in one rank's shard only: every rank skips the step (the norm is global), nothing changes."""

    def run():
        model = fsdp2(make_model(torch.float32), mesh)
        optimizer = make_optimizer("lamb", model, skip_nonfinite=True)
        x, y = batch(0, torch.float32)
        nn.functional.mse_loss(model(half(x)), half(y)).backward()
        before = full_params(model)
        if dist.get_rank() == 0:
            model[0].weight.grad.to_local()[0, 0] = float("inf")
        optimizer.step()
        changed = max(float((p - before[n]).abs().max()) for n, p in full_params(model).items())
        return {"skipped_steps": optimizer.skipped_steps, "param_change": changed}

    record("skip-nonfinite/lamb", run)


def resume_through_dcp(mesh, path: str, dtype: torch.dtype, build_optimizer, train_steps, *, saved_at: int = 2,
                       steps: int = STEPS) -> dict:
    """Train an FSDP2 model ``saved_at`` steps on 2 processes, save model and optimizer with DCP, train on to
    ``steps``; then resume a fresh model and optimizer from the checkpoint and train the same steps. Returns how far
    the resumed parameters end from the uninterrupted ones, and how much materialising the fresh state moved them.
    ``train_steps(model, optimizer, steps: range)`` runs the steps (each rank on its half of the batch)."""
    model = fsdp2(make_model(dtype), mesh)
    optimizer = build_optimizer(model)
    train_steps(model, optimizer, range(0, saved_at))
    dcp.save({"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, optimizer)},
             checkpoint_id=path)
    train_steps(model, optimizer, range(saved_at, steps))
    uninterrupted = full_params(model)

    resumed = fsdp2(make_model(dtype, seed=1), mesh)
    optimizer2 = build_optimizer(resumed)
    before = full_params(resumed)
    # get_optimizer_state_dict materialises empty state with a step at lr=0 and zero grads.
    state = {"model": get_model_state_dict(resumed), "optim": get_optimizer_state_dict(resumed, optimizer2)}
    materialise_change = max(float((p - before[n]).abs().max()) for n, p in full_params(resumed).items())
    dcp.load(state, checkpoint_id=path)
    set_model_state_dict(resumed, state["model"])
    set_optimizer_state_dict(resumed, optimizer2, state["optim"])
    train_steps(resumed, optimizer2, range(saved_at, steps))
    after = full_params(resumed)
    return {"max_abs_diff": max(float((after[n] - p).abs().max()) for n, p in uninterrupted.items()),
            "materialise_change": materialise_change}


def check_dcp(record, mesh, out_dir: str) -> None:
    """Save after 2 steps on 2 processes, resume into a fresh model and optimizer, run 2 more: as if never stopped."""
    for dtype in (torch.float64, torch.float32):
        dtype_name = str(dtype).removeprefix("torch.")
        for name in OPTIMIZERS:
            def run():
                return resume_through_dcp(
                    mesh, os.path.join(out_dir, f"ckpt-{name}-{dtype_name}"), dtype,
                    lambda model: make_optimizer(name, model),
                    lambda model, optimizer, steps: train(model, optimizer, dtype, steps, sharded_batch=True))

            record(f"dcp/{name}/{dtype_name}", run)


def check_bad_input(record, mesh) -> None:
    def mixed():
        model = make_model(torch.float32)
        fully_shard(model[0], mesh=mesh)  # the other layers stay plain
        optimizer = thalweg.LAMB(model.parameters())
        x, y = batch(0, torch.float32)
        nn.functional.mse_loss(model(half(x)), half(y)).backward()
        return _error_of(optimizer.step)

    def two_meshes():
        other = init_device_mesh("cpu", (dist.get_world_size(), 1), mesh_dim_names=("dp", "tp"))
        a = nn.Parameter(distribute_tensor(torch.ones(4, 3), mesh, [Shard(0)]))
        b = nn.Parameter(distribute_tensor(torch.ones(4, 3), other, [Shard(0), Replicate()]))
        optimizer = thalweg.LARS([a, b], lr=0.1)
        for p in (a, b):
            p.grad = torch.ones_like(p)
        return _error_of(optimizer.step)

    record("bad-input/mixed", mixed)
    record("bad-input/two-meshes", two_meshes)


def _error_of(fn) -> dict:
    try:
        fn()
    except Exception as error:  # noqa: BLE001 - the test asserts on the type and message
        return {"error_type": type(error).__name__, "message": str(error)}
    return {"error_type": None, "message": ""}


def run_cases(out_dir: str, cases) -> None:
    """A worker's whole life for a small check of its own (tests/*_dist_worker.py): join the gloo group, run
    ``cases(mesh, out_dir)`` — (key, function) pairs — recording each result or its traceback, write this rank's JSON."""
    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    results = {}
    for key, fn in cases(mesh, out_dir):
        try:
            results[key] = fn()
        except Exception:  # noqa: BLE001 - recorded for the test
            results[key] = {"exception": traceback.format_exc()}
    with open(os.path.join(out_dir, f"rank{dist.get_rank()}.json"), "w") as file:
        json.dump(results, file, indent=1)
    dist.destroy_process_group()
    exit_now()


def exit_now() -> None:
    """End this rank once its results are written, skipping the interpreter's teardown: on a loaded machine a rank
    has aborted there ("terminate called without an active exception", a C++ thread still joinable as its object is
    destroyed) after writing its results — once in about ten fresh-clone runs of the suite."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def muon_on_weights(model: nn.Module) -> thalweg.Muon:
    """Muon on the model's weight matrices (FSDP2 splits their rows: 5 -> 3 + 2, 3 -> 2 + 1, 1 -> 1 + 0)."""
    weights = [p for n, p in model.named_parameters() if n.endswith("weight")]
    return thalweg.Muon(weights, lr=0.05, weight_decay=0.01, adjust_lr_fn="match_rms_adamw")


def check_muon(record, mesh, out_dir: str) -> None:
    """Muon under FSDP2: each matrix orthogonalised whole, once, by one process, against one process; with each
    shard orthogonalised on its own instead, a different answer; DCP resume."""
    import thalweg.optim.muon as muon

    def train_muon(dtype):
        return lambda model, optimizer, steps: train(model, optimizer, dtype, steps, sharded_batch=True)

    for dtype in (torch.float64, torch.float32):
        dtype_name = str(dtype).removeprefix("torch.")
        expected_model = make_model(dtype)
        train(expected_model, muon_on_weights(expected_model), dtype, range(STEPS), sharded_batch=False)
        expected = full_params(expected_model)

        def run(dtype=dtype, expected=expected):
            model = fsdp2(make_model(dtype), mesh)
            optimizer = muon_on_weights(model)
            train(model, optimizer, dtype, range(STEPS), sharded_batch=True)
            state = optimizer.state[model[0].weight]["momentum_buffer"]
            return {"param_rel_error": relative_error(full_params(model), expected),
                    "buffer_is_dtensor": isinstance(state, DTensor)}

        record(f"fsdp2/muon/{dtype_name}", run)
        record(f"dcp/muon/{dtype_name}", lambda dtype=dtype, dtype_name=dtype_name: resume_through_dcp(
            mesh, os.path.join(out_dir, f"ckpt-muon-{dtype_name}"), dtype, muon_on_weights, train_muon(dtype)))

    def per_shard(split, coefficients, steps, eps):  # what a hand-written FSDP2 Muon does
        for position, _, update in split:
            if not update.numel():  # (an empty shard)
                yield position, update.clone()
                continue
            yield position, muon.orthogonalize(update.reshape(update.shape[0], -1), coefficients, steps, eps).reshape(
                update.shape)

    def naive():
        original, muon._orthogonalize_split = muon._orthogonalize_split, per_shard
        try:
            return _naive_muon()
        finally:
            muon._orthogonalize_split = original

    def _naive_muon():
        expected_model = make_model(torch.float64)
        train(expected_model, muon_on_weights(expected_model), torch.float64, range(STEPS), sharded_batch=False)
        model = fsdp2(make_model(torch.float64), mesh)
        train(model, muon_on_weights(model), torch.float64, range(STEPS), sharded_batch=True)
        return {"param_rel_error": relative_error(full_params(model), full_params(expected_model))}

    record("naive/muon-per-shard/float64", naive)

    def router(model):  # thalweg.create("muon", model): hidden matrices to Muon, the rest to AdamW; clipping across both
        return thalweg.create("muon", model, lr=0.05, max_grad_norm=MAX_GRAD_NORM)

    for dtype in (torch.float64, torch.float32):
        dtype_name = str(dtype).removeprefix("torch.")

        def routed(dtype=dtype):
            reference = make_model(dtype)
            norms = train(reference, router(reference), dtype, range(STEPS), sharded_batch=False)
            model = fsdp2(make_model(dtype), mesh)
            return compare("muon-router", dtype, model, router(model), (full_params(reference), norms))

        record(f"fsdp2/muon-router/{dtype_name}", routed)


def main() -> None:
    out_dir = sys.argv[1]
    only = set(sys.argv[2].split(",")) if len(sys.argv) > 2 else None
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.set_num_threads(1)
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    results: dict[str, dict] = {}

    def record(key: str, fn) -> None:
        start = time.perf_counter()
        try:
            results[key] = fn()
        except Exception:  # noqa: BLE001 - recorded for the test that owns the check
            results[key] = {"exception": traceback.format_exc()}
        results[key]["seconds"] = time.perf_counter() - start

    checks = {"equivalence": lambda: check_equivalence(record, mesh),
              "naive": lambda: check_naive_norm_differs(record, mesh),
              "collectives": lambda: check_collectives(record, mesh),
              "skip-nonfinite": lambda: check_skip_nonfinite(record, mesh),
              "dcp": lambda: check_dcp(record, mesh, out_dir),
              "bad-input": lambda: check_bad_input(record, mesh),
              "muon": lambda: check_muon(record, mesh, out_dir)}
    for check_name, check in checks.items():
        if only is None or check_name in only:
            check()
            dist.barrier()
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as file:
        json.dump(results, file, indent=1)
    dist.destroy_process_group()
    exit_now()


if __name__ == "__main__":
    main()
