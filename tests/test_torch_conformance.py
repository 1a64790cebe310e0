"""Conformance with torch.optim, driven by PyTorch's own optimizer database.

torch ships, with every release, the table its own optimizer tests are generated from:
``torch.testing._internal.common_optimizers.optim_db``. Each entry names an optimizer class, the
constructor configurations torch tests it with (``optim_inputs_func``) and the inputs it must refuse
(``optim_error_inputs_func``). This file takes every entry whose class thalweg also has (matched by
class name, so an optimizer added to thalweg later is picked up with no change here) and runs thalweg
and torch side by side on it:

* ``test_steps_match_torch``: every configuration, in float32 and float64, under torch's default
  implementation and each of ``foreach=False`` / ``foreach=True`` / ``fused=True`` that the database
  lists for the CPU (its ``differentiable`` mode is left out: it is not an option thalweg offers, see
  ``test_constructor_signature``). The same seeded parameters (odd shapes, a 0-d one) and the same
  seeded dense gradients for 10 steps; then parameters (after every step), every state tensor (same
  keys, same dtype, same values) and the param groups must agree with torch built with the same
  arguments -- or, for a ``foreach``/``fused`` case, with torch's for-loop, which the project holds
  every backend to (torch's own implementations do not always agree with each other). The
  ``default`` configuration is also run with two param groups and with ``named_parameters()``-style
  input; optimizers the database marks as taking sparse gradients get a case with sparse gradients
  and the database's own sparse hyper-parameters.
* ``test_state_dict_round_trip``: torch's checkpoint after 5 steps, loaded into a fresh thalweg
  optimizer and stepped 5 more, and thalweg's loaded into a fresh torch optimizer likewise, both
  equal torch resuming from its own checkpoint.
* ``test_error_matches_torch``: every error input raises the same exception type as torch at the
  same stage (construction or step). Messages are not compared (thalweg writes its own, naming the
  argument); whether torch's regex matches anyway is recorded as a ``regex_matches`` property.
* ``test_constructor_signature``: thalweg's constructor takes torch's arguments, in torch's order,
  with torch's defaults.

"Not applicable" is decided by torch alone: a configuration that torch itself refuses to build or
step on CPU (``fused`` where the database does not list the CPU, a tensor ``lr`` with ``foreach``,
the CUDA-only ``capturable`` configurations) is a skipped parameter naming torch's reason.

Known, deliberate differences are listed in ``DELIBERATE`` below and nowhere else; each listed case
is a strict xfail, so a difference that goes away turns the run red until its entry is removed.

``python tests/test_torch_conformance.py`` runs this file and prints, per optimizer, how many cases
passed, failed, are deliberate differences and are not applicable.
"""

from __future__ import annotations

import copy
import fnmatch
import importlib.util
import inspect
import re
import sys
import types
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch

import thalweg

# ---------------------------------------------------------------------------------------------------
# Deliberate differences: case pattern -> reason. A pattern is matched (fnmatch) against
# "<check>:<case id>", check being steps, state_dict, error or signature. Only differences that the
# README lists under "Where thalweg knowingly differs" belong here; anything else that differs is a
# bug to fix (or a decision to make and document there first).
# ---------------------------------------------------------------------------------------------------
DELIBERATE: dict[str, str] = {
    "error:Adafactor-error-does_not_support_complex_parameters":
        "README, 'Where thalweg knowingly differs': complex parameters are refused at construction (TypeError, "
        "naming the parameter); torch's Adafactor refuses them at the first step (RuntimeError)",
    "error:Muon-error-does_not_support_complex_parameters":
        "README, 'Where thalweg knowingly differs': complex parameters are refused at construction (TypeError, "
        "naming the parameter); torch's Muon refuses them at the first step (RuntimeError)",
    "error:Muon-error-only_support_2d_parameters":
        "README, 'Where thalweg knowingly differs': parameters of more than two dims are stepped as matrices (a "
        "convolution's weight flattened after its first dim, or a stack with batch_dims); torch's Muon refuses them",
    "steps:Muon-tensor_lr-float64":
        "README, 'Where thalweg knowingly differs': with a tensor lr, torch's Muon computes its scalars (the "
        "shape-adjusted lr, 1 - lr*weight_decay) in the tensor's dtype, float32; thalweg in float64 (2e-8 apart)",
    "state_dict:Muon-tensor_lr-float64":
        "as steps:Muon-tensor_lr-float64 (the round trip steps after loading)",
    "error:*-a_param_group_cannot_have_duplicate_parameters":
        "README, 'Where thalweg knowingly differs': a parameter listed twice in one group is an error "
        "(ValueError at construction); torch only warns (UserWarning)",
}

# Group keys thalweg writes that torch does not: optimizer-wide counters carried in param group 0 of a
# state_dict (README: skipped_steps survives torch.save, DCP and a load into torch.optim), and thalweg's
# own options (cautious; torch ignores a key it does not read, and a torch checkpoint lacks it: the
# constructor's value fills it in).
THALWEG_ONLY_GROUP_KEYS = frozenset(thalweg.Optimizer._OWN_STATE) | {"cautious", "batch_dims"}
# torch's implementation switches: thalweg's groups keep those its torch namesake keeps (README, Backends); a
# group may lack them (torch's own load_state_dict fills them in), but where both have one it must agree.
TORCH_IMPLEMENTATION_KEYS = frozenset({"foreach", "fused", "capturable", "differentiable"})

TOLERANCE = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.float64: dict(rtol=1e-10, atol=1e-10)}
DTYPES = (torch.float32, torch.float64)
SHAPES = [(3, 4), (5,), (), (2, 3, 4)]
MATRIX_SHAPES = [(3, 4), (5, 2), (2, 6)]  # for an optimizer that takes only 2-D parameters (Muon)
SPARSE_SHAPES = [(6, 3), (5,), (4, 2, 2)]  # sparse along the first dimension, as an embedding's gradient
STEPS = 10
SPLIT = 5  # where the state_dict round trip saves


# ---------------------------------------------------------------------------------------------------
# torch's database. common_optimizers imports torch's test utilities, which need `expecttest` (a torch
# development dependency, not a runtime one) and, on import, change process-wide settings: they freeze
# torch.backends' global flags and load their own hypothesis profile (max_examples 10 or 50, a 200 ms
# deadline) over the one tests/conftest.py chose. A stand-in for the former and a restore of the
# latter keep this file from needing or changing anything outside it (under xdist a worker imports
# it at collection, before running other files' tests).
# ---------------------------------------------------------------------------------------------------
def _import_optim_db():
    from hypothesis import settings as hypothesis_settings

    profile = hypothesis_settings.get_current_profile_name()
    stub = None
    if importlib.util.find_spec("expecttest") is None:
        import unittest

        stub = types.ModuleType("expecttest")
        stub.ACCEPT = False
        stub.TestCase = unittest.TestCase
        sys.modules["expecttest"] = stub
    flags_were_frozen = torch.backends.flags_frozen()
    try:
        from torch.testing._internal import common_optimizers
    finally:
        # torch.backends is a module wrapper: the flag lives in the globals of its functions.
        torch.backends.flags_frozen.__globals__["__allow_nonbracketed_mutation_flag"] = not flags_were_frozen
        hypothesis_settings.load_profile(profile)
        if stub is not None and sys.modules.get("expecttest") is stub:
            del sys.modules["expecttest"]
    return common_optimizers


common_optimizers = _import_optim_db()
OptimizerErrorEnum = common_optimizers.OptimizerErrorEnum

SHARED = [(info, getattr(thalweg, info.optim_cls.__name__))
          for info in common_optimizers.optim_db
          if isinstance(getattr(thalweg, info.optim_cls.__name__, None), type)]


def slug(text: str) -> str:
    return re.sub(r"[^0-9a-zA-Z]+", "_", text).strip("_").lower() or "empty"


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


# ---------------------------------------------------------------------------------------------------
# Cases
# ---------------------------------------------------------------------------------------------------
@dataclass
class Case:
    info: Any
    ours: type
    kwargs: dict
    dtype: torch.dtype
    id: str
    layout: str = "flat"  # flat | groups | named | database
    db_params: Any = None  # the configuration's own params, when the database gives them
    sparse: bool = False
    not_applicable: str | None = None
    shapes: list = field(default_factory=list)
    impl: str = ""  # "", forloop, foreach or fused: torch's implementation switch the case sets

    @property
    def theirs(self):
        return self.info.optim_cls

    @property
    def needs_closure(self) -> bool:
        return self.info.step_requires_closure


def make_tensors(shapes, dtype, seed):
    generator = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(shape, generator=generator, dtype=dtype)) for shape in shapes]


def make_grads(params, steps, seed, sparse):
    """``steps`` lists of gradients, one per parameter, seeded; sparse ones keep a few rows of each tensor."""
    generator = torch.Generator().manual_seed(seed)
    stream = []
    for _ in range(steps):
        grads = []
        for p in params:
            g = torch.randn(p.shape, generator=generator, dtype=p.dtype)
            if sparse:
                keep = torch.rand(p.shape[0], generator=generator) < 0.6
                g[~keep] = 0
                g = g.to_sparse(1)
            grads.append(g)
        stream.append(grads)
    return stream


def relayout(structure, flat):
    """``structure`` (a params argument: tensors, lists, tuples, dicts) with its tensors replaced, in
    order, by those of ``flat``."""
    it = iter(flat)

    def walk(node):
        if isinstance(node, torch.Tensor):
            return next(it)
        if isinstance(node, dict):
            return {k: walk(v) for k, v in node.items()}
        if isinstance(node, (list, tuple)):
            return type(node)(walk(v) for v in node)
        return node

    return walk(structure)


def tensors_of(structure):
    found = []

    def walk(node):
        if isinstance(node, torch.Tensor):
            found.append(node)
        elif isinstance(node, dict):
            for v in node.values():
                walk(v)
        elif isinstance(node, (list, tuple)):
            for v in node:
                walk(v)

    walk(structure)
    return found


def params_argument(case: Case, tensors):
    """The params argument of the case's layout over ``tensors``."""
    if case.layout == "database":
        return relayout(case.db_params, tensors)
    if case.layout == "groups":
        return [{"params": tensors[:2]}, {"params": tensors[2:], "lr": 0.005}]
    if case.layout == "named":
        return [(f"layer{i}.weight", t) for i, t in enumerate(tensors)]
    return list(tensors)


def initial_tensors(case: Case):
    if case.layout == "database":
        return [torch.nn.Parameter(t.detach().clone()) for t in tensors_of(case.db_params)]
    return make_tensors(case.shapes, case.dtype, seed=1234)


def build(cls, case: Case, tensors):
    return cls(params_argument(case, tensors), **copy.deepcopy(case.kwargs))


def run_steps(optimizer, tensors, grad_stream, case: Case):
    for grads in grad_stream:
        for p, g in zip(tensors, grads):
            p.grad = g.clone()
        if case.needs_closure:
            optimizer.step(lambda: torch.zeros(()))
        else:
            optimizer.step()


def torch_refusal(case: Case, shapes) -> str | None:
    """Why torch cannot build or step this configuration on CPU (None: it can)."""
    probe = Case(**{**case.__dict__, "shapes": shapes, "not_applicable": None})
    tensors = initial_tensors(probe)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            optimizer = build(probe.theirs, probe, tensors)
            run_steps(optimizer, tensors, make_grads(tensors, 2, 0, probe.sparse), probe)
    except Exception as error:  # whatever torch raises makes it not applicable
        return f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
    return None


_SHAPES_CHOSEN: dict = {}


def choose_shapes(case: Case):
    """SHAPES unless torch refuses them for this optimizer's plainest configuration (an optimizer of
    matrices only), then MATRIX_SHAPES."""
    if case.sparse:
        return SPARSE_SHAPES
    key = (case.info.name, case.dtype)
    if key not in _SHAPES_CHOSEN:
        plain = Case(**{**case.__dict__, "kwargs": {}, "layout": "flat"})
        _SHAPES_CHOSEN[key] = next((shapes for shapes in (SHAPES, MATRIX_SHAPES)
                                    if torch_refusal(plain, shapes) is None), SHAPES)
    return _SHAPES_CHOSEN[key]


def implementations(info):
    """torch's implementation switches for this optimizer on CPU: (name, kwargs, why not applicable)."""
    yield "", {}, None
    if "foreach" in info.supported_impls:
        yield "forloop", {"foreach": False}, None  # as torch's own tests spell the for-loop
        yield "foreach", {"foreach": True}, None
    if "fused" in info.supported_impls:
        reason = None if "cpu" in info.supports_fused_on else (
            f"torch's optim_db lists fused {info.name} only on {', '.join(info.supports_fused_on)}")
        yield "fused", {"fused": True}, reason


def step_cases() -> list[Case]:
    cases = []
    for info, ours in SHARED:
        for dtype in DTYPES:
            on_cpu = info.optim_inputs_func("cpu", dtype)
            cpu_descs = {config.desc for config in on_cpu}
            seen: dict[str, int] = {}

            def add(case: Case):
                count = seen.get(case.id, 0)
                seen[case.id] = count + 1
                if count:
                    case.id = case.id.replace(f"-{dtype_name(dtype)}", f"-{count + 1}-{dtype_name(dtype)}")
                if case.not_applicable is None:
                    case.shapes = choose_shapes(case)
                    case.not_applicable = torch_refusal(case, case.shapes)
                    if case.not_applicable:
                        case.not_applicable = f"torch itself refuses it on CPU: {case.not_applicable}"
                cases.append(case)

            for config in on_cpu:
                layout = "flat" if config.params is None else "database"
                for impl, impl_kwargs, reason in implementations(info):
                    words = [slug(config.desc)] + ([impl] if impl else [])
                    add(Case(info, ours, {**config.kwargs, **impl_kwargs}, dtype,
                             f"{info.name}-{'-'.join(words)}-{dtype_name(dtype)}", layout=layout,
                             db_params=config.params, sparse=info.only_supports_sparse_grads,
                             not_applicable=reason, impl=impl))
                if config.desc == "default" and config.params is None:
                    for extra in ("groups", "named"):
                        add(Case(info, ours, dict(config.kwargs), dtype,
                                 f"{info.name}-default-{extra}-{dtype_name(dtype)}", layout=extra,
                                 sparse=info.only_supports_sparse_grads))
            if info.supports_sparse and not info.only_supports_sparse_grads:
                add(Case(info, ours, dict(info.metadata_for_sparse[0]), dtype,
                         f"{info.name}-sparse_grads-{dtype_name(dtype)}", sparse=True))
            # The configurations torch keeps for CUDA (capturable...): listed, never run here.
            for config in info.optim_inputs_func("cuda", dtype):
                if config.desc not in cpu_descs:
                    add(Case(info, ours, dict(config.kwargs), dtype,
                             f"{info.name}-{slug(config.desc)}-{dtype_name(dtype)}",
                             not_applicable="a CUDA-only configuration in torch's optim_db "
                                            "(torch does not list it for CPU)"))
    return cases


@dataclass
class ErrorCase:
    info: Any
    ours: type
    index: int
    id: str
    desc: str
    error_type: type
    error_on: Any


def error_cases() -> list[ErrorCase]:
    cases = []
    for info, ours in SHARED:
        if info.optim_error_inputs_func is None:
            continue
        seen: dict[str, int] = {}
        for index, error_input in enumerate(info.optim_error_inputs_func("cpu", torch.float32)):
            desc = error_input.optimizer_error_input.desc
            case_id = f"{info.name}-error-{slug(desc)}"
            seen[case_id] = seen.get(case_id, 0) + 1
            if seen[case_id] > 1:
                case_id += f"-{seen[case_id]}"
            cases.append(ErrorCase(info, ours, index, case_id, desc, error_input.error_type, error_input.error_on))
    return cases


STEP_CASES = step_cases()
ERROR_CASES = error_cases()


def deliberate_reason(check: str, case_id: str) -> str | None:
    for pattern, reason in DELIBERATE.items():
        if fnmatch.fnmatchcase(f"{check}:{case_id}", pattern):
            return reason
    return None


def params_for(check: str, cases):
    out = []
    for case in cases:
        marks = []
        if getattr(case, "not_applicable", None):
            marks.append(pytest.mark.skip(reason=f"not applicable: {case.not_applicable}"))
        else:
            reason = deliberate_reason(check, case.id)
            if reason:
                marks.append(pytest.mark.xfail(strict=True, raises=AssertionError, reason=f"deliberate: {reason}"))
        out.append(pytest.param(case, id=case.id, marks=marks))
    return out


# ---------------------------------------------------------------------------------------------------
# Comparisons (each raises AssertionError naming what differs)
# ---------------------------------------------------------------------------------------------------
def same_value(a, b, tol) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)):
            return False
        try:
            torch.testing.assert_close(a, b, **tol)
        except AssertionError:
            return False
        return True
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(same_value(x, y, tol) for x, y in zip(a, b))
    return a == b


def assert_same_params(ours, theirs, tol, what):
    assert len(ours) == len(theirs)
    for i, (a, b) in enumerate(zip(ours, theirs)):
        torch.testing.assert_close(a.detach(), b.detach(), **tol, msg=lambda m: f"{what}: params[{i}]: {m}")


def assert_same_state(ours_sd, theirs_sd, tol, what):
    ours_state, theirs_state = ours_sd["state"], theirs_sd["state"]
    assert set(ours_state) == set(theirs_state), (
        f"{what}: state held for params {sorted(ours_state)} (thalweg) vs {sorted(theirs_state)} (torch)")
    for index in theirs_state:
        mine, torchs = ours_state[index], theirs_state[index]
        assert set(mine) == set(torchs), (
            f"{what}: state keys of param {index}: {sorted(mine)} (thalweg) vs {sorted(torchs)} (torch)")
        for key, expected in torchs.items():
            actual = mine[key]
            if isinstance(expected, torch.Tensor):
                assert isinstance(actual, torch.Tensor), f"{what}: state[{index}][{key!r}] is {actual!r}, not a tensor"
                assert actual.dtype == expected.dtype and actual.shape == expected.shape, (
                    f"{what}: state[{index}][{key!r}]: {actual.dtype} {tuple(actual.shape)} (thalweg) vs "
                    f"{expected.dtype} {tuple(expected.shape)} (torch)")
                torch.testing.assert_close(actual, expected, **tol,
                                           msg=lambda m, k=key: f"{what}: state[{index}][{k!r}]: {m}")
            else:
                assert actual == expected, f"{what}: state[{index}][{key!r}]: {actual!r} (thalweg) vs {expected!r} (torch)"


def assert_same_groups(ours_sd, theirs_sd, tol, what, ignore=frozenset()):
    ours_groups, theirs_groups = ours_sd["param_groups"], theirs_sd["param_groups"]
    assert len(ours_groups) == len(theirs_groups), f"{what}: {len(ours_groups)} vs {len(theirs_groups)} param groups"
    for index, (mine, torchs) in enumerate(zip(ours_groups, theirs_groups)):
        mine = {k: v for k, v in mine.items() if k not in THALWEG_ONLY_GROUP_KEYS and k not in ignore}
        torchs = {k: v for k, v in torchs.items() if k not in THALWEG_ONLY_GROUP_KEYS and k not in ignore
                  and not (k in TORCH_IMPLEMENTATION_KEYS and k not in mine)}
        assert set(mine) == set(torchs), (
            f"{what}: keys of param group {index}: only thalweg {sorted(set(mine) - set(torchs))}, "
            f"only torch {sorted(set(torchs) - set(mine))}")
        for key, expected in torchs.items():
            assert same_value(mine[key], expected, tol), (
                f"{what}: param group {index}[{key!r}]: {mine[key]!r} (thalweg) vs {expected!r} (torch)")


def assert_same(ours_opt, theirs_opt, ours_tensors, theirs_tensors, tol, what, ignore=frozenset()):
    assert_same_params(ours_tensors, theirs_tensors, tol, what)
    ours_sd, theirs_sd = ours_opt.state_dict(), theirs_opt.state_dict()
    assert_same_state(ours_sd, theirs_sd, tol, what)
    assert_same_groups(ours_sd, theirs_sd, tol, what, ignore)


def attempt(what: str, action: Callable[[], Any]):
    """``action()``; an exception from thalweg where torch went through is a difference, reported as one."""
    try:
        return action()
    except Exception as error:
        raise AssertionError(f"{what}: raised {type(error).__name__}: {error}") from error


# ---------------------------------------------------------------------------------------------------
# The tests
# ---------------------------------------------------------------------------------------------------
def torch_references(case: Case):
    """The torch runs thalweg is held to, as kwargs: torch with the case's own switches; and, where the
    case sets ``foreach``/``fused``, torch's for-loop as well, torch's reference implementation, which
    the project holds every backend to in float32/float64 (tests/test_torch_parity.py). A thalweg run
    that matches either passes: torch's implementations do not always agree with each other (its
    foreach ASGD moves float64 parameters by ~1e-8 relative from its for-loop: eta and mu are float32)."""
    yield "torch with the same arguments", case.kwargs
    if case.kwargs.get("foreach") or case.kwargs.get("fused"):
        loop = {k: v for k, v in case.kwargs.items() if k not in ("foreach", "fused")}
        yield "torch's for-loop (foreach=False)", {**loop, "foreach": False}


def matches_a_reference(case: Case, check: Callable[[str, dict], None]) -> None:
    """``check(label, torch_kwargs)`` for each of :func:`torch_references` until one passes; the
    first one's failure otherwise (then the others', in the message)."""
    failures = []
    for label, kwargs in torch_references(case):
        try:
            check(label, kwargs)
            return
        except AssertionError as failure:
            failures.append((label, failure))
    first = failures[0][1]
    if len(failures) > 1:
        others = "; ".join(f"against {label}: {str(f).splitlines()[0]}" for label, f in failures[1:])
        raise AssertionError(f"{first}\n(also {others})") from first
    raise first


def with_kwargs(case: Case, kwargs: dict) -> Case:
    return Case(**{**case.__dict__, "kwargs": kwargs})


def trajectory(cls, case: Case, grads, who: str):
    """Build ``cls`` on the case's parameters, step through ``grads``; the optimizer, its parameters and
    a snapshot of them after each step."""
    tensors = initial_tensors(case)
    optimizer = build(cls, case, tensors) if who == "torch" else attempt(
        f"{who} construction", lambda: build(cls, case, tensors))
    snapshots = []
    for step, step_grads in enumerate(grads, 1):
        if who == "torch":
            run_steps(optimizer, tensors, [step_grads], case)
        else:
            attempt(f"{who} step {step}", lambda: run_steps(optimizer, tensors, [step_grads], case))
        snapshots.append([t.detach().clone() for t in tensors])
    return optimizer, tensors, snapshots


@pytest.mark.parametrize("case", params_for("steps", STEP_CASES))
def test_steps_match_torch(case: Case):
    """STEPS steps from the same parameters and gradients: parameters after every step, then every state
    tensor and the param groups, as torch."""
    tol = TOLERANCE[case.dtype]
    grads = make_grads(initial_tensors(case), STEPS, seed=99, sparse=case.sparse)
    ours, ours_tensors, ours_snapshots = trajectory(case.ours, case, grads, "thalweg")

    def check(label, kwargs):
        theirs, theirs_tensors, theirs_snapshots = trajectory(case.theirs, with_kwargs(case, kwargs), grads, "torch")
        for step, (mine, torchs) in enumerate(zip(ours_snapshots, theirs_snapshots), 1):
            assert_same_params(mine, torchs, tol, f"after step {step} (vs {label})")
        # against torch's for-loop, the switches themselves differ by construction (the case asked for foreach)
        switches = frozenset() if kwargs is case.kwargs else frozenset({"foreach", "fused"})
        assert_same(ours, theirs, ours_tensors, theirs_tensors, tol, f"after {STEPS} steps (vs {label})", switches)

    matches_a_reference(case, check)


@pytest.mark.parametrize("case", params_for("state_dict", [c for c in STEP_CASES if not c.impl]))
def test_state_dict_round_trip(case: Case):
    """torch's checkpoint after SPLIT steps, loaded into a fresh thalweg optimizer and stepped on, equals torch
    never stopped; thalweg's loaded into a fresh torch optimizer and stepped on equals torch resuming from its
    own checkpoint. (torch's load_state_dict casts every state tensor but `step` to its parameter's dtype, so
    torch itself does not resume float64 NAdam's `mu_product` or ASGD's `eta`/`mu` as it left them; thalweg
    keeps their dtype — README, "Where thalweg knowingly differs" — and resumes as if never stopped.) Run
    under torch's default implementation only: the checkpoint does not depend on it, and
    test_steps_match_torch covers the others."""
    tol = TOLERANCE[case.dtype]
    grads = make_grads(initial_tensors(case), STEPS, seed=7, sparse=case.sparse)

    def first_half(cls, who):
        tensors = initial_tensors(case)
        optimizer = attempt(f"{who}: construction", lambda: build(cls, case, tensors))
        attempt(f"{who}: first {SPLIT} steps", lambda: run_steps(optimizer, tensors, grads[:SPLIT], case))
        return copy.deepcopy(optimizer.state_dict()), [torch.nn.Parameter(t.detach().clone()) for t in tensors]

    def resume(cls, checkpoint, tensors, who):
        optimizer = attempt(f"{who}: construction", lambda: build(cls, case, tensors))
        attempt(f"{who}: load_state_dict", lambda: optimizer.load_state_dict(checkpoint))
        attempt(f"{who}: steps after loading", lambda: run_steps(optimizer, tensors, grads[SPLIT:], case))
        return optimizer, tensors

    torch_checkpoint, torch_tensors = first_half(case.theirs, "torch")
    ours_checkpoint, ours_tensors = first_half(case.ours, "thalweg")
    reference, reference_tensors = resume(case.theirs, copy.deepcopy(torch_checkpoint),
                                          [torch.nn.Parameter(t.detach().clone()) for t in torch_tensors], "torch")

    uninterrupted_tensors = initial_tensors(case)
    uninterrupted = build(case.theirs, case, uninterrupted_tensors)
    run_steps(uninterrupted, uninterrupted_tensors, grads, case)
    ours, tensors = resume(case.ours, copy.deepcopy(torch_checkpoint), torch_tensors, "torch -> thalweg")
    assert_same(ours, uninterrupted, tensors, uninterrupted_tensors, tol,
                "torch's checkpoint resumed by thalweg vs torch never stopped")
    theirs, tensors = resume(case.theirs, copy.deepcopy(ours_checkpoint), ours_tensors, "thalweg -> torch")
    # The implementation switches thalweg's checkpoint lacks, torch fills from its __setstate__, whose
    # defaults are those of an old checkpoint (SGD: fused=False where its constructor says None).
    absent = TORCH_IMPLEMENTATION_KEYS - {k for group in ours_checkpoint["param_groups"] for k in group}
    assert_same(theirs, reference, tensors, reference_tensors, tol,
                "thalweg's checkpoint resumed by torch vs torch's own (here 'thalweg' = torch loaded from thalweg)",
                ignore=absent)


def _error_input(case: ErrorCase):
    return case.info.optim_error_inputs_func("cpu", torch.float32)[case.index].optimizer_error_input


def _error_params(error_input):
    if error_input.params is not None:
        return error_input.params
    param = torch.nn.Parameter(torch.randn(2, 3))
    param.grad = torch.randn(2, 3)
    return [param]


def _behaviour(cls, error_input, warning_expected: bool):
    """(stage, exception or warning, message) of building ``cls`` on the input, then stepping it:
    stage is "construction", "step" or None (no error). A UserWarning at construction counts as the
    outcome only where the database expects one (torch warns for some inputs instead of raising)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            optimizer = cls(_error_params(error_input), **error_input.kwargs)
        except Exception as error:
            return "construction", type(error), str(error)
    user_warnings = [w for w in caught if issubclass(w.category, UserWarning)] if warning_expected else []
    if user_warnings:
        return "construction", user_warnings[0].category, str(user_warnings[0].message)
    try:
        optimizer.step()
    except Exception as error:
        return "step", type(error), str(error)
    return None, None, ""


@pytest.mark.parametrize("case", params_for("error", ERROR_CASES))
def test_error_matches_torch(case: ErrorCase, record_property):
    error_input = _error_input(case)
    expected_stage = "construction" if case.error_on == OptimizerErrorEnum.CONSTRUCTION_ERROR else "step"
    regex = case.info.optim_error_inputs_func("cpu", torch.float32)[case.index].error_regex

    warning_expected = issubclass(case.error_type, Warning)
    torch_stage, torch_type, torch_message = _behaviour(case.info.optim_cls, copy.deepcopy(error_input),
                                                        warning_expected)
    # The database is torch's own statement of what torch does: hold torch to it first.
    assert (torch_stage, torch_type) == (expected_stage, case.error_type), (
        f"harness: torch {case.info.name} gave {torch_type} at {torch_stage}, its optim_db says "
        f"{case.error_type.__name__} at {expected_stage} ({torch_message})")

    stage, kind, message = _behaviour(case.ours, copy.deepcopy(error_input), warning_expected)
    matches = bool(kind) and bool(re.search(regex, message))
    record_property("regex_matches", matches)
    record_property("thalweg_message", message)
    assert stage == expected_stage and kind is not None and issubclass(kind, case.error_type), (
        f"torch: {case.error_type.__name__} at {expected_stage} ({torch_message!r}); thalweg: "
        + (f"{kind.__name__} at {stage} ({message!r})" if kind else "no error at all"))


SIGNATURE_CASES = [pytest.param(info, ours, id=info.name,
                                marks=[pytest.mark.xfail(strict=True, raises=AssertionError, reason=r)]
                                if (r := deliberate_reason("signature", info.name)) else [])
                   for info, ours in SHARED]


@pytest.mark.parametrize("info, ours", SIGNATURE_CASES)
def test_constructor_signature(info, ours):
    """Code written for torch.optim passes arguments positionally in torch's order and by keyword: thalweg
    must take the same ones, in the same order, with the same defaults (it may add its own after them)."""
    theirs = list(inspect.signature(info.optim_cls.__init__).parameters.values())[1:]
    mine = {p.name: p for p in list(inspect.signature(ours.__init__).parameters.values())[1:]}
    mine_positional = [p.name for p in mine.values() if p.kind is p.POSITIONAL_OR_KEYWORD]
    theirs_positional = [p.name for p in theirs if p.kind is p.POSITIONAL_OR_KEYWORD]
    problems = []
    if mine_positional[:len(theirs_positional)] != theirs_positional:
        problems.append(f"positional order {mine_positional} vs torch's {theirs_positional}")
    for p in theirs:
        if p.name not in mine:
            problems.append(f"no argument {p.name!r} (torch's default {p.default!r})")
        elif not same_value(mine[p.name].default, p.default, dict(rtol=0, atol=0)):
            problems.append(f"{p.name!r} defaults to {mine[p.name].default!r}, torch's to {p.default!r}")
    assert not problems, f"{ours.__name__} vs torch.optim.{info.name}: " + "; ".join(problems)


def test_deliberate_table_is_not_stale():
    """Every entry of DELIBERATE names at least one case that is run."""
    names = ([f"steps:{c.id}" for c in STEP_CASES if not c.not_applicable]
             + [f"state_dict:{c.id}" for c in STEP_CASES if not c.not_applicable and not c.impl]
             + [f"error:{c.id}" for c in ERROR_CASES] + [f"signature:{info.name}" for info, _ in SHARED])
    unused = [pattern for pattern in DELIBERATE if not fnmatch.filter(names, pattern)]
    assert not unused, f"DELIBERATE entries that match no case: {unused}"


def test_every_shared_optimizer_is_covered():
    """The database still has entries for thalweg's classes (a renamed module or attribute would
    otherwise leave this file testing nothing)."""
    names = {info.name for info, _ in SHARED}
    assert {"SGD", "Adam", "AdamW", "RMSprop", "Adagrad"} <= names, names
    assert all(any(c.info.name == n and not c.not_applicable for c in STEP_CASES) for n in names)


# ---------------------------------------------------------------------------------------------------
# Counts per optimizer: python tests/test_torch_conformance.py [extra pytest args]
# ---------------------------------------------------------------------------------------------------
def main(argv: list[str]) -> int:
    from collections import Counter, defaultdict

    counts: dict[str, Counter] = defaultdict(Counter)
    failures: list[str] = []
    regex: dict[str, Counter] = defaultdict(Counter)

    class Collector:
        def pytest_runtest_logreport(self, report):
            if report.when != "call" and not (report.when == "setup" and report.outcome != "passed"):
                return
            name = report.nodeid.split("[", 1)[1].rstrip("]").split("-")[0] if "[" in report.nodeid else "(any)"
            if hasattr(report, "wasxfail"):
                outcome = "deliberate" if report.skipped else "failed"  # a strict xpass fails
            elif report.skipped:
                outcome = "not applicable"
            else:
                outcome = report.outcome
            counts[name][outcome] += 1
            if outcome == "failed":
                failures.append(report.nodeid)
            props = dict(report.user_properties)
            if "regex_matches" in props:
                regex[name]["torch's regex matches" if props["regex_matches"] else "own message"] += 1

    code = pytest.main([__file__, "-q", "-p", "no:xdist", "-p", "no:cacheprovider",
                        "-W", "ignore::pytest.PytestAssertRewriteWarning", *argv], plugins=[Collector()])
    columns = ("passed", "failed", "deliberate", "not applicable")
    print(f"\n{'optimizer':<12}" + "".join(f"{c:>16}" for c in columns) + "   error messages")
    for name in sorted(counts):
        messages = ", ".join(f"{k}: {v}" for k, v in sorted(regex[name].items()))
        print(f"{name:<12}" + "".join(f"{counts[name][c]:>16}" for c in columns) + f"   {messages}")
    print("\nfailing:" if failures else "\nno failures", *failures, sep="\n  ")
    return int(code)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
