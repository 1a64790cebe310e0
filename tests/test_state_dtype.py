"""``state_dtype=torch.float32``: bfloat16/float16 parameters with float32 optimizer state.

The semantics, checked against an independent emulation (the counterpart — torch.optim or the paper
reference — run on float32 copies of the parameters): before each step the copy takes the parameter's
value, the step runs in float32 on float32 state, and the parameter takes the result rounded once.
Every backend (the fused CPU kernels read bfloat16 params and float32 state in one pass), the
optimizers' edge cases (a frozen tensor, a missing gradient), checkpoints, and the argument check.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import thalweg
from specs import SPECS, assert_close, assert_same_state, draw_case, grad_stream, make_params, split_groups
from test_backends import SHAPES, groups_for, none_at

STEPS = 12


def _ctor(spec):
    return {**spec.required, **{k: spec.grid[-1][k] for k in spec.counterpart_ctor_only}}


def _grads(dtype):
    return list(grad_stream(SHAPES, dtype, 7, STEPS))


def run_thalweg(spec, backend, dtype, **extra):
    params = make_params(SHAPES, dtype, 7)
    optimizer = spec.cls(groups_for(spec, params, counterpart=True), **_ctor(spec), backend=backend, **extra)
    for step, grads in enumerate(_grads(dtype)):
        for index, (param, grad) in enumerate(zip(params, grads)):
            param.grad = None if none_at(step, index) else grad.clone()
        optimizer.step()
    return optimizer, params


def run_emulation(spec, dtype, *, shapes=SHAPES, seed=7, steps=STEPS, build=None, missing=none_at, store=None):
    """The counterpart on float32 copies of ``dtype`` parameters, rounded back after every step (to nearest, or by
    ``store(step, index, param, copy)``)."""
    params = make_params(shapes, dtype, seed)
    copies = [p.detach().float().requires_grad_() for p in params]
    if build is None:
        optimizer = spec.counterpart(groups_for(spec, copies, counterpart=True), **_ctor(spec))
    else:
        optimizer = build(copies)
    for step, grads in enumerate(grad_stream(shapes, dtype, seed, steps)):
        with torch.no_grad():
            for index, (param, copy, grad) in enumerate(zip(params, copies, grads)):
                copy.copy_(param)
                copy.grad = None if missing(step, index) else grad.float()
        optimizer.step()
        with torch.no_grad():
            for index, (param, copy) in enumerate(zip(params, copies)):
                if store is None:
                    param.copy_(copy)
                else:
                    store(step, index, param, copy)
    return optimizer, params


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("spec", SPECS, ids=repr)
def test_low_precision_params_step_in_float32_on_float32_state(spec, backend, dtype):
    ours, params = run_thalweg(spec, backend, dtype, state_dtype=torch.float32)
    expected, expected_params = run_emulation(spec, dtype)
    assert all(p.dtype is dtype for p in params)
    for state in ours.state.values():
        for key, value in state.items():
            if key != "step":
                assert value.dtype is torch.float32, f"{key} is {value.dtype}"
    assert_same_state(ours, expected, params, expected_params)


@pytest.mark.parametrize("spec", SPECS, ids=repr)
@given(data=st.data())
def test_random_hyperparameters_and_shapes_step_in_float32(spec, backend, data):
    combo, shapes, dtype, seed = draw_case(data, spec, [torch.bfloat16, torch.float16])
    params = make_params(shapes, dtype, seed)
    ours = spec.build(spec.cls, split_groups(params, combo, spec), combo, backend=backend, state_dtype=torch.float32)
    for grads in grad_stream(shapes, dtype, seed, STEPS):
        for param, grad in zip(params, grads):
            param.grad = grad.clone()
        ours.step()
    expected, expected_params = run_emulation(
        spec, dtype, shapes=shapes, seed=seed,
        build=lambda copies: spec.build(spec.counterpart, split_groups(copies, combo, spec), combo),
        missing=lambda step, index: False)
    assert_same_state(ours, expected, params, expected_params)


@pytest.mark.parametrize("spec", SPECS, ids=repr)
def test_fused_cpu_kernel_takes_bfloat16_params_with_float32_state(spec, monkeypatch):
    """Every tensor of the fused CPU step is in a kernel bucket of bfloat16 params and float32 state, none on
    the foreach path (SGD's first momentum step too: its buffer is created before the kernel runs)."""
    from thalweg.engine import host

    seen = []
    original = host.partition

    def partition(params, grads, roles, steps):
        buckets, fallback, step_addresses = original(params, grads, roles, steps)
        seen.append(([(b.dtype, b.state_dtype, len(b.indices)) for b in buckets], fallback))
        return buckets, fallback, step_addresses

    params = make_params([(5,), (300,), (2, 3)], torch.bfloat16, 3)
    optimizer = spec.cls(params, **spec.required, backend="fused", state_dtype=torch.float32)
    for _ in range(2):
        for param in params:
            param.grad = torch.randn_like(param)
        monkeypatch.setattr(host, "partition", partition)
        optimizer.step()
        monkeypatch.undo()
    has_state = bool(spec.state_keys(spec.required) - {"step"})  # plain SGD has none
    assert len(seen) == 2
    for buckets, fallback in seen:
        assert fallback == []
        assert buckets == [(torch.bfloat16, torch.float32 if has_state else torch.bfloat16, 3)]


@pytest.mark.parametrize("spec", SPECS, ids=repr)
def test_state_dtype_leaves_float32_and_float64_params_as_they_were(spec, backend):
    for dtype in (torch.float32, torch.float64):
        with_option, params = run_thalweg(spec, backend, dtype, state_dtype=torch.float32)
        without, plain = run_thalweg(spec, backend, dtype)
        assert_same_state(with_option, without, params, plain, exact=True)


@pytest.mark.parametrize("spec", [s for s in SPECS if s.name in ("adam", "momentum", "lamb")], ids=repr)
def test_float32_state_survives_a_checkpoint(spec):
    ours, params = run_thalweg(spec, "fused", torch.bfloat16, state_dtype=torch.float32)
    saved = ours.state_dict()
    twin = [p.detach().clone().requires_grad_() for p in params]
    restored = spec.cls(groups_for(spec, twin, counterpart=True), **_ctor(spec), state_dtype=torch.float32)
    restored.load_state_dict(saved)
    assert_same_state(restored, ours, twin, params, exact=True)
    state = restored.state_dict()["state"]
    assert all(v.dtype is torch.float32 for s in state.values() for k, v in s.items() if k != "step")
    # Without the option the checkpoint loads as torch.optim loads it: state in the parameter's dtype.
    plain = spec.cls(groups_for(spec, twin, counterpart=True), **_ctor(spec))
    plain.load_state_dict(saved)
    assert all(v.dtype is torch.bfloat16 for s in plain.state_dict()["state"].values() for k, v in s.items()
               if k != "step")


def test_a_torch_checkpoint_with_bfloat16_state_is_widened_on_load():
    params = make_params([(4,), (3, 2)], torch.bfloat16, 1)
    theirs = torch.optim.Adam(params, lr=0.01)
    for param in params:
        param.grad = torch.randn_like(param)
    theirs.step()
    ours = thalweg.Adam(params, lr=0.01, state_dtype=torch.float32)
    ours.load_state_dict(theirs.state_dict())
    for param in params:
        for key in ("exp_avg", "exp_avg_sq"):
            assert ours.state[param][key].dtype is torch.float32
            assert_close(ours.state[param][key], theirs.state[param][key].float(), what=key)
    ours.step()  # and steps on it


@pytest.mark.parametrize("value", [torch.float16, torch.bfloat16, torch.float64, "float32", True, torch.int8, "uint8"])
def test_state_dtype_must_be_none_float32_or_int8(value):
    with pytest.raises(ValueError, match=r"^state_dtype must be None, torch\.float32 or 'int8', got "):
        thalweg.Adam(make_params([(3,)], torch.bfloat16, 0), state_dtype=value)
