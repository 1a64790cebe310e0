r"""Prodigy: Adam whose step size estimates itself (Mishchenko & Defazio, 2023, "Prodigy: An Expeditiously
Adaptive Parameter-Free Learner", arXiv:2306.06101), as the authors' ``prodigyopt`` package 1.1.2 implements it.

Adam's learning rate is replaced by :math:`d_k\,\gamma`: :math:`\gamma` (``lr``, default 1.0) is a multiplier
and :math:`d_k` an estimate of the distance from the initial point :math:`x_0` to a solution, grown from
:math:`d_0` (``d0``, 1e-6) as the iterates move. At step :math:`k` (0-based), with gradient :math:`g_k`
(plus :math:`\lambda x_k` when the decay is coupled), :math:`\eta_k = d_k \gamma\, b_k` (``dlr``;
:math:`b_k = \sqrt{1-\beta_2^{k+1}}/(1-\beta_1^{k+1})` with ``use_bias_correction``, else 1) and
:math:`\beta_3` (default :math:`\sqrt{\beta_2}`):

.. math::

    r_{k+1} &= \beta_3 r_k + \tfrac{d_k}{d_0}\,\eta_k\,\langle g_k, x_0 - x_k\rangle
        && \text{(group key ``d_numerator``, summed over all parameters)} \\
    s_{k+1} &= \beta_3 s_k + \tfrac{d_k}{d_0}\,\eta_k\, g_k
        && \text{(state ``s``; } \tfrac{d_k}{d_0} d_k \text{ with ``safeguard_warmup``)} \\
    \hat d_{k+1} &= c\, r_{k+1} / \lVert s_{k+1} \rVert_1, \qquad
        d_{k+1} = \min\!\big(\max(d_k, \hat d_{k+1}),\ d_k\,\rho\big)
        && (c\text{: ``d_coef''},\ \rho\text{: ``growth_rate''}) \\
    m_{k+1} &= \beta_1 m_k + d_k (1-\beta_1)\, g_k, \qquad v_{k+1} = \beta_2 v_k + d_k^2 (1-\beta_2)\, g_k^2 \\
    x_{k+1} &= x_k - \eta_k \lambda x_k \;(\text{``decouple``}) - \eta_k\, m_{k+1} / (\sqrt{v_{k+1}} + d_{k+1}\epsilon)

(the max with :math:`\hat d` is taken only while :math:`d_k = d_0`; afterwards :math:`d` follows the running
maximum :math:`\max_i \hat d_i`, capped by the growth rate). :math:`r`, :math:`s` and :math:`x_0` (state
``p0``) are what make the estimate: :math:`\langle g, x_0 - x\rangle` grows while the iterates keep moving in
a consistent direction, so :math:`d` grows until the step is as large as the distance travelled warrants.

**When to reach for it.** When you do not want to tune a learning rate: Prodigy at ``lr=1.0`` typically
lands within a small factor of a tuned Adam(W) on the same schedule (the paper: CIFAR, ImageNet, LLM and
diffusion fine-tuning). Keep the schedule you would use for Adam (cosine decay works: ``lr`` is a multiplier
of :math:`d`). Set ``safeguard_warmup=True`` with a warm-up schedule, and ``use_bias_correction=True`` if the
first steps are too large; ``d_coef`` (0.5 ... 2) is the preferred knob to tune. It costs one more state
tensor than Adam (``s`` and ``p0``: two) and one host sync per step.

**Its lr and AdamW's.** The step is :math:`\eta_k = d_k\gamma` where AdamW's is :math:`\gamma` alone, but the
moments carry :math:`d` too: for a constant :math:`d`, Prodigy is AdamW with learning rate :math:`d\gamma`
and :math:`\epsilon` scaled by :math:`d`. :math:`d` is that learning rate, estimated; ``group["d"]`` shows it
(the effective AdamW learning rate is ``lr * d``). Weight decay with ``decouple=True`` (the default) is AdamW's,
scaled by :math:`\eta_k`: the same ``weight_decay`` values as AdamW apply.

**Several groups.** :math:`d` is one estimate for all groups, kept (as in the package) in every param group:
``d``, ``d0``, ``d_max``, ``d_numerator``, ``d_denom``, ``d_hat`` and the step count ``k`` (the package's keys,
so a package checkpoint loads; ``d_denom``/``d_hat`` appear after the first step). The step-wide options
(``betas``, ``beta3``, ``decouple``, ``use_bias_correction``, ``growth_rate``, ``d_coef``, ``d0``) must be the
same in every group (the package silently reads group 0's; here a difference raises); ``weight_decay``,
``eps`` and ``safeguard_warmup`` may differ. Every group's ``lr`` must be the largest one or 0; as in the
package, a group at lr 0 stops feeding the estimate and keeps its moments, but still steps by them
(and decays) with the step size of the others.

**Per parameter** (the package's keys): ``step``, ``s``, ``p0`` (:math:`x_0`), ``exp_avg`` (:math:`m`; absent
when :math:`\beta_1 = 0`, the step then uses :math:`d_{k+1}\,g_k`), ``exp_avg_sq`` (:math:`v`). The package
keeps ``s`` and ``p0`` flattened (``p0`` a 0-d zero for an all-zero parameter): its checkpoints are reshaped on
load. A step in which no group feeds the estimate (every ``lr`` 0, or all gradients 0 so far) ends after the
moments, as the package's does: no parameter moves and ``d`` and ``k`` stay.

Left out of the package's options: ``fsdp_in_use`` (sharded DTensor parameters are detected, and their sums
taken across processes, always; the package's flag only covers FSDP1 flat parameters, which thalweg does not
support) and ``slice_p`` (an approximation that estimates ``d`` from every p-th entry to save memory; p = 1,
the default, is the method; a checkpoint with ``slice_p`` > 1 is refused). ``p.grad`` is not modified (the
package adds the coupled decay into it in place). ``differentiable`` is not offered: ``d`` is computed on the
host, so autograd could not follow it.
"""

from __future__ import annotations

import math
from typing import Any, Iterable

import torch

from .. import _checks
from .._base import Optimizer
from ..engine import Flag, rule, sqrt
from . import _d_adaptation as shared

# options the package reads from param group 0 for the whole step
_STEP_WIDE = ("betas", "beta3", "decouple", "use_bias_correction", "growth_rate", "d_coef", "d0")


@rule
def prodigy(param, grad, exp_avg, exp_avg_sq, *, lr, beta1, beta2, eps, weight_decay, d, dlr, d_next,
            decouple: Flag, maximize: Flag):
    """One Prodigy step of one tensor, in the package's order of operations: ``d`` the estimate before the
    step, ``dlr`` = d·lr·bias correction, ``d_next`` the estimate after it (Prodigy._stage_step)."""
    if maximize:
        grad = -grad
    if weight_decay != 0:
        if not decouple:
            grad = grad + weight_decay * param
    if lr != 0:  # a group at lr 0 keeps its moments (and still steps by them, as the package)
        if beta1 != 0:
            exp_avg = exp_avg * beta1 + d * (1 - beta1) * grad
        exp_avg_sq = exp_avg_sq * beta2 + d * d * (1 - beta2) * grad * grad
    denom = sqrt(exp_avg_sq) + d_next * eps
    if weight_decay != 0:
        if decouple:
            param = param - weight_decay * dlr * param
    if beta1 != 0:
        param = param - dlr * exp_avg / denom
    else:
        param = param - dlr * d_next * grad / denom
    return param, exp_avg, exp_avg_sq


class Prodigy(Optimizer):
    """Prodigy (Mishchenko & Defazio 2023): Adam with a self-estimated step size, as ``prodigyopt.Prodigy`` 1.1.2.

    Args:
        params: parameters, ``named_parameters()`` or param-group dicts.
        lr: multiplier of the estimated step size d (default 1.0; leave it unless training is unstable).
        betas: :math:`(\\beta_1, \\beta_2)` of the moments (default (0.9, 0.999)).
        beta3: decay of the estimate's accumulators (default None: :math:`\\sqrt{\\beta_2}`).
        eps: added to the denominator, scaled by d (default 1e-8).
        weight_decay: :math:`\\lambda` (default 0).
        decouple: decay the weights directly, AdamW-style (default True), else add the L2 term to the gradient.
        use_bias_correction: Adam's bias correction in the step size (default False).
        safeguard_warmup: leave lr out of the estimate's denominator (default False; use it with a warm-up).
        d0: the initial estimate (default 1e-6).
        d_coef: multiplies the estimate (default 1.0; the preferred knob).
        growth_rate: d grows by at most this factor per step (default inf).
        maximize: ascend the objective instead of descending it (default False).
        backend, foreach, fused, max_grad_norm, skip_nonfinite, state_dtype, param_update: as for every thalweg optimizer
            (see :class:`thalweg.Adam`).

    Example::

        optimizer = thalweg.Prodigy(model.parameters(), weight_decay=0.01)
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total_steps)
    """

    name = "prodigy"  # thalweg.create's name
    family = "LR-free"  # the arena's family (report panels, toggles)
    rule = prodigy
    stages_step = True
    own_state_keys = frozenset({"s", "p0"})
    unshaped_state_keys = frozenset({"s", "p0"})  # the package's are flattened: checked and reshaped on load

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1.0,
        betas: tuple[float, float] = (0.9, 0.999),
        beta3: float | None = None,
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        decouple: bool = True,
        use_bias_correction: bool = False,
        safeguard_warmup: bool = False,
        d0: float = 1e-6,
        d_coef: float = 1.0,
        growth_rate: float = float("inf"),
        *,
        maximize: bool = False,
        backend: str = "auto",
        foreach: bool | None = None,
        fused: bool | None = None,
        max_grad_norm: float | None = None,
        skip_nonfinite: bool = False,
        state_dtype: torch.dtype | None = None,
        param_update: str = "nearest",
    ) -> None:
        _checks.positive("d0", d0)
        defaults = dict(lr=lr, betas=betas, beta3=beta3, eps=eps, weight_decay=weight_decay, d=d0, d0=d0, d_max=d0,
                        d_numerator=0.0, d_coef=d_coef, k=0, growth_rate=growth_rate,
                        use_bias_correction=use_bias_correction, decouple=decouple, safeguard_warmup=safeguard_warmup,
                        maximize=maximize)
        super().__init__(params, defaults, backend=backend, foreach=foreach, fused=fused,
                         max_grad_norm=max_grad_norm, skip_nonfinite=skip_nonfinite, state_dtype=state_dtype, param_update=param_update,
                         differentiable=None)

    def _check_parameters(self, group: dict[str, Any], params: list[torch.Tensor], g: int) -> None:
        # float16 parameters with float16 state: the second moment holds d²·g², and with d starting at d0 = 1e-6 that
        # is below float16's smallest value (6e-8); it rounds to 0, the step divides by (almost) nothing, and
        # d_numerator turns NaN a step later (the prodigyopt package's run goes NaN alike). float32 state
        # (state_dtype) or bfloat16 parameters hold it.
        if self.state_dtype is None:
            for k, param in enumerate(params):
                if param.dtype == torch.float16:
                    raise ValueError(f"Prodigy on float16 parameters needs state_dtype=torch.float32: params[{k}] of "
                                     f"param group {g} is float16, and its second moment d²·g² (d starts at d0) is "
                                     "below the smallest float16 (6e-8): it would round to 0 and the steps diverge")

    def _check_hyperparameters(self, group: dict[str, Any]) -> None:
        _checks.non_negative("lr", group["lr"])
        _checks.betas(group["betas"])
        if group["beta3"] is not None:
            _checks.in_interval("beta3", group["beta3"], 0.0, 1.0, closed_high=False)
        _checks.positive("eps", group["eps"])
        _checks.non_negative("weight_decay", group["weight_decay"])
        _checks.flag("decouple", group["decouple"])
        _checks.flag("use_bias_correction", group["use_bias_correction"])
        _checks.flag("safeguard_warmup", group["safeguard_warmup"])
        _checks.positive("d0", group["d0"])
        _checks.positive("d_coef", group["d_coef"])
        growth_rate = _checks.as_number("growth_rate", group["growth_rate"])
        if not growth_rate >= 1:  # below 1, d would shrink every step whatever the estimate says
            raise ValueError(f"growth_rate must be >= 1 (inf: unrestricted), got {growth_rate}")
        _checks.flag("maximize", group["maximize"])
        shared.check_group_state(group, positive=("d", "d_max"), numbers=("d_numerator",))

    # -- the step ---------------------------------------------------------------------------------------

    def _update_all(self, loss: Any) -> Any:
        shared.check_step(self, _STEP_WIDE)
        return super()._update_all(loss)

    def _options(self) -> dict[str, Any]:
        """The step-wide values, from param group 0 (the package's)."""
        first = self.param_groups[0]
        beta1, beta2 = (_checks.as_number(f"betas[{i}]", b) for i, b in enumerate(first["betas"]))
        beta3 = math.sqrt(beta2) if first["beta3"] is None else float(first["beta3"])
        k, d, lr = first["k"], float(first["d"]), shared.largest_lr(self)
        bias_correction = ((1 - beta2 ** (k + 1)) ** 0.5) / (1 - beta1 ** (k + 1)) if first["use_bias_correction"] else 1
        return dict(beta1=beta1, beta2=beta2, beta3=beta3, d=d, lr=lr, dlr=d * lr * bias_correction)

    def _scalars(self, group: dict[str, Any]) -> dict[str, Any]:
        options = self._options()
        return dict(lr=_checks.as_number("lr", group["lr"]), beta1=options["beta1"], beta2=options["beta2"],
                    eps=float(group["eps"]), weight_decay=float(group["weight_decay"]), d=options["d"],
                    dlr=options["dlr"], d_next=options["d"],  # d_next: set by _stage_step
                    decouple=self.param_groups[0]["decouple"], maximize=group["maximize"])

    def _states(self, params, group, program, created_log=None, where=None):
        # s starts at 0 and p0 as a copy of the parameter (the package's); created inside the step's checks, so
        # that a refused step takes them back with the rest
        fresh = [not self.state.get(param) for param in params]
        states, created = super()._states(params, group, program, created_log, where)
        for k, (param, state, new) in enumerate(zip(params, states, fresh)):
            for key in ("s", "p0"):
                if key in state:
                    continue
                if not new:
                    raise RuntimeError(f"{where(k) if where else f'params[{k}]'}: its state has {sorted(state)} but "
                                       f"no {key!r}, which every Prodigy state holds")
                state[key] = self._new_state(param) if key == "s" else self._new_state(param).copy_(param.detach())
                if created_log is not None:
                    created_log.append((state, key))
        return states, created

    def _check_state(self, where, params, states) -> None:
        for k, (param, state) in enumerate(zip(params, states)):
            for key in ("s", "p0"):
                value = state.get(key)
                value = shared.local(value) if isinstance(value, torch.Tensor) else value
                if not (isinstance(value, torch.Tensor) and value.is_floating_point() and value.shape == param.shape
                        and value.device == param.device):
                    raise RuntimeError(f"{where(k)}: state[{key!r}] is {_describe(value)} but the parameter is a "
                                       f"{tuple(param.shape)} {param.device} tensor")

    def _stage_step(self, entries):
        """The estimate of d over every parameter (the package's first loop and its update of d), then the
        scalars the rule steps with; None when no group fed the estimate (the package returns there)."""
        options = self._options()
        first = self.param_groups[0]
        beta1, beta2, beta3, d, lr, dlr = (options[key] for key in ("beta1", "beta2", "beta3", "d", "lr", "dlr"))
        decouple = first["decouple"]
        columns, moments = [], []
        for group, params, grads, states, _ in entries:
            inputs = shared.stage_inputs(group, params, grads, decouple=decouple)
            if inputs is None:
                columns.append(None)
                continue
            params, grads = inputs
            ratio = d / float(group["d0"])  # d / d0 rather than d: values that are not too small (the package)
            alpha = ratio * d if group["safeguard_warmup"] else ratio * dlr
            def column(params, grads, p0, s, alpha=alpha):
                dots = shared.dots(grads, torch._foreach_sub(p0, params))
                return torch.stack([dots, shared.accumulate_(s, grads, beta3, alpha)]).to(torch.float64)

            columns.append(shared.by_batches(column, params, grads, [shared.local(state["p0"]) for state in states],
                                             [shared.local(state["s"]) for state in states]))
            moments.extend((group, grad, state) for grad, state in zip(grads, states))
        delta_numerator, d_denom = 0.0, 0.0
        for (group, *_), values in zip(entries, shared.to_host(entries, columns)):
            if values is None:
                continue
            coefficient = (d / float(group["d0"])) * dlr
            for dot, norm in zip(*values):
                delta_numerator += coefficient * dot
                d_denom += norm
        if d_denom == 0:  # nothing fed the estimate: the package returns after the moments
            for group, grad, state in moments:
                if beta1 > 0:
                    shared.local(state["exp_avg"]).mul_(beta1).add_(grad, alpha=d * (1 - beta1))
                shared.local(state["exp_avg_sq"]).mul_(beta2).addcmul_(grad, grad, value=d * d * (1 - beta2))
            return None
        d_max, d_coef, growth_rate = float(first["d_max"]), float(first["d_coef"]), float(first["growth_rate"])
        d_numerator = float(first["d_numerator"]) * beta3 + delta_numerator
        d_hat = d_coef * d_numerator / d_denom
        if d == float(self.param_groups[-1]["d0"]):  # (the package compares with its last group's d0)
            d = max(d, d_hat)
        d_max = max(d_max, d_hat)
        d = min(d_max, d * growth_rate)
        for group in self.param_groups:
            group.update(d_numerator=d_numerator, d_denom=d_denom, d=d, d_max=d_max, d_hat=d_hat, k=group["k"] + 1)
        return [dict(d=options["d"], dlr=dlr, d_next=d) for _ in entries]

    # -- checkpoints ----------------------------------------------------------------------------------

    def _check_checkpoint(self, state_dict: dict[str, Any]) -> None:
        super()._check_checkpoint(state_dict)
        for index, group in enumerate(state_dict["param_groups"]):
            if group.get("slice_p", 1) != 1:
                raise ValueError(f"param group {index} of the checkpoint has slice_p={group['slice_p']}: its s and p0 "
                                 "hold every p-th entry only (the package's approximation), which thalweg does not "
                                 "implement; resume it with prodigyopt")

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """torch.optim's, after checking the checkpoint; a ``prodigyopt`` checkpoint's flattened ``s`` and ``p0``
        (``p0`` a 0-d zero for a parameter that was all zeros) are given their parameter's shape."""
        self._check_checkpoint(state_dict)
        groups = state_dict["param_groups"]
        params = [p for group in self.param_groups for p in group["params"]]
        indices = [i for group in groups for i in group["params"]]
        shapes = dict(zip(indices, (p.shape for p in params)))
        state = {}
        for index, entry in state_dict["state"].items():
            entry = dict(entry)
            shape = shapes.get(index)
            for key in ("s", "p0"):
                value = entry.get(key)
                if shape is None or not isinstance(value, torch.Tensor) or value.shape == shape:
                    continue
                if key == "p0" and value.dim() == 0 and value.numel() == 1:
                    entry[key] = value.expand(shape).clone()
                elif value.dim() == 1 and value.numel() == math.prod(shape):
                    entry[key] = value.reshape(shape)
                else:
                    raise ValueError(f"state of param {index} in the checkpoint: {key!r} has shape {tuple(value.shape)} "
                                     f"but the parameter has {tuple(shape)}")
            state[index] = entry
        super().load_state_dict({**state_dict, "state": state})


def _describe(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"a {tuple(value.shape)} {str(value.dtype).removeprefix('torch.')} {value.device} tensor"
    return repr(value)
