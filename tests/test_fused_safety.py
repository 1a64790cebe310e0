"""backend="fused" follows what its tensors are now, not what they were when it last looked at them.

The fused path remembers, for a list of tensors, which of them a kernel can take and where their data
lies. A ``.data`` assignment keeps the tensor object but can change its storage (``optimizer_to(device)``
helpers: ``v.data = v.data.clone()`` on every state tensor), its strides (``p.data = p.data.t()``) or
its shape; ``p.grad.data = ...`` and ``load_state_dict`` can pair a parameter with a tensor of the
right size but another shape. Whatever the change, the fused step must do what the reference backend
does: the same update, or the same error. Only the public API is used here.

Run as a script (``python tests/test_fused_safety.py swap <case> <what>``), this module runs one
storage-swap case: the tests do so in a fresh interpreter, since a kernel writing through freed memory
may abort the process (heap corruption) instead of failing an assert.
"""

from __future__ import annotations

import copy
import os
import pathlib
import subprocess
import sys

import pytest
import torch

import thalweg
from thalweg import engine
from specs import assert_same_state

pytestmark = pytest.mark.skipif(
    engine.unavailable_reason(torch.device("cpu")) is not None,
    reason=f"backend='fused' unavailable on CPU: {engine.unavailable_reason(torch.device('cpu'))}",
)

SWAP_CASES = {
    "adam": ("Adam", dict(lr=0.01)),
    "adamw-amsgrad": ("AdamW", dict(lr=0.01, weight_decay=0.1, amsgrad=True)),
    "momentum": ("SGD", dict(lr=0.1, momentum=0.9)),
    "lamb": ("LAMB", dict(lr=0.01)),  # two passes over the tensors: the norms, then the step
    "lars": ("LARS", dict(lr=0.5)),
}
# 200k elements: an allocation of its own, returned to the system when freed (a stale address then
# points at unmapped memory); the small ones share the allocator's pools with the new storage.
SWAP_SHAPES = [(200_000,), (3, 5), (), (70_001,)]


def _grads(params, generator):
    for param in params:
        param.grad = torch.randn(param.shape, generator=generator)


def _swap_storage(optimizer: torch.optim.Optimizer, keys: set[str] | None) -> None:
    """What an ``optimizer_to(device)`` helper does: every state tensor (named in ``keys``, or all) keeps
    its object but gets new storage, the old one freed."""
    for state in optimizer.state.values():
        for key, value in state.items():
            if torch.is_tensor(value) and (keys is None or key in keys):
                value.data = value.data.clone()


def _run_swap(case: str, what: str) -> None:
    """Steps the reference and the fused backend alike, swapping the state's storage twice on the way;
    raises AssertionError where they differ."""
    name, options = SWAP_CASES[case]
    keys = None if what == "all" else {"step"}
    runs = []
    for backend in ("reference", "fused"):
        generator = torch.Generator().manual_seed(0)
        params = [torch.randn(shape, generator=generator).requires_grad_() for shape in SWAP_SHAPES]
        optimizer = getattr(thalweg, name)(params, backend=backend, **options)
        for step in range(6):
            _grads(params, generator)
            optimizer.step()
            if step in (1, 3):
                _swap_storage(optimizer, keys)
        runs.append((optimizer, params))
    (reference, reference_params), (fused, fused_params) = runs
    assert_same_state(fused, reference, fused_params, reference_params)


def _in_subprocess(*args: str) -> None:
    here = pathlib.Path(__file__)
    package_root = pathlib.Path(thalweg.__file__).resolve().parents[1]  # the thalweg under test
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(package_root), os.environ.get("PYTHONPATH")]))}
    out = subprocess.run([sys.executable, str(here), *args], capture_output=True, text=True, timeout=300, env=env,
                         cwd=here.parent)
    assert out.returncode == 0, f"exit status {out.returncode}\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"


@pytest.mark.parametrize("case,what", [(case, "all") for case in SWAP_CASES] + [("adam", "step"), ("lamb", "step")])
def test_state_given_new_storage_is_followed(case, what):
    """``v.data = v.data.clone()`` on the state tensors (all of them, or only the step counters, which the
    kernels read and increment in place) between steps: the next steps update the new storage, as the
    reference does, and never write to the freed one."""
    _in_subprocess("swap", case, what)


def _ids(value) -> str | None:
    """Test ids: the options as ``key=value`` pairs."""
    return "-".join(f"{k}={v}" for k, v in value.items()) if isinstance(value, dict) else None


TRANSPOSE_CASES = [("SGD", dict(lr=0.1)), ("SGD", dict(lr=0.1, momentum=0.9)), ("Adam", dict(lr=0.01)),
                   ("LAMB", dict(lr=0.01))]


@pytest.mark.parametrize("name,options", TRANSPOSE_CASES, ids=_ids)
def test_a_parameter_transposed_over_its_own_storage(name, options):
    """``p.data = p.data.t()`` keeps the data pointer and swaps the strides: the update must follow the
    strides (element [i, j] takes gradient [i, j]), as torch's does, not the storage order. A square
    parameter keeps its shape too; a stateless optimizer also takes a non-square one."""
    shapes = [(4, 4), (9,)] + ([(2, 3)] if "momentum" not in options and name == "SGD" else [])

    def run(backend):
        generator = torch.Generator().manual_seed(0)
        params = [torch.randn(shape, generator=generator).requires_grad_() for shape in shapes]
        optimizer = getattr(thalweg, name)(params, backend=backend, **options)
        for step in range(5):
            _grads(params, generator)
            optimizer.step()
            if step == 1:
                for param in params:
                    if param.dim() == 2:
                        param.data = param.data.t()
        return optimizer, params

    reference, fused = run("reference"), run("fused")
    assert not fused[1][0].is_contiguous()
    assert_same_state(fused[0], reference[0], fused[1], reference[1])


STATE_CASES = [("Adam", dict(lr=0.01), "exp_avg_sq"), ("SGD", dict(lr=0.1, momentum=0.9), "momentum_buffer"),
               ("LAMB", dict(lr=0.01), "exp_avg")]


@pytest.mark.parametrize("name,options,key", STATE_CASES, ids=[case[0] + "-" + case[2] for case in STATE_CASES])
def test_a_state_transposed_over_its_own_storage(name, options, key):
    """A state tensor given a transposed view of its own storage (same pointer, same shape for a square
    parameter): the reference reads and writes it by index, so must the fused step."""

    def run(backend):
        generator = torch.Generator().manual_seed(0)
        params = [torch.randn(5, 5, generator=generator).requires_grad_(), torch.randn(7, generator=generator).requires_grad_()]
        optimizer = getattr(thalweg, name)(params, backend=backend, **options)
        for step in range(5):
            _grads(params, generator)
            optimizer.step()
            if step == 1:
                state = optimizer.state[params[0]][key]
                state.data = state.data.t()
        return optimizer, params

    reference, fused = run("reference"), run("fused")
    assert_same_state(fused[0], reference[0], fused[1], reference[1])


def _error_of_each_backend(make, spoil) -> list[type]:
    """The exception type of a step after ``spoil(optimizer, params)``, for the reference then the fused
    backend, each checked to have left the spoiled parameter (``params[0]``) as it was."""
    outcomes = []
    for backend in ("reference", "fused"):
        generator = torch.Generator().manual_seed(0)
        optimizer, params = make(backend, generator)
        spoil(optimizer, params)
        before = params[0].detach().clone()
        with pytest.raises(Exception) as error:
            optimizer.step()
        outcomes.append(type(error.value))
        assert torch.equal(params[0].detach(), before), f"{backend}: the parameter was written"
    assert outcomes[0] is RuntimeError  # what torch raises: the test would be void if the reference took it
    return outcomes


@pytest.mark.parametrize("name,options,key", STATE_CASES, ids=[case[0] + "-" + case[2] for case in STATE_CASES])
@pytest.mark.parametrize("view", ["reshaped", "reinterpreted"])
def test_a_state_given_another_view_of_its_storage_fails_as_the_reference_does(name, options, key, view):
    """A state re-pointed at its own storage with another shape (same pointer, same size) or another
    dtype: the reference refuses it (the shapes do not broadcast; an int32 tensor cannot take a float
    result), and the fused step must neither read it as before nor write through it."""

    def make(backend, generator):
        params = [torch.randn(2, 3, generator=generator).requires_grad_(), torch.randn(7, generator=generator).requires_grad_()]
        optimizer = getattr(thalweg, name)(params, backend=backend, **options)
        for _ in range(2):  # SGD's buffers are new after the first: what the fused path knows comes after
            _grads(params, generator)
            optimizer.step()
        _grads(params, generator)
        return optimizer, params

    def spoil(optimizer, params):
        state = optimizer.state[params[0]][key]
        state.data = state.data.view(3, 2) if view == "reshaped" else state.data.view(torch.int32)

    reference, fused = _error_of_each_backend(make, spoil)
    assert fused is reference


GRAD_CASES = [("SGD", dict(lr=0.1)), ("SGD", dict(lr=0.1, momentum=0.9)), ("Adam", dict(lr=0.01)),
              ("LAMB", dict(lr=0.01)), ("LARS", dict(lr=0.5))]


@pytest.mark.parametrize("name,options", GRAD_CASES, ids=_ids)
@pytest.mark.parametrize("when", ["first-step", "later-step"])
def test_a_gradient_of_the_right_size_but_another_shape_fails_as_the_reference_does(name, options, when):
    """``p.grad.data = g`` with ``g`` of shape (3, 2) for a (2, 3) parameter: same size, so a kernel
    would apply it in storage order; the reference cannot broadcast it and raises."""

    def make(backend, generator):
        params = [torch.randn(2, 3, generator=generator).requires_grad_(), torch.randn(7, generator=generator).requires_grad_()]
        optimizer = getattr(thalweg, name)(params, backend=backend, **options)
        for _ in range(0 if when == "first-step" else 2):
            _grads(params, generator)
            optimizer.step()
        _grads(params, generator)
        return optimizer, params

    def spoil(optimizer, params):
        params[0].grad.data = torch.randn(3, 2)

    reference, fused = _error_of_each_backend(make, spoil)
    assert fused is reference


LOAD_CASES = [("Adam", dict(lr=0.01), "exp_avg"), ("SGD", dict(lr=0.1, momentum=0.9), "momentum_buffer"),
              ("LAMB", dict(lr=0.01), "exp_avg_sq"), ("RMSprop", dict(lr=0.01), "square_avg"),
              ("Adagrad", dict(lr=0.1), "sum")]


@pytest.mark.parametrize("name,options,key", LOAD_CASES, ids=[case[0] + "-" + case[2] for case in LOAD_CASES])
def test_a_loaded_state_of_the_right_size_but_another_shape_fails_as_the_reference_does(name, options, key):
    """A checkpoint whose state for a (2, 2) parameter has shape (4,) (a reshaped model, a hand-edited
    file): ``load_state_dict`` refuses it (torch.optim loads it and its step then raises); put into the
    state by hand instead, the fused step must not apply it in storage order."""
    generator = torch.Generator().manual_seed(0)
    source = [torch.randn(2, 2, generator=generator).requires_grad_(), torch.randn(7, generator=generator).requires_grad_()]
    saver = getattr(thalweg, name)(source, backend="reference", **options)
    _grads(source, generator)
    saver.step()
    checkpoint = copy.deepcopy(saver.state_dict())  # (its per-parameter dicts are the optimizer's own)
    checkpoint["state"][0][key] = checkpoint["state"][0][key].reshape(4)

    def make(backend, generator):
        params = [p.detach().clone().requires_grad_() for p in source]
        optimizer = getattr(thalweg, name)(params, backend=backend, **options)
        with pytest.raises(ValueError, match=r"has shape \(4,\) but the parameter has \(2, 2\)"):
            optimizer.load_state_dict(copy.deepcopy(checkpoint))
        optimizer.load_state_dict(saver.state_dict())
        optimizer.state[params[0]][key] = optimizer.state[params[0]][key].reshape(4)
        _grads(params, generator)
        return optimizer, params

    reference, fused = _error_of_each_backend(make, lambda optimizer, params: None)
    assert fused is reference


if __name__ == "__main__":
    {"swap": _run_swap}[sys.argv[1]](*sys.argv[2:])
