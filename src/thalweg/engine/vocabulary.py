"""The math vocabulary of rules, for every kind of value a rule meets outside a generated kernel.

A rule calls ``sqrt(v)``, ``where(c, a, b)``... and these functions do the right thing for what they
are given: a torch tensor (the reference backend runs the rule on the parameter's tensors), a
:class:`TensorList` (the foreach backend: one ``torch._foreach_*`` call per operation), a numpy array
(the host's per-tensor values: one entry per tensor), or a Python float (per-group values, computed in
float64 as torch.optim computes its Python scalars). The generated numba and Triton kernels bind the
same names to their own implementations of the same meaning.

Meanings follow torch: ``sign(nan) == 0`` (as ``torch.sign``), ``maximum``/``minimum`` propagate NaN
(as ``torch.maximum``), ``lerp`` switches form at ``|weight| = 0.5`` (as ATen's ``lerp``), ``norm`` is
the L2 norm accumulated in float64.
"""

from __future__ import annotations

import math
from contextvars import ContextVar
from typing import Any, Callable

import numpy as np
import torch

_Tensor = torch.Tensor

# The in-place cross-process sum of squared norms while a sharded group steps on the reference backend
# (set by the engine's reference runner; None: the tensors are whole and norms are local).
NORM_SUM: ContextVar[Callable[[torch.Tensor], None] | None] = ContextVar("thalweg_norm_sum", default=None)


class TensorList:
    """Tensors of one device and dtype, stepped together: each operator is one ``torch._foreach_*`` call.

    The operand on the other side may be another TensorList, a number (the same for every tensor), or
    per-tensor numbers (a numpy array, or a 1-d tensor of the device: one entry per tensor).
    """

    __slots__ = ("tensors",)
    __array_ufunc__ = None  # numpy defers to our reflected operators (ndarray * TensorList)

    def __init__(self, tensors: list[torch.Tensor]) -> None:
        self.tensors = tensors

    def __len__(self) -> int:
        return len(self.tensors)

    def _other(self, other: Any) -> Any:
        if isinstance(other, TensorList):
            return other.tensors
        if isinstance(other, np.ndarray):
            return other.tolist() if other.ndim else float(other)
        if isinstance(other, _Tensor):  # per-tensor values on the device (no host sync)
            return list(other.to(self.tensors[0].dtype).unbind()) if other.ndim else other
        return other

    def __add__(self, other):
        return TensorList(torch._foreach_add(self.tensors, self._other(other)))

    __radd__ = __add__

    def __sub__(self, other):
        return TensorList(torch._foreach_sub(self.tensors, self._other(other)))

    def __rsub__(self, other):  # other - self, exactly as (-self) + other
        return TensorList(torch._foreach_add(torch._foreach_neg(self.tensors), self._other(other)))

    def __mul__(self, other):
        return TensorList(torch._foreach_mul(self.tensors, self._other(other)))

    __rmul__ = __mul__

    def __truediv__(self, other):
        return TensorList(torch._foreach_div(self.tensors, self._other(other)))

    def __rtruediv__(self, other):  # torch's Tensor.__rtruediv__ too: reciprocal, then multiply
        return TensorList(torch._foreach_mul(torch._foreach_reciprocal(self.tensors), self._other(other)))

    def __pow__(self, exponent):
        if exponent != 2:
            raise ValueError(f"a TensorList may only be squared, got exponent {exponent!r}")
        return TensorList(torch._foreach_mul(self.tensors, self.tensors))

    def __neg__(self):
        return TensorList(torch._foreach_neg(self.tensors))

    def __pos__(self):
        return self

    def __abs__(self):
        return TensorList(torch._foreach_abs(self.tensors))

    def _each(self, other: Any, op: Callable[[Any, Any], Any]) -> TensorList:
        """An operation without a foreach kernel (comparisons, & and |): one torch call per tensor."""
        others = _per_tensor(other, len(self.tensors))
        return TensorList([op(a, b) for a, b in zip(self.tensors, others)])

    def __lt__(self, other):
        return self._each(other, torch.lt)

    def __le__(self, other):
        return self._each(other, torch.le)

    def __gt__(self, other):
        return self._each(other, torch.gt)

    def __ge__(self, other):
        return self._each(other, torch.ge)

    def __eq__(self, other):  # type: ignore[override]
        return self._each(other, torch.eq)

    def __ne__(self, other):  # type: ignore[override]
        return self._each(other, torch.ne)

    def __and__(self, other):
        return self._each(other, torch.logical_and)

    __rand__ = __and__

    def __or__(self, other):
        return self._each(other, torch.logical_or)

    __ror__ = __or__

    __hash__ = None  # type: ignore[assignment]


def _per_tensor(value: Any, n: int) -> list:
    """``value`` as one operand per tensor."""
    if isinstance(value, TensorList):
        return value.tensors
    if isinstance(value, np.ndarray) and value.ndim:
        return value.tolist()
    if isinstance(value, _Tensor) and value.ndim == 1 and value.numel() == n and n != 1:
        return list(value.unbind())
    return [value] * n


def _is_list(*values: Any) -> int:
    """Length of the first TensorList among ``values``, or 0."""
    for value in values:
        if isinstance(value, TensorList):
            return len(value.tensors)
    return 0


def sqrt(x):
    """Square root (IEEE-rounded in every backend)."""
    if isinstance(x, _Tensor):
        return torch.sqrt(x)
    if isinstance(x, TensorList):
        return TensorList(torch._foreach_sqrt(x.tensors))
    if isinstance(x, np.ndarray):
        return np.sqrt(x)
    return math.sqrt(x) if x >= 0 else math.nan


def sign(x):
    """-1, 0 or 1; 0 for NaN (as ``torch.sign``)."""
    if isinstance(x, _Tensor):
        return torch.sign(x)
    if isinstance(x, TensorList):
        return TensorList(torch._foreach_sign(x.tensors))
    if isinstance(x, np.ndarray):
        return (x > 0).astype(np.float64) - (x < 0)
    return float(x > 0) - float(x < 0)


def where(condition, a, b):
    """``a`` where ``condition`` holds, else ``b`` (elementwise for tensors, per tensor for per-tensor values)."""
    n = _is_list(condition, a, b)
    if n:
        return TensorList([where(c, x, y) for c, x, y in zip(_per_tensor(condition, n), _per_tensor(a, n),
                                                               _per_tensor(b, n))])
    if isinstance(condition, _Tensor):
        return torch.where(condition, a, b)
    if isinstance(condition, np.ndarray):
        return np.where(condition, a, b)
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        return np.where(condition, a, b)
    return a if condition else b


def maximum(a, b):
    """Elementwise maximum; NaN if either side is NaN (as ``torch.maximum``)."""
    return _extremum(a, b, torch.maximum, torch._foreach_maximum, np.maximum, "min", lambda x, y: x >= y)


def minimum(a, b):
    """Elementwise minimum; NaN if either side is NaN (as ``torch.minimum``)."""
    return _extremum(a, b, torch.minimum, torch._foreach_minimum, np.minimum, "max", lambda x, y: x <= y)


def _extremum(a, b, tensor_fn, foreach_fn, numpy_fn, clamp_side, keeps_first):
    if isinstance(a, TensorList) or isinstance(b, TensorList):
        first, second = (a, b) if isinstance(a, TensorList) else (b, a)
        return TensorList(foreach_fn(first.tensors, first._other(second)))
    if isinstance(a, _Tensor) or isinstance(b, _Tensor):
        if isinstance(a, _Tensor) and isinstance(b, _Tensor):
            return tensor_fn(a, b)
        tensor, number = (a, b) if isinstance(a, _Tensor) else (b, a)
        return torch.clamp(tensor, **{clamp_side: number})  # a NaN on either side gives NaN, as tensor_fn
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        return numpy_fn(a, b)
    if a != a or b != b:
        return math.nan
    return a if keeps_first(a, b) else b


def lerp(start, end, weight):
    """``start + weight * (end - start)``, in torch's two forms (exact at both ends)."""
    if isinstance(start, _Tensor):
        return torch.lerp(start, end, weight)
    if isinstance(start, TensorList):
        return TensorList(torch._foreach_lerp(start.tensors, end.tensors, start._other(weight)))
    if isinstance(start, np.ndarray) or isinstance(weight, np.ndarray):
        return np.where(np.abs(weight) < 0.5, start + weight * (end - start), end - (end - start) * (1 - weight))
    return start + weight * (end - start) if abs(weight) < 0.5 else end - (end - start) * (1 - weight)


def add(a, b, alpha):
    """``a + alpha·b`` rounded once (torch's ``add(alpha=)``): the engine's spelling of such a term on the
    torch-op backends."""
    if isinstance(a, TensorList):
        if isinstance(alpha, (int, float)):
            return TensorList(torch._foreach_add(a.tensors, b.tensors, alpha=alpha))
        return a + b * alpha  # per-tensor alphas: torch has no foreach form
    if isinstance(alpha, _Tensor):  # a value derived from a norm (0-d): no host sync to make it a number
        return a + alpha * b
    return torch.add(a, b, alpha=alpha)


def addcmul(a, b, c, value):
    """``a + value·b·c`` rounded once (torch's ``addcmul``)."""
    if isinstance(value, _Tensor):  # per-tensor values on the device, or derived from a norm: no host sync
        return a + value * b * c
    if isinstance(a, TensorList):
        return TensorList(torch._foreach_addcmul(a.tensors, b.tensors, c.tensors, a._other(value)))
    return torch.addcmul(a, b, c, value=value)


def addcdiv(a, b, c, value):
    """``a + value·b/c`` rounded once (torch's ``addcdiv``)."""
    if isinstance(value, _Tensor):
        return a + value * b / c
    if isinstance(a, TensorList):
        return TensorList(torch._foreach_addcdiv(a.tensors, b.tensors, c.tensors, a._other(value)))
    return torch.addcdiv(a, b, c, value=value)


# -- in place (the reference's and foreach's lowering, see torchops): torch's own in-place forms ---------


def _binary_(method: str, foreach_name: str):
    def op(a, other):
        if isinstance(a, TensorList):
            getattr(torch, foreach_name)(a.tensors, a._other(other))
        else:
            getattr(a, method)(other)
        return a

    op.__name__ = method
    op.__doc__ = f"``a.{method}(other)`` (one ``torch.{foreach_name}`` call for a TensorList); returns ``a``."
    return op


add_ = _binary_("add_", "_foreach_add_")
sub_ = _binary_("sub_", "_foreach_sub_")
mul_ = _binary_("mul_", "_foreach_mul_")
div_ = _binary_("div_", "_foreach_div_")


def _unary_(method: str, foreach_name: str):
    def op(a):
        if isinstance(a, TensorList):
            getattr(torch, foreach_name)(a.tensors)
        else:
            getattr(a, method)()
        return a

    op.__name__ = method
    return op


sqrt_ = _unary_("sqrt_", "_foreach_sqrt_")
neg_ = _unary_("neg_", "_foreach_neg_")
abs_ = _unary_("abs_", "_foreach_abs_")
sign_ = _unary_("sign_", "_foreach_sign_")


def add_alpha_(a, b, alpha):
    """``a += alpha·b`` in place, rounded once (``add_(b, alpha=)``)."""
    if isinstance(a, TensorList):
        if isinstance(alpha, (int, float)):
            torch._foreach_add_(a.tensors, b.tensors, alpha=alpha)
        else:
            torch._foreach_add_(a.tensors, (b * alpha).tensors)
    elif isinstance(alpha, _Tensor):
        a.add_(alpha * b)
    else:
        a.add_(b, alpha=alpha)
    return a


def addcmul_(a, b, c, value):
    if isinstance(value, _Tensor):
        add_(a, value * b * c)
    elif isinstance(a, TensorList):
        torch._foreach_addcmul_(a.tensors, b.tensors, c.tensors, a._other(value))
    else:
        a.addcmul_(b, c, value=value)
    return a


def addcdiv_(a, b, c, value):
    if isinstance(value, _Tensor):
        add_(a, value * b / c)
    elif isinstance(a, TensorList):
        torch._foreach_addcdiv_(a.tensors, b.tensors, c.tensors, a._other(value))
    else:
        a.addcdiv_(b, c, value=value)
    return a


def lerp_(a, end, weight):
    if isinstance(a, TensorList):
        torch._foreach_lerp_(a.tensors, end.tensors, a._other(weight))
    else:
        a.lerp_(end, weight)
    return a


def maximum_(a, b):
    if isinstance(a, TensorList) and isinstance(b, TensorList):
        torch._foreach_maximum_(a.tensors, b.tensors)
    elif isinstance(a, _Tensor) and isinstance(b, _Tensor):
        torch.maximum(a, b, out=a)
    else:
        _copy_(a, maximum(a, b))
    return a


def minimum_(a, b):
    if isinstance(a, TensorList) and isinstance(b, TensorList):
        torch._foreach_minimum_(a.tensors, b.tensors)
    elif isinstance(a, _Tensor) and isinstance(b, _Tensor):
        torch.minimum(a, b, out=a)
    else:
        _copy_(a, minimum(a, b))
    return a


def _copy_(a, value) -> None:
    if isinstance(a, TensorList):
        torch._foreach_copy_(a.tensors, value.tensors)
    else:
        a.copy_(value)


def norm(x):
    """L2 norm of a whole tensor, accumulated in float64 (a 0-d float64 tensor; across processes when sharded).

    The reference backend calls this inside the rule. The other backends never do: they turn each
    ``norm(x)`` into a first pass that sums ``x ** 2`` per tensor, then one cross-process sum for all of them.
    """
    if not isinstance(x, _Tensor):
        raise TypeError(f"norm() takes a tensor, got {type(x).__name__}")
    squares = torch.linalg.vector_norm(x, dtype=torch.float64).square().reshape(1)
    sum_ = NORM_SUM.get()
    if sum_ is not None:
        sum_(squares)
    return squares.sqrt().reshape(())


# |x|: Python's own abs() already dispatches (Tensor.__abs__, TensorList.__abs__, numpy, float).
abs = abs  # noqa: A001,PLW0127 - named here so that rules and generated code find every word in one place

__all__ = ["TensorList", "abs", "abs_", "add", "add_", "add_alpha_", "addcdiv", "addcdiv_", "addcmul", "addcmul_",
           "div_", "lerp_", "maximum_", "minimum_", "mul_", "neg_", "sign_", "sqrt_", "sub_", "sqrt", "sign", "where", "maximum", "minimum", "lerp", "norm", "NORM_SUM"]
