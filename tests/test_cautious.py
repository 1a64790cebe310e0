"""``cautious=True`` on the optimizers torch.optim also has (SGD, Momentum, Adam, AdamW, NAdam, RAdam).

Liang et al. 2024 ("Cautious Optimizers"), with timm's renormalisation: the components of the step u whose
sign differs from the gradient's are dropped, and the rest scaled by 1 / max(kept fraction, 1e-3), the
fraction taken over the whole tensor; a decoupled weight decay is not masked.

The reference is torch's own optimizer in float64, with its step masked: cautious changes no state, only
which part of torch's step reaches the weights, so after each torch step the weights are set to
``w_decayed - mask · scale · (w_decayed - w_torch)`` (``w_decayed``: the weights after a decoupled decay,
which torch applies first; ``w_decayed - w_torch`` is lr · u). The gradient the mask compares with is the
one the update is made of: after ``maximize``, plus the L2 term when the decay is not decoupled. Lion, Adan,
AdEMAMix and StableAdamW have cautious in their own float64 references (tests/references.py).
"""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from specs import BACKENDS, SHAPES, assert_same_state, clone_params, grad_stream, make_params

import thalweg

CASES = {  # name: thalweg class, torch class, option combinations (each also drawn at random below)
    "sgd": (thalweg.SGD, torch.optim.SGD, [dict(lr=0.05, momentum=0.9, weight_decay=0.1),
                                           dict(lr=0.05, momentum=0.9, nesterov=True, maximize=True),
                                           dict(lr=0.05, momentum=0.9, dampening=0.3),
                                           dict(lr=0.05)]),
    "momentum": (thalweg.Momentum, lambda params, **o: torch.optim.SGD(params, **{"momentum": 0.9, **o}),
                 [dict(lr=0.05, nesterov=True, weight_decay=0.1)]),
    "adam": (thalweg.Adam, torch.optim.Adam, [dict(lr=1e-2), dict(lr=1e-2, weight_decay=0.1, amsgrad=True),
                                              dict(lr=1e-2, weight_decay=0.1, decoupled_weight_decay=True, maximize=True)]),
    "adamw": (thalweg.AdamW, torch.optim.AdamW, [dict(lr=1e-2, weight_decay=0.1)]),
    "nadam": (thalweg.NAdam, torch.optim.NAdam, [dict(lr=1e-2, weight_decay=0.1),
                                                 dict(lr=1e-2, weight_decay=0.1, decoupled_weight_decay=True)]),
    "radam": (thalweg.RAdam, torch.optim.RAdam, [dict(lr=1e-2, betas=(0.9, 0.6)),  # rectified from step 2 on
                                                 dict(lr=1e-2, weight_decay=0.1, decoupled_weight_decay=True)]),
}
STEPS = 25
TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-5}


def decoupled(name: str, combo: dict) -> bool:
    return name == "adamw" or bool(combo.get("decoupled_weight_decay"))


def cautious_torch(name: str, combo: dict, params: list[torch.Tensor], grads_per_step) -> torch.optim.Optimizer:
    """torch's optimizer stepped on float64 ``params``, each step masked as cautious=True masks it."""
    torch_cls = CASES[name][1]
    optimizer = torch_cls(params, **combo, foreach=False)
    lr, weight_decay = combo["lr"], combo.get("weight_decay", 0.0)
    for grads in grads_per_step:
        before = []
        for param, grad in zip(params, grads):
            param.grad = grad.clone()
            gradient = -grad if combo.get("maximize") else grad.clone()
            if weight_decay and not decoupled(name, combo):
                gradient = gradient + weight_decay * param.detach()
            start = param.detach().clone()
            if weight_decay and decoupled(name, combo):
                start = start * (1 - lr * weight_decay)  # torch decays first, in place: the same float64 product
            before.append((start, gradient))
        optimizer.step()
        with torch.no_grad():
            for param, (start, gradient) in zip(params, before):
                if param.numel() == 0:
                    continue
                step = start - param  # lr * u
                mask = (step * gradient > 0).to(step.dtype)
                param.copy_(start - step * mask / mask.mean().clamp(min=1e-3))
    return optimizer


def check(name, combo, backend, shapes, dtype, seed):
    thalweg_cls = CASES[name][0]
    params = make_params(shapes, dtype, seed)
    expected_params = [p.detach().clone().double().requires_grad_() for p in params]  # (a float64 .double() aliases)
    grads = list(grad_stream(shapes, dtype, seed, STEPS))
    ours = thalweg_cls(params, **combo, cautious=True, backend=backend)
    for step_grads in grads:
        for param, grad in zip(params, step_grads):
            param.grad = grad.clone()
        ours.step()
    theirs = cautious_torch(name, combo, expected_params, [[g.double() for g in step] for step in grads])
    if dtype == torch.float64:
        assert_same_state(ours, theirs, params, expected_params)
        return
    # float32 against the float64 reference, relative to each tensor's largest magnitude
    for index, (a, e) in enumerate(zip(params, expected_params)):
        if e.numel():
            scale = float(e.detach().abs().max())
            torch.testing.assert_close(a.detach().double(), e.detach(), rtol=TOLERANCE[dtype],
                                       atol=TOLERANCE[dtype] * scale, msg=lambda m: f"param {index}: {m}")


GRID = [pytest.param(name, combo, id=f"{name}-{i}") for name, case in CASES.items() for i, combo in enumerate(case[2])]


@pytest.mark.parametrize("name,combo", GRID)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_matches_torch_with_the_step_masked(name, combo, backend, dtype):
    check(name, combo, backend, [(), (0,), (7,), (3, 5), (40, 30)], dtype, seed=3)


@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_random_shapes_and_learning_rates(backend, data):
    name, combo = data.draw(st.sampled_from([(n, c) for n, case in CASES.items() for c in case[2]]), label="case")
    combo = {**combo, "lr": data.draw(st.floats(1e-4, 0.1), label="lr")}
    shapes = data.draw(st.lists(st.sampled_from(SHAPES), min_size=1, max_size=4), label="shapes")
    check(name, combo, backend, shapes, torch.float64, data.draw(st.integers(0, 2**16), label="seed"))


def test_the_mask_changes_the_step():
    """Not a no-op: the cautious trajectory leaves the plain one, and where every component agrees it is the plain one."""
    params = make_params([(50,)], torch.float64, 0)
    plain, careful = clone_params(params), clone_params(params)
    grads = list(grad_stream([(50,)], torch.float64, 0, 5))
    for flag, ps in ((False, plain), (True, careful)):
        optimizer = thalweg.AdamW(ps, lr=1e-2, cautious=flag)
        for step in grads:
            ps[0].grad = step[0].clone()
            optimizer.step()
    assert (plain[0] - careful[0]).abs().max() > 1e-3
    # one step from zero state: u = m̂/(√v̂+ε) has the gradient's sign everywhere, so nothing is masked
    first_plain, first_careful = clone_params(params), clone_params(params)
    for flag, ps in ((False, first_plain), (True, first_careful)):
        ps[0].grad = grads[0][0].clone()
        thalweg.AdamW(ps, lr=1e-2, cautious=flag).step()
    torch.testing.assert_close(first_careful[0], first_plain[0], rtol=0, atol=1e-15)


def test_sparse_gradients_are_refused_with_cautious():
    embedding = torch.nn.Embedding(10, 3, sparse=True)
    embedding(torch.tensor([1, 2])).sum().backward()
    optimizer = thalweg.SGD(embedding.parameters(), lr=0.1, momentum=0.9, cautious=True)
    before = embedding.weight.detach().clone()
    with pytest.raises(RuntimeError, match="cautious=True cannot be used with sparse gradients"):
        optimizer.step()
    assert torch.equal(embedding.weight, before)


@pytest.mark.parametrize("name", CASES)
def test_cautious_must_be_a_bool(name):
    with pytest.raises(TypeError, match=r"^cautious must be True or False, got 1$"):
        CASES[name][0]([torch.zeros(2, requires_grad=True)], lr=0.1, cautious=1)


@pytest.mark.parametrize("name", ["adam", "sgd"])
def test_a_torch_checkpoint_loads_without_the_key(name):
    """torch's groups have no 'cautious': a torch checkpoint loads, the group takes the constructor's value
    (as for every key a checkpoint lacks), and without cautious the next step is torch's."""
    thalweg_cls, torch_cls, combos = CASES[name]
    params = make_params([(4, 3)], torch.float64, 1)
    twin = clone_params(params)
    theirs = torch_cls(twin, **combos[0])
    for _ in range(2):
        twin[0].grad = torch.randn_like(twin[0])
        theirs.step()
    checkpoint = copy.deepcopy(theirs.state_dict())  # (a state_dict holds the live state tensors)
    assert "cautious" not in checkpoint["param_groups"][0]
    careful = thalweg_cls(clone_params(twin), **combos[0], cautious=True)
    careful.load_state_dict(copy.deepcopy(checkpoint))
    assert careful.param_groups[0]["cautious"] is True
    with torch.no_grad():
        params[0].copy_(twin[0])
    ours = thalweg_cls(params, **combos[0])
    ours.load_state_dict(checkpoint)
    assert ours.param_groups[0]["cautious"] is False
    grad = torch.randn_like(twin[0])
    params[0].grad, twin[0].grad = grad.clone(), grad.clone()
    ours.step()
    theirs.step()
    torch.testing.assert_close(params[0], twin[0], rtol=1e-12, atol=1e-12)
