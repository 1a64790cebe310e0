"""Rules: an optimizer's elementwise math written once, and the straight-line programs derived from it.

A rule is a plain Python function::

    @rule
    def adam(param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, *, step, lr, beta1, beta2, eps, weight_decay,
             amsgrad: Flag, decoupled: Flag, maximize: Flag):
        ...
        return param, exp_avg, exp_avg_sq, max_exp_avg_sq

- **Positional parameters are roles**: the parameter, its gradient, then its state tensors, named as the
  optimizer's state keys (``exp_avg``...). The rule returns the new value of every role but the gradient,
  in order (a role it leaves alone is returned as it came).
- **Keyword-only parameters are scalars**: hyper-parameters of the param group (Python floats), flags
  (annotated :class:`Flag`: booleans), and two per-tensor values the engine provides: ``step`` (the
  tensor's step count, after this step's increment) and ``first`` (True when the tensor's state was
  created by this step, as SGD's momentum buffer is); the optimizer may supply more per-tensor values
  (annotated :class:`PerTensor`: a tensor's scalar state, such as NAdam's ``mu_product``).
- The body assigns names, uses arithmetic, comparisons, ``&``/``|`` and the vocabulary of
  :mod:`thalweg.engine.vocabulary` (``sqrt, abs, sign, where, maximum, minimum, lerp, norm``), and
  branches with ``if`` on flags and hyper-parameters only (a value that differs per element or per
  tensor is chosen with ``where``).

Called on torch tensors, the function *is* the reference backend. For the other backends the engine
specialises it: every ``if`` is decided from the group's flags and hyper-parameters, which leaves a
straight-line program (:class:`Program`, one per outcome, cached). The program is split into

- host work in float64: sub-expressions made only of scalars (``1 - beta2``, ``lr / bias_correction1``)
  are computed once per group (Python floats) or per tensor (numpy arrays over the tensors' step
  counts), never in the kernel's float32 — ``1 - beta2`` rounded to float32 is 1.3e-5 off;
- kernel work: the statements whose values are tensors, evaluated element by element;
- reductions: each ``norm(x)`` becomes a per-tensor sum of squares computed by a first pass over the
  tensors (float64), summed across processes when the tensors are shards, then handed to the storing
  pass as a per-tensor scalar. The first pass also stores every output that does not depend on a norm
  (LAMB's moments), and the second pass reads those back instead of recomputing them.
"""

from __future__ import annotations

import ast
import hashlib
import inspect
import textwrap
from typing import Any, Callable

from .language import PER_TENSOR, RESERVED, VOCABULARY, Flag, PerTensor, RuleError
from .program import Program

_BINOPS = (ast.Add, ast.Sub, ast.Mult, ast.Div, ast.Pow, ast.BitAnd, ast.BitOr)
_UNARY = (ast.USub, ast.UAdd, ast.Not)
_COMPARE = (ast.Lt, ast.LtE, ast.Gt, ast.GtE, ast.Eq, ast.NotEq)


class Rule:
    """An optimizer's elementwise update (see the module docstring); build one with :func:`rule`."""

    def __init__(self, fn: Callable[..., Any]) -> None:
        self.fn = fn
        self.name = fn.__name__
        lines, first_line = inspect.getsourcelines(fn)
        self.source = textwrap.dedent("".join(lines))
        self.filename = inspect.getsourcefile(fn) or "<rule>"
        self._offset = first_line - 1
        tree = ast.parse(self.source)
        function = tree.body[0]
        if not isinstance(function, ast.FunctionDef):
            raise RuleError(f"a rule must be a plain function, got {type(function).__name__}")
        function.decorator_list = []
        self._function = function
        args = function.args
        if args.vararg or args.kwarg or args.defaults or any(d is not None for d in args.kw_defaults):
            raise self._error(function, "a rule takes roles and keyword-only scalars, without defaults, *args or **kwargs")
        self.roles = tuple(a.arg for a in args.posonlyargs + args.args)
        for argument in args.posonlyargs + args.args + args.kwonlyargs:
            self._check_name(argument, argument.arg)
        if len(self.roles) < 2:
            raise self._error(function, "a rule's first two parameters are the parameter and its gradient")
        self.flags = tuple(a.arg for a in args.kwonlyargs if _is_annotated(a.annotation, "Flag"))
        # per-tensor inputs: what the engine provides (step, first), then what the optimizer supplies
        self.supplied = tuple(a.arg for a in args.kwonlyargs if _is_annotated(a.annotation, "PerTensor")
                              and a.arg not in PER_TENSOR)
        self.per_tensor = tuple(a.arg for a in args.kwonlyargs if a.arg in PER_TENSOR) + self.supplied
        self.scalars = tuple(a.arg for a in args.kwonlyargs if a.arg not in self.per_tensor)
        self.inputs = tuple(a.arg for a in args.kwonlyargs)
        self.state_roles = self.roles[2:]
        # the state roles every combination of options uses (assigned outside any `if`): a state that has some
        # of the optimizer's entries but lacks one of these is another optimizer's, or damaged
        top_level = {s.targets[0].id for s in function.body if isinstance(s, ast.Assign) and len(s.targets) == 1
                     and isinstance(s.targets[0], ast.Name)}  # (other forms are refused by _check_body)
        top_level |= {s.target.id for s in function.body if isinstance(s, ast.AugAssign) and isinstance(s.target, ast.Name)}
        self.core_roles = tuple(role for role in self.state_roles if role in top_level)
        self._conditions: list[ast.expr] = []
        self._check_body(function.body)
        self._condition_fn = self._compile_conditions()
        self._programs: dict[tuple[bool, ...], Program] = {}
        self.digest = hashlib.sha256(self.source.encode()).hexdigest()[:16]

    def __repr__(self) -> str:
        return f"<rule {self.name}{self.roles}>"

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.fn(*args, **kwargs)

    # -- what a group's scalars make of it ------------------------------------------------------

    def key(self, scalars: dict[str, Any]) -> tuple[bool, ...]:
        """The outcome of every ``if`` of the rule for these flags and hyper-parameters."""
        return self._condition_fn(*(scalars[name] for name in self.scalars))

    def program(self, scalars: dict[str, Any]) -> Program:
        """The straight-line program of this rule for a group's flags and hyper-parameters (cached)."""
        key = self._condition_fn(*(scalars[name] for name in self.scalars))
        program = self._programs.get(key)
        if program is None:
            program = self._programs[key] = Program(self, key)
        return program

    # -- checks -----------------------------------------------------------------------------------

    def _error(self, node: ast.AST, message: str) -> RuleError:
        line = getattr(node, "lineno", 1) + self._offset
        return RuleError(f'rule {self.__dict__.get("name", "?")} ({self.filename}, line {line}): {message}')

    def _check_body(self, body: list[ast.stmt]) -> None:
        statements = [s for s in body if not (isinstance(s, ast.Expr) and isinstance(s.value, ast.Constant))]
        if not statements or not isinstance(statements[-1], ast.Return):
            raise self._error(self._function, "a rule ends with `return` and the new value of each role but the gradient")
        self._check_block(statements[:-1])
        result = statements[-1].value
        values = result.elts if isinstance(result, ast.Tuple) else [result]
        if len(values) != len(self.roles) - 1:
            expected = ", ".join((self.roles[0],) + self.roles[2:])
            raise self._error(statements[-1], f"return {len(self.roles) - 1} values ({expected}), got {len(values)}")
        for value in values:
            self._check_expr(value)

    def _check_block(self, statements: list[ast.stmt]) -> None:
        for statement in statements:
            if isinstance(statement, ast.Expr) and isinstance(statement.value, ast.Constant):
                continue  # a docstring or comment-like string
            if isinstance(statement, ast.Pass):
                continue
            if isinstance(statement, ast.Assign):
                if len(statement.targets) != 1 or not isinstance(statement.targets[0], ast.Name):
                    raise self._error(statement, "assign one name at a time (`m = ...`)")
                self._check_target(statement.targets[0])
                self._check_expr(statement.value)
            elif isinstance(statement, ast.AugAssign):
                if not isinstance(statement.target, ast.Name) or not isinstance(statement.op, _BINOPS):
                    raise self._error(statement, "augmented assignment must be `name op= expression`")
                self._check_target(statement.target)
                self._check_expr(statement.value)
            elif isinstance(statement, ast.If):
                self._check_condition(statement.test)
                self._conditions.append(statement.test)
                self._check_block(statement.body)
                self._check_block(statement.orelse)
            elif isinstance(statement, ast.Return):
                raise self._error(statement, "`return` only as the rule's last statement")
            else:
                raise self._error(statement, f"{type(statement).__name__} statements are not part of the rule language")

    def _check_target(self, target: ast.Name) -> None:
        if target.id in self.inputs or target.id in VOCABULARY:
            raise self._error(target, f"`{target.id}` is a scalar input or a vocabulary function and cannot be reassigned")
        self._check_name(target, target.id)

    def _check_name(self, node: ast.AST, name: str) -> None:
        if name.startswith("_") or name in RESERVED or name in VOCABULARY:
            raise self._error(node, f"`{name}` is a name the generated code uses: rename it (names beginning with `_` "
                                    "and the engine's helpers are reserved)")

    def _check_expr(self, node: ast.expr) -> None:
        for child in ast.walk(node):
            if isinstance(child, ast.Call):
                if not isinstance(child.func, ast.Name) or child.func.id not in VOCABULARY or child.keywords:
                    raise self._error(child, f"calls are limited to {', '.join(VOCABULARY)} with positional arguments")
            elif isinstance(child, ast.BinOp):
                if not isinstance(child.op, _BINOPS):
                    raise self._error(child, f"operator {type(child.op).__name__} is not part of the rule language")
            elif isinstance(child, ast.UnaryOp):
                if not isinstance(child.op, _UNARY):
                    raise self._error(child, f"operator {type(child.op).__name__} is not part of the rule language")
            elif isinstance(child, ast.Compare):
                if len(child.ops) != 1 or not isinstance(child.ops[0], _COMPARE):
                    raise self._error(child, "compare two values at a time (`a < b`)")
            elif isinstance(child, ast.Constant):
                if not isinstance(child.value, (int, float)):
                    raise self._error(child, f"constant {child.value!r}: only numbers")
            elif not isinstance(child, (ast.Name, ast.Load, ast.BoolOp, ast.And, ast.Or, ast.Tuple, *_BINOPS,
                                        *_UNARY, *_COMPARE)):
                raise self._error(child, f"{type(child).__name__} is not part of the rule language")

    def _check_condition(self, test: ast.expr) -> None:
        self._check_expr(test)
        for child in ast.walk(test):
            if isinstance(child, ast.Name) and child.id not in self.scalars:
                raise self._error(test, f"`if` may test flags and hyper-parameters only, not `{child.id}` "
                                        "(choose per element or per tensor with where())")
            if isinstance(child, ast.Call):
                raise self._error(test, "`if` may test flags and hyper-parameters only, without calls")

    def _compile_conditions(self) -> Callable[..., tuple[bool, ...]]:
        tests = ", ".join(f"bool({ast.unparse(test)})" for test in self._conditions)
        source = f"def conditions({', '.join(self.scalars)}):\n    return ({tests}{',' if self._conditions else ''})\n"
        namespace: dict[str, Any] = {}
        exec(compile(source, f"<conditions of rule {self.name}>", "exec"), namespace)  # noqa: S102
        return namespace["conditions"]

    # -- specialisation ---------------------------------------------------------------------------

    def straight_line(self, key: tuple[bool, ...]) -> tuple[list[tuple[str, ast.expr, int]], list[ast.expr]]:
        """The rule's statements with every ``if`` decided by ``key``: ``(assignments, returned values)``."""
        outcomes = dict(zip(map(id, self._conditions), key))
        assignments: list[tuple[str, ast.expr, int]] = []

        def walk(statements: list[ast.stmt]) -> None:
            for statement in statements:
                if isinstance(statement, ast.Assign):
                    assignments.append((statement.targets[0].id, statement.value, statement.lineno + self._offset))
                elif isinstance(statement, ast.AugAssign):
                    name = statement.target.id
                    value = ast.BinOp(ast.Name(name, ast.Load()), statement.op, statement.value)
                    ast.copy_location(value, statement)
                    assignments.append((name, value, statement.lineno + self._offset))
                elif isinstance(statement, ast.If):
                    walk(statement.body if outcomes[id(statement.test)] else statement.orelse)

        statements = [s for s in self._function.body if not isinstance(s, ast.Return)]
        walk(statements)
        result = self._function.body[-1].value
        return assignments, (list(result.elts) if isinstance(result, ast.Tuple) else [result])


def rule(fn: Callable[..., Any]) -> Rule:
    """Decorator: ``fn`` is an optimizer's elementwise rule (see :mod:`thalweg.engine.rules`)."""
    return Rule(fn)


def _is_annotated(annotation: ast.expr | None, name: str) -> bool:
    if annotation is None:
        return False
    text = annotation.value if isinstance(annotation, ast.Constant) else ast.unparse(annotation)
    return str(text).rsplit(".", 1)[-1] == name


__all__ = ["Flag", "PerTensor", "Rule", "RuleError", "rule"]
