"""The rule language: its vocabulary, the kinds of values a rule computes, and its errors.

Shared by :mod:`.rules` (which parses and checks a rule) and :mod:`.program` (which specialises it).
"""

from __future__ import annotations

VOCABULARY = ("sqrt", "abs", "sign", "where", "maximum", "minimum", "lerp", "norm")
PER_TENSOR = ("step", "first")  # the per-tensor inputs the engine provides
# names the generated code itself uses (modules, helpers); with every name beginning with "_", a rule
# may not take or assign them
RESERVED = frozenset({"np", "tl", "triton", "torch", "math", "carray", "load", "store", "pointer", "address",
                      "fetch_add", "accumulate", "round_to", "square", "where", "add", "addcmul", "addcdiv",
                      "sum_of_squares", "load_bf16", "store_bf16", "round_bf16", "data", "P", "S", "C", "I64",
                      "F64", "BLOCK", "partial", "ptrs", "chunks", "sc", "late", "n"})


class Flag:
    """Annotation of a rule's compile-time switch: a boolean hyper-parameter (``maximize: Flag``)."""


class PerTensor:
    """Annotation of a per-tensor value the optimizer supplies each step (``mu_product: PerTensor``): a number
    per tensor, read from the tensor's scalar state before the step (NAdam's ``mu_product``, ASGD's ``eta``).
    It enters the program as ``step`` does: host arithmetic on it is float64, the kernels receive a column.

    One name is supplied by :class:`thalweg.Optimizer` itself: ``size: PerTensor`` is the tensor's element
    count — the whole tensor's when it is sharded — which a per-tensor mean divides by (``norm(x) ** 2 / size``
    is the mean of ``x²`` over the whole tensor, on every process)."""


class RuleError(ValueError):
    """A rule uses something the engine cannot derive backends from; the message points at its line."""


# expression kinds, in the order a mix of them takes the larger one
CONST, GROUP, EARLY, LATE, TENSOR = range(5)
KIND_NAMES = {CONST: "constant", GROUP: "hyper-parameter", EARLY: "per-tensor", LATE: "per-tensor (after a norm)",
              TENSOR: "tensor"}
