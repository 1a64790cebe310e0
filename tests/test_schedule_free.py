"""Schedule-Free AdamW and SGD (Defazio et al. 2024; the ``schedulefree`` package 1.4.1): every backend against
a float64 reference written here in the paper's form (x and z kept, y formed from them), and against the
package itself; train/eval, checkpoints, schedulers, bad input, a training run, and FSDP2 sharding.
(Not in specs.SPECS: the train/eval switch and the group schedule need their own tests, and the paper
reference is not a torch.optim counterpart that the generated suites could drive.)"""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from specs import SHAPES, assert_close, run_on_processes

import thalweg

BACKENDS = ("reference", "foreach", "fused")
STEPS = 25
KINDS = {"adamw": thalweg.ScheduleFreeAdamW, "sgd": thalweg.ScheduleFreeSGD}

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# -- the float64 reference: the paper's x, y, z ----------------------------------------------------------


class PaperScheduleFree:
    """Schedule-Free in its paper form, float64, on its own copies of the parameters (Defazio et al. 2024,
    Alg. 1, with the package's warm-up, weighting and AdamW normalisation; AdamWScheduleFreeReference):

        gamma = lr * min(1, t / warmup_steps); lr_max = max(lr_max, gamma); w = t^r * lr_max^p
        c = w / sum(w) (0 while the sum is 0);  y = (1 - beta) z + beta x   (the gradient is taken at y)
        d = g + wd * y  (SGD)   or   v = b2 v + (1 - b2) g^2,  d = g / (sqrt(v / (1 - b2^t)) + eps) + wd * y
        z = z - gamma * d;  x = (1 - c) x + c z

    A parameter without a gradient is left alone; its x, z (and v) start at its value on its first step."""

    def __init__(self, kind: str, groups: list[tuple[list[torch.Tensor], dict]]):
        self.kind = kind
        self.groups = [dict(options, k=0, lr_max=-1.0, weight_sum=0.0, x=[p.double().clone() for p in params],
                            z=[None] * len(params), v=[None] * len(params)) for params, options in groups]

    def step(self, grads: list[list[torch.Tensor | None]]) -> None:
        for group, group_grads in zip(self.groups, grads):
            t = group["k"] + 1
            gamma = group["lr"] * (t / group["warmup_steps"] if group["k"] < group["warmup_steps"] else 1.0)
            group["lr_max"] = max(group["lr_max"], gamma)
            weight = t ** group["r"] * group["lr_max"] ** group["weight_lr_power"]
            group["weight_sum"] += weight
            c = weight / group["weight_sum"] if group["weight_sum"] else 0.0
            beta = group["beta"]
            for i, grad in enumerate(group_grads):
                if grad is None:
                    continue
                g = -grad.double() if group["maximize"] else grad.double()
                if group["z"][i] is None:
                    group["z"][i] = group["x"][i].clone()
                    group["v"][i] = torch.zeros_like(g)
                x, z = group["x"][i], group["z"][i]
                y = (1 - beta) * z + beta * x
                if self.kind == "adamw":
                    v = group["v"][i] = group["beta2"] * group["v"][i] + (1 - group["beta2"]) * g * g
                    d = g / (torch.sqrt(v / (1 - group["beta2"] ** t)) + group["eps"]) + group["weight_decay"] * y
                else:
                    d = g + group["weight_decay"] * y
                z = group["z"][i] = z - gamma * d
                group["x"][i] = (1 - c) * x + c * z
            group["k"] = t

    def y(self, group: int, i: int) -> torch.Tensor:
        g = self.groups[group]
        return g["x"][i] if g["z"][i] is None else (1 - g["beta"]) * g["z"][i] + g["beta"] * g["x"][i]


def _options(kind: str, combo: dict) -> dict:
    """The thalweg constructor's keywords for a drawn combination."""
    common = {k: combo[k] for k in ("lr", "weight_decay", "warmup_steps", "r", "weight_lr_power", "maximize")}
    if kind == "adamw":
        return dict(common, betas=(combo["beta"], combo["beta2"]), eps=combo["eps"])
    return dict(common, momentum=combo["beta"])


def combos(kind: str):
    return st.fixed_dictionaries(dict(
        lr=st.floats(1e-3, 0.05) if kind == "adamw" else st.floats(1e-3, 1.0),
        beta=st.floats(0.5, 0.99), beta2=st.floats(0.9, 0.9999), eps=st.sampled_from([1e-8, 1e-3]),
        weight_decay=st.sampled_from([0.0, 0.1]) | st.floats(1e-4, 0.3),
        warmup_steps=st.sampled_from([0, 0, 5]) | st.integers(1, 30),
        r=st.sampled_from([0.0, 0.0, 1.0]) | st.floats(0.1, 2.0),
        weight_lr_power=st.sampled_from([2.0, 0.0]) | st.floats(0.5, 3.0),
        maximize=st.booleans()))


def _inputs(shapes, dtype, seed: int, steps: int = STEPS):
    """Start values and a gradient stream (drawn in float64, cast to ``dtype``: every dtype sees the same
    numbers); parameter 0 has no gradient on steps 0, 4, 8... (its state starts on step 1)."""
    generator = torch.Generator().manual_seed(seed)
    starts = [torch.randn(s, generator=generator, dtype=torch.float64).to(dtype) for s in shapes]
    grads = []
    for step in range(steps):
        scale = float(torch.empty(()).uniform_(0.1, 3.0, generator=generator))
        grads.append([None if (i == 0 and step % 4 == 0) else
                      (scale * torch.randn(s, generator=generator, dtype=torch.float64)).to(dtype)
                      for i, s in enumerate(shapes)])
    return starts, grads


def _run_against_reference(kind, combo, shapes, dtype, seed, backend):
    starts, grads = _inputs(shapes, dtype, seed)
    params = [torch.nn.Parameter(s.clone()) for s in starts]
    split = (len(params) + 1) // 2  # two groups: the second at half the lr, without weight decay (maybe empty)
    second = dict(lr=combo["lr"] / 2, weight_decay=0.0)
    optimizer = KINDS[kind]([{"params": params[:split]}, {"params": params[split:], **second}],
                            backend=backend, **_options(kind, combo))
    reference = PaperScheduleFree(kind, [(starts[:split], combo), (starts[split:], {**combo, **second})])
    for step_grads in grads:
        for param, grad in zip(params, step_grads):
            param.grad = grad
        optimizer.step()
        reference.step([step_grads[:split], step_grads[split:]])
    return params, optimizer, reference, split


def _where(reference, split, index):
    return (0, index) if index < split else (1, index - split)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", KINDS)
@given(data=st.data())
def test_every_backend_matches_the_paper_reference(kind, backend, data):
    """25 steps, params and every state tensor, in train mode (y), after eval() (x) and back after train()."""
    if backend == "fused" and thalweg.engine.unavailable_reason("cpu") is not None:
        pytest.skip(f"backend='fused' unavailable on CPU: {thalweg.engine.unavailable_reason('cpu')}")
    combo = data.draw(combos(kind), label="hyper-parameters")
    shapes = data.draw(st.lists(st.sampled_from(SHAPES), min_size=1, max_size=4), label="shapes")
    dtype = data.draw(st.sampled_from([torch.float32, torch.float64]), label="dtype")
    seed = data.draw(st.integers(0, 2**16), label="seed")
    params, optimizer, reference, split = _run_against_reference(kind, combo, shapes, dtype, seed, backend)
    iterates = [_iterates(reference, *_where(reference, split, index)) for index in range(len(params))]
    for index, (param, (x, y, z, v)) in enumerate(zip(params, iterates)):
        assert set(optimizer.state[param]) == ({"z", "exp_avg_sq"} if kind == "adamw" else {"z"})
        assert all(t.dtype == dtype for t in optimizer.state[param].values())
        _assert_close(param, y, x, y, z, what=f"y of param {index}")
        _assert_close(optimizer.state[param]["z"], z, x, y, z, what=f"z of param {index}")
        if kind == "adamw":
            assert_close(optimizer.state[param]["exp_avg_sq"], v.to(dtype), what=f"v of param {index}")
    for group, expected in zip(optimizer.param_groups, reference.groups):
        assert group["k"] == STEPS and group["lr_max"] == expected["lr_max"]
        assert group["weight_sum"] == pytest.approx(expected["weight_sum"], rel=1e-12)
    optimizer.eval()
    for index, (param, (x, y, z, _)) in enumerate(zip(params, iterates)):
        _assert_close(param, x, x, y, z, what=f"x of param {index}")
    optimizer.train()
    for index, (param, (x, y, z, _)) in enumerate(zip(params, iterates)):
        _assert_close(param, y, x, y, z, what=f"y of param {index}, back from x")


def _iterates(reference, group, i):
    """x, y, z (and v) of one parameter in the reference."""
    g = reference.groups[group]
    return g["x"][i], reference.y(group, i), g["z"][i], g["v"][i]


def _assert_close(actual, expected, *iterates, what):
    """Within the dtype's tolerance (1e-10 float64, 1e-5 float32) relative to the parameter's largest iterate:
    x, y and z are interpolations of one another, so a float32 rounding of z (|z| >> |x| when the average
    sits near 0) shows in x at z's scale, not x's."""
    tol = {torch.float32: 1e-5, torch.float64: 1e-10}[actual.dtype]
    scale = max([float(t.abs().max()) for t in iterates if t is not None and t.numel()] + [1e-30])
    torch.testing.assert_close(actual.detach().double(), expected.double(), rtol=tol, atol=tol * scale,
                               msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("kind", KINDS)
def test_the_triton_kernels_match_the_reference_backend(kind, dtype, monkeypatch):
    """The CUDA backend's Triton kernels, generated from the rule and run by Triton's interpreter on CPU tensors
    (as tests/test_triton.py does for the optimizers of specs.SPECS), multi-chunk tensors included."""
    triton = pytest.importorskip("triton", reason="triton is not installed: its kernels cannot be interpreted")
    if type(triton.language.zeros).__name__ != "InterpretedFunction":
        pytest.skip("triton was imported without TRITON_INTERPRET=1 (conftest.py sets it only without CUDA)")
    from thalweg.engine import driver, gpu

    monkeypatch.setattr(driver, "_launcher", lambda device: gpu)
    monkeypatch.setattr(gpu, "CHUNK", 256)  # a 1000-element tensor spans four programs
    monkeypatch.setattr(gpu, "BLOCK", 128)
    generated = []  # the programs whose Triton kernels ran
    kernels = gpu.kernels
    monkeypatch.setattr(gpu, "kernels", lambda program, *args: generated.append(program) or kernels(program, *args))
    combo = dict(lr=0.01 if kind == "adamw" else 0.1, beta=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1,
                 warmup_steps=3, r=1.0, weight_lr_power=2.0, maximize=True)
    shapes = [(3, 5), (), (0,), (1000,), (2, 3, 4)]
    runs = [_run_against_reference(kind, combo, shapes, dtype, 0, backend) for backend in ("reference", "fused")]
    (expected, expected_optimizer, *_), (actual, optimizer, reference, split) = runs
    assert generated and generated[0].rule is KINDS[kind].rule
    for index, (a, b) in enumerate(zip(actual, expected)):
        iterates = _iterates(reference, *_where(reference, split, index))[:3]
        _assert_close(a, b.detach().double(), *iterates, what=f"y of param {index}")
        for key, value in expected_optimizer.state[b].items():
            _assert_close(optimizer.state[a][key], value.double(), value, what=f"{key} of param {index}")


# -- the package itself ------------------------------------------------------------------------------------

PACKAGE_OPTIONS = {"adamw": dict(lr=0.02, betas=(0.8, 0.99), weight_decay=0.05, warmup_steps=6, r=0.5,
                                 weight_lr_power=2.0),
                   "sgd": dict(lr=0.3, momentum=0.85, weight_decay=0.05, warmup_steps=6, r=0.5, weight_lr_power=1.0)}
PACKAGE_SHAPES = [(4, 3), (), (0,), (7,), (2, 1, 5)]


def _package_class(kind: str):
    schedulefree = pytest.importorskip("schedulefree", reason="the schedulefree package (pip install "
                                       "schedulefree==1.4.1) is not installed: nothing to compare against")
    return {"adamw": schedulefree.AdamWScheduleFree, "sgd": schedulefree.SGDScheduleFree}[kind]


def _two_groups(params):
    return [{"params": params[:2]}, {"params": params[2:], "lr": 0.01, "weight_decay": 0.0}]


def _run_pair(kind, dtype, backend, steps=STEPS, *, foreach=False):
    """The package and thalweg side by side on the same parameters and gradients (a copy each: the package
    rewrites p.grad in place)."""
    starts, grads = _inputs(PACKAGE_SHAPES, dtype, seed=3, steps=steps)
    ours = [torch.nn.Parameter(s.clone()) for s in starts]
    theirs = [torch.nn.Parameter(s.clone()) for s in starts]
    mine = KINDS[kind](_two_groups(ours), backend=backend, **PACKAGE_OPTIONS[kind])
    package = _package_class(kind)(_two_groups(theirs), foreach=foreach, **PACKAGE_OPTIONS[kind])
    package.train()  # the package starts in eval mode
    for step_grads in grads:
        for a, b, g in zip(ours, theirs, step_grads):
            a.grad, b.grad = (None, None) if g is None else (g.clone(), g.clone())
        mine.step()
        package.step()
    return ours, mine, theirs, package


def _compare(ours, mine, theirs, package, dtype, exact: bool):
    check = torch.testing.assert_close if not exact else lambda a, b, **_: torch.equal(a, b) or pytest.fail(
        f"not bitwise equal: max difference {float((a - b).abs().max())}")
    tol = dict(rtol=1e-10, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-6)
    for index, (a, b) in enumerate(zip(ours, theirs)):
        check(a.detach(), b.detach(), **tol)
        assert set(mine.state[a]) == set(package.state[b]), index
        for key, value in package.state[b].items():
            check(mine.state[a][key], value, **tol)
    for ours_group, their_group in zip(mine.param_groups, package.param_groups):
        for key in ("k", "lr_max", "weight_sum", "scheduled_lr", "train_mode"):
            assert ours_group[key] == their_group[key], key


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("kind", KINDS)
def test_matches_the_package(kind, dtype, backend):
    """Two groups, warm-up, r and weight_lr_power, weight decay, a parameter without a gradient on some
    steps; train mode, then eval mode. Schedule-Free AdamW on the reference and foreach backends is bitwise
    the package's for-loop (the same torch ops in the same order); the rest within the dtype's tolerance."""
    if backend == "fused" and thalweg.engine.unavailable_reason("cpu") is not None:
        pytest.skip(f"backend='fused' unavailable on CPU: {thalweg.engine.unavailable_reason('cpu')}")
    ours, mine, theirs, package = _run_pair(kind, dtype, backend)
    exact = kind == "adamw" and backend != "fused"
    _compare(ours, mine, theirs, package, dtype, exact)
    mine.eval()
    package.eval()
    _compare(ours, mine, theirs, package, dtype, exact)


@pytest.mark.parametrize("kind", KINDS)
def test_the_packages_foreach_path_too(kind):
    ours, mine, theirs, package = _run_pair(kind, torch.float64, "foreach", foreach=True)
    _compare(ours, mine, theirs, package, torch.float64, exact=False)


@pytest.mark.parametrize("kind", KINDS)
def test_checkpoints_cross_load_with_the_package(kind):
    """A package checkpoint (saved in eval mode, as its docs ask) resumes in thalweg as the package would
    resume it, and a thalweg checkpoint in the package (given the `foreach` group key the package needs)."""
    ours, mine, theirs, package = _run_pair(kind, torch.float64, "reference", steps=8)
    mine.eval()
    package.eval()
    from_package = KINDS[kind](_two_groups(ours), backend="reference", **PACKAGE_OPTIONS[kind])
    from_package.load_state_dict(copy.deepcopy(package.state_dict()))
    to_package = _package_class(kind)(_two_groups(theirs), **PACKAGE_OPTIONS[kind])
    ours_saved = copy.deepcopy(mine.state_dict())
    for group in ours_saved["param_groups"]:  # the package reads its foreach= from the groups, thalweg keeps none
        group["foreach"] = False
    to_package.load_state_dict(ours_saved)
    assert from_package.param_groups[0]["train_mode"] is False and from_package.param_groups[0]["k"] == 8
    _, grads = _inputs(PACKAGE_SHAPES, torch.float64, seed=11, steps=5)
    from_package.train()
    to_package.train()
    for step_grads in grads:
        for a, b, g in zip(ours, theirs, step_grads):
            a.grad, b.grad = (None, None) if g is None else (g.clone(), g.clone())
        from_package.step()
        to_package.step()
    _compare(ours, from_package, theirs, to_package, torch.float64, exact=False)


# -- train / eval ----------------------------------------------------------------------------------------------


def _trained(kind, steps=6, **options):
    starts, grads = _inputs([(3, 4), (5,)], torch.float32, seed=7, steps=steps)
    params = [torch.nn.Parameter(s.clone()) for s in starts]
    optimizer = KINDS[kind](params, **({"lr": 0.05} if kind == "adamw" else {"lr": 0.5}), **options)
    for step_grads in grads:
        for p, g in zip(params, step_grads):
            p.grad = None if g is None else g.clone()
        optimizer.step()
    return params, optimizer, grads


def _snapshot(params, optimizer):
    return ([p.detach().clone() for p in params], copy.deepcopy(optimizer.state_dict()))


def _assert_same(before, after):
    for a, b in zip(before[0], after[0]):
        assert torch.equal(a, b)
    ignored = {"skipped_steps"}  # (counts skipped steps: its change is the point of skip_nonfinite)
    assert ([{k: v for k, v in g.items() if k not in ignored} for g in before[1]["param_groups"]]
            == [{k: v for k, v in g.items() if k not in ignored} for g in after[1]["param_groups"]])
    for index, state in before[1]["state"].items():
        for key, value in state.items():
            assert torch.equal(value, after[1]["state"][index][key]), key


@pytest.mark.parametrize("kind", KINDS)
def test_train_and_eval_are_idempotent_and_inverse(kind):
    params, optimizer, _ = _trained(kind)
    y = [p.detach().clone() for p in params]
    assert all(group["train_mode"] for group in optimizer.param_groups)
    optimizer.train()  # already training: nothing moves
    assert all(torch.equal(p, q) for p, q in zip(params, y))
    optimizer.eval()
    x = [p.detach().clone() for p in params]
    assert not any(torch.equal(p, q) for p, q in zip(x, y))  # x and y differ after some steps
    optimizer.eval()
    assert all(torch.equal(p, q) for p, q in zip(params, x))
    assert not optimizer.state_dict()["param_groups"][0]["train_mode"]
    optimizer.train()
    for p, q in zip(params, y):
        torch.testing.assert_close(p.detach(), q, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("kind", KINDS)
def test_a_new_optimizer_trains_and_eval_before_any_step_moves_nothing(kind):
    param = torch.nn.Parameter(torch.randn(4))
    start = param.detach().clone()
    optimizer = KINDS[kind]([param])
    assert optimizer.param_groups[0]["train_mode"] is True  # x = y = z before the first step
    optimizer.eval()
    assert torch.equal(param.detach(), start) and not optimizer.state
    optimizer.train()
    param.grad = torch.ones(4)
    optimizer.step()
    assert not torch.equal(param.detach(), start)


@pytest.mark.parametrize("kind", KINDS)
def test_step_in_eval_mode_raises_and_changes_nothing(kind):
    params, optimizer, _ = _trained(kind)
    optimizer.eval()
    for p in params:
        p.grad = torch.ones_like(p)
    before = _snapshot(params, optimizer)
    with pytest.raises(RuntimeError, match=r"step\(\) was called in eval mode .* Call optimizer\.train\(\)"):
        optimizer.step()
    _assert_same(before, _snapshot(params, optimizer))


def test_a_group_added_later_joins_in_the_current_mode():
    params, optimizer, _ = _trained("adamw")
    optimizer.eval()
    optimizer.add_param_group({"params": [torch.nn.Parameter(torch.zeros(2))]})
    assert optimizer.param_groups[1]["train_mode"] is False and optimizer.param_groups[1]["k"] == 0
    optimizer.train()
    assert all(group["train_mode"] for group in optimizer.param_groups)


# -- checkpoints, schedulers, skipped steps ----------------------------------------------------------------


@pytest.mark.parametrize("save_in", ["train", "eval"])
@pytest.mark.parametrize("kind", KINDS)
def test_resume_from_a_checkpoint_is_bitwise_an_uninterrupted_run(kind, save_in):
    """Save mid-run (model weights and optimizer), load into a fresh model and optimizer, continue: the same
    bits as a run never stopped (which, for an eval-mode checkpoint, went to eval mode and back at that point)."""
    options = dict(warmup_steps=4, weight_decay=0.01, r=1.0)
    params, optimizer, _ = _trained(kind, steps=5, **options)
    _, more = _inputs([(3, 4), (5,)], torch.float32, seed=8, steps=5)
    if save_in == "eval":
        optimizer.eval()
    saved_params = [p.detach().clone() for p in params]
    saved = copy.deepcopy(optimizer.state_dict())
    optimizer.train()

    fresh = [torch.nn.Parameter(p.clone()) for p in saved_params]
    resumed = KINDS[kind](fresh, **({"lr": 0.05} if kind == "adamw" else {"lr": 0.5}), **options)
    resumed.load_state_dict(saved)
    assert resumed.param_groups[0]["train_mode"] is (save_in == "train") and resumed.param_groups[0]["k"] == 5
    resumed.train()
    for step_grads in more:
        for pair in ((params, optimizer), (fresh, resumed)):
            for p, g in zip(pair[0], step_grads):
                p.grad = None if g is None else g.clone()
            pair[1].step()
    for a, b in zip(params, fresh):
        assert torch.equal(a, b)
    for a, b in zip(params, fresh):
        for key in optimizer.state[a]:
            assert torch.equal(optimizer.state[a][key], resumed.state[b][key]), key
    assert optimizer.state_dict()["param_groups"] == resumed.state_dict()["param_groups"]


@pytest.mark.parametrize("kind", KINDS)
def test_an_lr_scheduler_warmup_works_as_in_the_package(kind):
    """LinearLR changes `lr` between steps; the warm-up and the weights of the average follow it as in the
    package (lr_max, weight_sum, scheduled_lr and the parameters)."""
    def make(params, cls, **extra):
        optimizer = cls(_two_groups(params), **PACKAGE_OPTIONS[kind], **extra)
        return optimizer, torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=0.1, total_iters=10)

    starts, grads = _inputs(PACKAGE_SHAPES, torch.float64, seed=5)
    ours, theirs = [torch.nn.Parameter(s.clone()) for s in starts], [torch.nn.Parameter(s.clone()) for s in starts]
    (mine, my_schedule) = make(ours, KINDS[kind], backend="reference")
    package, their_schedule = make(theirs, _package_class(kind), foreach=False)
    package.train()
    lr_max = []
    for step_grads in grads:
        for a, b, g in zip(ours, theirs, step_grads):
            a.grad, b.grad = (None, None) if g is None else (g.clone(), g.clone())
        mine.step()
        package.step()
        my_schedule.step()
        their_schedule.step()
        lr_max.append(mine.param_groups[0]["lr_max"])
    assert lr_max[0] < lr_max[9] < lr_max[10] == lr_max[-1]  # LinearLR's 10 steps raised lr_max, then it held
    _compare(ours, mine, theirs, package, torch.float64, exact=kind == "adamw")
    assert mine.param_groups[0]["initial_lr"] == PACKAGE_OPTIONS[kind]["lr"]


def test_a_skipped_step_leaves_the_schedule():
    params, optimizer, _ = _trained("adamw", skip_nonfinite=True)
    for p in params:
        p.grad = torch.full_like(p, math.inf)
    before = _snapshot(params, optimizer)
    optimizer.step()
    assert optimizer.skipped_steps == 1
    _assert_same(before, _snapshot(params, optimizer))


@pytest.mark.parametrize("kind", KINDS)
def test_differentiable_steps_pass_gradcheck(kind):
    """differentiable=True: autograd records the step (the rule run out of place), so gradients flow from the new
    y and z (and v) back to the y, gradient and state it read; checked by finite differences in float64."""
    generator = torch.Generator().manual_seed(0)
    options = dict(lr=0.1, weight_decay=0.1, warmup_steps=3)
    param = torch.rand(5, dtype=torch.float64, generator=generator).requires_grad_()
    optimizer = KINDS[kind]([param], **options)
    for _ in range(2):
        param.grad = torch.rand(5, dtype=torch.float64, generator=generator) + 0.1
        optimizer.step()
    schedule = {key: optimizer.param_groups[0][key] for key in ("k", "lr_max", "weight_sum")}
    keys = sorted(optimizer.state[param])

    def step(y, grad, *state):
        y = y.clone()  # a non-leaf, as in torch's own test: the step writes into it
        y.grad = grad
        stepped = KINDS[kind]([y], differentiable=True, **options)
        stepped.param_groups[0].update(schedule)
        stepped.state[y] = {key: t.clone() for key, t in zip(keys, state)}
        stepped.step()
        return (y, *(stepped.state[y][key] for key in keys))

    grad = (torch.rand(5, dtype=torch.float64, generator=generator) - 0.5).requires_grad_()
    state = [optimizer.state[param][key].detach().clone().requires_grad_() for key in keys]
    assert torch.autograd.gradcheck(step, (param.detach().clone().requires_grad_(), grad, *state))


# -- bad input ---------------------------------------------------------------------------------------------

BAD = [("adamw", dict(lr=-0.1), ValueError, "lr must be >= 0, got -0.1"),
       ("adamw", dict(betas=(1.0, 0.999)), ValueError, r"betas\[0\] must be in \[0, 1\), got 1.0"),
       ("adamw", dict(betas=(0.0, 0.999)), ValueError, r"betas\[0\] must be in \(0, 1\), got 0.0"),
       ("adamw", dict(betas=(0.9, -0.1)), ValueError, r"betas\[1\] must be in \[0, 1\), got -0.1"),
       ("adamw", dict(betas=0.9), ValueError, r"betas must be a pair"),
       ("adamw", dict(eps=-1e-8), ValueError, "eps must be >= 0, got -1e-08"),
       ("adamw", dict(weight_decay=-0.01), ValueError, "weight_decay must be >= 0, got -0.01"),
       ("adamw", dict(warmup_steps=-1), ValueError, "warmup_steps must be an integer >= 0, got -1"),
       ("adamw", dict(warmup_steps=2.5), ValueError, "warmup_steps must be an integer >= 0, got 2.5"),
       ("adamw", dict(warmup_steps=True), ValueError, "warmup_steps must be an integer >= 0, got True"),
       ("adamw", dict(r=-1.0), ValueError, "r must be >= 0, got -1.0"),
       ("adamw", dict(r=math.nan), ValueError, "r must be a finite number >= 0, got nan"),
       ("adamw", dict(weight_lr_power=-2.0), ValueError, "weight_lr_power must be >= 0, got -2.0"),
       ("adamw", dict(maximize=1), TypeError, "maximize must be True or False, got 1"),
       ("adamw", dict(lr="0.1"), TypeError, r"lr must be a real number, got '0.1' \(str\)"),
       ("sgd", dict(momentum=0.0), ValueError, r"momentum must be in \(0, 1\), got 0.0"),
       ("sgd", dict(momentum=1.0), ValueError, r"momentum must be in \(0, 1\), got 1.0"),
       ("sgd", dict(lr=-1.0), ValueError, "lr must be >= 0, got -1.0"),
       ("sgd", dict(weight_decay=-1.0), ValueError, "weight_decay must be >= 0, got -1.0"),
       ("sgd", dict(warmup_steps=-3), ValueError, "warmup_steps must be an integer >= 0, got -3"),
       ("sgd", dict(r=-0.5), ValueError, "r must be >= 0, got -0.5"),
       ("sgd", dict(weight_lr_power=math.inf), ValueError, "weight_lr_power must be a finite number >= 0, got inf")]


@pytest.mark.parametrize("kind,bad,error,message", BAD, ids=[f"{k}-{next(iter(b))}" for k, b, _, _ in BAD])
def test_bad_input_is_refused_by_name(kind, bad, error, message):
    param = torch.nn.Parameter(torch.zeros(3))
    with pytest.raises(error, match=message):
        KINDS[kind]([param], **bad)
    optimizer = KINDS[kind]([param])  # in a param group: refused, and no group is added
    with pytest.raises(error, match=message):
        optimizer.add_param_group({"params": [torch.nn.Parameter(torch.zeros(2))], **bad})
    assert len(optimizer.param_groups) == 1


def test_a_misspelt_argument_and_a_hyper_parameter_broken_later_change_nothing():
    with pytest.raises(TypeError):
        thalweg.ScheduleFreeAdamW([torch.nn.Parameter(torch.zeros(2))], warmup=10)
    params, optimizer, _ = _trained("adamw")
    for p in params:
        p.grad = torch.ones_like(p)
    optimizer.param_groups[0]["betas"] = (0.9, 1.5)
    before = _snapshot(params, optimizer)
    with pytest.raises(ValueError, match=r"betas\[1\] must be in \[0, 1\), got 1.5"):
        optimizer.step()
    with pytest.raises(ValueError, match=r"betas\[1\] must be in \[0, 1\), got 1.5"):
        optimizer.eval()
    _assert_same(before, _snapshot(params, optimizer))
    optimizer.param_groups[0]["betas"] = (0.9, 0.999)
    optimizer.param_groups[0]["k"] = -1  # a damaged schedule
    with pytest.raises(ValueError, match=r"k \(the param group's step count\) must be an integer >= 0, got -1"):
        optimizer.step()


def test_a_damaged_z_is_refused_before_any_parameter_moves():
    params, optimizer, _ = _trained("sgd")
    optimizer.state[params[1]]["z"] = torch.zeros(2)
    before = [p.detach().clone() for p in params]
    with pytest.raises(RuntimeError, match=r"params\[1\]: state\['z'\] is a \(2,\) float32 tensor"):
        optimizer.eval()
    assert all(torch.equal(p, q) for p, q in zip(params, before)) and optimizer.param_groups[0]["train_mode"]


# -- training -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", KINDS)
def test_trains_the_digits_mlp_to_90_percent_evaluated_in_eval_mode(kind):
    """tests/test_training.py's task (full batch, 300 steps) at the package's default lr (AdamW 0.0025, SGD 1.0:
    measured 97.8 % and 98.4 % at x); accuracy taken at x, in eval mode."""
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x, y = torch.tensor(x / 16.0, dtype=torch.float32), torch.tensor(y)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10))
    optimizer = thalweg.create(f"schedulefree_{kind}", model)
    assert isinstance(optimizer, KINDS[kind])
    initial = torch.nn.functional.cross_entropy(model(x), y).item()
    model.train()
    optimizer.train()
    for _ in range(300):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
    model.eval()
    optimizer.eval()
    with torch.no_grad():
        loss = torch.nn.functional.cross_entropy(model(x), y).item()
        accuracy = (model(x).argmax(1) == y).float().mean().item()
    assert loss < initial
    assert accuracy >= 0.90, f"{kind}: training accuracy {accuracy:.3f} at x"


# -- FSDP2 ----------------------------------------------------------------------------------------------------

WORKER = Path(__file__).with_name("schedule_free_dist_worker.py")


@pytest.mark.timeout(300)
def test_fsdp2_on_two_processes_equals_one_process(tmp_path):
    """2 gloo processes, FSDP2 (uneven and empty shards), each rank on half the batch: y after the steps and x
    after eval() equal one process on the whole batch, and every rank holds the same group schedule; a DCP
    checkpoint resumes exactly."""
    results = run_on_processes(WORKER, tmp_path)
    tolerance = {"float64": 1e-10, "float32": 1e-5}  # the issue asks for 1e-5 and 1e-4
    for rank_results in results:
        assert set(rank_results) == {f"{c}{k}/{d}" for c in ("", "dcp/") for k in KINDS for d in tolerance}
        for key, entry in rank_results.items():
            assert "exception" not in entry, f"{key} raised:\n{entry['exception']}"
            if key.startswith("dcp/"):
                # saved in eval mode after 2 steps, resumed into a fresh model and optimizer: bitwise the
                # uninterrupted run, and DCP's materialising step (lr=0, zero grads) moved nothing
                assert entry["max_abs_diff"] == 0.0 and entry["materialise_change"] == 0.0, (key, entry)
                continue
            assert entry["y_rel_error"] <= tolerance[key.split("/")[1]], (key, entry)
            assert entry["x_rel_error"] <= tolerance[key.split("/")[1]], (key, entry)
    for key in (key for key in results[0] if not key.startswith("dcp/")):
        assert results[0][key]["groups"] == results[1][key]["groups"] == results[0][key]["expected_groups"], key
