"""The reference backend: the rule's straight-line program, one parameter's torch tensors at a time.

The rule's statements, with its ``if`` tests decided for the group, run as written on torch tensors:
hyper-parameters and the tensor's step count are Python floats (float64, as torch.optim computes its
scalars), ``norm()`` is taken on the spot. Each tensor expression is one torch op, and a product or
quotient added to a tensor is one ``addcmul``/``addcdiv``/``add(alpha=)``, as torch.optim's for-loop
writes it, so that even bfloat16 tensors round as there. Results are copied into the parameter and its
state. This is the oracle the derived backends are tested against (and, in float64, itself against the
rule function called directly), and the ``differentiable`` path of later issues: autograd sees torch ops.
"""

from __future__ import annotations

import threading
from typing import Any

import torch

from . import generated, torchops
from .codegen import header
from .program import Program
from .vocabulary import NORM_SUM

_LOCK = threading.Lock()
_FUNCTIONS: dict[str, Any] = {}


def source(program: Program) -> str:
    """The generated module: ``step(roles..., *, inputs...)`` for one tensor, returning the new values of the
    written roles, and ``step_all`` running the same statements over every tensor of a list in one loop
    (no call, no keyword arguments per tensor: torch.optim's for-loop spends about that much around its ops)."""
    rule = program.rule
    written = [program.outputs[role] for role in (rule.roles[0],) + rule.state_roles]
    body = torchops.lower(program, program.statements, inputs={role: role for role in rule.roles},
                          writable=set(program.roles_written), finals=set(written), read_at_end=written,
                          after=lambda var: [])
    lines = [header(program, "reference"),
             "from thalweg.engine.vocabulary import *  # noqa: F403 (the vocabulary, out of place and in place)", "", "",
             f"def step({', '.join(rule.roles)}, *, {', '.join(rule.inputs)}):"]
    lines += [f"    {line}" for line in body]
    lines.append(f"    return ({', '.join(written)},)")
    # the loop: role lists in, each written role's new value copied in unless computed in its own tensor
    lists = [f"{role}_list" for role in rule.roles]
    scalars = [f"{name}_all" if name in rule.supplied else name for name in rule.inputs if name not in ("step", "first")]
    # the loop copies each new value into its tensor as soon as nothing still to be read lives there
    stores: dict[str, list[str]] = {}
    for role, final in zip((rule.roles[0],) + rule.state_roles, written):
        stores.setdefault(final, []).append(role)
    loop_body = torchops.lower(program, program.statements, inputs={role: role for role in rule.roles},
                               writable=set(program.roles_written), finals=set(written), read_at_end=[],
                               after=lambda var: [], stores=stores,
                               store_line=lambda role, var: f"{role}.copy_({var})",
                               clone_line=lambda new, var: f"{new} = {var}.clone()")
    lines += ["", "", f"def step_all({', '.join(lists)}, steps, firsts, {', '.join(scalars)}):",
              f"    for _i in range(len({lists[0]})):"]
    lines += [f"        {name} = float({name}_all[_i])" for name in rule.supplied]
    for role, name in zip(rule.roles, lists):
        lines.append(f"        {role} = None if {name} is None else {name}[_i]")
    if "step" in rule.inputs:
        lines += ["        steps[_i] += 1", "        step = steps[_i].item()"]
    else:
        lines += ["        if steps is not None:", "            steps[_i] += 1"]
    if "first" in rule.inputs:
        lines.append("        first = firsts is not None and bool(firsts[_i])")
    lines += [f"        {line}" for line in loop_body]
    return "\n".join(lines) + "\n"


def module(program: Program):
    """The program's generated reference module (``step`` and ``step_all``; generated once per program)."""
    found = _FUNCTIONS.get(program.digest)
    if found is None:
        with _LOCK:
            found = _FUNCTIONS[program.digest] = generated.module(f"reference_{program.rule.name}", source(program))
    return found


def run(program: Program, params: list[torch.Tensor], grads: list[torch.Tensor], roles: list[list[torch.Tensor]],
        steps: list[torch.Tensor] | None, first: list[bool] | None, scalars: dict[str, Any], *,
        compute_dtypes: list[torch.dtype | None] | None = None, sum_across=None, rounding=None) -> None:
    """Step every parameter with the rule. ``compute_dtypes[i]``, when set, is the dtype parameter ``i`` is
    stepped in (float32 for a bfloat16 parameter with float32 state: stepped as a float32 copy, rounded
    back once: to nearest, or as ``rounding`` says, a :class:`.rounding.Rounding`)."""
    rule = program.rule
    if compute_dtypes is None:  # the generated loop (the per-tensor function below serves widened steps)
        by_role = dict(zip(program.state_roles, roles))
        token = NORM_SUM.set(sum_across)
        try:
            module(program).step_all(
                params, grads, *(by_role.get(role) for role in rule.state_roles), steps, first,
                *(scalars[name] for name in rule.inputs if name not in ("step", "first")))
        finally:
            NORM_SUM.reset(token)
        return
    step_function = module(program).step
    kwargs = {name: scalars[name] for name in rule.scalars}  # (PerTensor values: per tensor, below)
    takes_step, takes_first = "step" in rule.per_tensor, "first" in rule.per_tensor
    # each role's tensors in the rule's order (None: a role this group's options leave out)
    by_role = dict(zip(program.state_roles, roles))
    columns = [params, grads] + [by_role.get(role) for role in rule.state_roles]
    written = [0] + [k + 2 for k, role in enumerate(rule.state_roles)]  # positions of the returned roles
    token = NORM_SUM.set(sum_across)
    try:
        for i in range(len(params)):
            if steps is not None:
                steps[i] += 1
                if takes_step:
                    kwargs["step"] = steps[i].item()
            if takes_first:
                kwargs["first"] = bool(first[i]) if first is not None else False
            for name in rule.supplied:
                kwargs[name] = float(scalars[name][i])
            inputs = [None if column is None else column[i] for column in columns]
            widened = compute_dtypes is not None and compute_dtypes[i] is not None
            if widened:  # a float32 copy of the parameter and its gradient
                inputs[0], inputs[1] = inputs[0].to(compute_dtypes[i]), inputs[1].to(compute_dtypes[i])
            results = list(step_function(*inputs, **kwargs))
            for k, result in enumerate(results):  # a new value that is another written input's tensor: kept apart
                if result is not None and any(result is inputs[position] for j, position in enumerate(written) if j != k):
                    results[k] = result.clone()
            for position, result in zip(written, results):
                old = inputs[position]
                if result is old:
                    continue
                if old is None:
                    raise RuntimeError(f"rule {rule.name} returned a new {rule.roles[position]} that this group's "
                                       "options do not create (state roles follow the rule's `if` tests)")
                old.copy_(result)
            if widened and rounding is not None:
                rounding.store(i, params[i], inputs[0])
            elif widened:
                params[i].copy_(inputs[0])  # rounds to nearest even, bumps the version counter as in-place ops do
    finally:
        NORM_SUM.reset(token)


def run_out_of_place(program: Program, params: list[torch.Tensor], grads: list[torch.Tensor],
                     roles: list[list[torch.Tensor]], steps: list[torch.Tensor] | None, first: list[bool] | None,
                     scalars: dict[str, Any]) -> None:
    """The rule function itself, out of place, one tensor at a time; the results are copied into the
    parameter and its state. Serves ``differentiable=True`` (autograd records the step, and ``copy_`` is
    differentiable too, so gradients flow from what the step wrote back to what it read) and sparse
    gradients (torch's sparse-dense arithmetic; a sparse result is made dense to be stored)."""
    rule = program.rule
    by_role = dict(zip(program.state_roles, roles))
    kwargs = {name: scalars[name] for name in rule.scalars}
    for i in range(len(params)):
        if steps is not None:
            steps[i] += 1
            if "step" in rule.per_tensor:
                kwargs["step"] = steps[i].item()
        if "first" in rule.per_tensor:
            kwargs["first"] = bool(first[i]) if first is not None else False
        for name in rule.supplied:
            kwargs[name] = float(scalars[name][i])
        states = [None if by_role.get(role) is None else by_role[role][i] for role in rule.state_roles]
        # the rule reads clones: what autograd saves is then never the tensor the results are copied into
        inputs = [None if t is None else t.clone() for t in [params[i], *states]]
        results = rule.fn(inputs[0], grads[i], *inputs[1:], **kwargs)
        for old, read, new in zip([params[i], *states], inputs, results):
            if old is not None and new is not read:
                old.copy_(new.to_dense() if new.is_sparse else new)
