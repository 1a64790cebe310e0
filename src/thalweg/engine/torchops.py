"""A program as torch ops, the way torch.optim writes them: the reference and foreach backends' code.

Two things make a chain of torch ops round exactly as torch.optim's for-loop and foreach paths do, which
matters for bfloat16 and float16 tensors (each op rounds its result):

- **compound ops**: a product or quotient added to a tensor is one ``addcmul``/``addcdiv``, a scaled
  tensor added is one ``add(alpha=)`` (float32 math inside, one rounding), see :func:`_compound`;
- **in place where torch is**: ``exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)`` updates
  the state tensor in place, and torch's in-place foreach ops do not round like their out-of-place twins
  (``torch._foreach_mul_`` rounds a Python scalar to the tensor's dtype first). A statement is lowered to a
  chain of in-place ops on its first operand whenever that operand's memory is dead afterwards — a
  temporary, or a role this code writes and does not read again — and the chain's innermost op makes the
  temporary otherwise (``(v.sqrt() / c).add_(eps)``). That is torch's own style, and it allocates less.

The same statements serve the reference (one tensor: values are torch tensors, scalars Python floats)
and foreach (TensorLists: each op is one ``torch._foreach_*`` call); :mod:`.vocabulary` dispatches.
"""

from __future__ import annotations

import ast
import copy

from .codegen import TorchOps, _compound, render
from .language import TENSOR
from .program import Program, Stmt

_DIALECT = TorchOps()
_IN_PLACE_COMPOUND = {"add": "add_alpha_", "addcmul": "addcmul_", "addcdiv": "addcdiv_"}
_IN_PLACE_CALLS = {"lerp": "lerp_", "maximum": "maximum_", "minimum": "minimum_", "sqrt": "sqrt_", "abs": "abs_",
                   "sign": "sign_"}


def _chain(program: Program, node: ast.expr) -> list[tuple[str, ast.expr, list, ast.expr | None]]:
    """The ops from ``node`` inwards along their first operand: ``[(in-place op, node, other operands, base)]``,
    the last base a Name (or None: the chain ends in an op without an in-place form)."""
    tensor = lambda n: program._kind(n) == TENSOR  # noqa: E731
    links = []
    while True:
        if isinstance(node, ast.BinOp) and tensor(node):
            if isinstance(node.op, (ast.Add, ast.Sub)):
                found = None
                for base, term in ((node.left, node.right),) + (((node.right, node.left),) if isinstance(node.op, ast.Add) else ()):
                    if tensor(base):
                        compound = _compound(program, term)
                        if compound is not None:
                            found = (base, compound)
                            break
                if found is not None:
                    base, (op, scale, operands) = found
                    negate = isinstance(node.op, ast.Sub)
                    links.append((_IN_PLACE_COMPOUND[op], node, [*operands, ("scale", scale, negate)], base))
                    node = base
                    continue
            ops = {ast.Add: "add_", ast.Sub: "sub_", ast.Mult: "mul_", ast.Div: "div_"}
            op = ops.get(type(node.op))
            if op is None:
                break
            if tensor(node.left):
                links.append((op, node, [node.right], node.left))
                node = node.left
                continue
            if isinstance(node.op, (ast.Add, ast.Mult)) and tensor(node.right):  # exact: + and * commute
                links.append((op, node, [node.left], node.right))
                node = node.right
                continue
            break
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub) and tensor(node.operand):
            links.append(("neg_", node, [], node.operand))
            node = node.operand
            continue
        if isinstance(node, ast.Call) and node.func.id in _IN_PLACE_CALLS and node.args and tensor(node.args[0]):
            links.append((_IN_PLACE_CALLS[node.func.id], node, node.args[1:], node.args[0]))
            node = node.args[0]
            continue
        break
    return links


def lower(program: Program, statements: list[Stmt], *, inputs: dict[str, str], writable: set[str],
          read_at_end: list[str], finals: set[str], after, stores: dict[str, list[str]] | None = None,
          store_line=None, clone_line=None) -> list[str]:
    """Python lines for ``statements`` (tensor statements as torch ops; the others as written).

    ``inputs``: variables holding the roles' tensors on entry (variable -> role); ``writable``: roles whose
    tensors this code may overwrite (the ones it writes); ``finals``: variables holding a role's new value
    (their memory is never overwritten afterwards); ``after(var)``: the lines that follow the definition of
    ``var`` (its sum of squares); ``read_at_end``: variables read after the last statement.

    ``stores``: variable -> roles its value is copied into (``store_line(role, var)`` writes one copy). A
    copy into a role's tensor is written as soon as the variable is defined, unless another variable that
    still has to be read may be that very tensor (a ``where()`` with a per-tensor condition returns the
    argument it picks: ``z = where(first, param, z)`` is ``param``'s tensor on a first step): the copy then
    waits until those reads are done. Copies still waiting at the end go in an order in which none
    overwrites a tensor another one has yet to read (``clone_line(new, var)`` breaks a cycle).
    """
    reads: dict[str, list[int]] = {}
    for index, statement in enumerate(statements):
        for name in _names(statement.expr):
            reads.setdefault(name, []).append(index)
    for name in read_at_end:
        reads.setdefault(name, []).append(len(statements))
    # the tensor objects a variable may live in: one, except for a where() result, which may be any of its
    # tensor arguments (with a per-tensor condition, where() returns the argument it picks)
    memory: dict[str, frozenset[str]] = {var: frozenset([f"role:{role}"]) for var, role in inputs.items()}
    frozen: set[str] = set()
    lines: list[str] = []
    counter = [0]

    def dead_after(objs: frozenset[str], index: int) -> bool:
        return not any(j > index for var, o in memory.items() if o & objs for j in reads.get(var, ()))

    def may_overwrite(name: str, index: int, operands: list) -> bool:
        objs = memory.get(name)
        if objs is None or len(objs) != 1 or objs & frozen:
            return False
        (obj,) = objs
        if obj.startswith("role:") and obj[5:] not in writable:
            return False
        # the chain's other operands are read while it runs: none may live in the object it updates
        inside = set()
        for o in operands:
            expr = o[1] if isinstance(o, tuple) else o
            if expr is not None:
                inside.update(_names(expr))
        # nor may the statement read it anywhere else (where(c, x * y, x): x is read after x * y is formed)
        in_statement = sum(1 for n in _names(statements[index].expr) if memory.get(n, frozenset()) & objs)
        return (dead_after(objs, index) and in_statement <= 1
                and not any(memory.get(n, frozenset()) & objs for n in inside))

    def temporary() -> str:
        counter[0] += 1
        return f"_t{counter[0]}"

    def operand(o, index: int, comment: str) -> str:
        if isinstance(o, tuple):  # a compound op's scale
            _, scale, negate = o
            value = "1" if scale is None else render(program, scale, _DIALECT)
            return (f"(-{value})" if scale is not None else "-1") if negate else value
        return emit(o, index, comment)

    def out_of_place(node: ast.expr, index: int, comment: str) -> str:
        """``node`` as one out-of-place op whose tensor operands are emitted first (torch's style)."""
        def operand_var(child):
            if isinstance(child, ast.expr) and not isinstance(child, ast.Name) and program._kind(child) == TENSOR:
                return ast.Name(emit(child, index, comment), ast.Load())
            return child

        node = copy.copy(node)
        for field_name, value in ast.iter_fields(node):
            if isinstance(value, ast.expr) and not (isinstance(node, ast.Call) and field_name == "func"):
                setattr(node, field_name, operand_var(value))
            elif isinstance(value, list):
                setattr(node, field_name, [operand_var(v) for v in value])
        return render(program, node, _DIALECT)

    def emit(node: ast.expr, index: int, comment: str, target: str | None = None) -> str:
        """Lines computing ``node``; returns the variable that holds it."""
        if isinstance(node, ast.Name):
            return node.id
        if program._kind(node) != TENSOR:
            return render(program, node, _DIALECT)
        links = _chain(program, node)
        depth = len(links)
        while depth and not (isinstance(links[depth - 1][3], ast.Name) and may_overwrite(
                links[depth - 1][3].id, index, [o for link in links[:depth] for o in link[2]])):
            depth -= 1
        if depth:
            holder, ops = links[depth - 1][3].id, links[:depth]
        else:
            holder = target or temporary()
            innermost, ops = (links[-1][1], links[:-1]) if links else (node, [])
            lines.append(f"{holder} = {out_of_place(innermost, index, comment)}{comment}")
            memory[holder] = frozenset([f"tmp:{holder}"])
            if isinstance(innermost, ast.Call) and innermost.func.id == "where":
                for argument in innermost.args[1:]:
                    if isinstance(argument, ast.Name) and argument.id in memory:
                        memory[holder] |= memory[argument.id]
        for op, _, operands, _ in reversed(ops):
            args = ", ".join([holder] + [operand(o, index, comment) for o in operands])
            lines.append(f"{op}({args}){comment}")
        return holder

    pending: list[tuple[str, str]] = []  # (role, variable): copies that wait for reads of the role's tensor

    def clobbers(role: str, var: str, index: int) -> bool:
        """Whether copying ``var`` into ``role``'s tensor now would change a value still to be read."""
        obj = f"role:{role}"
        if memory.get(var) == frozenset([obj]):
            return False  # the variable is that tensor: nothing is copied
        if any(obj in memory.get(v, ()) for r, v in pending if (r, v) != (role, var)):
            return True
        return any(obj in o for v, o in memory.items() if v != var and any(j > index for j in reads.get(v, ())))

    def flush(index: int, final: bool = False) -> None:
        progress = True
        while pending and progress:
            progress = False
            for entry in list(pending):
                if not clobbers(*entry, index):
                    pending.remove(entry)
                    lines.append(store_line(*entry))
                    progress = True
        if final and pending:  # copies that would each overwrite what another has yet to read: a cycle
            role, var = pending[0]
            fresh = f"_copy_{var}"
            lines.append(clone_line(fresh, var))
            memory[fresh] = frozenset([f"tmp:{fresh}"])
            pending[0] = (role, fresh)
            flush(index, final=True)

    def store(var: str, index: int) -> None:
        if stores is None:
            return
        pending.extend((role, var) for role in stores.get(var, ()) if memory.get(var) != frozenset([f"role:{role}"]))
        flush(index)

    for var in inputs:
        store(var, -1)
    for index, statement in enumerate(statements):
        target, expr = statement.target, statement.expr
        comment = f"  # line {statement.line}"
        if program.kinds.get(target) != TENSOR:
            lines.append(f"{target} = {ast.unparse(expr)}{comment}")
        elif isinstance(expr, ast.Name):  # an alias: the same object
            lines.append(f"{target} = {expr.id}{comment}")
            memory[target] = memory.get(expr.id, frozenset([f"tmp:{expr.id}"]))
        else:
            holder = emit(expr, index, comment, target=target)
            if holder != target:
                lines.append(f"{target} = {holder}")
                memory[target] = memory[holder]
        lines += after(target)
        if target in finals:
            frozen.update(memory[target])
        store(target, index)
        flush(index)
    flush(len(statements), final=True)
    return lines


def _names(node: ast.expr) -> list[str]:
    return [n.id for n in ast.walk(node) if isinstance(n, ast.Name)]
