"""Issue 2, point 3: every backend against the reference backend (and against torch / the paper), on
torch.optim's own edge cases: a None grad for some steps, a layer frozen then unfrozen (different step
counts per tensor), zero-size parameters, an empty group beside full ones, groups with different
hyper-parameters."""

from __future__ import annotations

import pytest
import torch

import thalweg
from thalweg import engine
from specs import SPECS, Spec, assert_same_state, clone_params, grad_stream, make_params, run

SHAPES = [(3, 5), (5,), (0,), (2, 0, 3), (), (7,), (4, 4)]
FROZEN, SOMETIMES_NONE = 5, 1  # indices into SHAPES


def none_at(step: int, index: int) -> bool:
    # param 5 frozen for the first 10 steps, then trained; param 1 skips steps 2-4.
    return (index == FROZEN and step < 10) or (index == SOMETIMES_NONE and 2 <= step <= 4)


def groups_for(spec: Spec, params, *, counterpart: bool = False):
    """Three groups: two with different option combinations from the spec's grid, and an empty one between.

    For the counterpart, options it reads from its constructor only are made equal in both groups.
    """
    first, second = spec.grid[-1], spec.grid[len(spec.grid) // 2]
    assert first != second
    if counterpart:
        second = {**second, **{k: first[k] for k in spec.counterpart_ctor_only}}
    return [{"params": params[:2], **first},
            {"params": [], **first},
            {"params": params[2:], **second, "lr": second["lr"] * 0.3}]


def edge_case_run(spec, make, dtype, *, counterpart=False):
    params = make_params(SHAPES, dtype, 5, zero_first=False)
    grads = list(grad_stream(SHAPES, dtype, 5, 25))
    optimizer = run(lambda ps: make(groups_for(spec, ps, counterpart=counterpart)), params, grads, none_at=none_at)
    return optimizer, params


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("spec", SPECS, ids=repr)
def test_backend_matches_reference_on_edge_cases(spec, backend, dtype):
    reference, reference_params = edge_case_run(spec, lambda g: spec.cls(g, **spec.required, backend="reference"), dtype)
    ours, params = edge_case_run(spec, lambda g: spec.cls(g, **spec.required, backend=backend), dtype)
    assert_same_state(ours, reference, params, reference_params)
    # The frozen-then-unfrozen tensor has fewer steps than its neighbours.
    state = ours.state_dict()["state"]
    if "step" in state.get(0, {}):
        assert float(state[FROZEN]["step"]) == 15 and float(state[0]["step"]) == 25
        assert float(state[SOMETIMES_NONE]["step"]) == 22


@pytest.mark.parametrize("spec", SPECS, ids=repr)
def test_backend_matches_counterpart_on_edge_cases(spec, backend):
    ctor = {**spec.required, **{k: spec.grid[-1][k] for k in spec.counterpart_ctor_only}}
    counterpart, twin = edge_case_run(spec, lambda g: spec.counterpart(g, **ctor), torch.float64, counterpart=True)
    ours, params = edge_case_run(spec, lambda g: spec.cls(g, **ctor, backend=backend), torch.float64, counterpart=True)
    assert_same_state(ours, counterpart, params, twin)


def test_params_without_any_grad_leave_no_state_and_do_not_move(backend):
    spec_params = make_params([(3,), (2,)], torch.float32, 0)
    before = clone_params(spec_params)
    optimizer = thalweg.Adam(spec_params, lr=0.1, backend=backend)
    spec_params[0].grad = torch.ones(3)
    optimizer.step()
    assert torch.equal(spec_params[1], before[1])
    assert spec_params[1] not in optimizer.state or not optimizer.state[spec_params[1]]
    assert not torch.equal(spec_params[0], before[0])


@pytest.mark.parametrize("spec", SPECS, ids=repr)
def test_auto_backend_is_a_concrete_backend_and_matches_reference(spec):
    optimizer = spec.cls(make_params([(3,)], torch.float32, 0), **spec.required)
    assert optimizer.backend_for(torch.device("cpu")) in ("reference", "foreach", "fused")
    auto, auto_params = edge_case_run(spec, lambda g: spec.cls(g, **spec.required), torch.float32)
    reference, reference_params = edge_case_run(spec, lambda g: spec.cls(g, **spec.required, backend="reference"), torch.float32)
    assert_same_state(auto, reference, auto_params, reference_params)


@pytest.mark.parametrize("keywords, expected", [
    (dict(foreach=True), "foreach"),
    (dict(foreach=False), "reference"),
    (dict(fused=True), "fused"),
    (dict(backend="foreach", foreach=True), "foreach"),
])
def test_torch_style_foreach_and_fused_keywords_pick_the_backend(keywords, expected):
    optimizer = thalweg.Adam(make_params([(3,)], torch.float32, 0), **keywords)
    assert optimizer.backend == expected


def test_fused_false_keeps_auto_off_the_fused_path():
    optimizer = thalweg.Adam(make_params([(3,)], torch.float32, 0), fused=False)
    assert optimizer.backend_for(torch.device("cpu")) != "fused"


FUSED = engine.unavailable_reason(torch.device("cpu")) is None
TORCH_NAMESAKES = ["SGD", "Adam", "AdamW", "NAdam", "RAdam", "Adamax", "Adadelta", "ASGD", "Rprop", "RMSprop", "Adagrad",
                   "Adafactor", "Muon", "SparseAdam"]


@pytest.mark.parametrize("name", TORCH_NAMESAKES)
def test_param_groups_carry_torchs_backend_keys(name):
    """torch keeps foreach/fused/capturable in every param group (each optimizer its own subset): thalweg's groups
    hold the same keys with the same values, so state_dicts match key for key (thalweg adds only its own options:
    `cautious`, and Muon's `batch_dims`)."""
    ours = getattr(thalweg, name)([torch.nn.Parameter(torch.zeros(2, 2))])
    theirs = getattr(torch.optim, name)([torch.nn.Parameter(torch.zeros(2, 2))])
    group, expected = ours.param_groups[0], theirs.param_groups[0]
    assert set(group) - {"cautious", "batch_dims"} == set(expected)
    for key in ("foreach", "fused", "capturable"):
        assert group.get(key, "absent") == expected.get(key, "absent"), key


def test_a_group_s_own_foreach_and_fused_keys_pick_its_backend():
    """As torch reads them per group: a group added with foreach=False steps with the for-loop, one with
    foreach=True with torch._foreach_*, beside groups that follow the constructor; the results equal the
    reference backend's."""
    params = make_params([(4,), (3,), (5,)], torch.float64, 0)
    optimizer = thalweg.Adam([{"params": [params[0]]}], backend="fused" if FUSED else "foreach", lr=0.1)
    optimizer.add_param_group({"params": [params[1]], "foreach": False})
    optimizer.add_param_group({"params": [params[2]], "foreach": True})
    cpu = torch.device("cpu")
    assert [optimizer.backend_for(cpu, group["params"], group) for group in optimizer.param_groups] == [
        optimizer.backend, "reference", "foreach"]
    reference_params = [p.detach().clone().requires_grad_() for p in params]
    reference = thalweg.Adam([{"params": [p]} for p in reference_params], backend="reference", lr=0.1)
    for step in range(3):
        for group_params in (params, reference_params):
            for index, p in enumerate(group_params):
                p.grad = torch.full_like(p, float(step + index) - 1.5)
        optimizer.step()
        reference.step()
    for p, q in zip(params, reference_params):
        torch.testing.assert_close(p, q, rtol=1e-14, atol=1e-14)


def test_a_loaded_checkpoint_s_backend_keys_apply_as_in_torch():
    params = make_params([(3,)], torch.float32, 0)
    saved = torch.optim.Adam(params, foreach=True).state_dict()
    optimizer = thalweg.Adam(params)
    optimizer.load_state_dict(saved)
    assert optimizer.param_groups[0]["foreach"] is True
    assert optimizer.backend_for(torch.device("cpu"), params, optimizer.param_groups[0]) == "foreach"


@pytest.mark.parametrize("group, error, message", [
    ({"foreach": True, "fused": True}, ValueError, "foreach=True and fused=True cannot be used together"),
    ({"fused": 1}, TypeError, "fused must be True, False or None, got 1"),
    ({"capturable": True}, ValueError, "capturable=True is not supported"),
])
def test_a_group_s_backend_keys_are_checked_when_added(group, error, message):
    params = make_params([(3,), (2,)], torch.float32, 0)
    optimizer = thalweg.Adam([params[0]])
    with pytest.raises(error, match=message):
        optimizer.add_param_group({"params": [params[1]], **group})
    assert len(optimizer.param_groups) == 1


@pytest.mark.skipif(thalweg.engine.unavailable_reason(torch.device("cpu")) is not None,
                    reason="the auto rule chooses between fused and the for-loop only where fused exists")
@pytest.mark.parametrize("cls, shapes, expected", [
    (thalweg.SGD, [(1 << 20,)] * 2, "reference"),     # large tensors: SGD's one in-place op per tensor wins
    (thalweg.SGD, [(1 << 17,)] * 40, "reference"),
    (thalweg.Momentum, [(1 << 17,)] * 40, "fused"),    # momentum: the for-loop makes three passes
    (thalweg.Momentum, [(1 << 20,)] * 2, "fused"),
    (thalweg.Momentum, [(256, 784), (256,), (10, 256), (10,)], "reference"),  # a small model: fixed cost loses
    (thalweg.SGD, [(1000,)] * 40, "fused"),            # many small tensors: dispatch dominates, fusing wins
    (thalweg.SGD, [(1000,)] * 4, "reference"),         # a handful: the kernel call's fixed cost loses
    (thalweg.Adam, [(1 << 20,)], "fused"),              # multi-op updates: one pass beats six
    (thalweg.LAMB, [(3,)] * 4, "fused"),
])
def test_auto_picks_fused_where_it_measured_faster(cls, shapes, expected):
    params = [torch.zeros(shape, requires_grad=True) for shape in shapes]
    optimizer = cls(params, lr=0.1)
    assert optimizer.backend_for(torch.device("cpu"), params, optimizer.param_groups[0]) == expected


def test_adagrad_honours_a_group_initial_accumulator_value():
    # Deliberate difference from torch 2.13, which fills every group's sum with the constructor's value.
    first, second = make_params([(3,)], torch.float32, 0), make_params([(2,)], torch.float32, 1)
    optimizer = thalweg.Adagrad([{"params": first}, {"params": second, "initial_accumulator_value": 0.5}],
                                initial_accumulator_value=0.1)
    assert torch.equal(optimizer.state[first[0]]["sum"], torch.full((3,), 0.1))
    assert torch.equal(optimizer.state[second[0]]["sum"], torch.full((2,), 0.5))


def test_complex_parameters_are_refused_with_the_reason():
    with pytest.raises(TypeError, match=r"params\[0\] has dtype torch.complex64; only floating-point"):
        thalweg.Adam([torch.zeros(3, dtype=torch.complex64, requires_grad=True)])


@pytest.mark.parametrize("turned_on, key", [("momentum", "momentum_buffer"), ("centered", "grad_avg")])
def test_rmsprop_creates_state_when_a_schedule_turns_an_option_on(turned_on, key):
    # torch 2.13 raises KeyError here; thalweg creates the buffer (zeros) when first needed.
    runs = []
    for switch in (False, True):
        params = make_params([(4,)], torch.float32, 0)
        optimizer = thalweg.RMSprop(params, lr=0.01)
        for step in range(4):
            if step == 3 and switch:
                assert key not in optimizer.state[params[0]]
                optimizer.param_groups[0][turned_on] = 0.9 if turned_on == "momentum" else True
            params[0].grad = torch.linspace(-1, 1, 4) * (step + 1)
            optimizer.step()
        runs.append((params[0].detach().clone(), optimizer.state[params[0]]))
    (plain, _), (switched, state) = runs
    assert key in state and torch.isfinite(switched).all()
    if turned_on == "momentum":
        # a fresh zero buffer makes the first momentum step the plain one, up to rounding (the
        # momentum path divides, then scales by lr; the plain one does both in one addcdiv)
        torch.testing.assert_close(switched, plain, rtol=1e-6, atol=1e-7)
    else:
        assert not torch.equal(switched, plain)  # the centred denominator changed the step
