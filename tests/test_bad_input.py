"""Issue 2, point 10: the bad-input catalogue. Every message names the argument as spelled in the
signature, and the value. A step that raises leaves parameters and state as they were."""

from __future__ import annotations

import copy

import pytest
import torch

import thalweg
from specs import SPECS, make_params

INF, NAN = float("inf"), float("nan")


def build(spec, params=None, **kwargs):
    params = make_params([(3,)], torch.float32, 0) if params is None else params
    return spec.cls(params, **{**spec.required, **kwargs})


NONNEG_CASES = [pytest.param(spec, name, value, message, id=f"{spec.name}-{name}-{value}")
                for spec in SPECS for name in spec.nonneg
                for value, message in ((-0.1, r">= 0, got -0\.1"), (NAN, r"finite number >= 0, got nan"),
                                       (INF, r"finite number >= 0, got inf"))]


@pytest.mark.parametrize("spec, name, value, message", NONNEG_CASES)
def test_negative_nan_and_inf_are_refused(spec, name, value, message):
    with pytest.raises(ValueError, match=rf"^{name} must be (a )?{message}$"):
        build(spec, **{name: value})


FLAG_CASES = [pytest.param(spec, name, id=f"{spec.name}-{name}") for spec in SPECS for name in spec.flags]


@pytest.mark.parametrize("spec, name", FLAG_CASES)
@pytest.mark.parametrize("value", [1, "yes", None])
def test_non_bool_flags_are_refused(spec, name, value):
    with pytest.raises(TypeError, match=rf"^{name} must be True or False, got {value!r}$"):
        build(spec, **{name: value})


BETAS_SPECS = [s for s in SPECS if "betas" in s.grid[0]]
MOMENTUM_SPECS = [s for s in SPECS if "momentum" in s.ranges]


@pytest.mark.parametrize("spec", BETAS_SPECS, ids=repr)
@pytest.mark.parametrize("betas, index, value", [((1.0, 0.999), 0, "1.0"), ((-0.1, 0.999), 0, "-0.1"),
                                                  ((0.9, 1.0), 1, "1.0"), ((0.9, -1e-3), 1, "-0.001"),
                                                  ((0.9, NAN), 1, "nan")])
def test_betas_outside_0_1_are_refused_with_their_index(spec, betas, index, value):
    betas = betas + tuple(spec.grid[0]["betas"][2:])  # (beta3 as the spec's, for Adan and AdEMAMix)
    with pytest.raises(ValueError, match=rf"^betas\[{index}\] must be in \[0, 1\), got {value}$"):
        build(spec, betas=betas)


@pytest.mark.parametrize("spec", BETAS_SPECS, ids=repr)
def test_betas_must_be_a_pair(spec):
    """A pair, or three numbers for the optimizers with three moving averages; the message says which."""
    expected = (r"a pair \(beta1, beta2\)" if len(spec.grid[0]["betas"]) == 2
                else r"3 numbers \(beta1, beta2, beta3\)")
    with pytest.raises(ValueError, match=rf"^betas must be {expected}, got 0\.9$"):
        build(spec, betas=0.9)
    with pytest.raises(ValueError, match=rf"^betas must be {expected}, got \(0\.9, 0\.9, 0\.9, 0\.9\)$"):
        build(spec, betas=(0.9,) * 4)


@pytest.mark.parametrize("spec", MOMENTUM_SPECS, ids=repr)
def test_negative_momentum_is_refused(spec):
    with pytest.raises(ValueError, match=r"^momentum must be >= 0, got -0\.5$"):
        build(spec, momentum=-0.5)


@pytest.mark.parametrize("spec", [s for s in SPECS if "nesterov" in s.flags], ids=repr)
def test_nesterov_needs_momentum(spec):
    with pytest.raises(ValueError, match=r"nesterov=True requires momentum > 0.*got momentum=0"):
        build(spec, nesterov=True, momentum=0)


def test_nesterov_refuses_dampening():
    with pytest.raises(ValueError, match=r"nesterov=True requires momentum > 0 and dampening == 0, got momentum=0\.9, dampening=0\.1"):
        thalweg.SGD(make_params([(3,)], torch.float32, 0), momentum=0.9, dampening=0.1, nesterov=True)


@pytest.mark.parametrize("value", [-0.1, 1.5])
def test_rmsprop_alpha_outside_0_1(value):
    with pytest.raises(ValueError, match=rf"^alpha must be in \[0, 1\], got {value}$"):
        thalweg.RMSprop(make_params([(3,)], torch.float32, 0), alpha=value)


@pytest.mark.parametrize("value", [-1.0, 2.0])
def test_sgd_dampening_outside_0_1(value):
    with pytest.raises(ValueError, match=rf"^dampening must be in \[0, 1\], got {value}$"):
        thalweg.SGD(make_params([(3,)], torch.float32, 0), momentum=0.9, dampening=value)


@pytest.mark.parametrize("value, shown", [(0, "0.0"), (-1e-3, "-0.001"), (INF, "inf"), (NAN, "nan")])
def test_lars_trust_coefficient_must_be_positive(value, shown):
    with pytest.raises(ValueError, match=rf"^trust_coefficient must be a finite number > 0, got {shown}$"):
        thalweg.LARS(make_params([(3,)], torch.float32, 0), lr=1.0, trust_coefficient=value)


def test_lars_needs_an_lr():
    with pytest.raises(TypeError, match="lr"):
        thalweg.LARS(make_params([(3,)], torch.float32, 0))


@pytest.mark.parametrize("spec", SPECS, ids=repr)
def test_lr_must_be_a_number(spec):
    with pytest.raises(TypeError, match=r"^lr must be a real number, got '0\.1' \(str\)$"):
        build(spec, lr="0.1")


@pytest.mark.parametrize("lr, error, message", [
    (torch.tensor(0.1, device="meta"), ValueError, r"^lr must be a number or a one-element tensor holding one, got a meta tensor"),
    (torch.tensor(0.1 + 0j), TypeError, r"^lr must be a real number, got a torch\.complex64 tensor$"),
    (torch.tensor(True), TypeError, r"^lr must be a real number, got a torch\.bool tensor$"),
])
def test_a_tensor_lr_without_a_real_value_is_refused_by_name(lr, error, message):
    # issue #16, finding 8: these reached torch's own error ("Cannot copy out of meta tensor", float(complex))
    with pytest.raises(error, match=message):
        thalweg.Adam(make_params([(3,)], torch.float32, 0), lr=lr)


# -- backend, clipping ------------------------------------------------------------------------


@pytest.mark.parametrize("spec", SPECS, ids=repr)
def test_unknown_backend(spec):
    with pytest.raises(ValueError, match=r"^backend must be one of 'auto', 'reference', 'foreach', 'fused', got 'cuda'$"):
        build(spec, backend="cuda")


@pytest.mark.parametrize("spec", SPECS, ids=repr)
def test_foreach_and_fused_together(spec):
    with pytest.raises(ValueError, match=r"foreach=True and fused=True cannot be used together"):
        build(spec, foreach=True, fused=True)


def test_backend_contradicting_foreach():
    with pytest.raises(ValueError, match=r"backend='reference' contradicts foreach=True"):
        thalweg.Adam(make_params([(3,)], torch.float32, 0), backend="reference", foreach=True)


@pytest.mark.parametrize("name", ["foreach", "fused"])
def test_foreach_and_fused_must_be_bool_or_none(name):
    with pytest.raises(TypeError, match=rf"^{name} must be True, False or None, got 1$"):
        thalweg.Adam(make_params([(3,)], torch.float32, 0), **{name: 1})


@pytest.mark.parametrize("spec", SPECS, ids=repr)
@pytest.mark.parametrize("value, shown", [(0, "0.0"), (-1.0, "-1.0"), (NAN, "nan")])
def test_max_grad_norm_must_be_positive(spec, value, shown):
    with pytest.raises(ValueError, match=rf"^max_grad_norm must be a finite number > 0, got {shown}$"):
        build(spec, max_grad_norm=value)


@pytest.mark.parametrize("spec", SPECS, ids=repr)
def test_skip_nonfinite_must_be_bool(spec):
    with pytest.raises(TypeError, match=r"^skip_nonfinite must be True or False, got 1$"):
        build(spec, skip_nonfinite=1)


# -- params -----------------------------------------------------------------------------------


@pytest.mark.parametrize("spec", SPECS, ids=repr)
def test_bad_params(spec):
    a, b = make_params([(3,), (2,)], torch.float32, 0)
    with pytest.raises(ValueError, match=r"params is empty"):
        build(spec, [])
    with pytest.raises(ValueError, match=r"params is empty: every parameter group has an empty 'params' list"):
        build(spec, [{"params": []}])
    with pytest.raises(ValueError, match=r"params\[1\] appears twice in the same param group"):
        build(spec, [a, a])
    with pytest.raises(ValueError, match=r"params\[0\] of param group 1 is already in param group 0"):
        build(spec, [{"params": [a]}, {"params": [b, a][1:]}])
    with pytest.raises(TypeError, match=r"params\[1\] must be a torch\.Tensor, got list"):
        build(spec, [a, [1.0, 2.0]])
    with pytest.raises(ValueError, match=r"params\[0\] is not a leaf tensor"):
        build(spec, [a * 2])
    with pytest.raises(TypeError, match=r"params\[0\] has dtype torch\.int64; only floating-point tensors"):
        build(spec, [torch.zeros(3, dtype=torch.int64)])
    with pytest.raises(TypeError, match=r"got a single Tensor; wrap it in a list"):
        build(spec, a)
    with pytest.raises(TypeError, match=r"params must be an ordered collection"):
        build(spec, {a})


def test_add_param_group_is_checked_too():
    a, b = make_params([(3,), (2,)], torch.float32, 0)
    optimizer = thalweg.Adam([a])
    with pytest.raises(ValueError, match=r"params\[0\] of param group 1 is already in param group 0"):
        optimizer.add_param_group({"params": [a]})
    with pytest.raises(ValueError, match=r"^lr must be >= 0, got -1\.0$"):
        optimizer.add_param_group({"params": [b], "lr": -1.0})
    with pytest.raises(TypeError, match=r"a param group must be a dict, got list"):
        optimizer.add_param_group([b])
    assert len(optimizer.param_groups) == 1


# -- create -----------------------------------------------------------------------------------


def test_create_refuses_unknown_names_and_hyperparameters():
    model = torch.nn.Linear(3, 2)
    with pytest.raises(ValueError, match=r"unknown optimizer 'adamm'; choose one of: sgd, momentum, adam"):
        thalweg.create("adamm", model)
    with pytest.raises(TypeError, match=r"Adam has no hyper-parameter 'momentum'; it accepts: lr, betas"):
        thalweg.create("adam", model, momentum=0.9)


# -- a step that raises changes nothing -------------------------------------------------------


def trained(spec):
    params = make_params([(3, 2), (4,), (2,)], torch.float32, 1)
    optimizer = spec.cls([{"params": params[:2]}, {"params": params[2:]}], **spec.required)
    for _ in range(3):
        for p in params:
            p.grad = torch.randn_like(p)
        optimizer.step()
    for p in params:
        p.grad = torch.randn_like(p)
    return optimizer, params


def assert_step_raises_and_changes_nothing(optimizer, params, error, match):
    before_params = [p.detach().clone() for p in params]
    before_state = copy.deepcopy(optimizer.state_dict()["state"])
    with pytest.raises(error, match=match):
        optimizer.step()
    assert all(torch.equal(p, q) for p, q in zip(params, before_params)), "parameters changed"
    after_state = optimizer.state_dict()["state"]
    assert after_state.keys() == before_state.keys()
    for index, entry in before_state.items():
        assert after_state[index].keys() == entry.keys()
        for key, value in entry.items():
            assert torch.equal(torch.as_tensor(after_state[index][key]), torch.as_tensor(value)), f"state {key} changed"


@pytest.mark.parametrize("spec", SPECS, ids=repr)
def test_a_bad_lr_set_after_construction_fails_the_step_and_changes_nothing(spec):
    optimizer, params = trained(spec)
    optimizer.param_groups[1]["lr"] = -1  # group 0 is fine and is checked (and would be updated) first
    assert_step_raises_and_changes_nothing(optimizer, params, ValueError, r"^lr must be >= 0, got -1\.0$")


@pytest.mark.parametrize("spec", SPECS, ids=repr)
def test_a_sparse_grad_in_one_group_fails_the_step_and_changes_nothing(spec):
    optimizer, params = trained(spec)
    params[2].grad = torch.sparse_coo_tensor([[0]], torch.ones(1), (2,), check_invariants=True)  # second group
    if spec.sparse:  # accepted alone, refused with weight decay (it would touch every row)
        optimizer.param_groups[1]["weight_decay"] = 0.1
    assert_step_raises_and_changes_nothing(optimizer, params, RuntimeError, r"sparse gradients")


@pytest.mark.parametrize("spec", SPECS, ids=repr)
def test_an_unavailable_backend_fails_the_step_and_changes_nothing(spec, monkeypatch):
    # e.g. backend="fused" on a machine without numba (or CUDA without triton): the error must come
    # before any state is created or any gradient clipped.
    from thalweg import engine

    monkeypatch.setattr(engine, "unavailable_reason", lambda device: "numba is missing (simulated)")
    params = make_params([(3, 2), (4,)], torch.float32, 1)
    optimizer = spec.cls(params, **spec.required, backend="fused", max_grad_norm=0.1)
    for p in params:
        p.grad = torch.ones_like(p)
    assert_step_raises_and_changes_nothing(optimizer, params, RuntimeError,
                                           r"backend='fused' is not available for cpu tensors: numba is missing")
    assert all(torch.equal(p.grad, torch.ones_like(p)) for p in params), "gradients were clipped by a failed step"
