"""Float64 reference implementations of Lion, Adan, AdEMAMix, ADOPT, StableAdamW and SOAP, written from the authors' code.

Each is a ``torch.optim.Optimizer`` subclass in the manner of ``specs.PaperLAMB``: ``step`` reads the
parameter, its gradient and its state in float64, does the paper's arithmetic there, and writes parameter
and state back with ``copy_`` (so they keep the parameter's dtype). Per-parameter ``step`` is a 0-d float32
tensor, counted as torch.optim counts it, created (with the rest of the state) on the first step the
parameter has a gradient; parameters whose ``grad`` is None are skipped. ``maximize`` negates the gradient
before anything else, as torch.optim does: below, ``g`` always means the gradient after that negation.

These are test oracles, independent of thalweg's code: they import nothing from ``thalweg``. Each class
docstring states the update, the paper, the file and function of the authors' code it follows, and where
the authors' code and this class differ (only where the issue fixed an interface the authors' code lacks,
e.g. ``maximize``, or per-parameter rather than per-group step counts).

Cautious masking (Liang et al. 2024, "Cautious Optimizers: Improving Training with One Line of Code",
arXiv:2411.16085), as timm implements it (timm/optim/lion.py ``_single_tensor_lion``, adamw.py
``_single_tensor_adamw``, adan.py ``_single_tensor_adan``, adopt.py): for an update direction ``u`` and the
gradient ``g``, ``mask = (u·g > 0)``, ``u ← u·mask / max(mean(mask), 1e-3)``, the mean over the whole tensor;
weight decay is never masked. What ``u`` is differs per optimizer and is stated in each docstring.
"""

from __future__ import annotations

import math

import torch

__all__ = ["PaperLion", "PaperAdan", "PaperAdEMAMix", "PaperADOPT", "PaperStableAdamW", "PaperSOAP", "cautious_mask",
           "apple_linear_warmup", "apple_linear_hl_warmup"]


def cautious_mask(u: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """timm's caution: ``u·mask / max(mean(mask), 1e-3)`` with ``mask = (u·g > 0)``, mean over the whole tensor."""
    mask = (u * g > 0).to(u.dtype)
    return u * (mask / mask.mean().clamp(min=1e-3))


def _run_closure(closure):
    if closure is None:
        return None
    with torch.enable_grad():
        return closure()


def _grad(p: torch.Tensor, maximize: bool) -> torch.Tensor:
    g = p.grad.double()
    return -g if maximize else g


class PaperLion(torch.optim.Optimizer):
    """Lion (Chen et al. 2023, "Symbolic Discovery of Optimization Algorithms", arXiv:2302.06675, Program 1), in
    float64, following the authors' PyTorch code google/automl lion/lion_pytorch.py ``Lion.step``:

        w ← w·(1 − lr·λ)                      (decoupled weight decay, applied first)
        c = β1·m + (1 − β1)·g
        u = sign(c)                           (sign(0) = 0, torch.sign)
        w ← w − lr·u
        m ← β2·m + (1 − β2)·g                 (state ``exp_avg``)

    The authors' code has no ``maximize``; here g is the gradient negated when ``maximize``. No step count (the
    authors' code keeps none): state is ``exp_avg`` only.

    ``cautious`` (timm/optim/lion.py ``_single_tensor_lion``): u = sign(c) and g the gradient after maximize;
    u ← u·mask / max(mean(mask), 1e-3), mask = (u·g > 0); the decay w·(1 − lr·λ) is not masked.
    """

    def __init__(self, params, lr=1e-4, betas=(0.9, 0.99), weight_decay=0.0, *, maximize=False, cautious=False):
        super().__init__(params, dict(lr=lr, betas=betas, weight_decay=weight_decay, maximize=maximize,
                                      cautious=cautious))

    @torch.no_grad()
    def step(self, closure=None):
        loss = _run_closure(closure)
        for group in self.param_groups:
            lr, wd = float(group["lr"]), float(group["weight_decay"])
            b1, b2 = (float(b) for b in group["betas"])
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                w = p.detach().double()
                g = _grad(p, group["maximize"])
                m = state["exp_avg"].double()
                u = torch.sign(b1 * m + (1 - b1) * g)
                if group["cautious"]:
                    u = cautious_mask(u, g)
                p.copy_(w * (1 - lr * wd) - lr * u)
                state["exp_avg"].copy_(b2 * m + (1 - b2) * g)
        return loss


class PaperAdan(torch.optim.Optimizer):
    """Adan (Xie et al. 2022, "Adan: Adaptive Nesterov Momentum Algorithm for Faster Optimizing Deep Models",
    arXiv:2208.06677, Algorithm 1), in float64, in the convention of the official code sail-sg/Adan adan.py
    (``Adan.step`` and ``_single_tensor_adan``), where each β weighs the old average (β close to 1):

        g_prev = g on a parameter's first step (the official code sets ``neg_pre_grad = −g`` then), so d = 0
        d = g − g_prev
        m ← β1·m + (1 − β1)·g                 (state ``exp_avg``)
        v ← β2·v + (1 − β2)·d                 (state ``exp_avg_diff``)
        n ← β3·n + (1 − β3)·(g + β2·d)²       (state ``exp_avg_sq``)
        denom = √n / √(1 − β3^t) + eps
        step = lr·m/(1 − β1^t)/denom + lr·β2·v/(1 − β2^t)/denom
        no_prox=False:  w ← (w − step) / (1 + lr·λ)
        no_prox=True:   w ← w·(1 − lr·λ) − step
        g_prev ← g                            (state ``pre_grad``)

    Where this differs from the official code, and why:
      * ``pre_grad`` holds +g_prev; the official code stores its negation (``neg_pre_grad``, reused in place as a
        scratch buffer). The official code has no ``maximize``; here g is the gradient after maximize *and
        pre_grad is taken after maximize* (so d = g_t − g_{t−1} of the negated gradients, and d = 0 on the first
        step, maximize or not). pytorch_optimizer's Adan takes its first ``previous_grad`` before its maximize
        negation, so with maximize its first d is 2·g, not 0.
      * t is per parameter (torch.optim's convention); the official code counts ``group['step']`` once per
        group and resets ``neg_pre_grad`` only when that group count is 1. They agree whenever every parameter
        of a group has a gradient at every step.
      * the official ``max_grad_norm`` (global gradient clipping, off by default) is not part of this class.

    ``cautious`` (timm/optim/adan.py ``_single_tensor_adan``): u = m (the first-moment term; it has the sign of
    m/(1 − β1^t)/denom) and g the gradient after maximize; m is replaced *in the step only* by
    m·mask / max(mean(mask), 1e-3), mask = (m·g > 0) (state ``exp_avg`` stays unmasked). The gradient-difference
    term lr·β2·v/(1 − β2^t)/denom and the weight decay are not masked, as in timm.
    """

    def __init__(self, params, lr=1e-3, betas=(0.98, 0.92, 0.99), eps=1e-8, weight_decay=0.0, no_prox=False, *,
                 maximize=False, cautious=False):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, no_prox=no_prox,
                                      maximize=maximize, cautious=cautious))

    @torch.no_grad()
    def step(self, closure=None):
        loss = _run_closure(closure)
        for group in self.param_groups:
            lr, wd, eps = float(group["lr"]), float(group["weight_decay"]), float(group["eps"])
            b1, b2, b3 = (float(b) for b in group["betas"])
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = _grad(p, group["maximize"])
                state = self.state[p]
                if not state:
                    state["step"] = torch.tensor(0.0)
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_diff"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["pre_grad"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    g_prev = g
                else:
                    g_prev = state["pre_grad"].double()
                state["step"] += 1
                t = float(state["step"])
                w = p.detach().double()
                d = g - g_prev
                m = b1 * state["exp_avg"].double() + (1 - b1) * g
                v = b2 * state["exp_avg_diff"].double() + (1 - b2) * d
                z = g + b2 * d
                n = b3 * state["exp_avg_sq"].double() + (1 - b3) * z * z
                denom = n.sqrt() / math.sqrt(1 - b3**t) + eps
                m_step = cautious_mask(m, g) if group["cautious"] else m
                update = lr / (1 - b1**t) * m_step / denom + lr * b2 / (1 - b2**t) * v / denom
                if group["no_prox"]:
                    w = w * (1 - lr * wd) - update
                else:
                    w = (w - update) / (1 + lr * wd)
                p.copy_(w)
                state["exp_avg"].copy_(m)
                state["exp_avg_diff"].copy_(v)
                state["exp_avg_sq"].copy_(n)
                state["pre_grad"].copy_(g)
        return loss


def apple_linear_warmup(step: float, alpha_end: float, alpha_start: float = 0.0, warmup: float = 1) -> float:
    """apple/ml-ademamix pytorch/ademamix.py ``linear_warmup_scheduler``: linear from alpha_start at step 0 to
    alpha_end at step ``warmup``, alpha_end from then on."""
    if step < warmup:
        a = step / float(warmup)
        return (1.0 - a) * alpha_start + a * alpha_end
    return alpha_end


def apple_linear_hl_warmup(step: float, beta_end: float, beta_start: float = 0.0, warmup: float = 1) -> float:
    """apple/ml-ademamix pytorch/ademamix.py ``linear_hl_warmup_scheduler``: the half-life
    f(β) = ln(0.5)/ln(β + 1e-8) − 1 (Apple's code has the 1e-8 inside the log) interpolated linearly from
    f(beta_start) to f(beta_end) over ``warmup`` steps, mapped back by f⁻¹(x) = 0.5^(1/(x + 1)).
    Without the 1e-8 this is the paper's β3(t) = exp(ln β1·ln β3 / ((1 − t/T)·ln β3 + (t/T)·ln β1))."""

    def f(beta, eps=1e-8):
        return math.log(0.5) / math.log(beta + eps) - 1

    def f_inv(x):
        return math.pow(0.5, 1 / (x + 1))

    if step < warmup:
        a = step / float(warmup)
        return f_inv((1.0 - a) * f(beta_start) + a * f(beta_end))
    return beta_end


class PaperAdEMAMix(torch.optim.Optimizer):
    """AdEMAMix (Pagliardini, Ablin & Grangier 2024, "The AdEMAMix Optimizer: Better, Faster, Older",
    arXiv:2409.03137, Algorithm 1), in float64, following Apple's reference apple/ml-ademamix
    pytorch/ademamix.py ``AdEMAMix.step``:

        α_t  = α·t/alpha_warmup while t < alpha_warmup, else α          (``linear_warmup_scheduler``, from 0)
        β3_t = half-life warmup from β1 to β3 while t < beta3_warmup    (``linear_hl_warmup_scheduler``, see
               ``apple_linear_hl_warmup``), else β3; no warmup when the option is None
        m1 ← β1·m1 + (1 − β1)·g               (state ``exp_avg_fast``; = g when β1 = 0)
        m3 ← β3_t·m3 + (1 − β3_t)·g           (state ``exp_avg_slow``, never bias-corrected)
        v  ← β2·v + (1 − β2)·g²               (state ``exp_avg_sq``)
        u  = (m1/(1 − β1^t) + α_t·m3) / (√v/√(1 − β2^t) + eps)
        w  ← w − lr·(u + λ·w)                 (Apple: ``update.add_(p, alpha=lmbda); p.add_(-lr * update)``,
                                               i.e. AdamW's decoupled decay w·(1 − lr·λ) − lr·u)

    Differences from Apple's code: ``maximize`` (Apple has none; g is the negated gradient); ``exp_avg_fast``
    is always a tensor (Apple stores None when β1 = 0 and uses g directly — the same arithmetic, since then
    m1 = 0·m1 + 1·g = g and 1 − 0^t = 1); ``step`` is a float32 tensor (Apple: a Python int).

    ``cautious`` (no timm AdEMAMix exists; masked as timm masks AdamW's step): u the whole update above
    (fast and slow parts, before weight decay) and g the gradient after maximize; u ← u·mask/max(mean(mask),
    1e-3), mask = (u·g > 0); the decay λ·w is not masked. (pytorch_optimizer masks only the fast EMA, with
    its own scale n/(k + 1).)
    """

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999, 0.9999), alpha=2.0, beta3_warmup=None, alpha_warmup=None,
                 eps=1e-8, weight_decay=0.0, *, maximize=False, cautious=False):
        super().__init__(params, dict(lr=lr, betas=betas, alpha=alpha, beta3_warmup=beta3_warmup,
                                      alpha_warmup=alpha_warmup, eps=eps, weight_decay=weight_decay,
                                      maximize=maximize, cautious=cautious))

    @torch.no_grad()
    def step(self, closure=None):
        loss = _run_closure(closure)
        for group in self.param_groups:
            lr, wd, eps = float(group["lr"]), float(group["weight_decay"]), float(group["eps"])
            b1, b2, b3_final = (float(b) for b in group["betas"])
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = torch.tensor(0.0)
                    state["exp_avg_fast"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_slow"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["step"] += 1
                t = float(state["step"])
                alpha = float(group["alpha"])
                if group["alpha_warmup"] is not None:
                    alpha = apple_linear_warmup(t, alpha_end=alpha, alpha_start=0, warmup=group["alpha_warmup"])
                b3 = b3_final
                if group["beta3_warmup"] is not None:
                    b3 = apple_linear_hl_warmup(t, beta_end=b3_final, beta_start=b1, warmup=group["beta3_warmup"])
                w = p.detach().double()
                g = _grad(p, group["maximize"])
                m1 = b1 * state["exp_avg_fast"].double() + (1 - b1) * g
                m3 = b3 * state["exp_avg_slow"].double() + (1 - b3) * g
                v = b2 * state["exp_avg_sq"].double() + (1 - b2) * g * g
                denom = v.sqrt() / math.sqrt(1 - b2**t) + eps
                u = (m1 / (1 - b1**t) + alpha * m3) / denom
                if group["cautious"]:
                    u = cautious_mask(u, g)
                p.copy_(w - lr * (u + wd * w))
                state["exp_avg_fast"].copy_(m1)
                state["exp_avg_slow"].copy_(m3)
                state["exp_avg_sq"].copy_(v)
        return loss


class PaperADOPT(torch.optim.Optimizer):
    """ADOPT (Taniguchi et al. 2024, "ADOPT: Modified Adam Can Converge with Any β2 with the Optimal Rate",
    NeurIPS 2024, arXiv:2411.02853, Algorithm 1 with the clipping of the Nov-2024 update), in float64, following
    the authors' code iShohei220/adopt src/adopt/adopt.py ``_single_tensor_adopt`` (= the PyPI package
    torch-adopt 0.1.0, whose metadata names Shohei Taniguchi and that repository; the file is identical to
    the repository's HEAD). With s the number of earlier steps (s = t − 1, the code's ``step`` before its
    increment):

        g' = g + λ·w  if not decoupled (and λ ≠ 0), else g
        s = 0 (first step):  v ← g'² (state ``exp_avg_sq``); nothing else: the parameter does not move and no
                             weight decay is applied, m stays 0
        s ≥ 1:
            decoupled:  w ← w − lr·λ·w        (before the step; the step does not depend on w)
            n = g' / max(√v, eps)             (v of the earlier steps)
            n ← clamp(n, −s^¼, s^¼)           (the code's default ``clip_lambda = step**0.25`` with step = s)
            m ← β1·m + (1 − β1)·n             (``exp_avg.lerp_(normed_grad, 1 − β1)``; state ``exp_avg``)
            w ← w − lr·m
            v ← β2·v + (1 − β2)·g'²

    The code's ``clip_lambda`` option (None: no clipping) is not an option here: the default is fixed.
    pytorch_optimizer's ADOPT clips at t^¼ (t = s + 1, one step later than the authors') and applies its
    decoupled decay also on the first step; timm's adopt.py clips at (t − 1)^¼ like the authors'.
    """

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.9999), eps=1e-6, weight_decay=0.0, decoupled=False, *,
                 maximize=False):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, decoupled=decoupled,
                                      maximize=maximize))

    @torch.no_grad()
    def step(self, closure=None):
        loss = _run_closure(closure)
        for group in self.param_groups:
            lr, wd, eps = float(group["lr"]), float(group["weight_decay"]), float(group["eps"])
            b1, b2 = (float(b) for b in group["betas"])
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = torch.tensor(0.0)
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                s = float(state["step"])
                state["step"] += 1
                w = p.detach().double()
                g = _grad(p, group["maximize"])
                if wd != 0 and not group["decoupled"]:
                    g = g + wd * w
                v = state["exp_avg_sq"].double()
                if s == 0:
                    state["exp_avg_sq"].copy_(g * g)
                    continue
                if wd != 0 and group["decoupled"]:
                    w = w - lr * wd * w
                n = g / v.sqrt().clamp(min=eps)
                clip = s**0.25
                n = n.clamp(-clip, clip)
                m = b1 * state["exp_avg"].double() + (1 - b1) * n
                p.copy_(w - lr * m)
                state["exp_avg"].copy_(m)
                state["exp_avg_sq"].copy_(b2 * v + (1 - b2) * g * g)
        return loss


class PaperStableAdamW(torch.optim.Optimizer):
    """StableAdamW (Wortsman et al. 2023, "Stable and low-precision training for large-scale vision-language
    models", arXiv:2304.13013, Algorithm 2), in float64, with the parameter trajectory of torch-optimi 0.3.3
    ``optimi.StableAdamW`` (optimi/stableadamw.py ``stableadamw`` and ``_single_param_stableadamw``, with
    ``debias_beta`` from optimi/utils.py) at its defaults (decouple_lr=False, no Kahan summation in
    float32/float64):

        m ← β1·m + (1 − β1)·g,  v ← β2·v + (1 − β2)·g²     (states ``exp_avg``, ``exp_avg_sq``: torch's plain EMAs)
        m̂ = m/(1 − β1^t),  v̂ = v/(1 − β2^t)
        RMS = √(mean(g² / max(v̂, eps²)))      (over the whole tensor; an empty tensor has RMS 0)
        lr_t = lr / max(1, RMS)
        w ← w·(1 − lr_t·λ) − lr_t·m̂/(√v̂ + eps)           (decoupled decay with the divided lr)

    What optimi stores, and the map: optimi updates its moments with "debiased betas"
    β̂_t = β(1 − β^(t−1))/(1 − β^t) (``debias_beta``), so its ``exp_avg`` and ``exp_avg_sq`` hold the
    bias-corrected m̂_t and v̂_t themselves (β̂_1 = 0: m̂_1 = g, v̂_1 = g²), with eps added to √v̂ — which is
    torch.optim.AdamW's eps placement (√v/√(1 − β2^t) + eps). This class keeps torch's meaning of the state,
    m_t and v_t, so optimi.exp_avg = exp_avg/(1 − β1^t) and optimi.exp_avg_sq = exp_avg_sq/(1 − β2^t); the
    parameters agree. optimi also keeps ``eps_sq`` (a 0-d tensor eps²) and ``kahan_comp`` (None here) per
    parameter, and its step is one int32 tensor per param group (``group['step']``), counted once per
    ``step()`` whether or not a parameter has a gradient; here t is per parameter. optimi has no
    ``maximize``. With ``decouple_lr=True`` optimi scales the decay by lr_t/max_lr instead (not modelled).

    ``cautious`` (masked as timm masks AdamW's step, timm/optim/adamw.py ``_single_tensor_adamw``): u = m̂/(√v̂ +
    eps) and g the gradient after maximize; u ← u·mask/max(mean(mask), 1e-3), mask = (u·g > 0); then
    w ← w·(1 − lr_t·λ) − lr_t·u. The RMS (from g and v̂) and the decay are not masked.
    """

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.99), eps=1e-6, weight_decay=1e-2, *, maximize=False,
                 cautious=False):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, maximize=maximize,
                                      cautious=cautious))

    @torch.no_grad()
    def step(self, closure=None):
        loss = _run_closure(closure)
        for group in self.param_groups:
            lr, wd, eps = float(group["lr"]), float(group["weight_decay"]), float(group["eps"])
            b1, b2 = (float(b) for b in group["betas"])
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = torch.tensor(0.0)
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["step"] += 1
                t = float(state["step"])
                w = p.detach().double()
                g = _grad(p, group["maximize"])
                m = b1 * state["exp_avg"].double() + (1 - b1) * g
                v = b2 * state["exp_avg_sq"].double() + (1 - b2) * g * g
                m_hat, v_hat = m / (1 - b1**t), v / (1 - b2**t)
                rms = float((g * g / v_hat.clamp(min=eps * eps)).mean().sqrt()) if g.numel() else 0.0
                lr_t = lr / max(1.0, rms)
                u = m_hat / (v_hat.sqrt() + eps)
                if group["cautious"]:
                    u = cautious_mask(u, g)
                p.copy_(w * (1 - lr_t * wd) - lr_t * u)
                state["exp_avg"].copy_(m)
                state["exp_avg_sq"].copy_(v)
        return loss


class PaperSOAP(torch.optim.Optimizer):
    """SOAP (Vyas et al. 2024, "SOAP: Improving and Stabilizing Shampoo using Adam", arXiv:2409.11321, Algorithm 3),
    in float64, with the semantics of the authors' soap.py (github.com/nikhilvyas/SOAP, ``SOAP.step``,
    ``update_preconditioner``, ``get_orthogonal_matrix``, ``get_orthogonal_matrix_QR``, ``merge_dims``):

    For a gradient g (after maximize) reshaped to the work shape (``merge_dims``: neighbouring dims merged while their
    product stays <= ``max_precond_dim``; 1-d and 0-d: unchanged), each dim d of size <= ``max_precond_dim`` has a
    factor F_d (1-d: only with ``precondition_1d``) and a basis Q_d. Write G_(d) for g with dim d as rows and the
    others flattened, and P(x) (P⁻¹(x)) for x multiplied along each such dim by Q_dᵀ (by Q_d).

        first step of a parameter:  F_d = (1 − βs)·G_(d)G_(d)ᵀ;  Q_d = eigenvectors of F_d + 1e-30·I, by descending
                                    eigenvalue; nothing else (the parameter is not updated)
        Adam step t = 1, 2, ...:    m ← β1·m + (1 − β1)·g   (kept in the original basis, as the paper's Algorithm 3 and
                                    soap.py before its "momentum change": soap.py now keeps P(m), the same quantity)
                                    v ← β2·v + (1 − β2)·P(g)²;   n = P⁻¹(P(m) / (√v + eps))
                                    n ← n / (1e-30 + RMS(n))   (normalize_grads)
                                    η = lr·√(1 − β2^t)/(1 − β1^t)   (lr without correct_bias)
                                    w ← w − η·n;   w ← w − lr·λ·w   (λ > 0)
                                    F_d ← βs·F_d + (1 − βs)·G_(d)G_(d)ᵀ
                                    every ``precondition_frequency``-th t, per dim d in order: e = diag(Q_dᵀF_dQ_d),
                                    o = argsort(e, descending), v permuted by o along d, Q_d = qr(F_d·Q_d[:, o]).Q

    βs is ``shampoo_beta``, or β2 when negative. Differences from soap.py: ``step`` counts the initialising step too
    (soap.py's is t), hyper-parameters are read from the group at each step (soap.py fixes ``shampoo_beta`` and
    ``precondition_frequency`` at a parameter's first step), everything is float64 (soap.py takes eigh and QR in
    float32), an empty parameter gets no factor (soap.py would take eigh of a 0×0 matrix), ``maximize`` is added.
    State: ``step``, ``exp_avg`` (m, original basis), ``exp_avg_sq``, and lists ``GG``/``Q`` indexed by dim (None
    where a dim has no factor).
    """

    def __init__(self, params, lr=3e-3, betas=(0.95, 0.95), shampoo_beta=-1, eps=1e-8, weight_decay=0.01,
                 precondition_frequency=10, max_precond_dim=10000, merge_dims=False, precondition_1d=False,
                 normalize_grads=False, correct_bias=True, *, maximize=False):
        super().__init__(params, dict(lr=lr, betas=betas, shampoo_beta=shampoo_beta, eps=eps, weight_decay=weight_decay,
                                      precondition_frequency=precondition_frequency, max_precond_dim=max_precond_dim,
                                      merge_dims=merge_dims, precondition_1d=precondition_1d,
                                      normalize_grads=normalize_grads, correct_bias=correct_bias, maximize=maximize))

    @staticmethod
    def work_shape(shape, group):
        limit = group["max_precond_dim"]
        if len(shape) == 1 or not group["merge_dims"]:
            return list(shape)
        out, run = [], 1
        for size in shape:
            if run * size <= limit:
                run *= size
            elif run > 1:
                out, run = out + [run], size
            else:
                out, run = out + [size], 1
        return out + [run] if run > 1 or not out else out

    @staticmethod
    def along(x, matrix, d):
        """x multiplied along dim d by ``matrix`` (x_d ↦ matrix @ x_d)."""
        return torch.movedim(torch.tensordot(matrix, x, dims=([1], [d])), 0, d)

    @staticmethod
    def gram(g, d):
        rows = torch.movedim(g, d, 0).reshape(g.shape[d], -1)
        return rows @ rows.T

    @torch.no_grad()
    def step(self, closure=None):
        loss = _run_closure(closure)
        for group in self.param_groups:
            lr, wd, eps = float(group["lr"]), float(group["weight_decay"]), float(group["eps"])
            b1, b2 = (float(b) for b in group["betas"])
            bs = float(group["shampoo_beta"]) if group["shampoo_beta"] >= 0 else b2
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                shape = self.work_shape(p.shape, group)
                g = _grad(p, group["maximize"]).reshape(shape)
                if not state:
                    state["step"] = torch.tensor(1.0)
                    state["exp_avg"] = torch.zeros(p.shape, dtype=torch.float64)
                    state["exp_avg_sq"] = torch.zeros(p.shape, dtype=torch.float64)
                    preconditioned = [p.numel() > 0 and size <= group["max_precond_dim"]
                                      and (p.dim() != 1 or group["precondition_1d"]) for size in shape]
                    state["GG"] = [(1 - bs) * self.gram(g, d) if on else None for d, on in enumerate(preconditioned)]
                    state["Q"] = [None if F is None else torch.linalg.eigh(F + 1e-30 * torch.eye(F.shape[0],
                                  dtype=torch.float64))[1].flip(1) for F in state["GG"]]
                    continue
                t = float(state["step"])
                state["step"] += 1
                GG, Q = state["GG"], state["Q"]

                def project(x, back=False):
                    for d, q in enumerate(Q):
                        if q is not None:
                            x = self.along(x, q if back else q.T, d)
                    return x

                m = b1 * state["exp_avg"].reshape(shape) + (1 - b1) * g
                v = b2 * state["exp_avg_sq"].reshape(shape) + (1 - b2) * project(g) ** 2
                n = project(project(m) / (v.sqrt() + eps), back=True)
                if group["normalize_grads"]:
                    n = n / (1e-30 + n.pow(2).mean().sqrt())
                step_size = lr * math.sqrt(1 - b2**t) / (1 - b1**t) if group["correct_bias"] else lr
                w = p.detach().double() - step_size * n.reshape(p.shape)
                if wd > 0:
                    w = w - lr * wd * w
                p.copy_(w)
                for d, F in enumerate(GG):
                    if F is not None:
                        GG[d] = bs * F + (1 - bs) * self.gram(g, d)
                if t % group["precondition_frequency"] == 0:
                    for d, (F, q) in enumerate(zip(GG, Q)):
                        if F is None:
                            continue
                        order = torch.argsort(torch.diag(q.T @ F @ q), descending=True)
                        v = v.index_select(d, order)
                        Q[d] = torch.linalg.qr(F @ q[:, order])[0]
                state["exp_avg"] = m.reshape(p.shape)
                state["exp_avg_sq"] = v.reshape(p.shape)
        return loss
