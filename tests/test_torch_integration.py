"""Issue 2, point 6: the torch.optim machinery around an optimizer — GradScaler, closures,
add_param_group, step hooks, a torch.compile'd model, zero_grad."""

from __future__ import annotations

import copy

import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook

import thalweg
from specs import SPECS, TORCH_SPECS, assert_same_state, grad_stream, make_params


def small_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))


def batches(n, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [(torch.randn(16, 6, generator=generator), torch.randint(0, 3, (16,), generator=generator)) for _ in range(n)]


@pytest.mark.parametrize("spec", TORCH_SPECS, ids=repr)
def test_grad_scaler_steps_like_torch_and_skips_inf_steps(spec, backend):
    def train(make):
        model = small_model()
        optimizer = make(model.parameters())
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=3)
        scales = []
        for step, (x, y) in enumerate(batches(12)):
            optimizer.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(x), y)
            scaler.scale(loss).backward()
            if step == 5:
                model[0].weight.grad[0, 0] = float("inf")  # this step must be skipped, the scale halved
            before = [p.detach().clone() for p in model.parameters()]
            scaler.step(optimizer)
            scaler.update()
            if step == 5:
                assert all(torch.equal(a, b) for a, b in zip(before, model.parameters())), "inf step was taken"
            scales.append(scaler.get_scale())
        return model, optimizer, scales

    combo = spec.grid[-1]
    ours_model, ours, our_scales = train(lambda ps: spec.build(spec.cls, ps, combo, backend=backend))
    torch_model, theirs, their_scales = train(lambda ps: spec.build(spec.counterpart, ps, combo))
    assert our_scales == their_scales and our_scales[5] == our_scales[4] / 2
    assert_same_state(ours, theirs, list(ours_model.parameters()), list(torch_model.parameters()))


@pytest.mark.parametrize("spec", SPECS, ids=repr)
def test_step_with_closure_returns_the_loss_and_equals_a_plain_step(spec, backend):
    with_closure_model, plain_model = small_model(), small_model()
    with_closure = spec.cls(with_closure_model.parameters(), **{**spec.required, "lr": spec.train_lr}, backend=backend)
    plain = spec.cls(plain_model.parameters(), **{**spec.required, "lr": spec.train_lr}, backend=backend)
    for x, y in batches(5):
        def closure():
            with_closure.zero_grad()
            loss = torch.nn.functional.cross_entropy(with_closure_model(x), y)
            loss.backward()
            return loss

        returned = with_closure.step(closure)
        plain.zero_grad()
        expected = torch.nn.functional.cross_entropy(plain_model(x), y)
        expected.backward()
        plain.step()
        assert isinstance(returned, torch.Tensor) and torch.equal(returned, expected)
    assert_same_state(with_closure, plain, list(with_closure_model.parameters()), list(plain_model.parameters()), exact=True)


@pytest.mark.parametrize("spec", TORCH_SPECS, ids=repr)
def test_add_param_group_trains_the_new_group_like_torch(spec, backend):
    def train(make):
        params = make_params([(3, 5), (7,)], torch.float32, 2)
        optimizer = make(params[:1])
        grads = list(grad_stream([(3, 5), (7,)], torch.float32, 2, 20))
        for step, grad_list in enumerate(grads):
            if step == 8:
                optimizer.add_param_group({"params": params[1], "lr": 0.02})
            for param, grad in zip(params, grad_list):
                param.grad = grad.clone()
            optimizer.step()
        return optimizer, params

    combo = spec.grid[-1]
    ours, params = train(lambda ps: spec.build(spec.cls, ps, combo, backend=backend))
    theirs, twin = train(lambda ps: spec.build(spec.counterpart, ps, combo))
    assert len(ours.param_groups) == 2 and ours.param_groups[1]["lr"] == 0.02
    assert ours.param_groups[1].keys() - {"params"} == ours.defaults.keys()  # the new group got every default
    assert_same_state(ours, theirs, params, twin)


def test_step_hooks_fire_in_order_around_the_step():
    params = make_params([(3,)], torch.float32, 0)
    optimizer = thalweg.LAMB(params, lr=0.1)
    events = []
    pre = optimizer.register_step_pre_hook(lambda opt, args, kwargs: events.append(("pre", opt, params[0].clone())))
    post = optimizer.register_step_post_hook(lambda opt, args, kwargs: events.append(("post", opt, params[0].clone())))
    global_pre = register_optimizer_step_pre_hook(lambda opt, args, kwargs: events.append(("global", opt, None)))
    try:
        params[0].grad = torch.ones(3)
        optimizer.step()
    finally:
        pre.remove(), post.remove(), global_pre.remove()
    assert [e[0] for e in events] == ["global", "pre", "post"]
    assert all(e[1] is optimizer for e in events)
    assert not torch.equal(events[1][2], events[2][2])  # pre saw the weights before the update, post after
    params[0].grad = torch.ones(3)
    optimizer.step()
    assert len(events) == 3  # removed hooks stay removed


def test_a_pre_hook_may_replace_the_arguments_and_hooks_run_once_for_a_subclass_step():
    """As torch.optim: a pre-hook's (args, kwargs) replace the step's; a subclass that overrides step()
    and calls super().step() still sees each hook once (torch wraps the subclass's step, not ours)."""
    params = make_params([(3,)], torch.float32, 0)
    calls = []

    class Logged(thalweg.Adam):
        def step(self, closure=None):
            calls.append("subclass")
            return super().step(closure)

    for cls in (thalweg.Adam, Logged):
        optimizer = cls(params, lr=0.1)
        closure_calls = []
        closure = lambda: closure_calls.append(1) or torch.tensor(2.0)  # noqa: E731
        optimizer.register_step_pre_hook(lambda opt, args, kwargs: calls.append("pre") or ((args[0],), {"closure": closure}))
        optimizer.register_step_post_hook(lambda opt, args, kwargs: calls.append(("post", kwargs["closure"] is closure)))
        params[0].grad = torch.ones(3)
        assert optimizer.step() == torch.tensor(2.0) and closure_calls == [1]
        expected = ["pre", ("post", True)] if cls is thalweg.Adam else ["pre", "subclass", ("post", True)]
        assert calls == expected, cls
        calls.clear()


def test_step_is_a_named_profiler_range_and_leaves_grad_mode_as_it_was():
    params = make_params([(3,)], torch.float32, 0)
    optimizer = thalweg.Adam(params, lr=0.1)
    params[0].grad = torch.ones(3)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        optimizer.step()
    assert "Optimizer.step#Adam.step" in {event.key for event in profile.key_averages()}
    for enabled in (True, False):
        with torch.set_grad_enabled(enabled):
            optimizer.step()
            assert torch.is_grad_enabled() is enabled
            params[0].grad = torch.sparse_coo_tensor([[0]], [1.0], (3,))  # refused: the step raises
            with pytest.raises(RuntimeError, match="sparse"):
                optimizer.step()
            assert torch.is_grad_enabled() is enabled
            params[0].grad = torch.ones(3)


@pytest.mark.parametrize("set_to_none", [True, False])
def test_zero_grad(set_to_none):
    params = make_params([(3,), (2, 2)], torch.float32, 0)
    optimizer = thalweg.AdamW(params)
    for p in params:
        p.grad = torch.ones_like(p)
    optimizer.zero_grad(set_to_none=set_to_none)
    for p in params:
        assert (p.grad is None) if set_to_none else torch.equal(p.grad, torch.zeros_like(p))
    optimizer.zero_grad()  # torch's default: set_to_none=True
    assert all(p.grad is None for p in params)


def test_compiled_model_trains_like_the_eager_one():
    try:
        import torch._dynamo  # noqa: F401
    except ImportError as error:  # pragma: no cover
        pytest.skip(f"torch.compile unavailable: {error}")
    eager = small_model()
    compiled_source = copy.deepcopy(eager)
    compiled = torch.compile(compiled_source, backend="aot_eager", fullgraph=True)
    eager_opt = thalweg.Adam(eager.parameters(), lr=0.01)
    compiled_opt = thalweg.Adam(compiled.parameters(), lr=0.01)
    for x, y in batches(5):
        for model, optimizer in ((eager, eager_opt), (compiled, compiled_opt)):
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            optimizer.step()
    for a, b in zip(compiled_source.parameters(), eager.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert compiled_opt.state[next(compiled.parameters())]["step"] == 5


@pytest.mark.parametrize("name", ["Adam", "AdamW", "SGD", "Adagrad"])
def test_fused_on_meta_parameters_fails_at_the_step_as_torch_does(name):
    """torch's own suite: fused=True with meta-device parameters constructs, then the step raises RuntimeError
    (issue 12, point 4). thalweg raises the same type at the same stage, naming the device, and changes nothing."""
    outcomes = []
    for cls in (getattr(torch.optim, name), getattr(thalweg, name)):
        param = torch.empty(3, device="meta", requires_grad=True)
        optimizer = cls([param], fused=True)
        param.grad = torch.empty(3, device="meta")
        before = {k: set(v) for k, v in optimizer.state.items()}  # (Adagrad creates its state at construction)
        with pytest.raises(RuntimeError) as error:
            optimizer.step()
        outcomes.append((str(error.value), before == {k: set(v) for k, v in optimizer.state.items()}))
    message, unchanged = outcomes[1]
    assert "meta" in message and "fused" in message and unchanged
