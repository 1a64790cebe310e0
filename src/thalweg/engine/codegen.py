"""Rendering a program's expressions as source for a backend: numba, Triton, or Python over TensorLists.

A :class:`Dialect` says how each operation of the rule language is spelled in one backend; the
expressions themselves come from :class:`~thalweg.engine.rules.Program` (SSA names, scalars already
hoisted to the host), so rendering is a walk over a small AST.
"""

from __future__ import annotations

import ast

from .language import TENSOR
from .program import Program

_SYMBOLS = {ast.Add: "+", ast.Sub: "-", ast.Mult: "*", ast.Div: "/", ast.Pow: "**", ast.BitAnd: "&", ast.BitOr: "|",
            ast.Lt: "<", ast.LtE: "<=", ast.Gt: ">", ast.GtE: ">=", ast.Eq: "==", ast.NotEq: "!="}


class Dialect:
    """How one backend spells the rule language (the defaults are plain Python)."""

    # scalar sub-expressions left inside tensor expressions (the reference keeps them there: Python floats)
    # are written as plain Python
    python_scalars = False

    def call(self, name: str, args: list[str]) -> str:
        if name == "where":
            return f"({args[1]} if {args[0]} else {args[2]})"
        if name == "_square":
            return f"({args[0]} * {args[0]})"
        return f"{name}({', '.join(args)})"

    def binop(self, op: ast.operator, left: str, right: str) -> str:
        return f"({left} {_SYMBOLS[type(op)]} {right})"

    def unary(self, op: ast.unaryop, operand: str) -> str:
        return f"(-{operand})" if isinstance(op, ast.USub) else f"(not {operand})" if isinstance(op, ast.Not) else operand

    def scalar_condition(self, name: str) -> str:
        """A per-group or per-tensor value used as a condition (a flag, ``first``: 0 or 1 in the scalar table)."""
        return f"({name} != 0)"

    def fuse(self, program: Program, node: ast.BinOp) -> str | None:
        """Source for ``node`` as one compound operation, or None to spell it operation by operation."""
        return None


class TorchOps(Dialect):
    """Python over torch tensors (reference) or TensorLists (foreach), each update written as torch.optim
    writes it: a product added to a tensor is one ``addcmul``, a quotient one ``addcdiv``, a scaled tensor
    one ``add(alpha=)``. Each of those rounds once (in bfloat16: float32 math, one rounding), as torch's
    for-loop and foreach paths do, so low-precision parameters and state round exactly as there."""

    python_scalars = True

    def call(self, name: str, args: list[str]) -> str:
        if name == "where":
            return f"where({', '.join(args)})"
        return super().call(name, args)

    def scalar_condition(self, name: str) -> str:
        return name  # the vocabulary's where() takes per-tensor values as they are

    def fuse(self, program: Program, node: ast.BinOp) -> str | None:
        if program._kind(node) != TENSOR or not isinstance(node.op, (ast.Add, ast.Sub)):
            return None
        sides = [(node.left, node.right, False)]
        if isinstance(node.op, ast.Add):
            sides.append((node.right, node.left, False))
        else:
            sides = [(node.left, node.right, True)]
        for base, term, negate in sides:
            if program._kind(base) != TENSOR:
                continue
            found = _compound(program, term)
            if found is None:
                continue
            op, scale, operands = found
            value = "1" if scale is None else render(program, scale, self)
            if negate:
                value = f"-{value}" if scale is None else f"(-{value})"
            args = ", ".join([render(program, base, self)] + [render(program, o, self) for o in operands] + [value])
            return f"{op}({args})"
        return None


def _compound(program: Program, term: ast.expr):
    """``term`` as (op, scalar factor or None, tensor operands) when it is ``s·B·C``, ``B·C`` (addcmul),
    ``s·B/C``, ``B/C`` (addcdiv) or ``s·B`` (add with alpha); None otherwise."""
    if not isinstance(term, ast.BinOp) or program._kind(term) != TENSOR:
        return None
    tensor = lambda n: program._kind(n) == TENSOR  # noqa: E731
    left, right = term.left, term.right
    if isinstance(term.op, (ast.Mult, ast.Div)) and tensor(right):
        op = "addcmul" if isinstance(term.op, ast.Mult) else "addcdiv"
        if isinstance(left, ast.BinOp) and isinstance(left.op, ast.Mult) and not tensor(left.left) and tensor(left.right):
            return op, left.left, [left.right, right]
        if tensor(left):
            return op, None, [left, right]
    if isinstance(term.op, ast.Mult) and not tensor(left) and tensor(right):
        return "add", left, [right]
    return None


def render(program: Program, node: ast.expr, dialect: Dialect) -> str:
    """``node`` (a kernel expression of ``program``) as source in ``dialect``."""
    if dialect.python_scalars and not isinstance(node, (ast.Name, ast.Constant)) and program._kind(node) != TENSOR:
        return f"({ast.unparse(node)})"
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Constant):  # only the exponent of a square survives hoisting
        return repr(node.value)
    if isinstance(node, ast.BinOp):
        fused = dialect.fuse(program, node)
        if fused is not None:
            return fused
        return dialect.binop(node.op, render(program, node.left, dialect), render(program, node.right, dialect))
    if isinstance(node, ast.UnaryOp):
        return dialect.unary(node.op, render(program, node.operand, dialect))
    if isinstance(node, ast.Compare):
        return dialect.binop(node.ops[0], render(program, node.left, dialect),
                             render(program, node.comparators[0], dialect))
    if isinstance(node, ast.Call):
        args = [render(program, a, dialect) for a in node.args]
        if node.func.id == "where" and program._kind(node.args[0]) != TENSOR:
            args[0] = dialect.scalar_condition(args[0])
        return dialect.call(node.func.id, args)
    if isinstance(node, ast.BoolOp):
        raise ValueError(f"rule {program.rule.name}: `and`/`or` between tensors; use `&`/`|`")
    raise ValueError(f"rule {program.rule.name}: cannot render {ast.dump(node)}")


def header(program: Program, what: str) -> str:
    """The comment block opening a generated file: what it is and where it comes from."""
    rule = program.rule
    return (f"# Generated by thalweg.engine ({what}) from rule `{rule.name}` in {rule.filename}; do not edit.\n"
            f"# if-outcomes {program.key}, program {program.digest}. The program, statement by statement:\n"
            + "".join(f"#   {line}\n" for line in program.describe().splitlines()[1:]))
