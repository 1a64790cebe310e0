"""The rule language: its vocabulary, the kinds of values a rule computes, and its errors.

Shared by :mod:`.rules` (which parses and checks a rule) and :mod:`.program` (which specialises it).
"""

from __future__ import annotations

VOCABULARY = ("sqrt", "abs", "sign", "where", "maximum", "minimum", "lerp", "norm")
PER_TENSOR = ("step", "first")  # the per-tensor inputs the engine provides


class Flag:
    """Annotation of a rule's compile-time switch: a boolean hyper-parameter (``maximize: Flag``)."""


class RuleError(ValueError):
    """A rule uses something the engine cannot derive backends from; the message points at its line."""


# expression kinds, in the order a mix of them takes the larger one
CONST, GROUP, EARLY, LATE, TENSOR = range(5)
KIND_NAMES = {CONST: "constant", GROUP: "hyper-parameter", EARLY: "per-tensor", LATE: "per-tensor (after a norm)",
              TENSOR: "tensor"}
