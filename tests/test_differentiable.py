"""differentiable=True (issue 12): the step is recorded by autograd, so gradients flow from what it writes —
the new parameter and state — back to the parameter, gradient and state it read (meta-learning, learned
optimizers, hyper-gradients). The rule function runs out of place on the reference backend.

Every optimizer is checked with ``torch.autograd.gradcheck`` (float64, as torch's own suite does), and those
torch has are also checked against torch's differentiable implementation: same outputs, same gradients.
"""

from __future__ import annotations

import pytest
import torch
from torch.autograd import gradcheck

from specs import SPECS, Spec

# one option combination per optimizer, with every state role used; Adadelta's eps is raised so that
# gradcheck's finite differences (step 1e-6) stay small against sqrt(acc_delta + eps)
OPTIONS = {"sgd": dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.1),
           "momentum": dict(lr=0.1, weight_decay=0.1), "adam": dict(lr=0.1, weight_decay=0.1, amsgrad=True),
           "adamw": dict(lr=0.1, weight_decay=0.1), "nadam": dict(lr=0.1, weight_decay=0.1),
           "radam": dict(lr=0.1, betas=(0.9, 0.6)), "adamax": dict(lr=0.1, weight_decay=0.1),
           "rmsprop": dict(lr=0.1, centered=True, momentum=0.5, weight_decay=0.1), "adagrad": dict(lr=0.1, lr_decay=0.1),
           "adadelta": dict(eps=0.1, weight_decay=0.1), "asgd": dict(t0=1.0, lambd=0.1, weight_decay=0.1),
           "rprop": dict(), "lars": dict(lr=0.5, weight_decay=0.1), "lamb": dict(lr=0.1),
           "lion": dict(lr=0.1, weight_decay=0.1), "adan": dict(lr=0.1, weight_decay=0.1),
           "ademamix": dict(lr=0.1, weight_decay=0.1, alpha_warmup=5, beta3_warmup=5),
           "adopt": dict(lr=0.1, weight_decay=0.1), "stableadamw": dict(lr=0.1, betas=(0.5, 0.6))}
SIZE = 6


def prepared_state(spec: Spec, make):
    """A state two plain steps old, as leaves that require grad (the 0-d counters do not)."""
    generator = torch.Generator().manual_seed(0)
    param = torch.rand(SIZE, dtype=torch.float64, generator=generator).requires_grad_()
    optimizer = make([param])
    for _ in range(2):  # positive: no sign flips, so Rprop's sign(grad * prev) stays away from 0 under gradcheck
        param.grad = torch.rand(SIZE, dtype=torch.float64, generator=generator) + 0.1
        optimizer.step()
    state = {key: value.detach().clone() for key, value in optimizer.state[param].items()}
    start = param.detach().clone().requires_grad_()
    grad = (torch.rand(SIZE, dtype=torch.float64, generator=generator) - 0.5).requires_grad_()
    tensors = {key: value.requires_grad_() for key, value in state.items() if value.dim() > 0}
    return start, grad, state, tensors


def differentiable_step(make, state, keys):
    """``f(param, grad, *state tensors) -> (new param, *new state tensors)``: one differentiable step."""

    def step(param, grad, *tensors):
        param = param.clone()  # a non-leaf, as in torch's own test: the step writes into it
        param.grad = grad
        optimizer = make([param], differentiable=True)
        optimizer.state[param] = {**{k: v.clone() for k, v in state.items()}, **{k: t.clone() for k, t in zip(keys, tensors)}}
        optimizer.step()
        return (param, *(optimizer.state[param][k] for k in keys))

    return step


@pytest.mark.parametrize("spec", SPECS, ids=repr)
def test_gradients_flow_through_the_step(spec):
    make = lambda ps, **extra: spec.cls(ps, **{**spec.required, **OPTIONS[spec.name]}, **extra)  # noqa: E731
    param, grad, state, tensors = prepared_state(spec, make)
    keys = list(tensors)
    step = differentiable_step(make, state, keys)
    assert gradcheck(step, (param, grad, *tensors.values()))
    # the recorded graph reaches every input, through the parameter the step wrote
    new_param = step(param, grad, *tensors.values())[0]
    assert new_param.requires_grad and new_param.grad_fn is not None
    assert torch.autograd.grad(new_param.sum(), param, retain_graph=True)[0].abs().sum() > 0


@pytest.fixture
def float64_default():
    """Step counters in float64 (torch.optim's scalar dtype follows the default dtype): torch's differentiable
    Adam, AdamW and NAdam take their bias corrections from the step tensor, in its dtype."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


@pytest.mark.parametrize("spec", [s for s in SPECS if s.matches_torch], ids=repr)
def test_gradients_match_torch_differentiable(spec, float64_default):
    options = {**spec.required, **OPTIONS[spec.name]}
    ours = lambda ps, **extra: spec.cls(ps, **options, **extra)  # noqa: E731
    theirs = lambda ps, **extra: spec.counterpart(ps, **options, **extra)  # noqa: E731
    param, grad, state, tensors = prepared_state(spec, ours)
    keys = list(tensors)
    inputs = (param, grad, *tensors.values())
    mine, torchs = differentiable_step(ours, state, keys)(*inputs), differentiable_step(theirs, state, keys)(*inputs)
    weights = [torch.rand(SIZE, dtype=torch.float64, generator=torch.Generator().manual_seed(k)) for k in range(len(mine))]
    tolerance = dict(rtol=1e-10, atol=1e-12)
    for index, (a, b) in enumerate(zip(mine, torchs)):
        torch.testing.assert_close(a, b, **tolerance, msg=lambda m: f"output {index}: {m}")
    wanted = [t for t in inputs]
    grads_mine = torch.autograd.grad(sum((w * o).sum() for w, o in zip(weights, mine)), wanted, allow_unused=True)
    grads_torch = torch.autograd.grad(sum((w * o).sum() for w, o in zip(weights, torchs)), wanted, allow_unused=True)
    for index, (a, b) in enumerate(zip(grads_mine, grads_torch)):
        if b is None:
            assert a is None or not a.any(), f"input {index}: a gradient torch does not have"
            continue
        torch.testing.assert_close(a, b, **tolerance, msg=lambda m: f"gradient of input {index}: {m}")


def test_differentiable_refuses_what_it_cannot_record():
    import thalweg

    param = torch.zeros(3, requires_grad=True)
    with pytest.raises(ValueError, match="differentiable=True steps with the reference backend"):
        thalweg.Adam([param], differentiable=True, backend="fused")
    with pytest.raises(ValueError, match="differentiable=True steps with the reference backend"):
        thalweg.Adam([param], differentiable=True, state_dtype=torch.float32)
    with pytest.raises(TypeError, match="differentiable must be True or False, got 1"):
        thalweg.Adam([param], differentiable=1)
    with pytest.raises(ValueError, match="capturable=True is not supported"):
        thalweg.Adam([param], capturable=True)
    # without differentiable=True, a computed (non-leaf) tensor is refused, as torch refuses it
    with pytest.raises(ValueError, match="not a leaf tensor"):
        thalweg.Adam([param * 2])


@pytest.mark.parametrize("name", ["adam", "adamw", "nadam"])
def test_float32_step_counters_are_a_known_difference_from_torch(name):
    """README: with float32 step counters torch's differentiable Adam, AdamW and NAdam take their bias
    corrections in float32; thalweg's stay in float64. Close, and not equal: the difference is torch's."""
    spec = next(s for s in SPECS if s.name == name)
    options = {**spec.required, **OPTIONS[name]}
    ours = lambda ps, **extra: spec.cls(ps, **options, **extra)  # noqa: E731
    theirs = lambda ps, **extra: spec.counterpart(ps, **options, **extra)  # noqa: E731
    param, grad, state, tensors = prepared_state(spec, ours)
    assert state["step"].dtype == torch.float32
    keys = list(tensors)
    mine = differentiable_step(ours, state, keys)(param, grad, *tensors.values())[0]
    torchs = differentiable_step(theirs, state, keys)(param, grad, *tensors.values())[0]
    torch.testing.assert_close(mine, torchs, rtol=1e-6, atol=1e-9)
    assert not torch.equal(mine, torchs)
    # ... and thalweg's equals torch's own non-differentiable step (float64 bias corrections)
    reference = differentiable_step(lambda ps, **extra: spec.counterpart(ps, **options), state, keys)(
        param.detach(), grad.detach(), *(t.detach() for t in tensors.values()))[0]
    torch.testing.assert_close(mine.detach(), reference, rtol=1e-12, atol=1e-14)
