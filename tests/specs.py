"""Declarative test specs: one per optimizer, and the small harness every suite builds on.

A spec states what an optimizer *is* (its class, what it must match, which options it has, which
capabilities) — never which tests to skip. The suites in ``test_*.py`` are generated from ``SPECS``.

Counterparts: the five torch.optim optimizers are matched against torch itself; LARS and LAMB have no
torch counterpart and are matched against float64 implementations of the paper equations written
here (``PaperLARS``, ``PaperLAMB``), which are ``torch.optim.Optimizer`` subclasses so that the same
harness, schedulers included, drives them.
"""

from __future__ import annotations

import contextlib
import itertools
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from hypothesis import strategies as st

import thalweg
from references import PaperADOPT, PaperAdan, PaperAdEMAMix, PaperLion, PaperStableAdamW

BACKENDS = ("reference", "foreach", "fused")

# -- tolerances -------------------------------------------------------------------------------
# Relative to the largest magnitude of the expected tensor (so entries near zero are not held to a
# meaningless relative bound). float32/float64: the bounds. bfloat16 keeps 8 significant
# bits (unit round-off 2**-8 ~ 3.9e-3): computing an intermediate in a different order (or in float32
# inside a foreach kernel) moves a stored value by one ulp, i.e. up to 2**-7 ~ 7.8e-3 relative, and
# with the parameter, the moments and the step all rounded each step, a few ulps can pile up over
# 25 steps. 3e-2 allows ~4 ulps at the largest entry and still fails an update that is wrong.
# float16 keeps 11 significant bits: a float32 step rounded to float16 can land one ulp (up to 2**-10 ~ 9.8e-4
# relative) away from the float64 reference's when the exact value sits near a rounding boundary (measured:
# StableAdamW, one element of 16 after 25 steps); 2e-3 allows 2 ulps.
TOLERANCE = {torch.float32: 1e-5, torch.float64: 1e-10, torch.bfloat16: 3e-2, torch.float16: 2e-3}


def assert_close(actual: torch.Tensor, expected: torch.Tensor, *, what: str = "") -> None:
    """``actual`` equals ``expected`` within the dtype's tolerance, same shape and dtype."""
    assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype} != {expected.dtype}"
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    if expected.numel() == 0:
        return
    tol = TOLERANCE.get(expected.dtype, 1e-5)
    scale = max(float(expected.detach().abs().max().float()), torch.finfo(torch.float32).tiny)
    torch.testing.assert_close(actual, expected, rtol=tol, atol=tol * scale, msg=lambda m: f"{what}: {m}")


# -- paper references (float64 math) -----------------------------------------------------------


class PaperLARS(torch.optim.Optimizer):
    """LARS as written in thalweg/optim/lars.py's docstring (You et al. 2017, LARC form), in float64.

    d = g + wd·w; if trust_ratio and ‖w‖>0 and ‖g‖>0: d ← η‖w‖/(‖g‖ + wd‖w‖ + eps)·d;
    b = d at the first step, then μb + d; d = d + μb (Nesterov) or b; w ← w − lr·d.
    """

    def __init__(self, params, lr, momentum=0.9, weight_decay=0.0, trust_coefficient=0.001, eps=1e-8,
                 nesterov=False, *, maximize=False):
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay,
                                      trust_coefficient=trust_coefficient, eps=eps, nesterov=nesterov,
                                      maximize=maximize, trust_ratio=True))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, mu, wd = float(group["lr"]), float(group["momentum"]), float(group["weight_decay"])
            for p in group["params"]:
                if p.grad is None:
                    continue
                w = p.detach().double()
                g = -p.grad.double() if group["maximize"] else p.grad.double()
                d = g + wd * w
                w_norm, g_norm = w.norm(), g.norm()
                if group["trust_ratio"] and w_norm > 0 and g_norm > 0:
                    d = group["trust_coefficient"] * w_norm / (g_norm + wd * w_norm + group["eps"]) * d
                if mu != 0:
                    state = self.state[p]
                    b = d.clone() if "momentum_buffer" not in state else mu * state["momentum_buffer"].double() + d
                    state["momentum_buffer"] = b.to(p.dtype)
                    d = d + mu * b if group["nesterov"] else b
                p.copy_(w - lr * d)
        return loss


class PaperLAMB(torch.optim.Optimizer):
    """LAMB as written in thalweg/optim/lamb.py's docstring (You et al. 2019, Algorithm 2), in float64.

    Adam moments m, v; m̂ = m/(1−β1^t), v̂ = v/(1−β2^t) (or m, v without bias correction);
    r = m̂/(√v̂ + eps) + wd·w; q = ‖w‖/‖r‖ if trust_ratio and both > 0 else 1; w ← w − lr·q·r.
    """

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.01, bias_correction=True,
                 *, maximize=False):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                                      bias_correction=bias_correction, maximize=maximize, trust_ratio=True))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            (b1, b2), wd = (float(b) for b in group["betas"]), float(group["weight_decay"])
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = torch.tensor(0.0)
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros_like(p)
                state["step"] += 1
                t = float(state["step"])
                w = p.detach().double()
                g = -p.grad.double() if group["maximize"] else p.grad.double()
                m = b1 * state["exp_avg"].double() + (1 - b1) * g
                v = b2 * state["exp_avg_sq"].double() + (1 - b2) * g * g
                state["exp_avg"].copy_(m)
                state["exp_avg_sq"].copy_(v)
                if group["bias_correction"]:
                    m, v = m / (1 - b1**t), v / (1 - b2**t)
                r = m / (v.sqrt() + group["eps"]) + wd * w
                w_norm, r_norm = w.norm(), r.norm()
                q = w_norm / r_norm if group["trust_ratio"] and w_norm > 0 and r_norm > 0 else 1.0
                p.copy_(w - float(group["lr"]) * q * r)
        return loss


def _torch_momentum(params, **kwargs):
    """torch's counterpart of thalweg.Momentum: SGD with momentum 0.9 unless stated."""
    return torch.optim.SGD(params, **{"momentum": 0.9, **kwargs})


# -- specs -------------------------------------------------------------------------------------


def _grid(**options: list[Any]) -> list[dict[str, Any]]:
    keys = list(options)
    return [dict(zip(keys, values)) for values in itertools.product(*(options[k] for k in keys))]


def _valid_sgd(combo: dict[str, Any]) -> bool:
    return not combo.get("nesterov") or (combo.get("momentum", 0.9) > 0 and combo.get("dampening", 0) == 0)


@dataclass(frozen=True)
class Spec:
    name: str                                   # thalweg.create's name
    cls: type                                   # the thalweg class
    counterpart: Callable[..., torch.optim.Optimizer]  # torch.optim's optimizer or a paper reference
    matches_torch: bool                         # counterpart is torch.optim (checkpoints cross-load)
    grid: list[dict[str, Any]]                  # every discrete option combination, with representative values
    ranges: dict[str, Any]                      # hypothesis strategies for the non-zero continuous values
    state_keys: Callable[[dict[str, Any]], set[str]]  # per-parameter state keys after a step, given the options
    train_lr: float                             # an lr that trains the digits MLP to >= 90 %
    cycle_momentum: str | None                  # the group key OneCycleLR/CyclicLR cycle ("momentum", "betas")
    sparse: bool = False                        # accepts sparse gradients
    layerwise: bool = False                     # has per-group trust_ratio
    required: dict[str, Any] = field(default_factory=dict)  # arguments without a default
    group_only: tuple[str, ...] = ()            # option keys that live in param groups, not the constructor
    nonneg: tuple[str, ...] = ("lr", "eps", "weight_decay")  # float arguments that must be finite and >= 0
    flags: tuple[str, ...] = ("maximize",)      # boolean arguments
    # options the counterpart reads from its constructor only, ignoring a param group's value (torch
    # 2.13's Adagrad fills every group's ``sum`` with the constructor's initial_accumulator_value)
    counterpart_ctor_only: tuple[str, ...] = ()
    # in bfloat16 the result depends on the order of roundings more than the tolerance allows, and torch's
    # own for-loop and foreach paths are each far from the float64 result (ASGD: param ← (1-λη)·param − η·g
    # rounds three times a step in torch's for-loop, once in the fused kernel): a backend is then held to
    # be at least as close to the float64 run as torch's closest bfloat16 path, rather than to one of them
    # (a predicate of the options: RMSprop only when centred, where v - ḡ² cancels)
    bf16_ill_conditioned: Callable[[dict[str, Any]], bool] = lambda combo: False

    def __repr__(self) -> str:  # test ids
        return self.name

    def build(self, cls_or_counterpart, params_groups, combo: dict[str, Any], **extra):
        ctor = {k: v for k, v in combo.items() if k not in self.group_only}
        return cls_or_counterpart(params_groups, **ctor, **extra)


_lr = lambda hi: st.floats(1e-4, hi)  # noqa: E731
_betas = st.tuples(st.floats(0.5, 0.99), st.floats(0.9, 0.9999))
_betas3 = st.tuples(st.floats(0.5, 0.99), st.floats(0.5, 0.99), st.floats(0.9, 0.9999))

SGD_GRID = [c for c in _grid(lr=[0.05], momentum=[0.0, 0.9], dampening=[0.0, 0.3], nesterov=[False, True],
                              weight_decay=[0.0, 0.1], maximize=[False, True]) if _valid_sgd(c)]
ADAM_GRID = _grid(lr=[1e-2], betas=[(0.9, 0.999)], eps=[1e-8], weight_decay=[0.0, 0.1], amsgrad=[False, True],
                  maximize=[False, True])

SPECS: list[Spec] = [
    Spec("sgd", thalweg.SGD, torch.optim.SGD, True, SGD_GRID,
         dict(lr=_lr(0.3), momentum=st.floats(0.05, 0.99), dampening=st.floats(0.05, 0.9),
              weight_decay=st.floats(1e-4, 0.3)),
         lambda c: {"momentum_buffer"} if c.get("momentum", 0) else set(),
         train_lr=0.5, cycle_momentum="momentum", flags=("nesterov", "maximize"), nonneg=("lr", "weight_decay"),
         sparse=True),
    Spec("momentum", thalweg.Momentum, _torch_momentum, True,
         [c for c in _grid(lr=[0.05], nesterov=[False, True], weight_decay=[0.0, 0.1], maximize=[False, True])],
         dict(lr=_lr(0.3), weight_decay=st.floats(1e-4, 0.3)),
         lambda c: {"momentum_buffer"},
         train_lr=0.1, cycle_momentum="momentum", flags=("nesterov", "maximize"), nonneg=("lr", "weight_decay"),
         sparse=True),
    Spec("adam", thalweg.Adam, torch.optim.Adam, True, ADAM_GRID,
         dict(lr=_lr(0.1), betas=_betas, eps=st.floats(1e-10, 1e-3), weight_decay=st.floats(1e-4, 0.3)),
         lambda c: {"step", "exp_avg", "exp_avg_sq"} | ({"max_exp_avg_sq"} if c.get("amsgrad") else set()),
         train_lr=1e-2, cycle_momentum="betas", flags=("amsgrad", "maximize")),
    Spec("adamw", thalweg.AdamW, torch.optim.AdamW, True, ADAM_GRID,
         dict(lr=_lr(0.1), betas=_betas, eps=st.floats(1e-10, 1e-3), weight_decay=st.floats(1e-4, 0.3)),
         lambda c: {"step", "exp_avg", "exp_avg_sq"} | ({"max_exp_avg_sq"} if c.get("amsgrad") else set()),
         train_lr=1e-2, cycle_momentum="betas", flags=("amsgrad", "maximize")),
    Spec("nadam", thalweg.NAdam, torch.optim.NAdam, True,
         [c for c in _grid(lr=[1e-2], betas=[(0.9, 0.999)], eps=[1e-8], weight_decay=[0.0, 0.1], momentum_decay=[4e-3],
                           decoupled_weight_decay=[False, True], maximize=[False, True])
          if c["weight_decay"] or not c["decoupled_weight_decay"]],
         dict(lr=_lr(0.1), betas=_betas, eps=st.floats(1e-10, 1e-3), weight_decay=st.floats(1e-4, 0.3),
              momentum_decay=st.floats(1e-4, 0.1)),
         lambda c: {"step", "mu_product", "exp_avg", "exp_avg_sq"},
         train_lr=1e-2, cycle_momentum="betas", flags=("decoupled_weight_decay", "maximize"),
         nonneg=("lr", "eps", "weight_decay", "momentum_decay")),
    Spec("radam", thalweg.RAdam, torch.optim.RAdam, True,
         [c for c in _grid(lr=[1e-2], betas=[(0.9, 0.999)], eps=[1e-8], weight_decay=[0.0, 0.1],
                           decoupled_weight_decay=[False, True], maximize=[False, True])
          if c["weight_decay"] or not c["decoupled_weight_decay"]],
         # beta2 down to 0.5: rho_t passes 5 within the first steps, so both sides of the rectification run
         dict(lr=_lr(0.1), betas=st.tuples(st.floats(0.5, 0.99), st.floats(0.5, 0.9999)), eps=st.floats(1e-10, 1e-3),
              weight_decay=st.floats(1e-4, 0.3)),
         lambda c: {"step", "exp_avg", "exp_avg_sq"},
         train_lr=1e-2, cycle_momentum="betas", flags=("decoupled_weight_decay", "maximize")),
    Spec("adamax", thalweg.Adamax, torch.optim.Adamax, True,
         _grid(lr=[1e-2], betas=[(0.9, 0.999)], eps=[1e-8], weight_decay=[0.0, 0.1], maximize=[False, True]),
         dict(lr=_lr(0.1), betas=_betas, eps=st.floats(1e-10, 1e-3), weight_decay=st.floats(1e-4, 0.3)),
         lambda c: {"step", "exp_avg", "exp_inf"},
         train_lr=2e-2, cycle_momentum="betas"),
    Spec("rmsprop", thalweg.RMSprop, torch.optim.RMSprop, True,
         _grid(lr=[1e-2], alpha=[0.9], eps=[1e-8], momentum=[0.0, 0.9], centered=[False, True],
               weight_decay=[0.0, 0.1], maximize=[False, True]),
         dict(lr=_lr(0.02), alpha=st.floats(0.5, 0.999), eps=st.floats(1e-10, 1e-3), momentum=st.floats(0.05, 0.99),
              weight_decay=st.floats(1e-4, 0.3)),
         lambda c: {"step", "square_avg"} | ({"momentum_buffer"} if c.get("momentum") else set())
         | ({"grad_avg"} if c.get("centered") else set()),
         train_lr=1e-3, cycle_momentum="momentum", flags=("centered", "maximize"),
         bf16_ill_conditioned=lambda c: bool(c.get("centered"))),
    Spec("adagrad", thalweg.Adagrad, torch.optim.Adagrad, True,
         _grid(lr=[0.05], lr_decay=[0.0, 0.05], initial_accumulator_value=[0.0, 0.1], eps=[1e-10],
               weight_decay=[0.0, 0.1], maximize=[False, True]),
         dict(lr=_lr(0.3), lr_decay=st.floats(1e-3, 0.5), initial_accumulator_value=st.floats(1e-3, 1.0),
              eps=st.floats(1e-10, 1e-3), weight_decay=st.floats(1e-4, 0.3)),
         lambda c: {"step", "sum"},
         train_lr=5e-2, cycle_momentum=None, sparse=True, counterpart_ctor_only=("initial_accumulator_value",),
         nonneg=("lr", "eps", "weight_decay", "lr_decay", "initial_accumulator_value")),
    Spec("adadelta", thalweg.Adadelta, torch.optim.Adadelta, True,
         _grid(lr=[1.0], rho=[0.9], eps=[1e-6], weight_decay=[0.0, 0.1], maximize=[False, True]),
         dict(lr=st.floats(1e-2, 2.0), rho=st.floats(0.5, 0.99), eps=st.floats(1e-8, 1e-4),
              weight_decay=st.floats(1e-4, 0.3)),
         lambda c: {"step", "square_avg", "acc_delta"},
         train_lr=1.0, cycle_momentum=None),
    Spec("asgd", thalweg.ASGD, torch.optim.ASGD, True,
         # t0=5: the averaging starts within the test's steps (torch's 1e6 never does)
         _grid(lr=[1e-2], lambd=[1e-4], alpha=[0.75], t0=[1e6, 5.0], weight_decay=[0.0, 0.1], maximize=[False, True]),
         dict(lr=_lr(0.1), lambd=st.floats(1e-5, 1e-1), alpha=st.floats(0.5, 1.0), t0=st.floats(1.0, 30.0),
              weight_decay=st.floats(1e-4, 0.3)),
         lambda c: {"step", "eta", "mu", "ax"},
         train_lr=0.5, cycle_momentum=None, nonneg=("lr", "weight_decay", "lambd", "alpha"),
         bf16_ill_conditioned=lambda c: True),
    Spec("rprop", thalweg.Rprop, torch.optim.Rprop, True,
         _grid(lr=[1e-2], etas=[(0.5, 1.2), (0.25, 1.5)], step_sizes=[(1e-6, 50)], maximize=[False, True]),
         dict(lr=_lr(0.1)),
         lambda c: {"step", "prev", "step_size"},
         train_lr=1e-3, cycle_momentum=None, nonneg=("lr",),
         # torch multiplies a bfloat16 step_size by the etas rounded to bfloat16 (1.2 -> 1.203125): the factor
         # compounds, 6 % apart from a float32-math kernel after 30 growing steps (found by hypothesis)
         bf16_ill_conditioned=lambda c: True),
    Spec("lars", thalweg.LARS, PaperLARS, False,
         [c for c in _grid(lr=[1.0], momentum=[0.0, 0.9], nesterov=[False, True], weight_decay=[0.0, 1e-2],
                           trust_coefficient=[1e-3], maximize=[False, True], trust_ratio=[True, False])
          if not c["nesterov"] or c["momentum"] > 0],
         dict(lr=st.floats(1e-2, 5.0), momentum=st.floats(0.05, 0.99), weight_decay=st.floats(1e-4, 0.1),
              trust_coefficient=st.floats(1e-4, 0.05)),
         lambda c: {"momentum_buffer"} if c.get("momentum", 0.9) else set(),
         train_lr=3.0, cycle_momentum="momentum", layerwise=True, required={"lr": 1.0},
         group_only=("trust_ratio",), flags=("nesterov", "maximize")),
    Spec("lamb", thalweg.LAMB, PaperLAMB, False,
         _grid(lr=[1e-2], betas=[(0.9, 0.999)], eps=[1e-6], weight_decay=[0.0, 0.01], bias_correction=[True, False],
               maximize=[False, True], trust_ratio=[True, False]),
         dict(lr=_lr(0.1), betas=_betas, eps=st.floats(1e-10, 1e-3), weight_decay=st.floats(1e-4, 0.3)),
         lambda c: {"step", "exp_avg", "exp_avg_sq"},
         train_lr=2e-2, cycle_momentum="betas", layerwise=True, group_only=("trust_ratio",),
         flags=("bias_correction", "maximize")),
    # the modern set, each against a float64 reference written from its authors' code (tests/references.py,
    # itself checked against the authors' packages in tests/test_reference_packages.py)
    Spec("lion", thalweg.Lion, PaperLion, False,
         _grid(lr=[1e-2], betas=[(0.9, 0.99)], weight_decay=[0.0, 0.1], cautious=[False, True], maximize=[False, True]),
         dict(lr=_lr(0.1), betas=_betas, weight_decay=st.floats(1e-4, 0.3)),
         lambda c: {"exp_avg"},
         train_lr=1e-3, cycle_momentum="betas", flags=("cautious", "maximize"), nonneg=("lr", "weight_decay")),
    Spec("adan", thalweg.Adan, PaperAdan, False,
         [c for c in _grid(lr=[1e-2], betas=[(0.98, 0.92, 0.99)], eps=[1e-8], weight_decay=[0.0, 0.1],
                           no_prox=[False, True], cautious=[False, True], maximize=[False, True])
          if c["weight_decay"] or not c["no_prox"]],
         dict(lr=_lr(0.1), betas=_betas3, eps=st.floats(1e-10, 1e-3), weight_decay=st.floats(1e-4, 0.3)),
         lambda c: {"step", "exp_avg", "exp_avg_diff", "exp_avg_sq", "pre_grad"},
         train_lr=1e-3, cycle_momentum="betas", flags=("no_prox", "cautious", "maximize")),
    Spec("ademamix", thalweg.AdEMAMix, PaperAdEMAMix, False,
         [c for c in _grid(lr=[1e-2], betas=[(0.9, 0.999, 0.9999), (0.0, 0.999, 0.9999)], alpha=[2.0],
                           beta3_warmup=[None, 10], alpha_warmup=[None, 10], eps=[1e-8], weight_decay=[0.0, 0.1],
                           cautious=[False, True], maximize=[False, True])
          if (c["beta3_warmup"] is None) == (c["alpha_warmup"] is None)],
         dict(lr=_lr(0.1), betas=_betas3, alpha=st.floats(0.5, 8.0), eps=st.floats(1e-10, 1e-3),
              weight_decay=st.floats(1e-4, 0.3), beta3_warmup=st.integers(1, 30), alpha_warmup=st.integers(1, 30)),
         lambda c: {"step", "exp_avg_fast", "exp_avg_slow", "exp_avg_sq"},
         train_lr=1e-3, cycle_momentum="betas", flags=("cautious", "maximize"),
         nonneg=("lr", "eps", "weight_decay", "alpha")),
    Spec("adopt", thalweg.ADOPT, PaperADOPT, False,
         [c for c in _grid(lr=[1e-2], betas=[(0.9, 0.9999)], eps=[1e-6], weight_decay=[0.0, 0.1],
                           decoupled=[False, True], maximize=[False, True])
          if c["weight_decay"] or not c["decoupled"]],
         dict(lr=_lr(0.1), betas=_betas, eps=st.floats(1e-10, 1e-3), weight_decay=st.floats(1e-4, 0.3)),
         lambda c: {"step", "exp_avg", "exp_avg_sq"},
         train_lr=1e-3, cycle_momentum="betas", flags=("decoupled", "maximize")),
    Spec("stableadamw", thalweg.StableAdamW, PaperStableAdamW, False,
         _grid(lr=[1e-2], betas=[(0.9, 0.99)], eps=[1e-6], weight_decay=[0.0, 0.01], cautious=[False, True],
               maximize=[False, True]),
         dict(lr=_lr(0.1), betas=_betas, eps=st.floats(1e-10, 1e-3), weight_decay=st.floats(1e-4, 0.3)),
         lambda c: {"step", "exp_avg", "exp_avg_sq"},
         train_lr=1e-3, cycle_momentum="betas", flags=("cautious", "maximize")),
]
SPEC_BY_NAME = {spec.name: spec for spec in SPECS}
TORCH_SPECS = [spec for spec in SPECS if spec.matches_torch]
PAPER_SPECS = [spec for spec in SPECS if not spec.matches_torch]


def hyperparameters(spec: Spec) -> st.SearchStrategy[dict[str, Any]]:
    """A grid combination with each non-zero continuous value redrawn at random (zeros stay: they select a path)."""

    def randomise(combo: dict[str, Any]) -> st.SearchStrategy[dict[str, Any]]:
        drawn = {}
        for key, value in combo.items():
            is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
            if key in spec.ranges and (key == "betas" or (is_number and value != 0)):
                drawn[key] = spec.ranges[key]
            else:
                drawn[key] = st.just(value)
        return st.fixed_dictionaries(drawn)

    return st.sampled_from(spec.grid).flatmap(randomise)


def draw_case(data, spec: Spec, dtypes: list[torch.dtype]):
    """Random hyper-parameters (:func:`hyperparameters`), 1-4 shapes from ``SHAPES``, a dtype and a seed,
    each drawn under its own label so that hypothesis reports a failing case by name."""
    combo = data.draw(hyperparameters(spec), label="hyper-parameters")
    shapes = data.draw(st.lists(st.sampled_from(SHAPES), min_size=1, max_size=4), label="shapes")
    dtype = data.draw(st.sampled_from(dtypes), label="dtype")
    seed = data.draw(st.integers(0, 2**16), label="seed")
    return combo, shapes, dtype, seed


# -- harness -----------------------------------------------------------------------------------

SHAPES = [(), (0,), (7,), (3, 5), (1, 1, 9), (2, 0, 3), (4, 4)]


def make_params(shapes, dtype, seed: int, *, zero_first: bool = False) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    params = [torch.randn(shape, generator=generator, dtype=torch.float64).to(dtype) for shape in shapes]
    if zero_first and params:
        params[0].zero_()  # a zero-norm weight: the layer-wise trust ratio must fall back to 1
    return [p.requires_grad_() for p in params]


def clone_params(params: list[torch.Tensor]) -> list[torch.Tensor]:
    return [p.detach().clone().requires_grad_() for p in params]


def grad_stream(shapes, dtype, seed: int, steps: int):
    """Per step, one gradient per shape: random and independent of the weights, so a rounding
    difference cannot feed back through the loss and grow chaotically."""
    generator = torch.Generator().manual_seed(seed + 1)
    for _ in range(steps):
        scale = float(torch.empty(()).uniform_(0.1, 3.0, generator=generator))
        yield [(scale * torch.randn(shape, generator=generator, dtype=torch.float64)).to(dtype) for shape in shapes]


def split_groups(params, combo, spec: Spec):
    """Two groups: the first half with the options, the rest with half the lr (possibly empty)."""
    half = (len(params) + 1) // 2
    group_keys = {k: combo[k] for k in spec.group_only if k in combo}
    return [{"params": params[:half], **group_keys},
            {"params": params[half:], **group_keys, "lr": combo.get("lr", spec.required.get("lr", 1e-3)) / 2}]


def run(make_optimizer, params, grads_per_step, *, none_at=lambda step, index: False):
    """Step ``make_optimizer(params)`` through the gradients; ``none_at(step, i)`` leaves param i without grad."""
    optimizer = make_optimizer(params)
    for step, grads in enumerate(grads_per_step):
        for index, (param, grad) in enumerate(zip(params, grads)):
            param.grad = None if none_at(step, index) else grad.clone()
        optimizer.step()
    return optimizer


def assert_same_state(actual_opt, expected_opt, actual_params, expected_params, *, exact: bool = False) -> None:
    """Params and every per-parameter state tensor match; state key sets equal."""
    for index, (a, e) in enumerate(zip(actual_params, expected_params)):
        if exact:
            assert torch.equal(a, e), f"param {index} differs"
        else:
            assert_close(a.detach(), e.detach(), what=f"param {index}")
    actual_state, expected_state = actual_opt.state_dict()["state"], expected_opt.state_dict()["state"]
    assert set(actual_state) == set(expected_state), "parameters with state differ"
    for index in expected_state:
        a, e = actual_state[index], expected_state[index]
        assert set(a) == set(e), f"state keys of param {index}: {sorted(a)} != {sorted(e)}"
        for key in e:
            what = f"state[{index}][{key!r}]"
            if key == "step":
                assert float(a[key]) == float(e[key]), f"{what}: {a[key]} != {e[key]}"
                assert a[key].dtype == e[key].dtype, f"{what}: dtype {a[key].dtype} != {e[key].dtype}"
            elif exact:
                assert torch.equal(a[key], e[key]), f"{what} differs"
            else:
                assert_close(a[key], e[key], what=what)


@contextlib.contextmanager
def one_process_mesh():
    """A 1-process gloo group and CPU device mesh, for tests that need DTensors in this process."""
    import os
    import socket

    import pytest
    from torch.distributed.device_mesh import init_device_mesh

    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available in this build")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=0, world_size=1)
    try:
        yield init_device_mesh("cpu", (1,))
    finally:
        torch.distributed.destroy_process_group()


def run_seeded(cls, shapes, dtype, options, seed, steps=25, **extra):
    """``cls(params, **options, **extra)`` stepped ``steps`` times on seeded params and dense gradients of
    ``shapes`` (drawn in float64, then cast to ``dtype``: every dtype sees the same numbers); returns
    (params, optimizer)."""
    generator = torch.Generator().manual_seed(seed)
    params = [torch.nn.Parameter(torch.randn(s, generator=generator, dtype=torch.float64).to(dtype)) for s in shapes]
    optimizer = cls(params, **options, **extra)
    grads = torch.Generator().manual_seed(seed + 1)
    for _ in range(steps):
        for param in params:
            param.grad = torch.randn(param.shape, generator=grads, dtype=torch.float64).to(dtype)
        optimizer.step()
    return params, optimizer


def dcp_round_trip(model_and_optimizer, inputs: torch.Tensor, path, steps: int = 3):
    """Train ``model_and_optimizer()``'s pair ``steps`` steps on ``inputs``, save the optimizer through
    torch.distributed.checkpoint (one process) into ``path``, load it into a fresh pair holding the same weights, and
    check every state entry came back with its dtype and bits; then one more step each, which must agree. Returns
    the first pair."""
    import pytest

    dcp = pytest.importorskip("torch.distributed.checkpoint")
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

    def train(model, optimizer, count):
        for _ in range(count):
            optimizer.zero_grad()
            model(inputs).square().mean().backward()
            optimizer.step()

    model, optimizer = model_and_optimizer()
    train(model, optimizer, steps)
    dcp.save({"optim": get_optimizer_state_dict(model, optimizer)}, checkpoint_id=str(path))
    resumed_model, resumed = model_and_optimizer()
    resumed_model.load_state_dict(model.state_dict())
    state = {"optim": get_optimizer_state_dict(resumed_model, resumed)}
    dcp.load(state, checkpoint_id=str(path))
    set_optimizer_state_dict(resumed_model, resumed, state["optim"])
    for p, q in zip(model.parameters(), resumed_model.parameters()):
        assert optimizer.state[p].keys() == resumed.state[q].keys()
        for key, value in optimizer.state[p].items():
            assert resumed.state[q][key].dtype == value.dtype and torch.equal(resumed.state[q][key], value), key
    train(model, optimizer, 1)
    train(resumed_model, resumed, 1)
    for p, q in zip(model.parameters(), resumed_model.parameters()):
        assert torch.equal(p, q)
    return model, optimizer


def run_on_processes(worker, out_dir, timeout: float = 240, world_size: int = 2) -> list[dict]:
    """Run ``worker`` (a tests/*_dist_worker.py script) as the ranks of a ``world_size``-process gloo group on this
    machine; returns each rank's JSON results (it skips when this torch build has no gloo)."""
    import json
    import os
    import socket
    import subprocess
    import sys

    import pytest

    if not (torch.distributed.is_available() and torch.distributed.is_gloo_available()):
        pytest.skip("torch.distributed with the gloo backend is not available in this build")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {**os.environ, "WORLD_SIZE": str(world_size), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(worker.parent), os.environ.get("PYTHONPATH")]))}
    procs = [subprocess.Popen([sys.executable, str(worker), str(out_dir)], env={**env, "RANK": str(rank)},
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for rank in range(world_size)]
    try:
        logs = [proc.communicate(timeout=timeout)[0] for proc in procs]
    finally:
        for proc in procs:  # only the processes started here
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert all(proc.returncode == 0 for proc in procs), "\n".join(log[-3000:] for log in logs)
    return [json.loads((out_dir / f"rank{rank}.json").read_text()) for rank in range(world_size)]

