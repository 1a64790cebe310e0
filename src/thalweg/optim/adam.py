r"""Adam and AdamW.

Adam (Kingma & Ba, 2015) keeps exponential moving averages of the gradient and of its square and
steps along their bias-corrected ratio. At step :math:`t`, with gradient :math:`g_t`:

.. math::

    g_t &\leftarrow g_t + \lambda w_{t-1}                       && \text{(Adam: L2 penalty in the gradient)} \\
    w_{t-1} &\leftarrow (1 - \gamma\lambda)\, w_{t-1}           && \text{(AdamW: decoupled decay)} \\
    m_t &= \beta_1 m_{t-1} + (1-\beta_1)\, g_t \\
    v_t &= \beta_2 v_{t-1} + (1-\beta_2)\, g_t^2 \\
    \hat v_t &= \max(\hat v_{t-1}, v_t) \text{ with amsgrad, else } v_t \\
    w_t &= w_{t-1} - \frac{\gamma}{1-\beta_1^t}\,\frac{m_t}{\sqrt{\hat v_t}/\sqrt{1-\beta_2^t} + \epsilon}

AdamW (Loshchilov & Hutter, 2019) decays the weights directly instead of adding :math:`\lambda w` to the
gradient, so the decay is not rescaled by the adaptive denominator.

State (torch's names): ``step`` (a 0-d float tensor), ``exp_avg`` (:math:`m`), ``exp_avg_sq``
(:math:`v`), ``max_exp_avg_sq`` (with ``amsgrad``). Checkpoints cross-load with ``torch.optim.Adam``/``AdamW``.
"""

from __future__ import annotations

from typing import Any, Iterable

import torch

from .. import _checks
from .._base import Optimizer
from ..engine import Flag, PerTensor, lerp, maximum, norm, rule, sqrt, where


@rule
def adam(param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, *, step, lr, beta1, beta2, eps, weight_decay,
         size: PerTensor, amsgrad: Flag, decoupled: Flag, cautious: Flag, maximize: Flag):
    """One Adam/AdamW step of one tensor, in torch.optim's order of operations."""
    if maximize:
        grad = -grad
    if weight_decay != 0:
        if decoupled:
            param = param * (1 - lr * weight_decay)
        else:
            grad = grad + weight_decay * param
    exp_avg = lerp(exp_avg, grad, 1 - beta1)
    exp_avg_sq = beta2 * exp_avg_sq + (1 - beta2) * grad * grad
    second_moment = exp_avg_sq
    if amsgrad:
        max_exp_avg_sq = maximum(max_exp_avg_sq, exp_avg_sq)
        second_moment = max_exp_avg_sq
    step_size = lr / (1 - beta1**step)
    bias_correction2_sqrt = sqrt(1 - beta2**step)
    if cautious:
        update = exp_avg / (sqrt(second_moment) / bias_correction2_sqrt + eps)
        agrees = where(update * grad > 0, grad * 0 + 1, grad * 0)
        update = update * agrees / maximum(norm(agrees) ** 2 / size, 1e-3)
        param = param - step_size * update
    else:
        param = param - step_size * exp_avg / (sqrt(second_moment) / bias_correction2_sqrt + eps)
    return param, exp_avg, exp_avg_sq, max_exp_avg_sq


class Adam(Optimizer):
    """Adam, a drop-in for ``torch.optim.Adam`` (same arguments, defaults, state and checkpoints).

    Args:
        params: parameters, ``named_parameters()`` or param-group dicts.
        lr: learning rate :math:`\\gamma` (default 1e-3).
        betas: :math:`(\\beta_1, \\beta_2)`, decay rates of the two moving averages (default (0.9, 0.999)).
        eps: added to the denominator for numerical stability (default 1e-8).
        weight_decay: L2 penalty :math:`\\lambda` added to the gradient (default 0).
        amsgrad: use the running maximum of :math:`v` (Reddi et al., 2018) (default False).
        maximize: ascend the objective instead of descending it (default False).
        cautious: drop the components of the step whose sign differs from the gradient's (with L2 weight decay:
            the gradient plus the L2 term), the rest scaled by 1 / max(kept fraction, 1e-3) over the whole
            tensor (Liang et al. 2024, timm's renormalisation; a thalweg extension, default False).
        decoupled_weight_decay: decay the weights directly (AdamW) instead of adding the L2 term to the gradient
            (default False; torch's argument of the same name, a param-group key).
        backend: ``"auto"``, ``"reference"``, ``"foreach"`` or ``"fused"``; ``foreach=``/``fused=`` as in torch.
        max_grad_norm: clip the global gradient norm to this before the update (default None: off).
        skip_nonfinite: skip, and count in ``skipped_steps``, a step whose gradients hold NaN/Inf.
        state_dtype: ``torch.float32`` keeps the state of bfloat16/float16 parameters in float32, each step
            computed in float32 and the parameter rounded once (default None: the parameter's dtype, as torch);
            ``"int8"`` keeps ``exp_avg`` and ``exp_avg_sq`` of tensors of 4096 elements or more in 8-bit blocks
            (about 2 bytes per parameter instead of 8; see the README, "8-bit optimizer state").
        param_update: how a bfloat16 parameter takes its new value, computed in float32 (needs ``state_dtype``):
            ``"nearest"`` (default, torch's cast), ``"stochastic"`` (unbiased random rounding, reproducible) or
            ``"kahan"`` (the rounding error kept in ``state["kahan_comp"]``, 2 bytes per parameter, and added back
            next step); the last two keep training where updates are too small for bfloat16 (see the README,
            "bfloat16 parameters without float32 master weights").

    Example::

        optimizer = thalweg.Adam(model.parameters(), lr=1e-3)
        loss_fn(model(x), y).backward()
        optimizer.step()
        optimizer.zero_grad()
    """

    name = "adam"  # thalweg.create's name
    family = "Adam-like"  # the arena's family (report panels, toggles)

    rule = adam
    state_codecs = {"exp_avg": "signed", "exp_avg_sq": "unsigned", "max_exp_avg_sq": "unsigned"}
    optional_group_keys = Optimizer.optional_group_keys | {"amsgrad", "decoupled_weight_decay", "cautious"}

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0,
        amsgrad: bool = False,
        *,
        maximize: bool = False,
        decoupled_weight_decay: bool = False,
        cautious: bool = False,
        backend: str = "auto",
        foreach: bool | None = None,
        fused: bool | None = None,
        max_grad_norm: float | None = None,
        skip_nonfinite: bool = False,
        state_dtype: torch.dtype | None = None,
        param_update: str = "nearest",
        differentiable: bool = False,
        capturable: bool = False,
    ) -> None:
        _check_tensor_options(lr, betas, foreach)
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad, maximize=maximize,
                        decoupled_weight_decay=decoupled_weight_decay, cautious=cautious)
        super().__init__(params, defaults, backend=backend, foreach=foreach, fused=fused,
                         max_grad_norm=max_grad_norm, skip_nonfinite=skip_nonfinite,
                         state_dtype=state_dtype, param_update=param_update, differentiable=differentiable, capturable=capturable)

    def _check_hyperparameters(self, group: dict[str, Any]) -> None:
        _checks.non_negative("lr", group["lr"])
        _checks.betas(group["betas"])
        _checks.non_negative("eps", group["eps"])
        _checks.non_negative("weight_decay", group["weight_decay"])
        _checks.flag("amsgrad", group["amsgrad"])
        _checks.flag("maximize", group["maximize"])
        _checks.flag("decoupled_weight_decay", group["decoupled_weight_decay"])
        _checks.flag("cautious", group["cautious"])

    def _scalars(self, group: dict[str, Any]) -> dict[str, Any]:
        beta1, beta2 = group["betas"]
        return dict(lr=_checks.as_number("lr", group["lr"]), beta1=_checks.as_number("betas[0]", beta1),
                    beta2=_checks.as_number("betas[1]", beta2), eps=float(group["eps"]),
                    weight_decay=float(group["weight_decay"]), amsgrad=group["amsgrad"],
                    decoupled=group["decoupled_weight_decay"], cautious=group["cautious"], maximize=group["maximize"])


def _check_tensor_options(lr: Any, betas: Any, foreach: bool | None) -> None:
    """The combinations torch.optim.Adam refuses at construction (ValueError), refused alike: code that runs on
    thalweg then runs on torch. thalweg itself reads a tensor lr or beta once per step, on any backend."""
    if isinstance(betas, (tuple, list)) and len(betas) == 2:
        tensors = [isinstance(beta, torch.Tensor) for beta in betas]
        if tensors[0] != tensors[1]:
            raise ValueError(f"betas must be both numbers or both tensors (as torch.optim.Adam requires), got {betas!r}")
        if tensors[0] and foreach:
            raise ValueError(f"betas as tensors cannot be combined with foreach=True (torch.optim.Adam refuses it "
                             f"without capturable=True), got betas={betas!r}")
    if isinstance(lr, torch.Tensor) and foreach:
        raise ValueError(f"lr as a tensor cannot be combined with foreach=True (torch.optim.Adam refuses it without "
                         f"capturable=True), got lr={lr!r}")


class AdamW(Adam):
    """AdamW, a drop-in for ``torch.optim.AdamW``: Adam with decoupled weight decay (default 1e-2).

    Arguments as :class:`Adam`; ``weight_decay`` multiplies the weights by :math:`1-\\gamma\\lambda`
    each step instead of entering the gradient.
    """

    name = "adamw"  # thalweg.create's name
    family = "Adam-like"  # the arena's family (report panels, toggles)

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        amsgrad: bool = False,
        *,
        maximize: bool = False,
        cautious: bool = False,
        backend: str = "auto",
        foreach: bool | None = None,
        fused: bool | None = None,
        max_grad_norm: float | None = None,
        skip_nonfinite: bool = False,
        state_dtype: torch.dtype | None = None,
        param_update: str = "nearest",
        differentiable: bool = False,
        capturable: bool = False,
    ) -> None:
        super().__init__(params, lr, betas, eps, weight_decay, amsgrad, maximize=maximize, decoupled_weight_decay=True,
                         cautious=cautious,
                         backend=backend, foreach=foreach, fused=fused, max_grad_norm=max_grad_norm,
                         skip_nonfinite=skip_nonfinite, state_dtype=state_dtype, param_update=param_update, differentiable=differentiable,
                         capturable=capturable)
