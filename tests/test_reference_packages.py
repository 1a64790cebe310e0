"""The float64 references in ``references.py`` against the authors' published packages, and self-checks.

Package parity: reference and package run side by side in float64 on the same parameters and gradients
(shapes (), (7,), (3, 5), (2, 0, 3)) for 25 steps; parameters (every step) and state (mapped where the package
stores another quantity) must agree within 1e-10 relative to the largest entry. Packages and pins:

  * Lion — lion-pytorch 0.2.5 (lucidrains; same update as the authors' google/automl lion/lion_pytorch.py; its
    ``cautious_lion.Lion`` for caution). No maximize there: it is given the negated gradient.
  * Adan — the authors' code (sail-sg/Adan) is not on PyPI (installed from git only); pytorch_optimizer 4.1.0's
    ``Adan`` copies its ``_single_tensor_adan`` and is the parity package. adan-pytorch 0.1.0 (lucidrains) is
    not the authors' and does not match them: a test measures how.
  * AdEMAMix — Apple (apple/ml-ademamix) publishes no package; pytorch_optimizer 4.1.0's ``AdEMAMix`` equals
    Apple's code with ``weight_decouple=True`` and no warmup (parity), and differs otherwise (tests measure how).
  * ADOPT — torch-adopt 0.1.0 (the authors' package: iShohei220/adopt).
  * StableAdamW — torch-optimi 0.3.3 (``optimi.StableAdamW``), whose moments are stored bias-corrected.

Each package test skips, saying why, when its package is absent or not at the pinned version.
"""

from __future__ import annotations

import importlib.metadata
import math
import warnings

import pytest
import torch

from references import (PaperADOPT, PaperAdan, PaperAdEMAMix, PaperLion, PaperStableAdamW, apple_linear_hl_warmup,
                        apple_linear_warmup)

SHAPES = [(), (7,), (3, 5), (2, 0, 3)]
STEPS = 25
RTOL = 1e-10


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _package(module: str, dist: str, version: str):
    mod = pytest.importorskip(module, reason=f"{dist}=={version} is not installed (package parity test)")
    installed = importlib.metadata.version(dist)
    if installed != version:
        pytest.skip(f"{dist} {installed} is installed; this parity was established for {dist}=={version}")
    return mod


def _close(actual: torch.Tensor, expected: torch.Tensor, what: str = "") -> None:
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    if expected.numel() == 0:
        return
    scale = max(float(expected.detach().abs().max()), torch.finfo(torch.float64).tiny)
    torch.testing.assert_close(actual.detach(), expected.detach(), rtol=RTOL, atol=RTOL * scale,
                               msg=lambda m: f"{what}: {m}")


def _rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach(), b.detach()
    return float((a - b).abs().max() / b.abs().max()) if b.numel() else 0.0


def _grads(steps: int, seed: int, shapes=SHAPES, spikes=(), same_sign=False):
    """Per step, one float64 gradient per shape; ×30 on the steps in ``spikes``; element 0 of the (7,) tensor
    is exactly 0 on the first step (sign(0)); ``same_sign``: every element keeps one sign over all steps."""
    gen = torch.Generator().manual_seed(seed)
    signs = [torch.randn(s, generator=gen, dtype=torch.float64).sign() for s in shapes]
    out = []
    for k in range(steps):
        gs = []
        for s, sign in zip(shapes, signs):
            g = torch.randn(s, generator=gen, dtype=torch.float64) * (30.0 if k in spikes else 1.0)
            if same_sign:
                g = g.abs().clamp(min=0.05) * sign
            elif k == 0 and s == (7,):
                g[0] = 0.0
            gs.append(g)
        out.append(gs)
    return out


def _params(seed: int, shapes=SHAPES):
    gen = torch.Generator().manual_seed(seed + 1000)
    return [torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes]


def _side_by_side(make_ref, make_pkg, *, steps=STEPS, seed=0, negate_for_pkg=False, spikes=(), states=None,
                  shapes=SHAPES, same_sign=False):
    """Runs both; asserts params every step and ``states(ref_opt, pkg_opt, ref_p, pkg_p, t)`` (a list of
    (name, actual, expected)) every step. Returns the two optimizers and parameter lists."""
    init = _params(seed, shapes)
    ref_p = [x.clone().requires_grad_() for x in init]
    pkg_p = [x.clone().requires_grad_() for x in init]
    ref, pkg = make_ref(ref_p), make_pkg(pkg_p)
    for t, gs in enumerate(_grads(steps, seed, shapes, spikes, same_sign), start=1):
        for a, b, g in zip(ref_p, pkg_p, gs):
            a.grad = g.clone()
            b.grad = (-g if negate_for_pkg else g).clone()   # packages may modify p.grad in place
        ref.step()
        pkg.step()
        for i, (a, b) in enumerate(zip(ref_p, pkg_p)):
            _close(b, a, f"step {t} param {i} shape {tuple(a.shape)}")
            if states is not None:
                for name, actual, expected in states(ref.state[a], pkg.state[b], t):
                    _close(actual, expected, f"step {t} param {i} shape {tuple(a.shape)} state {name}")
    return ref, pkg, ref_p, pkg_p


# -- Lion: lion-pytorch 0.2.5 ------------------------------------------------------------------------------


LION_CASES = [dict(lr=1e-2, betas=(0.9, 0.99), weight_decay=0.0), dict(lr=3e-3, betas=(0.95, 0.98), weight_decay=0.1),
              dict(lr=1e-2, betas=(0.5, 0.9), weight_decay=1.0)]


@pytest.mark.parametrize("maximize", [False, True])
@pytest.mark.parametrize("case", LION_CASES, ids=lambda c: f"lr={c['lr']},b={c['betas']},wd={c['weight_decay']}")
def test_lion_matches_lion_pytorch(case, maximize):
    lion_pytorch = _package("lion_pytorch", "lion-pytorch", "0.2.5")
    _side_by_side(lambda p: PaperLion(p, **case, maximize=maximize), lambda p: lion_pytorch.Lion(p, **case),
                  negate_for_pkg=maximize, seed=1, states=lambda rs, ps, t: [("exp_avg", ps["exp_avg"], rs["exp_avg"])])


@pytest.mark.parametrize("maximize", [False, True])
@pytest.mark.parametrize("case", LION_CASES, ids=lambda c: f"lr={c['lr']},b={c['betas']},wd={c['weight_decay']}")
def test_cautious_lion_matches_lion_pytorch(case, maximize):
    """lion-pytorch's cautious Lion with cautious_factor=0 divides the mask by max(mean, 1e-5) where timm uses
    1e-3: the same for tensors of at most 1000 elements (the mean is then 0 or >= 1/numel), as here."""
    _package("lion_pytorch", "lion-pytorch", "0.2.5")
    from lion_pytorch.cautious_lion import Lion as CautiousLion

    _side_by_side(lambda p: PaperLion(p, **case, maximize=maximize, cautious=True),
                  lambda p: CautiousLion(p, **case, cautious_factor=0.0),
                  negate_for_pkg=maximize, seed=2, states=lambda rs, ps, t: [("exp_avg", ps["exp_avg"], rs["exp_avg"])])


def test_cautious_floor_differs_from_lion_pytorch_on_large_sparse_agreement():
    """Documented difference, measured: 2000 elements of which one agrees with the gradient. timm (and this
    reference) divide by max(1/2000, 1e-3) = 1e-3, lion-pytorch by max(1/2000, 1e-5): a step twice as long."""
    _package("lion_pytorch", "lion-pytorch", "0.2.5")
    from lion_pytorch.cautious_lion import Lion as CautiousLion

    n, lr = 2000, 1e-3
    ref_p = torch.zeros(n, dtype=torch.float64, requires_grad=True)
    pkg_p = torch.zeros(n, dtype=torch.float64, requires_grad=True)
    ref = PaperLion([ref_p], lr=lr, betas=(0.9, 0.99), cautious=True)
    pkg = CautiousLion([pkg_p], lr=lr, betas=(0.9, 0.99), cautious_factor=0.0)
    # step 1 builds m = 0.01·g1; step 2's gradient opposes m everywhere but at element 0, and is small enough
    # that c = 0.9·m + 0.1·g2 keeps m's sign
    g1 = torch.ones(n, dtype=torch.float64)
    g2 = -0.01 * torch.ones(n, dtype=torch.float64)
    g2[0] = 0.01
    for g in (g1, g2):
        ref_p.grad, pkg_p.grad = g.clone(), g.clone()
        ref.step()
        pkg.step()
    # after step 1 all agree (mask mean 1): both moved by −lr; step 2 moves element 0 only
    assert float(ref_p[0].detach()) == pytest.approx(-lr - lr / 1e-3)
    assert float(pkg_p[0].detach()) == pytest.approx(-lr - lr * n)
    assert torch.equal(ref_p[1:], pkg_p[1:])


# -- Adan: pytorch_optimizer 4.1.0 (copy of sail-sg/Adan's _single_tensor_adan) ------------------------------


ADAN_CASES = [dict(lr=1e-2, betas=(0.98, 0.92, 0.99), eps=1e-8, weight_decay=0.0),
              dict(lr=5e-3, betas=(0.9, 0.8, 0.95), eps=1e-6, weight_decay=0.05),
              dict(lr=2e-2, betas=(0.98, 0.92, 0.99), eps=1e-8, weight_decay=0.5)]


def _adan_states(rs, ps, t):
    return [("exp_avg", ps["exp_avg"], rs["exp_avg"]), ("exp_avg_diff", ps["exp_avg_diff"], rs["exp_avg_diff"]),
            ("exp_avg_sq", ps["exp_avg_sq"], rs["exp_avg_sq"]),
            ("pre_grad (package stores −g_prev)", -ps["previous_grad"], rs["pre_grad"])]


@pytest.mark.parametrize("no_prox", [False, True])
@pytest.mark.parametrize("case", ADAN_CASES, ids=lambda c: f"lr={c['lr']},b={c['betas']},wd={c['weight_decay']}")
def test_adan_matches_pytorch_optimizer(case, no_prox):
    """pytorch_optimizer's weight_decouple=False is the official no_prox=False (divide by 1 + lr·λ after)."""
    po = _package("pytorch_optimizer", "pytorch_optimizer", "4.1.0")
    _side_by_side(lambda p: PaperAdan(p, **case, no_prox=no_prox),
                  lambda p: po.Adan(p, **case, weight_decouple=no_prox), seed=3, states=_adan_states)


def test_adan_maximize_differs_from_pytorch_optimizer_on_the_first_difference():
    """Documented difference, measured: pytorch_optimizer stores its first previous_grad before negating for
    maximize, so its first g − g_prev is 2g, not 0 (the reference takes pre_grad after maximize). The first
    step's parameters nearly agree (both steps are ≈ lr·sign(g)), the difference moment does not, and the
    trajectories part."""
    po = _package("pytorch_optimizer", "pytorch_optimizer", "4.1.0")
    case = dict(lr=1e-2, betas=(0.98, 0.92, 0.99), weight_decay=0.0)
    init = _params(4)
    grads = _grads(STEPS, 4)
    ref_p = [x.clone().requires_grad_() for x in init]
    pkg_p = [x.clone().requires_grad_() for x in init]
    ref, pkg = PaperAdan(ref_p, **case, maximize=True), po.Adan(pkg_p, **case, maximize=True)
    for t, gs in enumerate(grads, start=1):
        for a, b, g in zip(ref_p, pkg_p, gs):
            a.grad, b.grad = g.clone(), g.clone()
        ref.step()
        pkg.step()
        if t == 1:
            a, b, g = ref_p[2], pkg_p[2], gs[2]
            assert _rel_diff(b, a) < 1e-6
            assert torch.equal(ref.state[a]["exp_avg_diff"], torch.zeros_like(g))
            _close(pkg.state[b]["exp_avg_diff"], (1 - 0.92) * 2 * -g, "package's first exp_avg_diff")
    assert _rel_diff(pkg_p[2], ref_p[2]) > 1e-3


def test_adan_pytorch_lucidrains_is_not_the_official_adan():
    """Documented difference, measured: adan-pytorch 0.1.0 (lucidrains; betas as 1 − β) updates no moment on
    a parameter's first step, so that step leaves the parameter where it is (the official one moves it by
    ≈ lr·sign(g)), and its bias corrections then lag one step behind."""
    adan_pytorch = _package("adan_pytorch", "adan-pytorch", "0.1.0")
    init = _params(5)
    grads = _grads(STEPS, 5)
    ref_p = [x.clone().requires_grad_() for x in init]
    pkg_p = [x.clone().requires_grad_() for x in init]
    ref = PaperAdan(ref_p, lr=1e-2, betas=(0.98, 0.92, 0.99))
    pkg = adan_pytorch.Adan(pkg_p, lr=1e-2, betas=(0.02, 0.08, 0.01))
    for t, gs in enumerate(grads, start=1):
        for a, b, g in zip(ref_p, pkg_p, gs):
            a.grad, b.grad = g.clone(), g.clone()
        ref.step()
        pkg.step()
        if t == 1:
            assert torch.equal(pkg_p[2].detach(), init[2])
            _close(ref_p[2], init[2] - 1e-2 * gs[2] / (gs[2].abs() + 1e-8), "official first step ≈ lr·sign(g)")
    assert _rel_diff(pkg_p[2], ref_p[2]) > 1e-3


# -- AdEMAMix: pytorch_optimizer 4.1.0 where it equals Apple's code ---------------------------------------


ADEMAMIX_CASES = [dict(lr=1e-2, betas=(0.9, 0.999, 0.9999), alpha=2.0, eps=1e-8, weight_decay=0.0),
                  dict(lr=5e-3, betas=(0.8, 0.99, 0.999), alpha=5.0, eps=1e-6, weight_decay=0.1),
                  dict(lr=1e-2, betas=(0.0, 0.999, 0.99), alpha=1.0, eps=1e-8, weight_decay=0.3)]


@pytest.mark.parametrize("maximize", [False, True])
@pytest.mark.parametrize("case", ADEMAMIX_CASES, ids=lambda c: f"b={c['betas']},a={c['alpha']},wd={c['weight_decay']}")
def test_ademamix_matches_pytorch_optimizer_without_warmup(case, maximize):
    """pytorch_optimizer's AdEMAMix with weight_decouple=True (w·(1 − lr·λ) before the step) is Apple's
    w − lr·(u + λ·w); without warmup the two are the same optimizer."""
    po = _package("pytorch_optimizer", "pytorch_optimizer", "4.1.0")
    _side_by_side(lambda p: PaperAdEMAMix(p, **case, maximize=maximize),
                  lambda p: po.AdEMAMix(p, **case, weight_decouple=True, maximize=maximize), seed=6,
                  states=lambda rs, ps, t: [("exp_avg_fast", ps["exp_avg"], rs["exp_avg_fast"]),
                                            ("exp_avg_slow", ps["exp_avg_slow"], rs["exp_avg_slow"]),
                                            ("exp_avg_sq", ps["exp_avg_sq"], rs["exp_avg_sq"])])


def test_ademamix_beta3_warmup_differs_from_pytorch_optimizer_by_apples_log_eps():
    """Documented difference, measured: Apple's half-life warmup takes ln(β + 1e-8); pytorch_optimizer uses the
    paper's closed form (no 1e-8). The schedules differ by ~1e-6 (not more than 1e-5); without the 1e-8 they
    agree to rounding; the α warmups agree; 25-step trajectories then differ by ~1e-7 relative."""
    po = _package("pytorch_optimizer", "pytorch_optimizer", "4.1.0")
    b1, b3, warmup = 0.9, 0.9999, 100
    steps = range(1, warmup + 5)
    apple = [apple_linear_hl_warmup(t, b3, b1, warmup) for t in steps]
    closed = [po.AdEMAMix.schedule_beta3(warmup, t, b1, b3) for t in steps]
    worst = max(abs(a - c) for a, c in zip(apple, closed))
    assert 1e-7 < worst < 1e-5

    def no_eps(t):  # Apple's schedule with its 1e-8 removed
        if t >= warmup:
            return b3
        a = t / warmup
        x = (1 - a) * math.log(0.5) / math.log(b1) + a * math.log(0.5) / math.log(b3) - 1
        return 0.5 ** (1 / (x + 1))

    assert max(abs(no_eps(t) - c) for t, c in zip(steps, closed)) < 1e-14
    assert all(apple_linear_warmup(t, 2.0, 0, warmup) == pytest.approx(po.AdEMAMix.schedule_alpha(warmup, t, 2.0),
                                                                       rel=1e-14) for t in steps)

    init, grads = _params(7), _grads(STEPS, 7)
    ref_p = [x.clone().requires_grad_() for x in init]
    pkg_p = [x.clone().requires_grad_() for x in init]
    ref = PaperAdEMAMix(ref_p, lr=1e-2, alpha_warmup=20, beta3_warmup=20)
    pkg = po.AdEMAMix(pkg_p, lr=1e-2, alpha=2.0, t_alpha_beta3=20)
    for gs in grads:
        for a, b, g in zip(ref_p, pkg_p, gs):
            a.grad, b.grad = g.clone(), g.clone()
        ref.step()
        pkg.step()
    assert 1e-10 < _rel_diff(pkg_p[2], ref_p[2]) < 1e-5


def test_ademamix_default_weight_decay_of_pytorch_optimizer_is_coupled():
    """Documented difference, measured: pytorch_optimizer's AdEMAMix defaults to weight_decouple=False (λ·w added
    to the gradient, then through the moments), Apple's decay is decoupled; with λ = 0.1 they part by > 1e-3."""
    po = _package("pytorch_optimizer", "pytorch_optimizer", "4.1.0")
    init, grads = _params(8), _grads(STEPS, 8)
    ref_p = [x.clone().requires_grad_() for x in init]
    pkg_p = [x.clone().requires_grad_() for x in init]
    ref = PaperAdEMAMix(ref_p, lr=1e-2, weight_decay=0.1)
    pkg = po.AdEMAMix(pkg_p, lr=1e-2, alpha=2.0, weight_decay=0.1)
    for gs in grads:
        for a, b, g in zip(ref_p, pkg_p, gs):
            a.grad, b.grad = g.clone(), g.clone()
        ref.step()
        pkg.step()
    assert _rel_diff(pkg_p[2], ref_p[2]) > 1e-3


# -- ADOPT: torch-adopt 0.1.0 (the authors') -----------------------------------------------------------------


ADOPT_CASES = [dict(lr=1e-2, betas=(0.9, 0.9999), eps=1e-6, weight_decay=0.0),
               dict(lr=5e-3, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.1),
               dict(lr=1e-2, betas=(0.9, 0.5), eps=1e-3, weight_decay=0.5)]


def _adopt_states(rs, ps, t):
    return [("step", ps["step"], rs["step"]), ("exp_avg", ps["exp_avg"], rs["exp_avg"]),
            ("exp_avg_sq", ps["exp_avg_sq"], rs["exp_avg_sq"])]


@pytest.mark.parametrize("maximize", [False, True])
@pytest.mark.parametrize("decoupled", [False, True])
@pytest.mark.parametrize("case", ADOPT_CASES, ids=lambda c: f"b={c['betas']},eps={c['eps']},wd={c['weight_decay']}")
def test_adopt_matches_torch_adopt(case, decoupled, maximize):
    """The package's for-loop path (``_single_tensor_adopt``, the one the reference follows)."""
    adopt = _package("adopt", "torch-adopt", "0.1.0")
    with warnings.catch_warnings():
        # torch-adopt calls the deprecated torch._utils.is_compiling and _cuda_graph_capture_health_check
        warnings.simplefilter("ignore", UserWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        _side_by_side(lambda p: PaperADOPT(p, **case, decoupled=decoupled, maximize=maximize),
                      lambda p: adopt.ADOPT(p, **case, decouple=decoupled, maximize=maximize, foreach=False),
                      seed=9, spikes=(6,), states=_adopt_states)


def test_adopt_foreach_path_of_torch_adopt_clips_at_a_float32_bound():
    """Measured: torch-adopt's foreach path computes the clip s^¼ from the float32 step tensor
    (``clip_lambda(device_state_steps[0])``), its for-loop path from a Python float: where the clip binds
    (s ≥ 2) the two differ by float32 rounding of s^¼ (~1e-8 relative), so foreach is held to 1e-6 here."""
    adopt = _package("adopt", "torch-adopt", "0.1.0")
    assert float(torch.tensor(2.0) ** 0.25) != 2.0**0.25
    init, grads = _params(9), _grads(STEPS, 9, spikes=(6,))
    ref_p = [x.clone().requires_grad_() for x in init]
    pkg_p = [x.clone().requires_grad_() for x in init]
    ref = PaperADOPT(ref_p, lr=1e-2, weight_decay=0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        pkg = adopt.ADOPT(pkg_p, lr=1e-2, weight_decay=0.1, foreach=True)
        worst = 0.0
        for gs in grads:
            for a, b, g in zip(ref_p, pkg_p, gs):
                a.grad, b.grad = g.clone(), g.clone()
            ref.step()
            pkg.step()
            worst = max(worst, max(_rel_diff(b, a) for a, b in zip(ref_p, pkg_p)))
    assert 1e-12 < worst < 1e-6


# -- StableAdamW: torch-optimi 0.3.3 ---------------------------------------------------------------------


STABLE_CASES = [dict(lr=1e-2, betas=(0.9, 0.99), eps=1e-6, weight_decay=0.0),
                dict(lr=5e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2),
                dict(lr=1e-2, betas=(0.5, 0.9), eps=1e-6, weight_decay=0.3)]


@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize("maximize", [False, True])
@pytest.mark.parametrize("case", STABLE_CASES, ids=lambda c: f"b={c['betas']},eps={c['eps']},wd={c['weight_decay']}")
def test_stableadamw_matches_optimi(case, maximize, foreach):
    """optimi stores m̂ = m/(1 − β1^t) and v̂ = v/(1 − β2^t); the reference stores torch's m and v. Gradient
    spikes (×30) at steps 6 and 13 make RMS > 1, so the lr division is exercised (asserted)."""
    optimi = _package("optimi", "torch-optimi", "0.3.3")
    b1, b2 = case["betas"]

    def states(rs, ps, t):
        return [("exp_avg (optimi: m̂)", ps["exp_avg"], rs["exp_avg"] / (1 - b1**t)),
                ("exp_avg_sq (optimi: v̂)", ps["exp_avg_sq"], rs["exp_avg_sq"] / (1 - b2**t))]

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)   # optimi deprecates foreach=True in favour of triton
        _side_by_side(lambda p: PaperStableAdamW(p, **case, maximize=maximize),
                      lambda p: optimi.StableAdamW(p, **case, foreach=foreach, triton=False, kahan_sum=False),
                      negate_for_pkg=maximize, seed=10, spikes=(5, 12), states=states)
    # the RMS of the (3, 5) tensor at the spike on step 13, from the same gradients: the division really ran
    gs = [step[2] for step in _grads(13, 10, spikes=(5, 12))]
    v = torch.zeros_like(gs[0])
    for g in gs:
        v = b2 * v + (1 - b2) * g * g
    rms = float((gs[-1] ** 2 / (v / (1 - b2**13)).clamp(min=case["eps"] ** 2)).mean().sqrt())
    assert rms > 1.5


# -- self-checks (no package needed) ----------------------------------------------------------------------


def _run(opt_cls, init, grads, **kwargs):
    p = init.clone().requires_grad_()
    opt = opt_cls([p], **kwargs)
    for g in grads:
        p.grad = g.clone()
        opt.step()
    return p.detach(), opt.state[p]


def test_lion_is_sign_momentum_when_betas_are_equal():
    """β1 = β2 = β, λ = 0: m_t = β·m + (1 − β)·g and w ← w − lr·sign(m_t), by hand; sign(0) = 0 leaves a
    coordinate whose c is 0 in place."""
    lr, beta = 0.1, 0.5
    w0 = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    grads = [torch.tensor([0.0, 1.0, -3.0]), torch.tensor([2.0, -4.0, 1.0]), torch.tensor([-1.0, 1.0, 5.0])]
    grads = [g.double() for g in grads]
    # m1 = (0, 0.5, -1.5)   sign (0, 1, -1)
    # m2 = (1, -1.75, -0.25)  sign (1, -1, -1)
    # m3 = (0, -0.375, 2.375) sign (0, -1, 1)
    expected = w0 - lr * (torch.tensor([0.0, 1, -1]) + torch.tensor([1.0, -1, -1]) + torch.tensor([0.0, -1, 1])).double()
    w, state = _run(PaperLion, w0, grads, lr=lr, betas=(beta, beta))
    _close(w, expected)
    _close(state["exp_avg"], torch.tensor([0.0, -0.375, 2.375], dtype=torch.float64))
    assert set(state) == {"exp_avg"}


def test_adan_first_step_and_constant_gradient_is_adamw():
    """On the first step d = 0, m̂ = g, n̂ = g²: w moves by lr·g/(|g| + eps). With a constant gradient d stays 0,
    and Adan with no_prox=True is torch.optim.AdamW with betas (β1, β3) (float64)."""
    w0 = _params(11)[2]
    g = _grads(1, 11)[0][2]
    lr, eps = 1e-2, 1e-8
    w, state = _run(PaperAdan, w0, [g], lr=lr, eps=eps)
    _close(w, w0 - lr * g / (g.abs() + eps))
    _close(state["pre_grad"], g)
    assert torch.equal(state["exp_avg_diff"], torch.zeros_like(g))

    for maximize in (False, True):
        w, _ = _run(PaperAdan, w0, [g] * 6, lr=lr, betas=(0.9, 0.8, 0.99), eps=eps, weight_decay=0.1, no_prox=True,
                    maximize=maximize)
        expected, _ = _run(torch.optim.AdamW, w0, [g] * 6, lr=lr, betas=(0.9, 0.99), eps=eps, weight_decay=0.1,
                           maximize=maximize)
        _close(w, expected, f"maximize={maximize}")
    # no_prox=False: w ← (w − lr·g/(|g| + eps))/(1 + lr·λ) every step
    w, _ = _run(PaperAdan, w0, [g] * 6, lr=lr, eps=eps, weight_decay=0.1)
    expected = w0.clone()
    for _ in range(6):
        expected = (expected - lr * g / (g.abs() + eps)) / (1 + lr * 0.1)
    _close(w, expected)


def test_adan_maximize_takes_pre_grad_after_negation():
    w0, grads = _params(12)[2], [gs[2] for gs in _grads(5, 12)]
    w_max, s_max = _run(PaperAdan, w0, grads, lr=1e-2, weight_decay=0.1, maximize=True)
    w_neg, s_neg = _run(PaperAdan, w0, [-g for g in grads], lr=1e-2, weight_decay=0.1)
    _close(w_max, w_neg)
    for key in ("exp_avg", "exp_avg_diff", "exp_avg_sq", "pre_grad"):
        _close(s_max[key], s_neg[key], key)
    _close(s_max["pre_grad"], -grads[-1])


def test_ademamix_with_alpha_zero_is_adamw():
    """α = 0 leaves the fast EMA: Apple's AdEMAMix is then AdamW (decoupled decay, torch's eps placement)."""
    w0, grads = _params(13)[2], [gs[2] for gs in _grads(STEPS, 13)]
    for maximize in (False, True):
        for wd in (0.0, 0.1):
            w, _ = _run(PaperAdEMAMix, w0, grads, lr=1e-2, betas=(0.9, 0.99, 0.999), alpha=0.0, eps=1e-8,
                        weight_decay=wd, maximize=maximize)
            expected, _ = _run(torch.optim.AdamW, w0, grads, lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=wd,
                               maximize=maximize)
            _close(w, expected, f"maximize={maximize} wd={wd}")


def test_ademamix_beta1_zero_keeps_a_fast_tensor_and_warmups_reach_their_ends():
    w0, grads = _params(14)[2], [gs[2] for gs in _grads(3, 14)]
    _, state = _run(PaperAdEMAMix, w0, grads, betas=(0.0, 0.999, 0.9999))
    assert isinstance(state["exp_avg_fast"], torch.Tensor)
    _close(state["exp_avg_fast"], grads[-1])
    assert set(state) == {"step", "exp_avg_fast", "exp_avg_slow", "exp_avg_sq"}
    # the half-life ln 0.5/ln β of β3_t is linear in t between Apple's ln 0.5/ln(β + 1e-8) at β1 (t = 0) and at
    # β3 (t = T); from T on, β3 itself. At t = 0 that gives β1 + 1e-8, Apple's 1e-8.
    def hl_apple(b):
        return math.log(0.5) / math.log(b + 1e-8)

    T, b1, b3 = 40, 0.9, 0.9999
    assert apple_linear_hl_warmup(0, b3, b1, T) == pytest.approx(b1 + 1e-8, abs=1e-14)
    assert apple_linear_hl_warmup(T, b3, b1, T) == b3
    mid = apple_linear_hl_warmup(T / 4, b3, b1, T)
    assert math.log(0.5) / math.log(mid) == pytest.approx(0.75 * hl_apple(b1) + 0.25 * hl_apple(b3), rel=1e-10)
    assert apple_linear_warmup(10, 2.0, 0, T) == pytest.approx(0.5) and apple_linear_warmup(T, 2.0, 0, T) == 2.0


def test_adopt_first_step_only_sets_v_then_clips_at_earlier_steps_to_the_quarter():
    """Step 1: the parameter does not move (nor decays), v = g'² (g' = g + λ·w when coupled). Step 2: n = g2/|g1|
    is clipped at 1^¼ = 1; step 3 at 2^¼."""
    lr, b1, b2 = 0.1, 0.9, 0.5
    w0 = torch.tensor([1.0, -1.0], dtype=torch.float64)
    for decoupled in (False, True):
        w, state = _run(PaperADOPT, w0, [torch.tensor([0.5, -2.0], dtype=torch.float64)], lr=lr, weight_decay=0.2,
                        decoupled=decoupled)
        assert torch.equal(w, w0)
        g1 = torch.tensor([0.5, -2.0], dtype=torch.float64) + (0 if decoupled else 0.2 * w0)
        _close(state["exp_avg_sq"], g1 * g1)
        assert torch.equal(state["exp_avg"], torch.zeros(2, dtype=torch.float64)) and float(state["step"]) == 1

    g1, g2, g3 = (torch.tensor(v, dtype=torch.float64) for v in ([0.1, -0.1], [5.0, 0.01], [-5.0, 1.0]))
    w, state = _run(PaperADOPT, w0, [g1, g2, g3], lr=lr, betas=(b1, b2), eps=1e-6)
    n2 = torch.tensor([1.0, 0.1], dtype=torch.float64)            # 5/0.1 = 50 clipped to 1; 0.01/0.1
    m2 = (1 - b1) * n2
    v2 = b2 * g1**2 + (1 - b2) * g2**2
    n3 = (g3 / v2.sqrt()).clamp(-2**0.25, 2**0.25)             # (−1.41, 14.1) clipped to ±2^¼
    m3 = b1 * m2 + (1 - b1) * n3
    assert float(n3[0]) == pytest.approx(-(2**0.25))
    _close(w, w0 - lr * m2 - lr * m3)
    _close(state["exp_avg_sq"], b2 * v2 + (1 - b2) * g3**2)
    assert float(state["step"]) == 3


def test_stableadamw_is_adamw_under_constant_gradients_and_divides_lr_by_rms():
    """Constant g: v̂ = g², RMS = 1, so torch.optim.AdamW exactly. A 10× spike on step 2 (scalar, by hand):
    RMS = √(g²/v̂) > 1 divides both the step and the decay."""
    w0, g = _params(15)[2], _grads(1, 15)[0][2]
    for maximize in (False, True):
        w, _ = _run(PaperStableAdamW, w0, [g] * 6, lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1,
                    maximize=maximize)
        expected, _ = _run(torch.optim.AdamW, w0, [g] * 6, lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1,
                           maximize=maximize)
        _close(w, expected, f"maximize={maximize}")

    lr, wd, eps, b1, b2 = 0.1, 0.5, 1e-6, 0.9, 0.99
    w, state = _run(PaperStableAdamW, torch.tensor(2.0, dtype=torch.float64),
                    [torch.tensor(1.0, dtype=torch.float64), torch.tensor(10.0, dtype=torch.float64)],
                    lr=lr, betas=(b1, b2), eps=eps, weight_decay=wd)
    w1 = 2.0 * (1 - lr * wd) - lr * 1.0 / (1.0 + eps)
    m2, v2 = b1 * (1 - b1) + (1 - b1) * 10.0, b2 * (1 - b2) + (1 - b2) * 100.0
    m_hat, v_hat = m2 / (1 - b1**2), v2 / (1 - b2**2)
    rms = math.sqrt(100.0 / v_hat)
    assert rms > 1.4
    lr2 = lr / rms
    expected = w1 * (1 - lr2 * wd) - lr2 * m_hat / (math.sqrt(v_hat) + eps)
    assert float(w) == pytest.approx(expected, rel=1e-12)
    assert float(state["exp_avg"]) == pytest.approx(m2, rel=1e-14)
    assert float(state["exp_avg_sq"]) == pytest.approx(v2, rel=1e-14)


@pytest.mark.parametrize("cls,kwargs", [(PaperLion, dict(lr=1e-2)), (PaperAdan, dict(lr=1e-2, weight_decay=0.1)),
                                        (PaperAdEMAMix, dict(lr=1e-2, weight_decay=0.1)),
                                        (PaperStableAdamW, dict(lr=1e-2, weight_decay=0.1))],
                         ids=["lion", "adan", "ademamix", "stableadamw"])
def test_cautious_equals_plain_when_every_sign_agrees(cls, kwargs):
    """Every element's gradient keeps one sign over all steps, so every update component agrees with it:
    mask = 1, mean 1, and the cautious run is the plain one."""
    _side_by_side(lambda p: cls(p, **kwargs, cautious=True), lambda p: cls(p, **kwargs), seed=16,
                  shapes=[(7,), (3, 5)], same_sign=True,
                  states=lambda rs, ps, t: [(k, ps[k], rs[k]) for k in rs if k != "step"])


@pytest.mark.parametrize("cls,keys", [(PaperLion, {"exp_avg"}),
                                      (PaperAdan, {"step", "exp_avg", "exp_avg_diff", "exp_avg_sq", "pre_grad"}),
                                      (PaperAdEMAMix, {"step", "exp_avg_fast", "exp_avg_slow", "exp_avg_sq"}),
                                      (PaperADOPT, {"step", "exp_avg", "exp_avg_sq"}),
                                      (PaperStableAdamW, {"step", "exp_avg", "exp_avg_sq"})],
                         ids=["lion", "adan", "ademamix", "adopt", "stableadamw"])
def test_state_keys_dtypes_and_skipped_params(cls, keys):
    """State as the issue fixes it: keys, the param's dtype (float32 here), ``step`` a 0-d float32 tensor; a
    param without a gradient gets no state and does not move."""
    p = torch.randn(3, 2, dtype=torch.float32, requires_grad=True)
    frozen = torch.randn(4, dtype=torch.float32, requires_grad=True)
    before = frozen.detach().clone()
    opt = cls([p, frozen])
    for _ in range(2):
        p.grad = torch.randn(3, 2)
        opt.step()
    state = opt.state[p]
    assert set(state) == keys
    for k, v in state.items():
        if k == "step":
            assert v.dtype == torch.float32 and v.ndim == 0 and float(v) == 2
        else:
            assert v.dtype == torch.float32 and v.shape == p.shape
    assert p.dtype == torch.float32
    assert frozen not in opt.state or not opt.state[frozen]
    assert torch.equal(frozen.detach(), before)


# -- thalweg itself against each package, directly ----------------------------------------------------------


def _thalweg_against(make_pkg, cls, options, backend, **side_by_side):
    import thalweg  # noqa: F401 - (the references above import nothing of thalweg; this section does)

    _side_by_side(lambda p: cls(p, **options, backend=backend), make_pkg, **side_by_side)


@pytest.mark.parametrize("backend", ["reference", "foreach", "fused"])
def test_thalweg_matches_each_authors_package_directly(backend):
    """Not only through the references: thalweg's Lion, ADOPT and StableAdamW against lion-pytorch, torch-adopt
    and torch-optimi, and its Adan and AdEMAMix against pytorch_optimizer's classes that equal the authors' code,
    parameters within 1e-10 over 25 steps in float64 (gradient spikes make StableAdamW's RMS exceed 1)."""
    import thalweg

    cases = []
    lion_pytorch = _package("lion_pytorch", "lion-pytorch", "0.2.5")
    cases.append((lambda p: lion_pytorch.Lion(p, lr=1e-2, betas=(0.9, 0.99), weight_decay=0.1), thalweg.Lion,
                  dict(lr=1e-2, betas=(0.9, 0.99), weight_decay=0.1), {}))
    adopt = _package("adopt", "torch-adopt", "0.1.0")
    cases.append((lambda p: adopt.ADOPT(p, lr=1e-2, weight_decay=0.1, decouple=True, foreach=False), thalweg.ADOPT,
                  dict(lr=1e-2, weight_decay=0.1, decoupled=True), dict(spikes=(6,))))
    optimi = _package("optimi", "torch-optimi", "0.3.3")
    cases.append((lambda p: optimi.StableAdamW(p, lr=1e-2, weight_decay=1e-2, foreach=False, triton=False,
                                               kahan_sum=False), thalweg.StableAdamW, dict(lr=1e-2, weight_decay=1e-2),
                  dict(spikes=(5, 12))))
    po = _package("pytorch_optimizer", "pytorch_optimizer", "4.1.0")
    cases.append((lambda p: po.Adan(p, lr=1e-2, weight_decay=0.02, weight_decouple=False), thalweg.Adan,
                  dict(lr=1e-2, weight_decay=0.02), {}))
    cases.append((lambda p: po.AdEMAMix(p, lr=1e-2, alpha=2.0, weight_decay=0.1, weight_decouple=True), thalweg.AdEMAMix,
                  dict(lr=1e-2, weight_decay=0.1), {}))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # torch-adopt's deprecated torch internals
        warnings.simplefilter("ignore", DeprecationWarning)
        for make_pkg, cls, options, extra in cases:
            _thalweg_against(make_pkg, cls, options, backend, seed=11, **extra)
