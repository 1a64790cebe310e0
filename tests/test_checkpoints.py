"""Issue 2, point 4: checkpoints. Resuming mid-run is bit-identical to not stopping (in memory and through
torch.save/torch.load), checkpoints cross-load with torch.optim both ways, and named parameters put
``param_names`` in the state dict as torch does."""

from __future__ import annotations

import copy
import io

import pytest
import torch

import thalweg
from specs import SPECS, TORCH_SPECS, Spec, assert_same_state, clone_params, grad_stream, make_params, split_groups

SHAPES = [(3, 5), (), (0,), (7,), (1, 1, 9)]
STEPS, STOP = 30, 12


def step_through(optimizer, params, grads):
    for grad_list in grads:
        for param, grad in zip(params, grad_list):
            param.grad = grad.clone()
        optimizer.step()


def combo_of(spec: Spec):
    return spec.grid[-1]  # the combination with the most options on: the most state to carry


def via_memory(state_dict):
    return copy.deepcopy(state_dict)


def via_file(state_dict):
    buffer = io.BytesIO()
    torch.save(state_dict, buffer)
    buffer.seek(0)
    return torch.load(buffer)  # weights_only=True (torch's default): a checkpoint must need nothing else


@pytest.mark.parametrize("transport", [via_memory, via_file], ids=["memory", "torch.save"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("spec", SPECS, ids=repr)
def test_resume_is_bit_identical_to_not_stopping(spec, backend, dtype, transport):
    combo = combo_of(spec)
    make = lambda ps: spec.build(spec.cls, split_groups(ps, combo, spec), combo, backend=backend)  # noqa: E731
    grads = list(grad_stream(SHAPES, dtype, 3, STEPS))

    straight_params = make_params(SHAPES, dtype, 3)
    straight = make(straight_params)
    step_through(straight, straight_params, grads)

    first_params = make_params(SHAPES, dtype, 3)
    first = make(first_params)
    step_through(first, first_params, grads[:STOP])
    checkpoint = transport(first.state_dict())
    resumed_params = clone_params(first_params)
    del first
    resumed = make(resumed_params)
    resumed.load_state_dict(checkpoint)
    step_through(resumed, resumed_params, grads[STOP:])

    assert_same_state(resumed, straight, resumed_params, straight_params, exact=True)


def run_split(first_cls, second_cls, spec, combo, backend, *, dtype=torch.float32):
    """STOP steps with ``first_cls``, checkpoint, STEPS - STOP more with ``second_cls`` after loading it."""
    def build(cls, params):
        extra = {"backend": backend} if issubclass(cls, thalweg.Optimizer) else {}
        return spec.build(cls, split_groups(params, combo, spec), combo, **extra)

    grads = list(grad_stream(SHAPES, dtype, 4, STEPS))
    params = make_params(SHAPES, dtype, 4)
    first = build(first_cls, params)
    step_through(first, params, grads[:STOP])
    params = clone_params(params)
    second = build(second_cls, params)
    second.load_state_dict(via_file(first.state_dict()))
    step_through(second, params, grads[STOP:])
    return second, params


def torch_class(spec: Spec):
    return torch.optim.SGD if spec.name == "momentum" else spec.counterpart


@pytest.mark.parametrize("direction", ["torch->thalweg", "thalweg->torch"])
@pytest.mark.parametrize("spec", TORCH_SPECS, ids=repr)
def test_checkpoints_cross_load_with_torch(spec, backend, direction):
    combo = {**combo_of(spec), **({"momentum": 0.9} if spec.name == "momentum" else {})}
    cls = spec.cls
    first, second = (torch_class(spec), cls) if direction == "torch->thalweg" else (cls, torch_class(spec))
    mixed, mixed_params = run_split(first, second, spec, combo, backend)
    pure, pure_params = run_split(torch_class(spec), torch_class(spec), spec, combo, backend)
    assert type(mixed) is second
    assert_same_state(mixed, pure, mixed_params, pure_params)


def named_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Tanh(), torch.nn.Linear(3, 2))


def train(model, optimizer, steps, seed=0):
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(8, 4, generator=generator)
        optimizer.zero_grad()
        model(x).square().mean().backward()
        optimizer.step()


@pytest.mark.parametrize("spec", TORCH_SPECS, ids=repr)
def test_named_parameters_are_accepted_with_param_names_as_torch(spec):
    model, twin = named_model(), named_model()
    ours = spec.cls(model.named_parameters(), lr=0.01)
    theirs = spec.counterpart(twin.named_parameters(), lr=0.01)
    train(model, ours, 3)
    train(twin, theirs, 3)
    ours_groups, theirs_groups = ours.state_dict()["param_groups"], theirs.state_dict()["param_groups"]
    assert [g["param_names"] for g in ours_groups] == [g["param_names"] for g in theirs_groups]
    assert ours_groups[0]["param_names"] == ["0.weight", "0.bias", "2.weight", "2.bias"]
    assert_same_state(ours, theirs, list(model.parameters()), list(twin.parameters()))

    # A named checkpoint loads into a fresh named optimizer and into torch's, and training goes on alike.
    resumed_model, torch_model = copy.deepcopy(model), copy.deepcopy(model)
    resumed = spec.cls(resumed_model.named_parameters(), lr=0.01)
    resumed.load_state_dict(via_file(ours.state_dict()))
    into_torch = spec.counterpart(torch_model.named_parameters(), lr=0.01)
    into_torch.load_state_dict(via_file(ours.state_dict()))
    for m, o in ((model, ours), (resumed_model, resumed), (torch_model, into_torch)):
        train(m, o, 3, seed=1)
    assert_same_state(resumed, ours, list(resumed_model.parameters()), list(model.parameters()), exact=True)
    assert_same_state(into_torch, ours, list(torch_model.parameters()), list(model.parameters()))


@pytest.mark.parametrize("transport", [via_memory, via_file], ids=["memory", "torch.save"])
def test_skipped_steps_survive_a_checkpoint(transport):
    """Issue #16, finding 7: the count of skipped non-finite steps restarted at 0 after a resume."""
    params = make_params([(3,), (2, 2)], torch.float32, 0)
    optimizer = thalweg.Adam(params, lr=0.1, skip_nonfinite=True)
    for bad in (True, False, True):
        for p in params:
            p.grad = torch.full_like(p, float("nan") if bad else 1.0)
        optimizer.step()
    assert optimizer.skipped_steps == 2
    saved = transport(optimizer.state_dict())
    resumed = thalweg.Adam(clone_params(params), lr=0.1, skip_nonfinite=True)
    resumed.load_state_dict(saved)
    assert resumed.skipped_steps == 2
    assert "skipped_steps" not in resumed.param_groups[0]  # back where it lives, not a hyper-parameter
    assert resumed.state_dict()["param_groups"][0]["skipped_steps"] == 2
    into_torch = torch.optim.Adam(clone_params(params), lr=0.1)
    into_torch.load_state_dict(transport(optimizer.state_dict()))  # torch ignores the extra group key
