"""A step that raises changes nothing, and a checkpoint that does not fit is refused at load (issue #16, 4 and 6).

Each case spoils one thing about the *second* parameter (or a later group) of an optimizer that has
already stepped, so that a step writing as it goes would have moved the first parameter and advanced
its counter before reaching the bad one. The step must raise an error that names the parameter (group,
position, name) and the entry, and leave every parameter and every state entry as it was, with no
state created.
"""

from __future__ import annotations

import copy

import pytest
import torch

import thalweg
from specs import BACKENDS, SPECS, SPEC_BY_NAME

OPTIONS = {"sgd": dict(lr=0.1, momentum=0.9), "momentum": dict(lr=0.1), "adam": dict(lr=0.01, amsgrad=True),
           "adamw": dict(lr=0.01, weight_decay=0.1), "rmsprop": dict(lr=0.01, centered=True, momentum=0.5),
           "adagrad": dict(lr=0.1), "lars": dict(lr=0.5), "lamb": dict(lr=0.01),
           "nadam": dict(lr=0.01, weight_decay=0.1), "radam": dict(lr=0.01), "adamax": dict(lr=0.01),
           "adadelta": dict(weight_decay=0.1), "asgd": dict(t0=1.0), "rprop": dict(lr=0.01),
           "lion": dict(lr=0.01, weight_decay=0.1, cautious=True), "adan": dict(lr=0.01, cautious=True),
           "ademamix": dict(lr=0.01, alpha_warmup=5, beta3_warmup=5), "adopt": dict(lr=0.01),
           "stableadamw": dict(lr=0.01, cautious=True)}
CASES = [(spec.name, backend) for spec in SPECS for backend in BACKENDS]


def _make(name, backend, *, named=False, groups=1):
    generator = torch.Generator().manual_seed(0)
    params = [torch.randn(3, generator=generator).requires_grad_(), torch.randn(2, 2, generator=generator).requires_grad_(),
              torch.randn(4, generator=generator).requires_grad_()]
    entries = list(zip(["head.weight", "body.weight", "tail.bias"], params)) if named else params
    groups_arg = entries if groups == 1 else [{"params": entries[:2]}, {"params": entries[2:]}]
    optimizer = SPEC_BY_NAME[name].cls(groups_arg, backend=backend, **OPTIONS[name])
    for _ in range(2):
        _grads(params, generator)
        optimizer.step()
    _grads(params, generator)
    return optimizer, params


def _grads(params, generator):
    for param in params:
        param.grad = torch.randn(param.shape, generator=generator)


def _snapshot(optimizer, params):
    state = {id(p): {k: (v.clone() if torch.is_tensor(v) else copy.deepcopy(v)) for k, v in s.items()}
             for p, s in optimizer.state.items()}
    return [p.detach().clone() for p in params], state


def _assert_unchanged(optimizer, params, snapshot):
    values, state = snapshot
    for index, (param, value) in enumerate(zip(params, values)):
        if param.shape == value.shape:
            assert torch.equal(param.detach(), value), f"params[{index}] was written"
    now = {id(p): s for p, s in optimizer.state.items()}
    assert set(now) == set(state), "state was created or dropped for some parameter"
    for key, entries in state.items():
        assert set(now[key]) == set(entries), f"state keys changed: {sorted(now[key])} != {sorted(entries)}"
        for entry, value in entries.items():
            if torch.is_tensor(value) and torch.is_tensor(now[key][entry]) and value.shape == now[key][entry].shape:
                assert torch.equal(now[key][entry], value), f"state[{entry!r}] was written"


def _expect_refusal(optimizer, params, *fragments):
    snapshot = _snapshot(optimizer, params)
    with pytest.raises(RuntimeError) as error:
        optimizer.step()
    for fragment in fragments:
        assert fragment in str(error.value), f"{fragment!r} not in {error.value}"
    _assert_unchanged(optimizer, params, snapshot)


@pytest.mark.parametrize("name,backend", CASES)
def test_a_gradient_of_another_shape_set_through_data(name, backend):
    optimizer, params = _make(name, backend, named=True)
    params[1].grad.data = torch.ones(5)
    _expect_refusal(optimizer, params, "param group 0, params[1] ('body.weight')", "gradient")


@pytest.mark.parametrize("name,backend", CASES)
def test_a_gradient_of_another_dtype_set_through_data(name, backend):
    optimizer, params = _make(name, backend)
    params[1].grad.data = params[1].grad.data.double()
    _expect_refusal(optimizer, params, "params[1]", "float64")


@pytest.mark.parametrize("name,backend", CASES)
def test_a_parameter_given_another_shape_mid_run(name, backend):
    optimizer, params = _make(name, backend)
    if not optimizer.state.get(params[1]):
        pytest.skip("no per-parameter state to disagree with")  # SGD without momentum is not among OPTIONS
    params[1].data = torch.zeros(6)
    params[1].grad = torch.ones(6)
    _expect_refusal(optimizer, params, "params[1]", "state[")


@pytest.mark.parametrize("name,backend", CASES)
@pytest.mark.parametrize("value", [None, [0.0, 1.0]], ids=["None", "list"])
def test_a_state_entry_that_is_not_a_tensor(name, backend, value):
    optimizer, params = _make(name, backend)
    key = next(k for k in optimizer.state[params[1]] if k != "step")
    optimizer.state[params[1]][key] = value
    _expect_refusal(optimizer, params, "params[1]", repr(key))


# SGD's and LARS's state is their momentum buffer alone: without it, a state is new (torch alike), not damaged.
@pytest.mark.parametrize("name,backend", [(name, backend) for name, backend in CASES
                                          if SPEC_BY_NAME[name].cls.counts_steps])
def test_a_state_entry_missing_in_a_later_group(name, backend):
    optimizer, params = _make(name, backend, groups=2)
    key = next(k for k in optimizer.state[params[2]] if k != "step")
    del optimizer.state[params[2]][key]
    _expect_refusal(optimizer, params, "param group 1, params[0]", repr(key))


@pytest.mark.parametrize("name,backend", CASES)
def test_state_created_by_a_failing_first_step_is_taken_back(name, backend):
    generator = torch.Generator().manual_seed(0)
    params = [torch.randn(3, generator=generator).requires_grad_(), torch.randn(2, 2, generator=generator).requires_grad_()]
    optimizer = SPEC_BY_NAME[name].cls(params, backend=backend, **OPTIONS[name])
    before = {p: dict(s) for p, s in optimizer.state.items()}  # Adagrad creates its state at construction
    _grads(params, generator)
    params[1].grad.data = torch.ones(3)
    with pytest.raises(RuntimeError, match=r"params\[1\]"):
        optimizer.step()
    assert {p: set(s) for p, s in optimizer.state.items()} == {p: set(s) for p, s in before.items()}


def test_the_issue_example():
    a, b = torch.zeros(3, requires_grad=True), torch.zeros(2, 2, requires_grad=True)
    optimizer = thalweg.Adam([a, b], lr=0.1, backend="reference")
    a.grad, b.grad = torch.ones(3), torch.ones(2, 2)
    b.grad.data = torch.ones(5)
    with pytest.raises(RuntimeError, match=r"params\[1\].*gradient"):
        optimizer.step()
    assert torch.equal(a, torch.zeros(3)) and len(optimizer.state) == 0


# -- checkpoints -----------------------------------------------------------------------------------


def _checkpoint(name, backend="reference"):
    optimizer, params = _make(name, backend)
    optimizer.step()
    return optimizer.state_dict()


def _expect_load_refused(optimizer, params, checkpoint, *fragments):
    snapshot = _snapshot(optimizer, params)
    groups = copy.deepcopy([{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups])
    with pytest.raises(ValueError) as error:
        optimizer.load_state_dict(checkpoint)
    for fragment in fragments:
        assert fragment in str(error.value), f"{fragment!r} not in {error.value}"
    _assert_unchanged(optimizer, params, snapshot)
    assert [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups] == groups


@pytest.mark.parametrize("name", [spec.name for spec in SPECS if spec.cls.counts_steps])  # (SGD, LARS, Lion keep none)
def test_a_state_without_step_is_refused(name):
    checkpoint = _checkpoint(name)
    del checkpoint["state"][1]["step"]
    optimizer, params = _make(name, "reference")
    _expect_load_refused(optimizer, params, checkpoint, "param 1", "'step'")


@pytest.mark.parametrize("step", [-1.0, float("nan"), "3", torch.tensor([1.0, 2.0])], ids=["negative", "nan", "str", "vector"])
def test_a_step_that_is_not_a_count_is_refused(step):
    checkpoint = _checkpoint("adam")
    checkpoint["state"][1]["step"] = step
    optimizer, params = _make("adam", "reference")
    _expect_load_refused(optimizer, params, checkpoint, "param 1", "'step' must be a count")


@pytest.mark.parametrize("value,fragment", [(None, "must be a tensor"), ([0.0] * 4, "must be a tensor"),
                                            (torch.zeros(4), "has shape (4,)")], ids=["None", "list", "shape"])
def test_a_state_entry_that_does_not_fit_is_refused(value, fragment):
    checkpoint = _checkpoint("adam")
    checkpoint["state"][1]["exp_avg"] = value
    optimizer, params = _make("adam", "reference")
    _expect_load_refused(optimizer, params, checkpoint, "param 1", "'exp_avg'", fragment)


@pytest.mark.parametrize("source,target", [("sgd", "adam"), ("adam", "sgd"), ("lamb", "lars"), ("lars", "lamb"),
                                           ("adam", "rmsprop"), ("rmsprop", "adagrad"), ("adagrad", "adam")])
def test_a_checkpoint_of_another_optimizer_is_refused(source, target):
    checkpoint = _checkpoint(source)
    optimizer, params = _make(target, "reference")
    _expect_load_refused(optimizer, params, checkpoint, "checkpoint")


@pytest.mark.parametrize("key", ["lr", "betas"])
def test_a_group_missing_a_hyperparameter_is_refused(key):
    checkpoint = _checkpoint("adam")
    del checkpoint["param_groups"][0][key]
    optimizer, params = _make("adam", "reference")
    _expect_load_refused(optimizer, params, checkpoint, repr(key))


def test_a_group_count_that_differs_is_refused():
    checkpoint = _checkpoint("adam")
    optimizer, params = _make("adam", "reference", groups=2)
    _expect_load_refused(optimizer, params, checkpoint, "1 param groups")


def test_a_torch_adamw_checkpoint_steps_thalweg_adam_with_decoupled_decay():
    """torch's AdamW is Adam with the group key ``decoupled_weight_decay=True``; its checkpoint loaded into
    ``thalweg.Adam`` (as into ``torch.optim.Adam``) must keep decaying the weights directly."""
    generator = torch.Generator().manual_seed(0)
    start = [torch.randn(5, generator=generator), torch.randn(2, 3, generator=generator)]
    grads = [[torch.randn(p.shape, generator=generator) for p in start] for _ in range(4)]
    runs = {}
    for who in ("torch", "thalweg"):
        params = [p.clone().requires_grad_() for p in start]
        saver = torch.optim.AdamW(params, lr=0.05, weight_decay=0.5)
        for step_grads in grads[:2]:
            for p, g in zip(params, step_grads):
                p.grad = g.clone()
            saver.step()
        resumed = (torch.optim.Adam if who == "torch" else thalweg.Adam)(params, lr=0.05, weight_decay=0.5)
        resumed.load_state_dict(saver.state_dict())
        for step_grads in grads[2:]:
            for p, g in zip(params, step_grads):
                p.grad = g.clone()
            resumed.step()
        runs[who] = params
    for ours, theirs in zip(runs["thalweg"], runs["torch"]):
        torch.testing.assert_close(ours, theirs)


def test_a_torch_checkpoint_with_a_numeric_step_loads_as_torch_legacy_ones_do():
    """torch < 1.12 saved ``step`` as a Python number; torch.optim still loads such checkpoints."""
    generator = torch.Generator().manual_seed(0)
    params = [torch.randn(4, generator=generator).requires_grad_()]
    saver = torch.optim.Adam(params, lr=0.01)
    params[0].grad = torch.randn(4, generator=generator)
    saver.step()
    checkpoint = saver.state_dict()
    checkpoint["state"][0]["step"] = 1
    twins = [p.detach().clone().requires_grad_() for p in params]
    ours, theirs = thalweg.Adam(params, lr=0.01), torch.optim.Adam(twins, lr=0.01)
    ours.load_state_dict(copy.deepcopy(checkpoint))
    theirs.load_state_dict(copy.deepcopy(checkpoint))
    grad = torch.randn(4, generator=generator)
    params[0].grad, twins[0].grad = grad.clone(), grad.clone()
    ours.step()
    theirs.step()
    torch.testing.assert_close(params[0], twins[0])
    assert float(ours.state[params[0]]["step"]) == 2.0 and torch.is_tensor(ours.state[params[0]]["step"])


def test_a_checkpoint_from_an_older_torch_without_newer_keys_loads():
    """Keys torch added over the releases (``maximize``, ``foreach``, ``decoupled_weight_decay``...) may be
    absent from an old checkpoint: they take this optimizer's values, as torch.optim's loading does."""
    checkpoint = _checkpoint("adam")
    for key in ("maximize", "decoupled_weight_decay", "amsgrad"):
        del checkpoint["param_groups"][0][key]
    optimizer, params = _make("adam", "reference")
    optimizer.load_state_dict(checkpoint)
    optimizer.step()
