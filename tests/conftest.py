"""Shared fixtures: hypothesis profiles and the backend matrix."""

from __future__ import annotations

import os

import torch

# Without a GPU, Triton kernels can only run in Triton's interpreter, and TRITON_INTERPRET must be set
# before triton is imported (its own library functions, tl.zeros and tl.sum among them, are decorated at
# import). Building any torch optimizer imports torch._dynamo, which imports triton: so here, first.
if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

from thalweg import engine  # noqa: E402

# Examples are cheap (tiny tensors, 25-40 steps) but many tests draw them: modest counts keep the
# core suite within its CI budget. THALWEG_HYPOTHESIS=thorough for a longer local hunt.
settings.register_profile("ci", max_examples=15, deadline=None, derandomize=True,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
settings.register_profile("thorough", max_examples=300, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
settings.load_profile(os.environ.get("THALWEG_HYPOTHESIS", "ci"))

BACKENDS = ("reference", "foreach", "fused")


def _skip_unavailable(name: str) -> None:
    if name == "fused":
        reason = engine.unavailable_reason(torch.device("cpu"))
        if reason is not None:
            pytest.skip(f"backend='fused' unavailable on CPU: {reason}")


@pytest.fixture(params=BACKENDS)
def backend(request) -> str:
    """Every concrete backend; 'fused' is skipped, with the registry's reason, until it can run here."""
    _skip_unavailable(request.param)
    return request.param


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


@pytest.fixture
def one_torch_thread():
    """One torch thread for the test: with two xdist workers on two cores, torch's OpenMP teams spin against
    each other on small matrix products (a Muon parity case took 50 s instead of 3)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
