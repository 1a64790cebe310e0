"""How the hand-written CPU kernels (``numba_cpu.py`` beside this file) were launched before the rule engine.

Kept, with them, only for ``benchmarks/derived_vs_handwritten.py``: the scalar tables each kernel read and
the per-algorithm calls, as ``thalweg/kernels/fused.py`` made them (commit b23f145), over the bucket
tables the engine builds today (the same pointer and chunk tables the old partition built).
"""

from __future__ import annotations

import numpy as np
import torch

from thalweg.engine import host

from . import numba_cpu

_NUMPY = {torch.float32: (np.float32, np.float32), torch.float64: (np.float64, np.float64),
          torch.bfloat16: (np.uint16, np.float32)}
# the state roles in each old kernel's row order
_ROLES = {"sgd": ["momentum_buffer"], "momentum": ["momentum_buffer"], "lars": ["momentum_buffer"],
          "adam": ["exp_avg", "exp_avg_sq", "max_exp_avg_sq"], "adamw": ["exp_avg", "exp_avg_sq", "max_exp_avg_sq"],
          "lamb": ["exp_avg", "exp_avg_sq"], "rmsprop": ["square_avg", "grad_avg", "momentum_buffer"],
          "adagrad": ["sum"]}
_PASSES = {"sgd": ("_sgd_chunk",), "momentum": ("_sgd_chunk",), "lars": ("_norms_chunk", "_sgd_chunk"),
           "adam": ("_adam_chunk",), "adamw": ("_adam_chunk",), "lamb": ("_lamb_moments_chunk", "_lamb_update_chunk"),
           "rmsprop": ("_rmsprop_chunk",), "adagrad": ("_adagrad_chunk",)}


def _flags(*switches) -> np.ndarray:
    return np.array(switches, dtype=np.int64)


class HandWritten:
    """One step of ``optimizer`` (a thalweg optimizer with its state created) through the old kernel."""

    def __init__(self, name, optimizer):
        self.name = name
        self.optimizer = optimizer  # owns the state tensors whose raw addresses the kernel writes through
        group = optimizer.param_groups[0]
        self.group = group
        params = group["params"]
        states = [optimizer.state[p] for p in params]
        rows = [params, [p.grad for p in params]]
        rows += [[s[r] for s in states] if r in states[0] else [] for r in _ROLES[name]]
        self.ptrs = np.zeros((len(rows), len(params)), dtype=np.int64)
        for r, tensors in enumerate(rows):
            if tensors:
                self.ptrs[r] = [t.data_ptr() for t in tensors]
        numels = [p.numel() for p in params]
        self.chunks = host.chunk_table(numels)
        storage, self.compute = _NUMPY[params[0].dtype]
        self.like = (np.empty(1, dtype=storage), np.empty(1, dtype=storage))
        self.pool = numba_cpu.pool(_PASSES[name], storage, sum(numels), len(self.chunks), storage)
        steps = [s["step"] for s in states] if "step" in states[0] else []
        self.steps = np.array([s.data_ptr() for s in steps], dtype=np.int64)
        self.step_like = np.empty(1, dtype=np.float32)
        self.n = len(params)

    def step(self):
        host.mark_written(self.group["params"])  # as the old launcher did before every kernel call
        g, c, kernels = self.group, self.compute, numba_cpu
        pool, ptrs, chunks, steps, like, step_like = self.pool, self.ptrs, self.chunks, self.steps, self.like, self.step_like
        lr, weight_decay = float(g["lr"]), float(g.get("weight_decay", 0.0))
        if self.name in ("sgd", "momentum"):
            momentum, dampening = float(g["momentum"]), float(g["dampening"])
            hp = np.array([-lr, weight_decay, momentum, 1 - dampening], dtype=c)
            coef = np.ones((self.n, 2), dtype=c)
            coef[:, 0] = 0
            kernels.sgd(pool, ptrs, chunks, coef, hp, _flags(g["maximize"], weight_decay != 0, momentum != 0,
                                                             g["nesterov"]), *like)
        elif self.name == "lars":
            momentum = float(g["momentum"])
            hp = np.array([-lr, weight_decay, momentum, 1.0], dtype=c)
            hp64 = np.array([g["trust_coefficient"], weight_decay, g["eps"]], dtype=np.float64)
            coef = np.ones((self.n, 2), dtype=c)
            coef[:, 0] = 0
            flags = _flags(g["maximize"], weight_decay != 0, momentum != 0, g["nesterov"], g["trust_ratio"])
            kernels.lars(pool, ptrs, chunks, coef, hp, hp64, flags, *like)
        elif self.name in ("adam", "adamw"):
            beta1, beta2 = g["betas"]
            w1 = c(1 - beta1)
            hp = np.array([w1, w1 - c(1), beta2, 1 - beta2, g["eps"], weight_decay, 1 - lr * weight_decay, 0.5], dtype=c)
            hp64 = np.array([lr, beta1, beta2], dtype=np.float64)
            mode = 0 if weight_decay == 0 else 2 if self.name == "adamw" else 1
            kernels.adam(pool, ptrs, steps, chunks, hp, hp64, _flags(g["maximize"], mode, g["amsgrad"]), *like, step_like)
        elif self.name == "lamb":
            beta1, beta2 = g["betas"]
            w1 = c(1 - beta1)
            hp = np.array([w1, w1 - c(1), beta2, 1 - beta2, g["eps"], weight_decay, 0.5], dtype=c)
            hp64 = np.array([lr, beta1, beta2, 1.0 if g["bias_correction"] else 0.0], dtype=np.float64)
            flags = _flags(g["maximize"], weight_decay != 0, g["trust_ratio"])
            kernels.lamb(pool, ptrs, steps, chunks, hp, hp64, flags, *like, step_like)
        elif self.name == "rmsprop":
            alpha, momentum = float(g["alpha"]), float(g["momentum"])
            w = c(1 - alpha)
            hp = np.array([-lr, alpha, w, g["eps"], weight_decay, momentum, 0.5, w - c(1)], dtype=c)
            flags = _flags(g["maximize"], weight_decay != 0, g["centered"], momentum > 0)
            kernels.rmsprop(pool, ptrs, steps, chunks, hp, flags, *like, step_like)
        elif self.name == "adagrad":
            hp = np.array([g["eps"], weight_decay], dtype=c)
            hp64 = np.array([lr, g["lr_decay"]], dtype=np.float64)
            kernels.adagrad(pool, ptrs, steps, chunks, hp, hp64, _flags(g["maximize"], weight_decay != 0), *like,
                            step_like)
