"""Issue 2, point 1: SGD/Momentum, Adam, AdamW, RMSprop and Adagrad match torch.optim — params, every state
tensor and the state_dict layout — for every option combination, on every backend.

Two layers: every grid combination on fixed awkward shapes (so each combination is certainly run),
then hypothesis over shapes, dtypes, random hyper-parameter values and step counts.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import thalweg
from specs import (TOLERANCE, TORCH_SPECS, Spec, assert_same_state, clone_params, draw_case, grad_stream, make_params, run,
                   split_groups)

FIXED_SHAPES = [(3, 5), (), (0,), (7,), (1, 1, 9)]
# torch 2.13's CPU fused SGD is left out: in bfloat16 it disagrees with its own for-loop from the
# first step (checked by hand: another param value after one step), so it is no reference.
TORCH_FUSED_ON_CPU = {"adam", "adamw", "adagrad"}


def torch_implementation(spec: Spec, backend: str, dtype: torch.dtype) -> dict:
    """Which torch implementation a backend is held to.

    In float32/float64 every backend must match torch's CPU default (the for-loop) within the
    tolerance. In bfloat16 the order of roundings is part of the result: torch's own for-loop and
    foreach paths disagree by many ulps once an accumulator with beta2 ~ 0.99 stagnates (``0.99·x``
    rounds back to ``x`` in one path and not in the other). So in bfloat16 each backend is held to
    the torch path that rounds the same way: reference <-> for-loop, foreach <-> foreach, fused <->
    torch's fused kernel where torch has one on CPU (fp32 math, one rounding), else the for-loop.
    """
    if dtype != torch.bfloat16:
        return {}
    if backend == "foreach":
        return {"foreach": True}
    if backend == "fused" and spec.name in TORCH_FUSED_ON_CPU:
        return {"fused": True}
    return {"foreach": False}


def check_against_torch(spec: Spec, combo, backend, shapes, dtype, seed, steps):
    params = make_params(shapes, dtype, seed)
    twin = clone_params(params)
    grads = list(grad_stream(shapes, dtype, seed, steps))
    ours = run(lambda ps: spec.build(spec.cls, split_groups(ps, combo, spec), combo, backend=backend), params, grads)
    if dtype == torch.bfloat16 and spec.bf16_ill_conditioned(combo):
        check_bf16_accuracy(spec, combo, params, twin, grads)
        return
    implementation = torch_implementation(spec, backend, dtype)
    theirs = run(lambda ps: spec.build(spec.counterpart, split_groups(ps, combo, spec), combo, **implementation),
                 twin, grads)
    assert_same_state(ours, theirs, params, twin)

    state = ours.state_dict()["state"]
    for index, entry in state.items():
        assert set(entry) == spec.state_keys(combo), f"state keys of param {index}"
    ours_groups, theirs_groups = ours.state_dict()["param_groups"], theirs.state_dict()["param_groups"]
    for mine, torchs in zip(ours_groups, theirs_groups):
        # every key thalweg writes must be one torch writes, with the same value, so checkpoints cross-load —
        # except the optimizer-wide counts thalweg adds (skipped_steps) and its own options (cautious), which
        # torch carries along unread; the implementation switch this run asked torch for (foreach=True for
        # thalweg's backend="fused") is a key of both, with values that differ by construction.
        mine = {k: v for k, v in mine.items() if k not in thalweg.Optimizer._OWN_STATE and k != "cautious"}
        assert set(mine) <= set(torchs), f"group keys torch does not know: {set(mine) - set(torchs)}"
        for key in implementation:
            mine.pop(key, None)
        for key in mine:
            assert mine[key] == torchs[key], f"group[{key!r}]: {mine[key]!r} != {torchs[key]!r}"


def check_bf16_accuracy(spec: Spec, combo, ours, initial, grads):
    """Every parameter of ``ours`` (bfloat16, stepped) is as close to a float64 run of torch as torch's own bfloat16
    paths are (the farther of its for-loop and foreach, which differ from each other by as much), with the
    suite's bfloat16 tolerance (about 4 ulps of the largest magnitude) to spare (``initial``: untouched copies)."""

    def torch_run(dtype, **implementation):
        params = [p.detach().to(dtype, copy=True).requires_grad_() for p in initial]
        run(lambda ps: spec.build(spec.counterpart, split_groups(ps, combo, spec), combo, **implementation), params,
            [[g.to(dtype) for g in step] for step in grads])
        return params

    exact = torch_run(torch.float64)
    paths = [torch_run(torch.bfloat16, foreach=False), torch_run(torch.bfloat16, foreach=True)]
    for index, (mine, truth) in enumerate(zip(ours, exact)):
        if truth.numel() == 0:
            continue
        error = lambda p: float((p.detach().double() - truth.detach()).abs().max())  # noqa: E731
        allowed = max(error(path[index]) for path in paths) + TOLERANCE[torch.bfloat16] * float(truth.detach().abs().max())
        assert error(mine) <= allowed, f"param {index}: {error(mine):.4g} from the float64 run, torch's {allowed:.4g}"


GRID_CASES = [pytest.param(spec, combo, id=f"{spec.name}-{i}") for spec in TORCH_SPECS for i, combo in enumerate(spec.grid)]


@pytest.mark.parametrize("spec, combo", GRID_CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_every_option_combination_matches_torch(spec, combo, dtype, backend):
    check_against_torch(spec, combo, backend, FIXED_SHAPES, dtype, seed=7, steps=25)


@pytest.mark.parametrize("spec", TORCH_SPECS, ids=repr)
@given(data=st.data())
def test_random_hyperparameters_shapes_and_dtypes_match_torch(spec, backend, data):
    combo, shapes, dtype, seed = draw_case(data, spec, [torch.float32, torch.float64, torch.bfloat16])
    steps = data.draw(st.integers(25, 40), label="steps")
    check_against_torch(spec, combo, backend, shapes, dtype, seed, steps)


@pytest.mark.parametrize("nesterov", [False, True])
def test_momentum_is_sgd_with_momentum_0_9(backend, nesterov):
    params = make_params(FIXED_SHAPES, torch.float32, 3)
    twin = clone_params(params)
    grads = list(grad_stream(FIXED_SHAPES, torch.float32, 3, 25))
    ours = run(lambda ps: thalweg.Momentum(ps, lr=0.05, nesterov=nesterov, backend=backend), params, grads)
    sgd = run(lambda ps: thalweg.SGD(ps, lr=0.05, momentum=0.9, nesterov=nesterov, backend=backend), twin, grads)
    assert ours.param_groups[0]["momentum"] == 0.9
    assert_same_state(ours, sgd, params, twin, exact=True)
