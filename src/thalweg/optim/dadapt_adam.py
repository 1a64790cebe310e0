r"""D-Adapt Adam: Adam whose step size estimates itself (Defazio & Mishchenko, 2023, "Learning-Rate-Free Learning
by D-Adaptation", ICML 2023, arXiv:2301.07733), as the authors' ``dadaptation`` package 3.2 implements it
(``DAdaptAdam``).

Adam's learning rate becomes :math:`\eta_k = d_k\,\gamma\,b_k` (``dlr``): :math:`\gamma` (``lr``, default 1.0)
is a multiplier, :math:`b_k = \sqrt{1-\beta_2^{k+1}}/(1-\beta_1^{k+1})` with ``use_bias_correction`` (else 1),
and :math:`d_k` a lower bound on the distance to a solution, grown from :math:`d_0` (1e-6). At step :math:`k`
(0-based), with gradient :math:`g_k` (plus :math:`\lambda x_k` when the decay is coupled), layer scale
:math:`\rho` (the group key ``layer_scale``, default 1) and :math:`\sqrt{\beta_2}` as the estimate's decay:

.. math::

    a_k &= \textstyle\sum \rho\,\eta_k\,\langle g_k,\ s_k / (\sqrt{v_k} + \epsilon)\rangle
        && \text{(over all parameters, with the moments before the step)} \\
    r_{k+1} &= \sqrt{\beta_2}\, r_k + (1-\sqrt{\beta_2})\, a_k   && \text{(group key ``numerator_weighted``)} \\
    s_{k+1} &= \sqrt{\beta_2}\, s_k + \eta_k (1-\sqrt{\beta_2})\, g_k   && \text{(state ``s``)} \\
    m_{k+1} &= \beta_1 m_k + \rho\,\eta_k (1-\beta_1)\, g_k, \qquad v_{k+1} = \beta_2 v_k + (1-\beta_2)\, g_k^2 \\
    \hat d &= \frac{r_{k+1}}{(1-\sqrt{\beta_2}) \sum \rho \lVert s_{k+1}\rVert_1}, \qquad
        d_{k+1} = \max\!\big(d_k,\ \min(\hat d,\ d_k\,\text{growth\_rate})\big) \\
    x_{k+1} &= x_k - \eta_k \lambda x_k \;(\text{``decouple``}) - m_{k+1} / (\sqrt{v_{k+1}} + \epsilon)

The momentum :math:`m` carries the step size :math:`\eta` (it is the step itself), so the new :math:`d` first
acts on the next step. :math:`d` never decreases.

**When to reach for it.** As Prodigy (:mod:`thalweg.optim.prodigy`, its successor from the same authors):
to train without tuning a learning rate. D-Adaptation's estimate grows more cautiously than Prodigy's (the
paper's lower bound), so it can take longer to reach a good step size; Prodigy is the usual first choice,
D-Adapt Adam the one the D-Adaptation paper's results were obtained with.

**Its lr and AdamW's.** :math:`\eta_k = d_k\gamma` plays AdamW's learning rate (``lr * group["d"]`` is the
effective one; with ``decouple=True`` the same ``weight_decay`` as AdamW's applies). Note the package's default
``decouple=False``: the decay is an L2 term in the gradient, as torch's ``Adam``.

**Several groups.** :math:`d` is one estimate for all groups, kept (as in the package) in every param group:
``d``, ``numerator_weighted`` and the step count ``k`` (the package's keys, so a package checkpoint loads).
``layer_scale`` (a group key, default 1, as in the package) scales a group's step relative to the others'.
The step-wide options (``betas``, ``decouple``, ``use_bias_correction``, ``growth_rate``) must be the same in
every group (the package silently reads group 0's; here a difference raises). Every group's ``lr`` must be the
largest one or 0; a group at lr 0 stops feeding the estimate and keeps its moments, but still steps by them
(as in the package). A step in which nothing fed the estimate (every ``lr`` 0, or all gradients 0 so far)
ends after the moments, as the package's does: no parameter moves and ``d``, ``k`` and ``numerator_weighted``
stay.

**Per parameter** (the package's keys): ``step``, ``s``, ``exp_avg`` (:math:`m`), ``exp_avg_sq`` (:math:`v`).

Left out of the package's options: ``log_every`` (it only logs; read ``group["d"]``), ``fsdp_in_use``
(sharded DTensor parameters are detected, and their sums taken across processes, always; the package's flag
covers FSDP1 flat parameters, which thalweg does not support). ``p.grad`` is not modified (the package adds the
coupled decay into it in place). ``differentiable`` is not offered: ``d`` is computed on the host.
"""

from __future__ import annotations

from typing import Any, Iterable

import torch

from .. import _checks
from .._base import Optimizer
from ..engine import Flag, rule, sqrt
from . import _d_adaptation as shared

# options the package reads from param group 0 for the whole step
_STEP_WIDE = ("betas", "decouple", "use_bias_correction", "growth_rate")


@rule
def dadapt_adam(param, grad, exp_avg, exp_avg_sq, *, lr, beta1, beta2, eps, weight_decay, layer_scale, dlr,
                decouple: Flag, maximize: Flag):
    """One D-Adapt Adam step of one tensor, in the package's order of operations (``dlr`` = d·lr·bias
    correction, with d before the step; the new d first acts on the next step)."""
    if maximize:
        grad = -grad
    if weight_decay != 0:
        if not decouple:
            grad = grad + weight_decay * param
    if lr != 0:  # a group at lr 0 keeps its moments (and still steps by them, as the package)
        exp_avg = exp_avg * beta1 + layer_scale * dlr * (1 - beta1) * grad
        exp_avg_sq = exp_avg_sq * beta2 + (1 - beta2) * grad * grad
    denom = sqrt(exp_avg_sq) + eps
    if weight_decay != 0:
        if decouple:
            param = param - weight_decay * dlr * param
    param = param - exp_avg / denom
    return param, exp_avg, exp_avg_sq


class DAdaptAdam(Optimizer):
    """D-Adapt Adam (Defazio & Mishchenko 2023): Adam with a self-estimated step size, as
    ``dadaptation.DAdaptAdam`` 3.2.

    Args:
        params: parameters, ``named_parameters()`` or param-group dicts (a group may set ``layer_scale``).
        lr: multiplier of the estimated step size d (default 1.0).
        betas: :math:`(\\beta_1, \\beta_2)` of the moments (default (0.9, 0.999)).
        eps: added to the denominator (default 1e-8).
        weight_decay: :math:`\\lambda` (default 0).
        decouple: decay the weights directly, AdamW-style (default False: an L2 term in the gradient).
        d0: the initial estimate (default 1e-6).
        growth_rate: d grows by at most this factor per step (default inf).
        use_bias_correction: Adam's bias correction in the step size (default False).
        maximize: ascend the objective instead of descending it (default False).
        backend, foreach, fused, max_grad_norm, skip_nonfinite, state_dtype, param_update: as for every thalweg optimizer
            (see :class:`thalweg.Adam`).

    Example::

        optimizer = thalweg.DAdaptAdam(model.parameters(), decouple=True, weight_decay=0.01)
    """

    name = "dadaptadam"  # thalweg.create's name
    family = "LR-free"  # the arena's family (report panels, toggles)
    rule = dadapt_adam
    stages_step = True
    own_state_keys = frozenset({"s"})
    optional_group_keys = Optimizer.optional_group_keys | {"layer_scale"}

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1.0,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        decouple: bool = False,
        d0: float = 1e-6,
        growth_rate: float = float("inf"),
        use_bias_correction: bool = False,
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
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, d=d0, k=0, layer_scale=1.0,
                        numerator_weighted=0.0, growth_rate=growth_rate, use_bias_correction=use_bias_correction,
                        decouple=decouple, maximize=maximize)
        super().__init__(params, defaults, backend=backend, foreach=foreach, fused=fused,
                         max_grad_norm=max_grad_norm, skip_nonfinite=skip_nonfinite, state_dtype=state_dtype, param_update=param_update,
                         differentiable=None)

    def _check_hyperparameters(self, group: dict[str, Any]) -> None:
        _checks.non_negative("lr", group["lr"])
        _checks.betas(group["betas"])
        _checks.positive("eps", group["eps"])
        _checks.non_negative("weight_decay", group["weight_decay"])
        _checks.flag("decouple", group["decouple"])
        _checks.flag("use_bias_correction", group["use_bias_correction"])
        growth_rate = _checks.as_number("growth_rate", group["growth_rate"])
        if not growth_rate >= 1:  # below 1 the cap would sit under d, which never decreases: no effect but confusion
            raise ValueError(f"growth_rate must be >= 1 (inf: unrestricted), got {growth_rate}")
        _checks.positive("layer_scale", group["layer_scale"])
        _checks.flag("maximize", group["maximize"])
        shared.check_group_state(group, positive=("d",), numbers=("numerator_weighted",))

    # -- the step ---------------------------------------------------------------------------------------

    def _update_all(self, loss: Any) -> Any:
        shared.check_step(self, _STEP_WIDE)
        return super()._update_all(loss)

    def _options(self) -> dict[str, Any]:
        """The step-wide values, from param group 0 (the package's)."""
        first = self.param_groups[0]
        beta1, beta2 = (_checks.as_number(f"betas[{i}]", b) for i, b in enumerate(first["betas"]))
        k, d, lr = first["k"], float(first["d"]), shared.largest_lr(self)
        bias_correction = ((1 - beta2 ** (k + 1)) ** 0.5) / (1 - beta1 ** (k + 1)) if first["use_bias_correction"] else 1
        return dict(beta1=beta1, beta2=beta2, d=d, lr=lr, dlr=d * lr * bias_correction)

    def _scalars(self, group: dict[str, Any]) -> dict[str, Any]:
        options = self._options()
        return dict(lr=_checks.as_number("lr", group["lr"]), beta1=options["beta1"], beta2=options["beta2"],
                    eps=float(group["eps"]), weight_decay=float(group["weight_decay"]),
                    layer_scale=float(group["layer_scale"]), dlr=options["dlr"],
                    decouple=self.param_groups[0]["decouple"], maximize=group["maximize"])

    def _states(self, params, group, program, created_log=None, where=None):
        fresh = [not self.state.get(param) for param in params]
        states, created = super()._states(params, group, program, created_log, where)
        for k, (param, state, new) in enumerate(zip(params, states, fresh)):
            if "s" in state:
                continue
            if not new:
                raise RuntimeError(f"{where(k) if where else f'params[{k}]'}: its state has {sorted(state)} but no 's', "
                                   "which every DAdaptAdam state holds")
            state["s"] = self._new_state(param)
            if created_log is not None:
                created_log.append((state, "s"))
        return states, created

    def _check_state(self, where, params, states) -> None:
        for k, (param, state) in enumerate(zip(params, states)):
            value = state.get("s")
            value = shared.local(value) if isinstance(value, torch.Tensor) else value
            if not (isinstance(value, torch.Tensor) and value.is_floating_point() and value.shape == param.shape
                    and value.device == param.device):
                raise RuntimeError(f"{where(k)}: state['s'] is {value!r:.60} but the parameter is a "
                                   f"{tuple(param.shape)} {param.device} tensor")

    def _stage_step(self, entries):
        """The estimate of d over every parameter (the package's first loop and its update of d), then the
        scalars the rule steps with; None when nothing fed the estimate (the package returns there)."""
        options = self._options()
        first = self.param_groups[0]
        beta1, beta2, d, lr, dlr = (options[key] for key in ("beta1", "beta2", "d", "lr", "dlr"))
        decouple = first["decouple"]
        sqrt_beta2 = beta2 ** 0.5
        columns, moments = [], []
        for group, params, grads, states, _ in entries:
            inputs = shared.stage_inputs(group, params, grads, decouple=decouple)
            if inputs is None:
                columns.append(None)
                continue
            _, grads = inputs
            def column(grads, s, exp_avg_sq, eps=float(group["eps"])):
                denom = torch._foreach_sqrt(exp_avg_sq)
                torch._foreach_add_(denom, eps)  # the moments before the step
                dots = shared.dots(grads, torch._foreach_div(s, denom))
                norms = shared.accumulate_(s, grads, sqrt_beta2, dlr * (1 - sqrt_beta2))
                return torch.stack([dots, norms]).to(torch.float64)

            columns.append(shared.by_batches(column, grads, [shared.local(state["s"]) for state in states],
                                             [shared.local(state["exp_avg_sq"]) for state in states]))
            moments.extend((group, grad, state) for grad, state in zip(grads, states))
        numerator_acum, sk_l1 = 0.0, 0.0
        for (group, *_), values in zip(entries, shared.to_host(entries, columns)):
            if values is None:
                continue
            r = float(group["layer_scale"])
            for dot, norm in zip(*values):
                numerator_acum += r * dlr * dot
                sk_l1 += r * norm
        numerator_weighted = sqrt_beta2 * float(first["numerator_weighted"]) + (1 - sqrt_beta2) * numerator_acum
        if sk_l1 == 0:  # nothing fed the estimate: the package returns after the moments
            for group, grad, state in moments:
                r = float(group["layer_scale"])
                shared.local(state["exp_avg"]).mul_(beta1).add_(grad, alpha=r * dlr * (1 - beta1))
                shared.local(state["exp_avg_sq"]).mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
            return None
        if lr > 0.0:
            d_hat = numerator_weighted / ((1 - sqrt_beta2) * sk_l1)
            d = max(d, min(d_hat, d * float(first["growth_rate"])))
        for group in self.param_groups:
            group.update(numerator_weighted=numerator_weighted, d=d, k=group["k"] + 1)
        return [dict(dlr=dlr) for _ in entries]
