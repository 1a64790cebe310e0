"""The foreach backend: a rule's program as Python over :class:`~.vocabulary.TensorList` values.

Each pass of the program becomes a generated Python function whose every operation is one
``torch._foreach_*`` call over all tensors of a (dtype, state dtype) bucket; outputs are copied into their
roles with one ``torch._foreach_copy_`` each, and a reduction pass returns each tensor's sum of squares
(``torch._foreach_norm`` in float64). The same functions serve as the fused backend's fallback for the
tensors a kernel cannot take, so every tensor gets the program's math either way.
"""

from __future__ import annotations

import threading

import torch

from . import generated, torchops, vocabulary
from .codegen import header
from .program import Program
from .vocabulary import TensorList

_LOCK = threading.Lock()
_FUNCTIONS: dict[tuple[str, int], object] = {}


def source(program: Program) -> str:
    """The generated module: one function per pass, ``pass<k>(roles..., hp, columns, sums)``."""
    lines = [header(program, "foreach"),
             "from thalweg.engine.lists import store, sum_of_squares",
             "from thalweg.engine.vocabulary import *  # noqa: F403 (the vocabulary, out of place and in place)", ""]
    roles = list(program.rule.roles[:2]) + program.state_roles
    columns = program.columns + program.late_columns
    slots = {k: j for j, k in enumerate(program.slots)}
    for index, kernel_pass in enumerate(program.passes):
        lines.append(f"def pass{index}({', '.join(roles)}, _hp, _columns, _sums):")
        for name in kernel_pass.scalars:
            source_ = f"_hp[{program.hp.index(name)}]" if name in program.hp else f"_columns[{columns.index(name)}]"
            lines.append(f"    {name} = {source_}")
        inputs = {role: role for role in roles}
        for var, role in kernel_pass.loads:
            if var != role:  # the last pass reads back what the first one stored
                lines.append(f"    {var} = {role}")
                inputs[var] = role

        def after(var: str, kernel_pass=kernel_pass) -> list[str]:
            if var in kernel_pass.reductions:
                return [f"_sums[:, {slots[kernel_pass.reductions[var]]}] = sum_of_squares({var})"]
            return []

        for var, _ in kernel_pass.loads:
            lines += [f"    {line}" for line in after(var)]
        lines += [f"    {line}" for line in torchops.lower(
            program, kernel_pass.body, inputs=inputs, writable=set(kernel_pass.roles_written),
            finals=set(kernel_pass.stores), read_at_end=[], after=after, stores=kernel_pass.stores,
            store_line=lambda role, var: f"store({role}, {var})",
            clone_line=lambda new, var: f"{new} = TensorList([_t.clone() for _t in {var}.tensors])")]
        lines += ["    return None", "", ""]
    return "\n".join(lines)


def functions(program: Program) -> list:
    """The program's pass functions (generated once per program)."""
    key = (program.digest, 0)
    found = _FUNCTIONS.get(key)
    if found is None:
        with _LOCK:
            module = generated.module(f"foreach_{program.rule.name}", source(program))
            found = _FUNCTIONS[key] = [getattr(module, f"pass{k}") for k in range(len(program.passes))]
    return found


def store(role: TensorList, value: TensorList) -> None:
    """Copy a pass's value into its role's tensors (nothing to do when the role itself is the value)."""
    if value is role or value.tensors is role.tensors:
        return
    torch._foreach_copy_(role.tensors, value.tensors)


def sum_of_squares(value: TensorList) -> torch.Tensor:
    """Each tensor's sum of squares in float64 (a 1-d tensor on the tensors' device)."""
    if not value.tensors:
        return torch.zeros(0, dtype=torch.float64)
    return torch.stack(torch._foreach_norm(value.tensors, 2, dtype=torch.float64)).square()


__all__ = ["functions", "source", "store", "sum_of_squares", "vocabulary"]
