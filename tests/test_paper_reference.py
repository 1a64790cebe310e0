"""Issue 2, point 2: LARS and LAMB against float64 implementations of the paper equations (specs.PaperLARS,
specs.PaperLAMB), for every option combination — trust_ratio off, zero-norm weights and gradients,
Nesterov, no bias correction, weight decay, maximize — on every backend."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from specs import (PAPER_SPECS, Spec, assert_same_state, clone_params, draw_case, grad_stream, make_params, run,
                   split_groups)

FIXED_SHAPES = [(3, 5), (4, 4), (), (0,), (7,), (1, 1, 9)]


def check_against_paper(spec: Spec, combo, backend, shapes, dtype, seed, steps):
    # The first weight starts at zero (‖w‖ = 0: the trust ratio must fall back to 1), and the second
    # gets an all-zero gradient on some steps (‖g‖ = 0 for LARS; for LAMB ‖r‖ may still be > 0).
    params = make_params(shapes, dtype, seed, zero_first=True)
    twin = clone_params(params)
    grads = list(grad_stream(shapes, dtype, seed, steps))
    if len(shapes) > 1:
        for step in (0, 3, 4):
            grads[step][1] = torch.zeros_like(grads[step][1])
    ours = run(lambda ps: spec.build(spec.cls, split_groups(ps, combo, spec), combo, backend=backend), params, grads)
    paper = run(lambda ps: spec.build(spec.counterpart, split_groups(ps, combo, spec), combo), twin, grads)
    assert_same_state(ours, paper, params, twin)
    for index, entry in ours.state_dict()["state"].items():
        assert set(entry) == spec.state_keys(combo), f"state keys of param {index}"
    if combo.get("trust_ratio", True) and shapes[0] != () and 0 not in shapes[0]:
        # A zero weight's trust ratio falls back to 1: it moves (by the plain direction), unlike ‖w‖·(...) = 0.
        assert params[0].detach().abs().sum() > 0


GRID_CASES = [pytest.param(spec, combo, id=f"{spec.name}-{i}") for spec in PAPER_SPECS for i, combo in enumerate(spec.grid)]


@pytest.mark.parametrize("spec, combo", GRID_CASES)
def test_every_option_combination_matches_the_paper_in_float64(spec, combo, backend):
    check_against_paper(spec, combo, backend, FIXED_SHAPES, torch.float64, seed=11, steps=25)


@pytest.mark.parametrize("spec", PAPER_SPECS, ids=repr)
@given(data=st.data())
def test_random_hyperparameters_and_shapes_match_the_paper(spec, backend, data):
    combo, shapes, dtype, seed = draw_case(data, spec, [torch.float64, torch.float32])
    steps = data.draw(st.integers(25, 40), label="steps")
    check_against_paper(spec, combo, backend, shapes, dtype, seed, steps)
