r"""Schedule-Free AdamW and SGD (Defazio et al., 2024, "The Road Less Scheduled", NeurIPS 2024,
arXiv:2405.15682), as the authors' ``schedulefree`` package 1.4.1 implements them (``AdamWScheduleFree``,
``SGDScheduleFree``).

No learning-rate schedule and no stopping time to choose: the method keeps two sequences, the base
iterates :math:`z` (plain SGD or Adam steps) and their running average :math:`x`, and takes each
gradient at the interpolation :math:`y` between them. The average plays the role of the schedule's
annealing; the interpolation with :math:`\beta` plays the role of momentum. At step :math:`t` (1-based):

.. math::

    y_t &= (1-\beta)\, z_t + \beta\, x_t                                   && \text{(the gradient is taken here)} \\
    d_t &= g_t + \lambda y_t                                                && \text{(SGD)} \\
    v_t &= \beta_2 v_{t-1} + (1-\beta_2)\, g_t^2, \quad
        d_t = \frac{g_t}{\sqrt{v_t/(1-\beta_2^t)} + \epsilon} + \lambda y_t  && \text{(AdamW)} \\
    z_{t+1} &= z_t - \gamma_t d_t \\
    x_{t+1} &= (1 - c_{t+1})\, x_t + c_{t+1}\, z_{t+1}, \qquad
        c_{t+1} = \frac{w_t}{\sum_{i \le t} w_i}, \quad w_t = t^r \,(\max_{i \le t} \gamma_i)^{p}

with :math:`\gamma_t = \gamma \min(1, t/\text{warmup\_steps})` (a linear warm-up), :math:`r` the power of
the polynomial weighting (``r``) and :math:`p` the power of the learning rate in the weights
(``weight_lr_power``: iterates taken during warm-up, at a small learning rate, count less). :math:`\beta`
is ``betas[0]`` (AdamW) or ``momentum`` (SGD); :math:`x_1 = z_1 = y_1` is the initial parameter.

As in the package's production classes, the *parameter holds* :math:`y` while training (the model computes
its gradients there) and the state holds :math:`z`; :math:`x` is never stored. One step rewrites
:math:`y` directly (substitute :math:`x_t = (y_t - (1-\beta) z_t)/\beta` above):

.. math::

    y_{t+1} = y_t + c_{t+1}(z_t - y_t) + \gamma_t\,(\beta(1 - c_{t+1}) - 1)\, d_t, \qquad z_{t+1} = z_t - \gamma_t d_t

and :meth:`~ScheduleFreeAdamW.eval` / :meth:`~ScheduleFreeAdamW.train` move the parameter to
:math:`x = y + (1 - 1/\beta)(z - y)` and back to :math:`y = x + (1 - \beta)(z - x)`.

**Train and eval.** Call ``optimizer.train()`` with ``model.train()`` and ``optimizer.eval()`` with
``model.eval()``: evaluate, save and ship :math:`x` (the average), train at :math:`y`. Both calls are
idempotent; ``step()`` in eval mode raises. A new optimizer is in train mode (:math:`x = y = z` before the
first step, so the two modes are the same point; the package starts in eval mode and refuses the first step
until ``train()`` is called — the only difference, and it changes no number). The mode is the param groups'
``train_mode`` key, so it travels in ``state_dict()``.

**Checkpoints.** Save in eval mode: the model's weights are then :math:`x`, the ones to evaluate or deploy,
and the optimizer's checkpoint records ``train_mode=False``; to resume, load both and call
``optimizer.train()``. (Saved in train mode, the model holds :math:`y`: also consistent, and resumes
bitwise.) **BatchNorm** running statistics are averages of activations at :math:`y`; after
``optimizer.eval()`` recompute them at :math:`x` before evaluating: ``torch.optim.swa_utils.update_bn(batches,
model)`` over some training batches (it resets them and takes an exact average), or, as the package's docs
show, ``model.train()`` and ~50 forward passes under ``torch.no_grad()``, then ``model.eval()``.

**Group state.** The schedule lives in each param group (the package's keys, so checkpoints cross-load):
``k`` (steps taken), ``lr_max`` (:math:`\max_i \gamma_i`, -1 before the first step), ``weight_sum``
(:math:`\sum_i w_i`), ``train_mode`` and ``scheduled_lr`` (:math:`\gamma_t` of the last step, for logging).
They are advanced once per ``step()`` for every group, after the update succeeded (a step that raises or that
``skip_nonfinite`` skips leaves them), and every process of a sharded run computes the same values. A torch
``lr_scheduler`` changes ``lr`` as for any optimizer, and the warm-up and the weights follow it as in the
package. Per parameter (no ``step``: the count is the group's ``k``, as in the package, so a parameter that
had no gradient on some steps is bias-corrected by the group's count): ``z`` and, for AdamW, ``exp_avg_sq``
(:math:`v`).
"""

from __future__ import annotations

import math
from numbers import Integral
from typing import Any, Callable, Iterable

import torch

from .. import _checks, distributed
from .._base import Optimizer
from ..engine import Flag, lerp, rule, sqrt


@rule
def schedule_free_adamw(param, grad, z, exp_avg_sq, *, lr, beta1, beta2, eps, weight_decay, ckp1, t,
                        maximize: Flag):
    """One Schedule-Free AdamW step of one tensor (``param`` is y), in the package's order of operations:
    ``lr`` is this step's warmed-up rate, ``ckp1`` the averaging weight c, ``t`` the group's step count."""
    if maximize:
        grad = -grad
    exp_avg_sq = beta2 * exp_avg_sq + (1 - beta2) * grad * grad
    denom = sqrt(exp_avg_sq / (1 - beta2**t)) + eps
    grad = grad / denom
    if weight_decay != 0:
        grad = grad + weight_decay * param  # decay taken at y
    param = lerp(param, z, ckp1)
    param = param + lr * (beta1 * (1 - ckp1) - 1) * grad
    z = z - lr * grad
    return param, z, exp_avg_sq


@rule
def schedule_free_sgd(param, grad, z, *, lr, momentum, weight_decay, ckp1, maximize: Flag):
    """One Schedule-Free SGD step of one tensor (``param`` is y), in the package's order of operations."""
    if maximize:
        grad = -grad
    if weight_decay != 0:
        grad = grad + weight_decay * param  # decay taken at y
    param = lerp(param, z, ckp1)
    param = param + lr * (momentum * (1 - ckp1) - 1) * grad
    z = z - lr * grad
    return param, z


def schedule(group: dict[str, Any]) -> tuple[float, float, dict[str, Any]]:
    """This step's learning rate and averaging weight ``ckp1`` for a param group, and the group's schedule keys
    after the step — computed, not written (the package's arithmetic, in Python floats)."""
    k, warmup_steps = group["k"], group["warmup_steps"]
    lr = _checks.as_number("lr", group["lr"]) * ((k + 1) / warmup_steps if k < warmup_steps else 1.0)
    lr_max = max(lr, float(group["lr_max"]))
    weight = (k + 1) ** float(group["r"]) * lr_max ** float(group["weight_lr_power"])
    weight_sum = float(group["weight_sum"]) + weight
    # 0/0 when every weight so far is 0 (lr = 0 with weight_lr_power > 0): the package catches the
    # ZeroDivisionError and leaves the average where it is
    ckp1 = weight / weight_sum if weight_sum != 0 else 0.0
    return lr, ckp1, dict(k=k + 1, lr_max=lr_max, weight_sum=weight_sum, scheduled_lr=lr)


class _ScheduleFree(Optimizer):
    """What both Schedule-Free optimizers share: the group schedule, the train/eval switch, its checks."""

    counts_steps = False  # the count is the group's `k` (see the module docstring)
    # a checkpoint may lack `scheduled_lr` (logging only) and, as for every thalweg optimizer, `maximize` (the
    # package's checkpoints have none); the schedule's own keys it must have
    optional_group_keys = Optimizer.optional_group_keys | {"scheduled_lr"}

    def _interpolation(self, group: dict[str, Any]) -> float:
        """:math:`\\beta`: betas[0] (AdamW) or momentum (SGD)."""
        raise NotImplementedError

    def _check_schedule(self, group: dict[str, Any]) -> None:
        _checks.non_negative("lr", group["lr"])
        _checks.non_negative("weight_decay", group["weight_decay"])
        warmup_steps = group["warmup_steps"]
        if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, Integral) or warmup_steps < 0:
            raise ValueError(f"warmup_steps must be an integer >= 0, got {warmup_steps!r}")
        _checks.non_negative("r", group["r"])
        _checks.non_negative("weight_lr_power", group["weight_lr_power"])
        _checks.flag("maximize", group["maximize"])
        # the schedule's own keys: only a damaged checkpoint or a hand-edited group gets these wrong
        k = group["k"]
        if isinstance(k, bool) or not isinstance(k, Integral) or k < 0:
            raise ValueError(f"k (the param group's step count) must be an integer >= 0, got {k!r}")
        _checks.flag("train_mode", group["train_mode"])
        _checks.non_negative("weight_sum", group["weight_sum"])
        lr_max = _checks.as_number("lr_max", group["lr_max"])
        if not (lr_max == -1.0 or 0 <= lr_max < math.inf):
            raise ValueError(f"lr_max must be -1 (no step yet) or a finite number >= 0, got {lr_max}")

    # -- the step: refused in eval mode; the group schedule advanced once it has succeeded ------------------

    def _step_without_grad(self, closure: Callable[[], Any] | None = None) -> Any:
        for index, group in enumerate(self.param_groups):
            if not group["train_mode"]:
                raise RuntimeError(f"{type(self).__name__}.step() was called in eval mode (param group {index}): the "
                                   "parameters hold the averaged weights x. Call optimizer.train() before training "
                                   "steps (and optimizer.eval() before evaluating or saving)")
        skipped = self.skipped_steps
        loss = super()._step_without_grad(closure)
        if self.skipped_steps == skipped:  # a step skip_nonfinite skipped leaves the schedule too
            for group in self.param_groups:  # every group, stepped or not (as the package)
                group.update(schedule(group)[2])
        return loss

    def _initial_state(self, param, role, group):
        # z starts as a copy of the parameter (the package's torch.clone(p)), in the state's dtype; created with the
        # rest of the state, inside the base's checks, so a refused step takes it back with the rest
        if role == "z":
            return self._new_state(param).copy_(param)
        return super()._initial_state(param, role, group)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        # a group added later joins in the optimizer's current mode (its parameters have no z yet: either is right)
        if self.param_groups and isinstance(param_group, dict) and "train_mode" not in param_group:
            param_group = {**param_group, "train_mode": self.param_groups[0]["train_mode"]}
        super().add_param_group(param_group)

    # -- train / eval ------------------------------------------------------------------------------------

    @torch.no_grad()
    def train(self) -> None:
        """Move every parameter to y, where training takes its gradients (:math:`y = x + (1-\\beta)(z - x)`); a
        no-op in train mode. Call it with ``model.train()``."""
        self._switch(to_train=True)

    @torch.no_grad()
    def eval(self) -> None:
        """Move every parameter to x, the average to evaluate, save and deploy
        (:math:`x = y + (1 - 1/\\beta)(z - y)`); a no-op in eval mode. Call it with ``model.eval()``."""
        self._switch(to_train=False)

    def _switch(self, *, to_train: bool) -> None:
        # everything checked before any parameter moves: a refused switch changes nothing
        moves = []
        for index, group in enumerate(self.param_groups):
            self._check_hyperparameters(group)
            if group["train_mode"] == to_train:
                continue
            beta = _checks.as_number("beta", self._interpolation(group))
            weight = 1 - beta if to_train else 1 - 1 / beta
            for position, param in enumerate(group["params"]):
                state = self.state.get(param)
                z = state.get("z") if state else None
                if z is None:  # no step yet: x = y = z
                    continue
                if not isinstance(z, torch.Tensor) or z.shape != param.shape or not z.is_floating_point():
                    raise RuntimeError(f"param group {index}, params[{position}]: state['z'] is "
                                       f"{_describe(z)}, not a floating tensor of the parameter's shape "
                                       f"{tuple(param.shape)}")
                moves.append((distributed.local(param), distributed.local(z).to(param.device), weight))
        for y, z, weight in moves:
            if z.dtype == y.dtype:
                y.lerp_(z, weight)
            else:  # state_dtype=float32 for a bfloat16 parameter: in float32, rounded once
                y.copy_(y.to(z.dtype).lerp_(z, weight))
        for group in self.param_groups:
            group["train_mode"] = to_train


def _describe(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"a {tuple(value.shape)} {str(value.dtype).removeprefix('torch.')} tensor"
    return f"{type(value).__name__}"


class ScheduleFreeAdamW(_ScheduleFree):
    """Schedule-Free AdamW (Defazio et al., 2024): AdamW without a learning-rate schedule, as the ``schedulefree``
    package's ``AdamWScheduleFree``. Call ``optimizer.train()``/``optimizer.eval()`` with the model's.

    Args:
        params: parameters, ``named_parameters()`` or param-group dicts.
        lr: learning rate :math:`\\gamma` (default 0.0025; typically 1x-10x AdamW's, as the warm-up and
            the averaging absorb what a schedule's decay would do).
        betas: :math:`(\\beta, \\beta_2)`: the interpolation between z and x (0 < β < 1, the role of Adam's
            β1) and the second moment's decay (default (0.9, 0.999)).
        eps: added to the denominator (default 1e-8).
        weight_decay: :math:`\\lambda`, decoupled, taken at y (default 0).
        warmup_steps: linear warm-up of the learning rate over this many steps (default 0).
        r: power of the polynomial weighting of the average (default 0).
        weight_lr_power: power of the largest learning rate so far in the weights of the average (default 2).
        maximize: ascend the objective instead of descending it (default False).
        backend, foreach, fused, max_grad_norm, skip_nonfinite, state_dtype, differentiable: as for every thalweg
            optimizer (see :class:`thalweg.Adam`).

    Example::

        optimizer = thalweg.ScheduleFreeAdamW(model.parameters(), lr=2.5e-3, warmup_steps=100)
        model.train(); optimizer.train()
        for x, y in batches:
            loss_fn(model(x), y).backward()
            optimizer.step()
            optimizer.zero_grad()
        model.eval(); optimizer.eval()  # evaluate, and save, in eval mode
    """

    name = "schedulefree_adamw"  # thalweg.create's name
    family = "schedule-free"  # the arena's family (report panels, toggles)
    rule = schedule_free_adamw
    state_codecs = {"z": "float", "exp_avg_sq": "unsigned"}  # z is an iterate

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 0.0025,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        warmup_steps: int = 0,
        r: float = 0.0,
        weight_lr_power: float = 2.0,
        *,
        maximize: bool = False,
        backend: str = "auto",
        foreach: bool | None = None,
        fused: bool | None = None,
        max_grad_norm: float | None = None,
        skip_nonfinite: bool = False,
        state_dtype: torch.dtype | None = None,
        param_update: str = "nearest",
        differentiable: bool = False,
    ) -> None:
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, warmup_steps=warmup_steps, r=r,
                        weight_lr_power=weight_lr_power, maximize=maximize, k=0, train_mode=True, weight_sum=0.0,
                        lr_max=-1.0, scheduled_lr=0.0)
        super().__init__(params, defaults, backend=backend, foreach=foreach, fused=fused,
                         max_grad_norm=max_grad_norm, skip_nonfinite=skip_nonfinite, state_dtype=state_dtype, param_update=param_update,
                         differentiable=differentiable)

    def _check_hyperparameters(self, group: dict[str, Any]) -> None:
        _checks.betas(group["betas"])
        if _checks.as_number("betas[0]", group["betas"][0]) == 0:  # y = z: x could not be recovered from y and z
            raise ValueError(f"betas[0] must be in (0, 1), got {group['betas'][0]}")
        _checks.non_negative("eps", group["eps"])
        self._check_schedule(group)

    def _interpolation(self, group: dict[str, Any]) -> float:
        return group["betas"][0]

    def _scalars(self, group: dict[str, Any]) -> dict[str, Any]:
        lr, ckp1, after = schedule(group)
        beta1, beta2 = group["betas"]
        return dict(lr=lr, beta1=_checks.as_number("betas[0]", beta1), beta2=_checks.as_number("betas[1]", beta2),
                    eps=float(group["eps"]), weight_decay=float(group["weight_decay"]), ckp1=ckp1, t=after["k"],
                    maximize=group["maximize"])


class ScheduleFreeSGD(_ScheduleFree):
    """Schedule-Free SGD (Defazio et al., 2024): SGD with momentum without a learning-rate schedule, as the
    ``schedulefree`` package's ``SGDScheduleFree``. Call ``optimizer.train()``/``optimizer.eval()`` with the
    model's.

    Args:
        params: parameters, ``named_parameters()`` or param-group dicts.
        lr: learning rate :math:`\\gamma` (default 1.0, the package's; typically 10x-50x what SGD with momentum
            would use with a schedule).
        momentum: :math:`\\beta`, the interpolation between z and x, in (0, 1) (default 0.9).
        weight_decay: :math:`\\lambda`, an L2 term added to the gradient at y (default 0).
        warmup_steps: linear warm-up of the learning rate over this many steps (default 0).
        r: power of the polynomial weighting of the average (default 0).
        weight_lr_power: power of the largest learning rate so far in the weights of the average (default 2).
        maximize: ascend the objective instead of descending it (default False).
        backend, foreach, fused, max_grad_norm, skip_nonfinite, state_dtype, differentiable: as for every thalweg
            optimizer (see :class:`thalweg.Adam`).
    """

    name = "schedulefree_sgd"  # thalweg.create's name
    family = "schedule-free"  # the arena's family (report panels, toggles)
    rule = schedule_free_sgd

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1.0,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        warmup_steps: int = 0,
        r: float = 0.0,
        weight_lr_power: float = 2.0,
        *,
        maximize: bool = False,
        backend: str = "auto",
        foreach: bool | None = None,
        fused: bool | None = None,
        max_grad_norm: float | None = None,
        skip_nonfinite: bool = False,
        state_dtype: torch.dtype | None = None,
        param_update: str = "nearest",
        differentiable: bool = False,
    ) -> None:
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay, warmup_steps=warmup_steps, r=r,
                        weight_lr_power=weight_lr_power, maximize=maximize, k=0, train_mode=True, weight_sum=0.0,
                        lr_max=-1.0, scheduled_lr=0.0)
        super().__init__(params, defaults, backend=backend, foreach=foreach, fused=fused,
                         max_grad_norm=max_grad_norm, skip_nonfinite=skip_nonfinite, state_dtype=state_dtype, param_update=param_update,
                         differentiable=differentiable)

    def _check_hyperparameters(self, group: dict[str, Any]) -> None:
        momentum = _checks.as_number("momentum", group["momentum"])
        if not 0 < momentum < 1:  # the package's bound: momentum 0 would make x unrecoverable from y and z
            raise ValueError(f"momentum must be in (0, 1), got {momentum}")
        self._check_schedule(group)

    def _interpolation(self, group: dict[str, Any]) -> float:
        return group["momentum"]

    def _scalars(self, group: dict[str, Any]) -> dict[str, Any]:
        lr, ckp1, _ = schedule(group)
        return dict(lr=lr, momentum=_checks.as_number("momentum", group["momentum"]),
                    weight_decay=float(group["weight_decay"]), ckp1=ckp1, maximize=group["maximize"])
