"""A rule specialised for one param group: straight-line SSA, host values, reductions and kernel passes.

:meth:`.rules.Rule.program` builds one :class:`Program` per outcome of the rule's ``if`` tests. The
program is what every derived backend renders: its host statements (float64, per group and per tensor),
its ``norm()`` terms, and one or two :class:`Pass` es of kernel statements with their loads and stores.
"""

from __future__ import annotations

import ast
import copy
import hashlib
from dataclasses import dataclass
from typing import Any

from . import vocabulary
from .language import CONST, EARLY, GROUP, LATE, TENSOR, VOCABULARY, RuleError


@dataclass
class Stmt:
    """``target = expr`` in SSA form (every name assigned once), with the kind of its value."""

    target: str
    expr: ast.expr
    kind: int
    line: int  # line in the rule's source file


@dataclass
class Pass:
    """One kernel pass over every element of every tensor of a bucket.

    ``loads``: (variable, role) read from memory at the top of each element; ``body``: statements in
    order; ``stores``: variable -> roles it is stored to, right after its definition (or its load);
    ``reductions``: variable -> slot of the per-tensor sum of its squares; ``kept``: stored variables
    read again later in the pass (a backend rounds them to the role's storage dtype first, as the
    reference reads back its bfloat16 state).
    """

    loads: list[tuple[str, str]]
    body: list[Stmt]
    stores: dict[str, list[str]]
    reductions: dict[str, int]
    kept: set[str]
    scalars: list[str]  # host variables the pass reads (hp, early and late columns)

    @property
    def roles_read(self) -> list[str]:
        return [role for _, role in self.loads]

    @property
    def roles_written(self) -> list[str]:
        return [role for roles in self.stores.values() for role in roles]


class Program:
    """A rule specialised for one outcome of its ``if`` tests: straight-line SSA statements, split into
    host work (float64, per group and per tensor), reductions and one or two kernel passes."""

    def __init__(self, rule_: Any, key: tuple[bool, ...], *, early_stores: bool = True) -> None:
        # (rule_: a rules.Rule, which imports this module)
        self.rule = rule_
        self.key = key
        # whether a program with norms stores, in its first pass, the outputs that do not depend on a norm (LAMB's
        # moments, read back by the last pass); without, the first pass only sums and the last computes everything
        # again (8-bit state: the last pass must step from the moments' float values, not from their codes)
        self.early_stores = early_stores
        self._recomputing: Program | None = None
        self._fresh: dict[str, int] = {}
        self.kinds: dict[str, int] = {}
        for role in rule_.roles:
            self.kinds[role] = TENSOR
        for name in rule_.scalars:
            self.kinds[name] = GROUP
        for name in rule_.per_tensor:
            self.kinds[name] = EARLY
        self.reductions: list[str] = []  # slot k: the kernel variable whose squares are summed
        assignments, returned = rule_.straight_line(key)
        statements, outputs = self._ssa(assignments, returned)
        self.outputs = outputs  # role -> final variable (the role's own name when unchanged)
        # the straight-line program as written (norm() calls in place): what the reference backend runs
        self.statements = [Stmt(s.target, copy.deepcopy(s.expr), s.kind, s.line) for s in statements]
        self._build(self._extract_norms(statements))
        self.digest = hashlib.sha256(
            (rule_.digest + repr(key) + self.describe()).encode()).hexdigest()[:16]

    def recomputing(self) -> Program:
        """This program with a first pass that only sums its norms (see ``early_stores``; itself without norms)."""
        if len(self.passes) == 1 or not self.early_stores:
            return self
        if self._recomputing is None:
            self._recomputing = Program(self.rule, self.key, early_stores=False)
        return self._recomputing

    # -- SSA ----------------------------------------------------------------------------------------

    def _new_name(self, name: str) -> str:
        count = self._fresh.get(name, 0) + 1
        self._fresh[name] = count
        return f"{name}__{count}"

    def _ssa(self, assignments, returned):
        rule_ = self.rule
        env = {name: name for name in rule_.roles + rule_.inputs}
        statements: list[Stmt] = []

        def rename(node: ast.expr, line: int) -> ast.expr:
            node = copy.deepcopy(node)

            class Renamer(ast.NodeTransformer):
                def visit_Name(inner, name: ast.Name) -> ast.expr:  # noqa: N805
                    if name.id in VOCABULARY:
                        return name
                    if name.id not in env:
                        raise RuleError(f"rule {rule_.name} ({rule_.filename}, line {line}): `{name.id}` is used before "
                                        "it is assigned (in this combination of flags)")
                    return ast.Name(env[name.id], ast.Load())

                def visit_Call(inner, call: ast.Call) -> ast.expr:  # noqa: N805
                    inner.generic_visit(call)
                    if call.func.id == "norm" and (len(call.args) != 1 or self._kind(call.args[0]) != TENSOR):
                        raise RuleError(f"rule {rule_.name} ({rule_.filename}, line {line}): norm() takes one tensor")
                    if (call.func.id == "where" and len(call.args) == 3 and self._kind(call.args[0]) == TENSOR
                            and TENSOR not in (self._kind(call.args[1]), self._kind(call.args[2]))):
                        # torch.where(mask, 1.2, 0.5) is a tensor of torch's default dtype, not the parameter's
                        raise RuleError(f"rule {rule_.name} ({rule_.filename}, line {line}): where() with a per-element "
                                        "condition needs a tensor on one side (write where(c, x * a, x * b), not "
                                        "x * where(c, a, b))")
                    return call

                def visit_BinOp(inner, binop: ast.BinOp) -> ast.expr:  # noqa: N805
                    inner.generic_visit(binop)
                    if isinstance(binop.op, ast.Pow) and self._kind(binop.left) == TENSOR:
                        exponent = binop.right
                        if not (isinstance(exponent, ast.Constant) and exponent.value == 2):
                            raise RuleError(f"rule {rule_.name} ({rule_.filename}, line {line}): a tensor may only be "
                                            "squared (`x ** 2`); write other powers with the vocabulary")
                        return ast.Call(ast.Name("_square", ast.Load()), [binop.left], [])
                    return binop

            return Renamer().visit(node)

        for name, value, line in assignments:
            expr = rename(value, line)
            target = self._new_name(name)
            env[name] = target
            kind = self._kind(expr)
            self.kinds[target] = kind
            statements.append(Stmt(target, expr, kind, line))

        outputs: dict[str, str] = {}
        written_roles = (rule_.roles[0],) + rule_.roles[2:]
        last_line = assignments[-1][2] if assignments else 0
        for role, value in zip(written_roles, returned):
            expr = rename(value, last_line)
            if isinstance(expr, ast.Name):
                outputs[role] = expr.id
            else:
                target = self._new_name(f"{role}_out")
                self.kinds[target] = self._kind(expr)
                statements.append(Stmt(target, expr, self.kinds[target], last_line))
                outputs[role] = target
            if self.kinds[outputs[role]] != TENSOR:
                raise RuleError(f"rule {rule_.name} ({rule_.filename}, line {last_line}): the new value of {role} must "
                                "be a tensor expression")
        return statements, outputs

    def _extract_norms(self, statements: list[Stmt]) -> list[Stmt]:
        """Each ``norm(x)`` becomes a kernel statement ``_term<k> = x`` (whose squares a first pass sums per
        tensor) and a per-tensor value ``_norm<k>`` the host computes from the sum."""
        out: list[Stmt] = []
        program = self

        class Extract(ast.NodeTransformer):
            def visit_Call(inner, call: ast.Call) -> ast.expr:  # noqa: N805
                inner.generic_visit(call)
                if call.func.id != "norm":
                    return call
                slot = len(program.reductions)
                term, result = f"_term{slot}", f"_norm{slot}"
                program.kinds[term] = TENSOR
                program.kinds[result] = LATE
                program.reductions.append(term)
                out.append(Stmt(term, call.args[0], TENSOR, line))
                return ast.Name(result, ast.Load())

        for statement in statements:
            line = statement.line
            expr = Extract().visit(copy.deepcopy(statement.expr))
            kind = self._kind(expr)
            self.kinds[statement.target] = kind
            out.append(Stmt(statement.target, expr, kind, line))
        return out

    def _kind(self, node: ast.expr) -> int:
        if isinstance(node, ast.Constant):
            return CONST
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "norm":
            return LATE
        if isinstance(node, ast.Name):
            return self.kinds.get(node.id, CONST)
        children = [c for c in ast.iter_child_nodes(node) if isinstance(c, ast.expr) and not (
            isinstance(node, ast.Call) and c is node.func)]
        return max((self._kind(c) for c in children), default=CONST)

    # -- host / kernel split, hoisting, passes ------------------------------------------------------

    def _build(self, statements: list[Stmt]) -> None:
        hoisted: list[Stmt] = []
        constants: dict[tuple[type, Any], str] = {}

        def hoist(node: ast.expr, line: int) -> ast.expr:
            """Replace every maximal scalar sub-expression of a tensor expression by a host variable."""
            kind = self._kind(node)
            if kind != TENSOR:
                if isinstance(node, ast.Name):
                    return node
                if isinstance(node, ast.Constant):
                    key = (type(node.value), node.value)
                    if key not in constants:
                        constants[key] = f"_c{len(constants)}"
                        self.kinds[constants[key]] = GROUP
                        hoisted.append(Stmt(constants[key], node, GROUP, line))
                    return ast.Name(constants[key], ast.Load())
                name = f"_h{len(hoisted)}"
                self.kinds[name] = kind
                hoisted.append(Stmt(name, node, kind, line))
                return ast.Name(name, ast.Load())
            for field_name, value in ast.iter_fields(node):
                if isinstance(value, ast.expr) and not (isinstance(node, ast.Call) and field_name == "func"):
                    setattr(node, field_name, hoist(value, line))
                elif isinstance(value, list):
                    setattr(node, field_name, [hoist(v, line) if isinstance(v, ast.expr) else v for v in value])
            return node

        kernel: list[Stmt] = []
        host: list[Stmt] = []
        for statement in statements:
            if statement.kind == TENSOR:
                statement.expr = hoist(statement.expr, statement.line)
                kernel.append(statement)
            else:
                host.append(statement)
        host += hoisted
        definitions = {s.target: s for s in kernel + host}

        def needs(roots: list[str], stop: set[str] = frozenset()) -> set[str]:
            """Variables the roots depend on (themselves included), not looking through ``stop``."""
            seen: set[str] = set()
            todo = list(roots)
            while todo:
                name = todo.pop()
                if name in seen:
                    continue
                seen.add(name)
                if name in stop or name not in definitions:
                    continue
                todo.extend(_names(definitions[name].expr))
            return seen

        changed = {role: var for role, var in self.outputs.items() if var != role}
        live = needs(list(changed.values()))
        slots = [k for k, term in enumerate(self.reductions) if f"_norm{k}" in live]
        late = {name for name in live if self.kinds.get(name) == LATE}
        # a kernel variable is late when it depends on a norm: it can only be computed in the last pass
        late_kernel = {s.target for s in kernel if needs([s.target]) & late}

        if not slots:
            passes = [self._pass(kernel, needs(list(changed.values())), changed, reloads={})]
        else:
            early_out = {role: var for role, var in changed.items() if var not in late_kernel and self.early_stores}
            while True:
                reloads = {var: role for role, var in early_out.items()}
                last = needs([changed[r] for r in changed if r not in early_out], stop=set(reloads))
                clash = [role for role in early_out if role in last]  # the last pass reads its old value
                if not clash:
                    break
                for role in clash:
                    del early_out[role]
            first_roots = [self.reductions[k] for k in slots] + list(early_out.values())
            first = self._pass(kernel, needs(first_roots), early_out, reloads={},
                               reductions={self.reductions[k]: k for k in slots})
            late_out = {role: var for role, var in changed.items() if role not in early_out}
            second = self._pass(kernel, last, late_out, reloads=reloads)
            passes = [first, second]
        self.passes = passes
        self.slots = slots

        # host statements each stage needs, in program order
        scalars_used = {name for p in passes for name in p.scalars}
        host_live = needs(list(scalars_used))
        self.group = [s for s in host if s.target in host_live and s.kind in (CONST, GROUP)]
        self.early = [s for s in host if s.target in host_live and s.kind == EARLY]
        self.late = [s for s in host if s.target in host_live and s.kind == LATE]
        group_inputs = [n for n in self.rule.scalars if n in host_live]
        self.group_vars = group_inputs + [s.target for s in self.group]
        self.early_vars = [n for n in self.rule.per_tensor if n in host_live] + [s.target for s in self.early]
        self.late_vars = [f"_norm{k}" for k in slots] + [s.target for s in self.late]
        self.hp = [n for n in self.group_vars if n in scalars_used]
        self.columns = [n for n in self.early_vars if n in scalars_used]
        self.late_columns = [n for n in self.late_vars if n in scalars_used]
        self.uses_step = "step" in host_live
        self.uses_first = "first" in host_live
        read = {role for p in passes for role in p.roles_read}
        self.roles_written = [role for role in self.outputs if role in changed]
        self.state_roles = [r for r in self.rule.state_roles if r in read or r in changed]
        self.reads_grad = self.rule.roles[1] in read
        self._host_fns = _host_functions(self)

    def _pass(self, kernel: list[Stmt], live: set[str], stores: dict[str, str], *, reloads: dict[str, str],
              reductions: dict[str, int] | None = None) -> Pass:
        roles = self.rule.roles
        body = [s for s in kernel if s.target in live and s.target not in reloads]
        loads = [(role, role) for role in roles if role in live]
        loads += [(var, role) for var, role in reloads.items() if var in live]
        store_map: dict[str, list[str]] = {}
        for role, var in stores.items():
            store_map.setdefault(var, []).append(role)
        used_later: set[str] = set()
        defined_at = {s.target: i for i, s in enumerate(body)}
        for i, statement in enumerate(body):
            for name in _names(statement.expr):
                if name in store_map and defined_at.get(name, -1) < i:
                    used_later.add(name)
        scalars = sorted({n for s in body for n in _names(s.expr) if self.kinds.get(n) in (CONST, GROUP, EARLY, LATE)},
                         key=lambda n: (self.kinds[n], n))
        return Pass(loads, body, store_map, dict(reductions or {}), used_later, scalars)

    # -- host values --------------------------------------------------------------------------------

    def group_values(self, scalars: dict[str, Any]) -> tuple:
        """Every group-level host variable, computed with Python floats (float64), in ``group_vars`` order."""
        return self._host_fns[0](*(scalars[n] for n in self.rule.scalars))

    def early_values(self, group: tuple, step: Any, first: Any, supplied: tuple = ()) -> tuple:
        """Per-tensor host variables before any norm (``early_vars`` order): ``step``/``first`` and the
        optimizer's ``supplied`` values (``rule.supplied`` order) are numpy arrays (one entry per tensor)
        or, for one tensor, numbers."""
        return self._host_fns[1](step, first, *supplied, *group)

    def late_values(self, group: tuple, early: tuple, sums: list[Any]) -> tuple:
        """Per-tensor host variables that depend on norms (``late_vars`` order), from each used slot's sum of
        squares (``slots`` order)."""
        return self._host_fns[2](*sums, *early, *group)

    # -- inspection ---------------------------------------------------------------------------------

    def describe(self) -> str:
        """The program as text: host statements per stage, then each pass (what ``engine.show`` prints first)."""
        lines = [f"# rule {self.rule.name}, if-outcomes {self.key}"]
        for title, statements in (("per group (float64)", getattr(self, "group", [])),
                                  ("per tensor (float64)", getattr(self, "early", [])),
                                  ("per tensor, after the norms (float64)", getattr(self, "late", []))):
            if statements:
                lines.append(f"# {title}:")
                lines += [f"{s.target} = {ast.unparse(s.expr)}" for s in statements]
        for index, kernel_pass in enumerate(getattr(self, "passes", [])):
            lines.append(f"# pass {index + 1} of {len(self.passes)}: loads {kernel_pass.loads}")
            for statement in kernel_pass.body:
                line = f"{statement.target} = {ast.unparse(statement.expr)}"
                if statement.target in kernel_pass.stores:
                    line += f"    # store -> {', '.join(kernel_pass.stores[statement.target])}"
                if statement.target in kernel_pass.reductions:
                    line += f"    # sum of squares -> slot {kernel_pass.reductions[statement.target]}"
                lines.append(line)
            for var, _ in kernel_pass.loads:
                if var in kernel_pass.stores:
                    lines.append(f"# store {var} -> {', '.join(kernel_pass.stores[var])}")
        return "\n".join(lines)


def _names(node: ast.expr) -> list[str]:
    return [n.id for n in ast.walk(node) if isinstance(n, ast.Name) and n.id not in VOCABULARY and n.id != "_square"]


def _host_functions(program: Program):
    """Compile the three host stages of ``program`` into Python functions over floats or numpy arrays."""

    def function(name: str, args: list[str], lines: list[str], results: list[str]) -> str:
        body = "".join(f"    {line}\n" for line in lines)
        return f"def {name}({', '.join(args)}):\n{body}    return ({', '.join(results)}{',' if results else ''})\n"

    unparse = lambda s: f"{s.target} = {ast.unparse(s.expr)}"  # noqa: E731
    sums = [f"_sq{k}" for k in program.slots]
    source = "\n".join([
        function("group", list(program.rule.scalars), [unparse(s) for s in program.group], program.group_vars),
        function("early", ["step", "first", *program.rule.supplied] + program.group_vars, [unparse(s) for s in program.early],
                 program.early_vars),
        function("late", sums + program.early_vars + program.group_vars,
                 [f"_norm{k} = sqrt(_sq{k})" for k in program.slots] + [unparse(s) for s in program.late],
                 program.late_vars),
    ])
    namespace: dict[str, Any] = {name: getattr(vocabulary, name) for name in VOCABULARY}
    exec(compile(source, f"<host stages of rule {program.rule.name} {program.key}>", "exec"), namespace)  # noqa: S102
    return namespace["group"], namespace["early"], namespace["late"]
