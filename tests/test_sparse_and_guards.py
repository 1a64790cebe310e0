"""Issue 2, points 7 and 8: sparse Adagrad equals dense Adagrad; every other optimizer refuses a sparse
gradient cleanly; max_grad_norm equals clip_grad_norm_ then step; skip_nonfinite leaves everything
untouched and training continues."""

from __future__ import annotations

import copy

import pytest
import torch

import thalweg
from specs import SPECS, assert_same_state, clone_params, grad_stream, make_params, split_groups

SPARSE_SPECS = [s for s in SPECS if s.sparse]
DENSE_ONLY_SPECS = [s for s in SPECS if not s.sparse]


def embedding_run(sparse, make, steps=25):
    torch.manual_seed(0)
    embedding = torch.nn.Embedding(20, 4, sparse=sparse)
    optimizer = make(embedding.parameters())
    generator = torch.Generator().manual_seed(1)
    for _ in range(steps):
        # repeated indices: their gradient rows must be summed before squaring
        indices = torch.cat([torch.randint(0, 20, (6,), generator=generator), torch.tensor([3, 3])])
        optimizer.zero_grad()
        (embedding(indices) * torch.randn(8, 4, generator=generator)).sum().backward()
        assert embedding.weight.grad.is_sparse == sparse
        optimizer.step()
    return optimizer, list(embedding.parameters())


@pytest.mark.parametrize("options", [dict(), dict(lr_decay=0.05, initial_accumulator_value=0.1, eps=1e-6),
                                     dict(maximize=True)], ids=["defaults", "decay-init-eps", "maximize"])
@pytest.mark.parametrize("spec", [s for s in SPARSE_SPECS if s.name == "adagrad"], ids=repr)
def test_sparse_adagrad_equals_dense(spec, backend, options):
    make = lambda ps: spec.cls(ps, lr=0.1, **options, backend=backend)  # noqa: E731
    sparse, sparse_params = embedding_run(True, make)
    dense, dense_params = embedding_run(False, make)
    assert_same_state(sparse, dense, sparse_params, dense_params)
    torch_sparse, torch_params = embedding_run(True, lambda ps: spec.counterpart(ps, lr=0.1, **options))
    assert_same_state(sparse, torch_sparse, sparse_params, torch_params)


@pytest.mark.parametrize("options", [dict(), dict(momentum=0.9), dict(momentum=0.9, nesterov=True),
                                     dict(momentum=0.5, dampening=0.3, maximize=True)],
                         ids=["plain", "momentum", "nesterov", "dampening-maximize"])
def test_sparse_sgd_equals_dense_and_torch(backend, options):
    """torch's SGD takes sparse gradients; so does thalweg's (the rule on torch's sparse arithmetic), whatever
    the backend chosen for dense ones. torch keeps a sparse momentum buffer, thalweg a dense one: same values."""
    make = lambda ps: thalweg.SGD(ps, lr=0.1, **options, backend=backend)  # noqa: E731
    sparse, sparse_params = embedding_run(True, make)
    dense, dense_params = embedding_run(False, make)
    assert_same_state(sparse, dense, sparse_params, dense_params)
    torch_sparse, torch_params = embedding_run(True, lambda ps: torch.optim.SGD(ps, lr=0.1, **options))
    # torch's sparse buffer sums in another order (coalescing): float32 rounding apart
    for ours, theirs in zip(sparse_params, torch_params):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    for ours, theirs in zip(sparse.state.values(), torch_sparse.state.values()):
        assert set(ours) == set(theirs)
        for key in theirs:
            expected = theirs[key].to_dense() if theirs[key].is_sparse else theirs[key]
            torch.testing.assert_close(ours[key], expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("cls", [thalweg.Adagrad, thalweg.SGD], ids=lambda c: c.__name__)
def test_sparse_grad_with_weight_decay_is_refused(cls):
    optimizer = cls(torch.nn.Embedding(5, 2, sparse=True).parameters(), weight_decay=0.1)
    param = optimizer.param_groups[0]["params"][0]
    param.grad = torch.sparse_coo_tensor([[1]], torch.ones(1, 2), (5, 2), check_invariants=True)
    with pytest.raises(RuntimeError, match=r"weight_decay=0\.1 cannot be used with sparse gradients"):
        optimizer.step()


def snapshot(optimizer, params):
    return [p.detach().clone() for p in params], copy.deepcopy(optimizer.state_dict())


def assert_untouched(optimizer, params, before):
    before_params, before_state = before
    assert all(torch.equal(a, b) for a, b in zip(params, before_params)), "parameters changed"
    after_state = optimizer.state_dict()
    assert after_state["state"].keys() == before_state["state"].keys()
    for index, entry in before_state["state"].items():
        assert entry.keys() == after_state["state"][index].keys()
        for key, value in entry.items():
            assert torch.equal(torch.as_tensor(after_state["state"][index][key]), torch.as_tensor(value)), f"state {key} changed"


@pytest.mark.parametrize("spec", DENSE_ONLY_SPECS, ids=repr)
def test_other_optimizers_refuse_a_sparse_grad_and_change_nothing(spec, backend):
    params = make_params([(5, 2), (3,)], torch.float32, 0)
    optimizer = spec.cls([{"params": params[:1]}, {"params": params[1:]}], **spec.required, backend=backend)
    for grads in grad_stream([(5, 2), (3,)], torch.float32, 0, 3):  # build some state first
        for p, g in zip(params, grads):
            p.grad = g
        optimizer.step()
    params[1].grad = torch.ones(3)  # the other group is fine: it must not move either
    params[0].grad = torch.sparse_coo_tensor([[1, 3]], torch.ones(2, 2), (5, 2), check_invariants=True)
    before = snapshot(optimizer, params)
    with pytest.raises(RuntimeError, match=rf"{spec.cls.__name__} does not support sparse gradients"):
        optimizer.step()
    assert_untouched(optimizer, params, before)


# -- max_grad_norm ----------------------------------------------------------------------------


@pytest.mark.parametrize("max_norm", [0.5, 1e3], ids=["clips", "no-op"])
@pytest.mark.parametrize("spec", SPECS, ids=repr)
def test_max_grad_norm_equals_clip_grad_norm_then_step(spec, backend, max_norm):
    shapes = [(3, 5), (7,), (), (0,)]
    combo = spec.grid[-1]
    params = make_params(shapes, torch.float32, 6)
    twin = clone_params(params)
    ours = spec.build(spec.cls, split_groups(params, combo, spec), combo, backend=backend, max_grad_norm=max_norm)
    manual = spec.build(spec.cls, split_groups(twin, combo, spec), combo, backend=backend)
    for grads in grad_stream(shapes, torch.float32, 6, 10):
        for p, t, g in zip(params, twin, grads):
            p.grad, t.grad = g.clone(), g.clone()
        expected_norm = torch.nn.utils.clip_grad_norm_(twin, max_norm)
        manual.step()
        ours.step()
        assert isinstance(ours.last_grad_norm, torch.Tensor)
        torch.testing.assert_close(ours.last_grad_norm, expected_norm, rtol=1e-6, atol=0)
        for p, t in zip(params, twin):  # the gradients themselves are clipped in place, as clip_grad_norm_ does
            torch.testing.assert_close(p.grad, t.grad, rtol=1e-6, atol=1e-7)
    assert_same_state(ours, manual, params, twin)


def test_last_grad_norm_is_none_before_any_step_and_without_clipping():
    params = make_params([(3,)], torch.float32, 0)
    clipped, plain = thalweg.Adam(params, max_grad_norm=1.0), thalweg.Adam(clone_params(params))
    assert clipped.last_grad_norm is None and plain.last_grad_norm is None


# -- skip_nonfinite ---------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("spec", SPECS, ids=repr)
def test_skip_nonfinite_leaves_everything_untouched_and_training_continues(spec, backend, bad):
    shapes = [(3, 5), (7,), ()]
    combo = spec.grid[-1]
    params = make_params(shapes, torch.float32, 8)
    twin = clone_params(params)
    ours = spec.build(spec.cls, split_groups(params, combo, spec), combo, backend=backend, skip_nonfinite=True)
    never_saw_it = spec.build(spec.cls, split_groups(twin, combo, spec), combo, backend=backend)
    for step, grads in enumerate(grad_stream(shapes, torch.float32, 8, 12)):
        for p, g in zip(params, grads):
            p.grad = g.clone()
        if step in (4, 7):
            params[1].grad[2] = bad
            before = snapshot(ours, params)
            ours.step()
            assert_untouched(ours, params, before)
            continue
        for t, g in zip(twin, grads):
            t.grad = g.clone()
        ours.step()
        never_saw_it.step()
    assert ours.skipped_steps == 2
    # The skipped steps left no trace: the run equals one that never saw them, bit for bit.
    assert_same_state(ours, never_saw_it, params, twin, exact=True)


def test_skip_nonfinite_with_clipping_records_the_bad_norm():
    params = make_params([(3,)], torch.float32, 0)
    optimizer = thalweg.SGD(params, lr=0.1, max_grad_norm=1.0, skip_nonfinite=True)
    params[0].grad = torch.tensor([1.0, float("nan"), 0.0])
    optimizer.step()
    assert optimizer.skipped_steps == 1 and torch.isnan(optimizer.last_grad_norm)


def test_without_skip_nonfinite_a_nan_grad_is_applied_as_torch_does():
    params = make_params([(3,)], torch.float32, 0)
    optimizer = thalweg.SGD(params, lr=0.1)
    params[0].grad = torch.tensor([1.0, float("nan"), 0.0])
    optimizer.step()
    assert torch.isnan(params[0][1]) and optimizer.skipped_steps == 0


@pytest.mark.parametrize("spec", [s for s in SPECS if s.name in ("adam", "momentum", "lamb")], ids=repr)
def test_finite_gradients_whose_float32_squares_overflow_are_not_nonfinite(spec):
    """The rule (issue #16, finding 5): a step is non-finite when a gradient holds a NaN or an infinity.
    Gradients of 1e20 are finite, but the sum of their squares overflows float32: the global norm is
    accumulated in float64 on every backend, so every backend takes the step (none skips it) and clips by
    the same finite norm."""
    results = {}
    for backend in ("reference", "foreach", "fused"):
        if backend == "fused" and thalweg.engine.unavailable_reason(torch.device("cpu")) is not None:
            continue
        params = make_params([(4,), (3, 2)], torch.float32, 11)
        optimizer = spec.cls(params, **spec.required, backend=backend, skip_nonfinite=True, max_grad_norm=1.0)
        for p in params:
            p.grad = torch.full_like(p, 1e20)
        optimizer.step()
        assert optimizer.skipped_steps == 0, backend
        assert torch.isfinite(optimizer.last_grad_norm) and float(optimizer.last_grad_norm) > 1e20, backend
        results[backend] = [p.detach().clone() for p in params]
    reference = results.pop("reference")
    for backend, params in results.items():
        for a, e in zip(params, reference):
            torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-6, msg=lambda m: f"{backend}: {m}")
