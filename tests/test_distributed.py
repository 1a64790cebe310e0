"""Every optimizer under FSDP2, DDP, ZeroRedundancyOptimizer and DCP equals the single-process run.

Process start-up is the cost (importing torch twice), so ONE launch of two gloo processes on loopback
(tests/dist_worker.py, torchrun-style environment) runs every check and writes its results; the tests
below read them, one test per check. Under pytest-xdist the workers share that launch (a file lock).
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import thalweg
import thalweg.distributed
from thalweg import engine

pytestmark = pytest.mark.timeout(400)

WORLD_SIZE = 2
LAUNCH_TIMEOUT_S = 300
OPTIMIZERS = ("sgd", "momentum", "adam", "adamw", "rmsprop", "adagrad", "lars", "lamb", "nadam", "radam", "adamax",
              "adadelta", "asgd", "rprop", "lion", "adan", "ademamix", "adopt", "stableadamw", "adafactor")
DTYPES = ("float64", "float32")
# The issue asks for 1e-5 (float64) and 1e-4 (float32); measured errors are ~1e-16 and ~2e-7.
TOLERANCE = {"float64": 1e-10, "float32": 1e-5}
WORKER = Path(__file__).with_name("dist_worker.py")

needs_gloo = pytest.mark.skipif(not (torch.distributed.is_available() and torch.distributed.is_gloo_available()),
                                reason="torch.distributed with the gloo backend is not available in this build")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _launch(out_dir: Path) -> tuple[int, str]:
    """Start the ranks, wait at most LAUNCH_TIMEOUT_S, kill what is left; returns (worst exit code, logs)."""
    env = {**os.environ, "WORLD_SIZE": str(WORLD_SIZE), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()),
           "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(filter(None, [str(WORKER.parent), os.environ.get("PYTHONPATH")]))}
    procs = []
    for rank in range(WORLD_SIZE):
        log = open(out_dir / f"log{rank}.txt", "w")
        procs.append((subprocess.Popen([sys.executable, str(WORKER), str(out_dir)], stdout=log, stderr=subprocess.STDOUT,
                                       env={**env, "RANK": str(rank), "LOCAL_RANK": str(rank)}), log))
    codes = []
    deadline = time.monotonic() + LAUNCH_TIMEOUT_S
    try:
        for proc, _ in procs:
            try:
                codes.append(proc.wait(timeout=max(1.0, deadline - time.monotonic())))
            except subprocess.TimeoutExpired:
                codes.append(-9)
                break
    finally:
        for proc, log in procs:  # only the processes started here
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            log.close()
    logs = "\n".join((out_dir / f"log{rank}.txt").read_text()[-3000:] for rank in range(WORLD_SIZE))
    return max(codes, key=abs), logs


@pytest.fixture(scope="session")
def results(tmp_path_factory) -> list[dict]:
    """The per-rank results of the one launch, shared by all xdist workers of this session."""
    # Under xdist each worker's basetemp is a child of this session's directory; alone, it is that directory.
    session_dir = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        session_dir = session_dir.parent
    shared = session_dir / "thalweg-distributed"
    shared.mkdir(exist_ok=True)
    with open(shared / "lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        done = shared / "done.json"
        if not done.exists():
            for attempt in range(2):  # a second try only if the free port was taken in between
                code, logs = _launch(shared)
                if code == 0 or "address already in use" not in logs.lower():
                    break
            done.write_text(json.dumps({"code": code, "logs": logs}))
        status = json.loads(done.read_text())
    if status["code"] != 0:
        pytest.fail(f"the distributed worker failed (exit code {status['code']}):\n{status['logs']}")
    return [json.loads((shared / f"rank{rank}.json").read_text()) for rank in range(WORLD_SIZE)]


def _result(results: list[dict], key: str) -> list[dict]:
    for rank_results in results:
        entry = rank_results.get(key)
        assert entry is not None, f"the worker recorded no result for {key}"
        assert "exception" not in entry, f"{key} raised:\n{entry['exception']}"
    return [rank_results[key] for rank_results in results]


CASES = [(mode, name, dtype) for mode in ("fsdp2", "ddp", "zero") for name in OPTIMIZERS for dtype in DTYPES]
NORM_USERS = ("lars", "lamb", "lion", "stableadamw", "adafactor")  # their steps reduce over whole tensors
CASES += [(mode, name, dtype) for mode in ("fsdp2-reference", "fsdp2-foreach") for name in NORM_USERS for dtype in DTYPES]


@needs_gloo
@pytest.mark.parametrize("mode,name,dtype", CASES, ids=["/".join(case) for case in CASES])
def test_matches_single_process(results, mode, name, dtype):
    """Params after 4 clipped steps, and the clipping norm at every step, equal the single-process run on the global batch."""
    for entry in _result(results, f"{mode}/{name}/{dtype}"):
        assert entry["param_rel_error"] <= TOLERANCE[dtype], entry
        assert entry["grad_norm_rel_error"] <= TOLERANCE[dtype], entry


@needs_gloo
@pytest.mark.parametrize("name", OPTIMIZERS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_fused_backend_on_local_shards(results, name, dtype):
    """backend="fused" under FSDP2: the kernels see plain local shards; LARS/LAMB stay fused, their per-tensor
    norms summed across the shards between the two passes."""
    reason = engine.unavailable_reason(torch.device("cpu"))
    if reason is not None:
        pytest.skip(f"backend='fused' unavailable on CPU: {reason}")
    for entry in _result(results, f"fsdp2-fused/{name}/{dtype}"):
        assert entry["param_rel_error"] <= TOLERANCE[dtype], entry
        assert entry["grad_norm_rel_error"] <= TOLERANCE[dtype], entry


@needs_gloo
@pytest.mark.parametrize("name", NORM_USERS)
def test_per_shard_norms_would_be_wrong(results, name):
    """With the cross-shard sum switched off, the comparison above fails by orders of magnitude."""
    for entry in _result(results, f"naive/{name}/float64"):
        assert entry["param_rel_error"] > 1e-3, entry
        assert entry["grad_norm_rel_error"] > 1e-2, entry


@needs_gloo
def test_adafactor_column_statistics_from_each_shard_would_be_wrong(results):
    """Adafactor under FSDP2 with its column sums (and row-factor mean) over each process's rows only — the engine's
    norms still summed — ends far from the single process: the all-reduces of its stage are what makes it exact."""
    for entry in _result(results, "naive/adafactor-columns-per-shard/float64"):
        assert entry["param_rel_error"] > 1e-4, entry


@needs_gloo
@pytest.mark.parametrize("dtype", DTYPES)
def test_muon_orthogonalises_each_whole_matrix_once(results, dtype):
    """Muon under FSDP2 (rows split, one matrix to an empty shard): each matrix gathered by one process, orthogonalised
    whole and scattered back — the single process's parameters; its momentum a DTensor; DCP resumes exactly."""
    for entry in _result(results, f"fsdp2/muon/{dtype}"):
        assert entry["param_rel_error"] <= TOLERANCE[dtype] and entry["buffer_is_dtensor"], entry
    for entry in _result(results, f"dcp/muon/{dtype}"):
        assert entry["max_abs_diff"] == 0.0 and entry["materialise_change"] == 0.0, entry


@needs_gloo
@pytest.mark.parametrize("dtype", DTYPES)
def test_the_muon_router_under_fsdp2_matches_one_process(results, dtype):
    """thalweg.create("muon", model) on an FSDP2 model: Muon's matrices and AdamW's vectors, clipped by the norm of all
    gradients counted whole — the single process's parameters and clipping norms."""
    for entry in _result(results, f"fsdp2/muon-router/{dtype}"):
        assert entry["param_rel_error"] <= TOLERANCE[dtype], entry
        assert entry["grad_norm_rel_error"] <= TOLERANCE[dtype], entry


@needs_gloo
def test_matrix_optimizers_on_four_processes_match_one(tmp_path):
    """4 gloo processes, shards uneven and some empty (tests/matrix_dist_worker.py): Muon and SOAP (each process
    owning some matrices), Adafactor and the Muon router give one process's parameters and state (float64); Muon and
    SOAP also under HSDP (2 x 2: replicated over one mesh dimension, sharded over the other) and DDP, SOAP under
    ZeroRedundancyOptimizer, and resumed from a distributed checkpoint saved on the 4 processes as if never stopped."""
    from specs import run_on_processes

    results = run_on_processes(WORKER.with_name("matrix_dist_worker.py"), tmp_path, world_size=4)
    for rank, entries in enumerate(results):
        for key in ("muon", "adafactor", "router", "soap", "soap-zero", "muon-hsdp", "soap-hsdp", "soap-ddp",
                    "muon-ddp"):
            entry = entries[key]
            assert "exception" not in entry, f"rank {rank} {key} raised:\n{entry['exception']}"
            assert entry["max_rel_error"] <= TOLERANCE["float64"], (rank, key, entry)
        entry = entries["naive/soap-per-shard"]  # (the check can fail: factors of each shard's rows are another SOAP)
        assert "exception" not in entry and entry["max_rel_error"] > 1e-2, (rank, entry)
        entry = entries["soap-dcp"]
        assert "exception" not in entry, f"rank {rank} soap-dcp raised:\n{entry['exception']}"
        assert entry["max_abs_diff"] == 0.0 and entry["materialise_change"] == 0.0, (rank, entry)


@needs_gloo
def test_muon_orthogonalising_each_shard_on_its_own_would_be_wrong(results):
    for entry in _result(results, "naive/muon-per-shard/float64"):
        assert entry["param_rel_error"] > 1e-2, entry


@needs_gloo
def test_zero_without_reduce_grad_norm_over_clips_per_partition(results):
    """The documented ZeRO limitation is real: without reduce_grad_norm_over each rank sees its partition's norm."""
    for entry in _result(results, "naive/zero-unreduced-grad-norm/float64"):
        assert entry["grad_norm_rel_error"] > 1e-2, entry


@needs_gloo
def test_one_all_reduce_per_norm_use(results):
    """A LAMB step under FSDP2 issues 2 all-reduces: the clipping norm, and all trust-ratio norms of the weight group."""
    for entry in _result(results, "collectives/lamb"):
        assert entry["all_reduces"] == 2, entry


@needs_gloo
def test_nonfinite_grad_on_one_shard_skips_on_every_rank(results):
    for entry in _result(results, "skip-nonfinite/lamb"):
        assert entry["skipped_steps"] == 1 and entry["param_change"] == 0.0, entry


@needs_gloo
@pytest.mark.parametrize("name", OPTIMIZERS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_dcp_resume_is_exact(results, name, dtype):
    """Save after 2 steps, resume a fresh model and optimizer, 2 more steps: bitwise the uninterrupted run;
    DCP's materialising step (lr=0, zero grads) leaves the parameters untouched."""
    for entry in _result(results, f"dcp/{name}/{dtype}"):
        assert entry["materialise_change"] == 0.0, entry
        assert entry["max_abs_diff"] == 0.0, entry


@needs_gloo
@pytest.mark.parametrize("case,words", [("mixed", ["param group 0", "mixes sharded (DTensor) and plain"]),
                                        ("two-meshes", ["param group 0", "device mesh"])])
def test_bad_sharding_is_a_value_error(results, case, words):
    for entry in _result(results, f"bad-input/{case}"):
        assert entry["error_type"] == "ValueError", entry
        for word in words:
            assert word in entry["message"], entry


# -- without processes -----------------------------------------------------------------------------


def test_plain_groups_have_no_sharding():
    params = [torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(2, 2))]
    assert thalweg.distributed.group_sharding(0, params) is None
    assert thalweg.distributed.local(params[0]) is params[0]


def test_reduce_grad_norm_over_rejects_other_optimizers():
    with pytest.raises(TypeError, match="thalweg optimizer"):
        thalweg.distributed.reduce_grad_norm_over(torch.optim.SGD([torch.nn.Parameter(torch.ones(1))]), process_group=object())
