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
    """The generated module: ``step(roles..., *, inputs...)`` returning the new values of the written roles."""
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
    return "\n".join(lines) + "\n"


def function(program: Program):
    """The program's per-tensor step function (generated once per program)."""
    found = _FUNCTIONS.get(program.digest)
    if found is None:
        with _LOCK:
            found = _FUNCTIONS[program.digest] = generated.module(f"reference_{program.rule.name}",
                                                                  source(program)).step
    return found


def run(program: Program, params: list[torch.Tensor], grads: list[torch.Tensor], roles: list[list[torch.Tensor]],
        steps: list[torch.Tensor] | None, first: list[bool] | None, scalars: dict[str, Any], *,
        compute_dtypes: list[torch.dtype | None] | None = None, sum_across=None) -> None:
    """Step every parameter with the rule. ``compute_dtypes[i]``, when set, is the dtype parameter ``i`` is
    stepped in (float32 for a bfloat16 parameter with float32 state: stepped as a float32 copy, rounded
    back once)."""
    rule = program.rule
    state_roles = program.state_roles
    step_function = function(program)
    inputs = {name: scalars[name] for name in rule.scalars}
    inputs.setdefault("step", None)
    inputs.setdefault("first", False)
    token = NORM_SUM.set(sum_across)
    try:
        for i, (param, grad) in enumerate(zip(params, grads)):
            if steps is not None:
                steps[i] += 1
                if "step" in rule.per_tensor:
                    inputs["step"] = steps[i].item()
            if "first" in rule.per_tensor:
                inputs["first"] = bool(first[i]) if first is not None else False
            call_inputs = {name: inputs[name] for name in rule.inputs}
            widened = compute_dtypes is not None and compute_dtypes[i] is not None
            target = param.to(compute_dtypes[i]) if widened else param
            values = {rule.roles[0]: target, rule.roles[1]: grad.to(compute_dtypes[i]) if widened else grad}
            for role, tensors in zip(state_roles, roles):
                values[role] = tensors[i]
            results = step_function(*(values.get(role) for role in rule.roles), **call_inputs)
            for role, result in zip((rule.roles[0],) + rule.state_roles, results):
                old = values.get(role)
                if result is old:
                    continue
                if old is None:
                    raise RuntimeError(f"rule {rule.name} returned a new {role} that this group's options do not "
                                       "create (state roles follow the rule's `if` tests)")
                old.copy_(result)
            if widened:
                param.copy_(target)  # rounds to nearest even, bumps the version counter as in-place ops do
    finally:
        NORM_SUM.reset(token)
