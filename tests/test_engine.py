"""The rule engine (thalweg.engine): one definition per optimizer, every backend derived from it.

- every derived backend (foreach, fused CPU) equals the reference — the rule itself on torch tensors — for
  every rule and every combination of its ``if`` outcomes that the specs' grids reach, params and state,
  on 0-d, empty, odd-sized and multi-chunk tensors, in float32, float64, bfloat16 and bfloat16 with float32
  state (the Triton kernels: test_triton.py);
- scalar sub-expressions are folded on the host in float64;
- a rule written in this file, with a norm, runs on every backend (Triton's interpreter included) and
  matches a hand-written float64 loop, without a line of the engine changed;
- the rule language's errors name the rule, its line and what to write instead;
- the generated code can be printed, and the dependency rules of the package hold.
"""

from __future__ import annotations

import ast
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import thalweg
from thalweg import engine
from thalweg.engine import Flag, RuleError, lerp, norm, rule, sign, sqrt, where
from specs import SPECS, TOLERANCE

# (1500,) spans three chunks: the kernels run with 512-element chunks here (see the fixture below)
SHAPES = [(), (0,), (7,), (3, 5), (1500,), (2, 0, 3), (1, 1, 9)]
FUSED = engine.unavailable_reason(torch.device("cpu")) is None
DTYPES = {"float32": (torch.float32, None), "float64": (torch.float64, None), "bfloat16": (torch.bfloat16, None),
          "bfloat16+float32-state": (torch.bfloat16, torch.float32)}


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch):
    """512-element chunks: a 1500-element tensor is cut in three, as a 70k one is by the real 64k chunks."""
    from thalweg.engine import host

    monkeypatch.setattr(host, "CHUNK", 512)


def _programs():
    """(spec, combination) for each distinct program the specs' grids reach (combinations that decide every
    ``if`` of the rule alike give one program: running them all would test nothing more)."""
    cases = []
    for spec in SPECS:
        seen = set()
        for combo in spec.grid:
            group = {k: combo[k] for k in spec.group_only if k in combo}
            optimizer = spec.cls([{"params": [torch.zeros(1, requires_grad=True)], **group}],
                                 **{**spec.required, **{k: v for k, v in combo.items() if k not in spec.group_only}})
            program = optimizer.rule.program(optimizer._scalars(optimizer.param_groups[0]))
            if (type(optimizer).__name__, program.digest) not in seen:
                seen.add((type(optimizer).__name__, program.digest))
                cases.append(pytest.param(spec, combo, id=f"{spec.name}-{program.key}"))
    return cases


PROGRAMS = _programs()


def _run(spec, combo, backend, dtype, state_dtype, steps=4, seed=0):
    generator = torch.Generator().manual_seed(seed)
    params = [torch.randn(s, generator=generator, dtype=torch.float64).to(dtype).requires_grad_() for s in SHAPES]
    group = {"params": params, **{k: combo[k] for k in spec.group_only if k in combo}}
    ctor = {k: v for k, v in combo.items() if k not in spec.group_only}
    optimizer = spec.cls([group], **{**spec.required, **ctor}, backend=backend, state_dtype=state_dtype)
    for step in range(steps):
        for i, param in enumerate(params):
            skip = (step + i) % 3 == 0 and i % 2 == 0  # a tensor without a gradient: step counts differ
            param.grad = None if skip else torch.randn(param.shape, generator=generator, dtype=torch.float64).to(dtype)
        optimizer.step()
    return params, optimizer


def _assert_same(expected, actual, dtype):
    (ref_params, ref_opt), (params, opt) = expected, actual
    # bfloat16: the kernels round each stored value once, the reference after every torch op (a few ulps)
    tol = TOLERANCE[torch.float32] if dtype is torch.float32 else TOLERANCE[dtype]
    for i, (e, a) in enumerate(zip(ref_params, params)):
        scale = max(float(e.detach().abs().max().float()) if e.numel() else 0.0, 1e-30)
        torch.testing.assert_close(a.detach().double(), e.detach().double(), rtol=tol, atol=tol * scale,
                                   msg=lambda m: f"param {i}: {m}")
        assert ref_opt.state[e].keys() == opt.state[a].keys(), f"param {i}: state keys"
        for key, value in ref_opt.state[e].items():
            got = opt.state[a][key]
            assert got.dtype == value.dtype, f"param {i} {key}: dtype {got.dtype} != {value.dtype}"
            scale = max(float(value.abs().max().double()) if value.numel() else 0.0, 1e-30)
            torch.testing.assert_close(got.double(), value.double(), rtol=tol, atol=tol * scale,
                                       msg=lambda m: f"param {i} state {key}: {m}")


@pytest.mark.parametrize("dtype_case", list(DTYPES))
@pytest.mark.parametrize("backend", ["foreach", "fused"])
@pytest.mark.parametrize("spec, combo", PROGRAMS)
def test_every_backend_equals_the_reference(spec, combo, backend, dtype_case):
    if backend == "fused" and not FUSED:
        pytest.skip(f"backend='fused' unavailable on CPU: {engine.unavailable_reason(torch.device('cpu'))}")
    dtype, state_dtype = DTYPES[dtype_case]
    reference = _run(spec, combo, "reference", dtype, state_dtype)
    derived = _run(spec, combo, backend, dtype, state_dtype)
    if dtype is torch.bfloat16 and state_dtype is None:
        # the reference rounds to bfloat16 after every op: compare against its float32-state twin's
        # params within a few bfloat16 ulps rather than to 1e-5
        for e, a in zip(reference[0], derived[0]):
            scale = max(float(e.detach().abs().max().float()) if e.numel() else 0.0, 1e-30)
            torch.testing.assert_close(a.detach().float(), e.detach().float(), rtol=0, atol=5e-2 * scale)
        return
    _assert_same(reference, derived, dtype)


# -- host folding ------------------------------------------------------------------------------------


def test_scalar_subexpressions_are_folded_on_the_host_in_float64():
    """One Adam step from zero state: exp_avg_sq = (1 - β2)·g² exactly. Folded in float64 and then rounded
    to float32 once, (1 - β2) is within 6e-8 of its true value; computed in float32 from β2 = 0.999 it is
    1.3e-5 off (float32(0.999) = 0.99900001287...), which this test would see."""
    beta2 = 0.999
    exact = (1 - beta2) * 4.0  # g = 2
    program = thalweg.Adam.rule.program(dict(lr=1e-3, beta1=0.9, beta2=beta2, eps=1e-8, weight_decay=0.0,
                                             amsgrad=False, decoupled=False, cautious=False, maximize=False))
    assert "1 - beta2" in program.describe()
    assert all("1 - beta2" not in ast.unparse(s.expr) for p in program.passes for s in p.body)  # not in a kernel
    folded = dict(zip(program.group_vars, program.group_values(dict(
        lr=1e-3, beta1=0.9, beta2=beta2, eps=1e-8, weight_decay=0.0, amsgrad=False, decoupled=False, cautious=False, maximize=False))))
    assert any(v == 1 - beta2 for v in folded.values())
    float32_folding = float(np.float32(1) - np.float32(beta2)) * 4.0
    assert abs(float32_folding - exact) / exact > 1e-5  # what computing it in float32 would give
    for backend in ["reference", "foreach"] + (["fused"] if FUSED else []):
        param = torch.zeros(3, requires_grad=True)
        param.grad = torch.full((3,), 2.0)
        optimizer = thalweg.Adam([param], lr=1e-3, betas=(0.9, beta2), backend=backend)
        optimizer.step()
        value = float(optimizer.state[param]["exp_avg_sq"][0])
        assert abs(value - exact) / exact < 1e-6, f"{backend}: {value} vs {exact}"


# -- a new rule, written here ---------------------------------------------------------------------------


@rule
def signed_momentum(param, grad, exp_avg, *, lr, beta, weight_decay, trust: Flag, maximize: Flag):
    """A rule the engine has never seen: sign of an EMA (Lion-like), decoupled decay, and a per-tensor
    trust ratio from two norms, so that the two-pass path is exercised too."""
    if maximize:
        grad = -grad
    exp_avg = lerp(exp_avg, grad, 1 - beta)
    update = sign(exp_avg) + weight_decay * param
    if trust:
        ratio = norm(param) / (norm(update) + 1e-3)
        update = update * where(ratio > 0, ratio, 1.0)
    param = param - lr * update
    return param, exp_avg


class SignedMomentum(thalweg.Optimizer):
    rule = signed_momentum
    name = "signed-momentum"

    def __init__(self, params, lr=1e-2, beta=0.9, weight_decay=0.0, *, trust=True, maximize=False, backend="auto"):
        super().__init__(params, dict(lr=lr, beta=beta, weight_decay=weight_decay, trust=trust, maximize=maximize),
                         backend=backend, foreach=None, fused=None, max_grad_norm=None, skip_nonfinite=False)

    def _check_hyperparameters(self, group):
        thalweg._checks.non_negative("lr", group["lr"])


def _signed_momentum_float64(params, grads_per_step, lr, beta, weight_decay, trust, maximize):
    """The same update, written by hand in float64, one tensor at a time."""
    w = [p.detach().double().clone() for p in params]
    m = [torch.zeros_like(x) for x in w]
    for grads in grads_per_step:
        for i, g in enumerate(grads):
            g = -g.double() if maximize else g.double()
            m[i] = beta * m[i] + (1 - beta) * g
            u = torch.sign(m[i]) + weight_decay * w[i]
            if trust:
                ratio = float(w[i].norm()) / (float(u.norm()) + 1e-3)
                u = u * (ratio if ratio > 0 else 1.0)
            w[i] = w[i] - lr * u
    return w, m


def _start(shape) -> torch.Tensor:
    n = int(np.prod(shape))
    return torch.linspace(-1, 1, n).reshape(shape) if n else torch.zeros(shape)


def _new_rule_run(backend, options, grads_per_step):
    params = [_start(s).requires_grad_() for s in SHAPES]
    optimizer = SignedMomentum(params, backend=backend, **options)
    for grads in grads_per_step:
        for p, g in zip(params, grads):
            p.grad = g.clone()
        optimizer.step()
    return params, optimizer


@pytest.mark.parametrize("options", [dict(lr=0.01, beta=0.8, weight_decay=0.1, trust=True, maximize=False),
                                     dict(lr=0.05, beta=0.3, weight_decay=0.0, trust=False, maximize=True)],
                         ids=["trust", "plain"])
@pytest.mark.parametrize("backend", ["reference", "foreach", "fused", "triton-interpreter"])
def test_a_rule_written_here_runs_on_every_backend(backend, options, monkeypatch):
    generator = torch.Generator().manual_seed(4)
    grads_per_step = [[torch.randn(s, generator=generator) for s in SHAPES] for _ in range(5)]
    if backend == "fused" and not FUSED:
        pytest.skip("backend='fused' unavailable on CPU")
    if backend == "triton-interpreter":
        pytest.importorskip("triton")
        if os.environ.get("TRITON_INTERPRET") != "1":  # conftest.py sets it where there is no GPU
            pytest.skip("a machine with CUDA: Triton kernels are not interpreted in this process")
        from thalweg.engine import driver, gpu

        monkeypatch.setattr(driver, "_launcher", lambda device: gpu)
        backend = "fused"
    params, optimizer = _new_rule_run(backend, options, grads_per_step)
    expected_w, expected_m = _signed_momentum_float64([_start(s) for s in SHAPES], grads_per_step, **options)
    for p, w, m in zip(params, expected_w, expected_m):
        torch.testing.assert_close(p.detach().double(), w, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(optimizer.state[p]["exp_avg"].double(), m, rtol=1e-5, atol=1e-6)


# -- the rule language's errors ------------------------------------------------------------------------


def _rule_error(source: str) -> str:
    namespace = {"Flag": Flag, "rule": rule, "sqrt": sqrt, "where": where}
    path = Path(__file__).parent / "_generated_rule_for_test.py"
    path.write_text(source)
    try:
        code = compile(source, str(path), "exec")
        with pytest.raises(RuleError) as error:
            exec(code, namespace)  # noqa: S102
            for value in namespace.values():
                if isinstance(value, engine.Rule):
                    value.program({name: 0.0 for name in value.scalars})
        return str(error.value)
    finally:
        path.unlink()


@pytest.mark.parametrize("body, message", [
    ("    if grad > 0:\n        param = param - lr\n    return param", r"`if` may test flags and hyper-parameters only, not `grad`"),
    ("    param = param - undefined\n    return param", r"`undefined` is used before it is assigned"),
    ("    return param, grad", r"return 1 values \(param\), got 2"),
    ("    for x in grad:\n        pass\n    return param", r"For statements are not part of the rule language"),
    ("    param = param ** 3\n    return param", r"a tensor may only be squared"),
    ("    param = param.exp()\n    return param", r"calls are limited to"),
    ("    param, grad = grad, param\n    return param", r"assign one name at a time"),
    ("    _hidden = param * lr\n    return _hidden", r"`_hidden` is a name the generated code uses"),
    ("    param = param * where(grad > 0, lr, 0.5)\n    return param", r"where\(\) with a per-element condition needs a tensor"),
])
def test_rule_language_errors_say_what_and_where(body, message):
    text = _rule_error(f"@rule\ndef bad(param, grad, *, lr):\n{body}\n")
    assert "rule bad" in text and "_generated_rule_for_test.py" in text and "line" in text
    assert __import__("re").search(message, text), text


def test_a_rule_may_not_take_a_name_the_generated_code_uses():
    text = _rule_error("@rule\ndef bad(param, grad, load, *, lr):\n    return param - lr * grad, load\n")
    assert "`load` is a name the generated code uses" in text


def test_a_rule_needs_a_return_of_every_role():
    text = _rule_error("@rule\ndef bad(param, grad, exp_avg, *, lr):\n    param = param - lr * grad\n    return param\n")
    assert "return 2 values (param, exp_avg), got 1" in text


# -- inspection ---------------------------------------------------------------------------------------

ADAM = dict(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1, amsgrad=True, decoupled=True, cautious=False,
            maximize=False)


@pytest.mark.parametrize("backend, words", [
    ("reference", ["# rule adam", "def adam("]),
    ("foreach", ["def pass0(", "lerp_(exp_avg, grad", "addcdiv_(param__1"]),
    ("fused", ["def pass0(data):", "load(_ptr_grad, _i)", "store(_ptr_param, _i, param__"]),
])
def test_generated_code_can_be_printed(backend, words):
    if backend == "fused" and not FUSED:
        pytest.skip("backend='fused' unavailable on CPU")
    text = engine.show(thalweg.Adam.rule, backend, **ADAM)
    for word in words:
        assert word in text, f"{word!r} not in:\n{text}"
    assert "_h" in text or backend == "reference"  # hoisted host values, named


def test_triton_source_can_be_printed():
    text = engine.show(thalweg.LAMB.rule, "fused", device="cuda", dtype=torch.bfloat16, state_dtype=torch.float32,
                       lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-6, weight_decay=0.01, bias_correction=True,
                       maximize=False, trust_ratio=True)
    assert "@triton.jit" in text and "def pass0(" in text and "def pass1(" in text
    assert "tl.pointer_type(tl.bfloat16)" in text and "tl.pointer_type(tl.float32)" in text
    assert "tl.div_rn(" in text and "tl.sqrt_rn(" in text


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_the_kernels_of_8bit_state_and_of_param_update_can_be_printed(device):
    text = engine.show(thalweg.Adam.rule, "fused", device=device, dtype=torch.bfloat16, state_dtype="int8",
                       state_codecs=thalweg.Adam.state_codecs, param_update="kahan", **ADAM)
    assert "8-bit exp_avg, exp_avg_sq" in text and "kahan rounding" in text
    assert ("store_kahan(" if device == "cpu" else "store_bf16_kahan(") in text
    stochastic = engine.show(thalweg.Adam.rule, "fused", device=device, dtype=torch.bfloat16,
                             state_dtype=torch.float32, param_update="stochastic", **ADAM)
    assert ("store_stochastic(" if device == "cpu" else "store_bf16_stochastic(") in stochastic
    with pytest.raises(ValueError, match="pass dtype=torch.bfloat16"):
        engine.show(thalweg.Adam.rule, "fused", param_update="kahan", **ADAM)
    with pytest.raises(TypeError, match="state_codecs"):
        engine.show(thalweg.Adam.rule, "fused", state_dtype="int8", **ADAM)


def test_show_needs_every_scalar():
    with pytest.raises(TypeError, match="missing amsgrad"):
        engine.show(thalweg.Adam.rule, "foreach", **{k: v for k, v in ADAM.items() if k != "amsgrad"})


def test_a_generated_line_says_which_rule_line_it_comes_from():
    program = thalweg.Adam.rule.program(ADAM)
    text = engine.show(thalweg.Adam.rule, "foreach", **ADAM)
    source = Path(thalweg.optim.adam.__file__).read_text().splitlines()
    for statement in program.passes[0].body:
        assert f"# line {statement.line}" in text
        assert statement.target.split("__")[0] in source[statement.line - 1], (statement.target, source[statement.line - 1])


def test_an_error_in_generated_code_is_reported_at_its_file_and_line():
    """A foreach pass that fails points its traceback at the generated module (a real file), not at exec."""
    param = torch.zeros(3, requires_grad=True)
    optimizer = thalweg.Adam([param], backend="foreach")
    param.grad = torch.ones(3)
    optimizer.step()
    with torch.inference_mode():  # the step's checks pass it; the in-place foreach op then refuses it
        optimizer.state[param]["exp_avg"] = torch.zeros(3)
    param.grad = torch.ones(3)
    with pytest.raises(RuntimeError) as error:
        optimizer.step()
    frames = [frame for frame in __import__("traceback").extract_tb(error.value.__traceback__)]
    generated = [f for f in frames if "foreach_adam_" in f.filename]
    assert generated and Path(generated[0].filename).exists(), [f.filename for f in frames]
    assert "# line" in Path(generated[0].filename).read_text().splitlines()[generated[0].lineno - 1]


# -- reductions -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["reference", "foreach", "fused"])
def test_norms_are_summed_across_processes_once_per_group_and_step(backend):
    """``sum_across`` stands for the all-reduce of a sharded group: adding 1 to every sum of squares is what a
    second process holding, of every tensor, a shard of squared norm 1 would give. Every backend uses it
    the same way (the result equals the reference's), the derived ones with one call per step for all the
    group's norms."""
    if backend == "fused" and not FUSED:
        pytest.skip("backend='fused' unavailable on CPU")
    calls = []

    def doubled(sums):
        calls.append(tuple(sums.shape))
        sums.add_(1.0)

    results = {}
    for name, which, sum_across in (("reference", "reference", doubled), (backend, backend, doubled),
                                    ("local", backend, None)):
        params = [torch.linspace(-1, 2, 5).requires_grad_(), torch.linspace(0, 1, 70_001).requires_grad_()]
        grads = [torch.linspace(1, -1, 5), torch.linspace(-1, 1, 70_001)]
        program = thalweg.LAMB.rule.program(dict(lr=0.1, beta1=0.9, beta2=0.999, eps=1e-6, weight_decay=0.01,
                                                 bias_correction=True, maximize=False, trust_ratio=True))
        states = [[torch.zeros_like(p) for p in params] for _ in program.state_roles]
        steps = [torch.tensor(0.0), torch.tensor(0.0)]
        calls.clear()
        with torch.no_grad():
            engine.run(program, which, [p.detach() for p in params], grads, states, steps, None,
                       dict(lr=0.1, beta1=0.9, beta2=0.999, eps=1e-6, weight_decay=0.01, bias_correction=True,
                            maximize=False, trust_ratio=True), sum_across=sum_across)
        results[name] = ([p.detach().clone() for p in params], list(calls))
    reference_params, reference_calls = results["reference"]
    params, backend_calls = results[backend]
    assert reference_calls == [(1,)] * 4  # the oracle: one sum per norm() call, per tensor
    if backend != "reference":
        assert backend_calls == [(2, 2)]  # every tensor's two sums of squares, at once
    for a, e in zip(params, reference_params):
        torch.testing.assert_close(a, e, rtol=1e-6, atol=1e-7)
    local_params, local_calls = results["local"]
    assert local_calls == []
    assert not torch.allclose(local_params[0], params[0])  # the sums mattered: local norms give another step


def test_norm_sums_across_processes_only_when_told():
    tensor = torch.tensor([3.0, 4.0])
    assert float(norm(tensor)) == 5.0
    token = engine.vocabulary.NORM_SUM.set(lambda squares: squares.mul_(2))
    try:
        assert abs(float(norm(tensor)) - 5.0 * 2**0.5) < 1e-12
    finally:
        engine.vocabulary.NORM_SUM.reset(token)
    assert float(norm(tensor)) == 5.0


# -- dependencies -------------------------------------------------------------------------------------------

PACKAGE = Path(thalweg.__file__).parent


def _imports(path: Path) -> set[str]:
    """thalweg modules ``path`` imports, anywhere in the file (function-local imports included)."""
    module = "thalweg." + ".".join(path.relative_to(PACKAGE).with_suffix("").parts)
    if module.endswith(".__init__"):
        module = module[: -len(".__init__")]
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("thalweg")}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.startswith("thalweg"):
                if node.module:  # `from .x import y` runs x (and y, when y is a module); `from . import x` runs x only
                    found.add(target)
                found |= {f"{target}.{a.name}" for a in node.names}
    modules = {"thalweg." + ".".join(p.relative_to(PACKAGE).with_suffix("").parts).removesuffix(".__init__")
               for p in PACKAGE.rglob("*.py")}
    return {m for m in found if m in modules and m != module}


def _graph() -> dict[str, set[str]]:
    graph = {}
    for path in PACKAGE.rglob("*.py"):
        name = "thalweg." + ".".join(path.relative_to(PACKAGE).with_suffix("").parts).removesuffix(".__init__")
        graph[name] = _imports(path)
    return graph


def test_no_import_cycles_including_function_local_imports():
    graph = _graph()
    for start in graph:
        stack, seen = [(start, [start])], set()
        while stack:
            node, path = stack.pop()
            for nxt in graph.get(node, ()):
                if nxt == start and not (len(path) == 1 or start == "thalweg"):
                    # a package importing its submodules and a submodule importing a sibling through the
                    # package is not a cycle of modules; anything else is
                    if not all(p.startswith(start + ".") or p == start for p in path):
                        pytest.fail(f"import cycle: {' -> '.join(path + [start])}")
                if nxt not in seen:
                    seen.add(nxt)
                    stack.append((nxt, path + [nxt]))


def test_dependencies_point_one_way():
    graph = _graph()
    optimizers = {m for m in graph if m.startswith("thalweg.optim")}
    for module, imports in graph.items():
        if module.startswith("thalweg.engine"):
            assert not imports & optimizers, f"{module} imports an optimizer: {imports & optimizers}"
            assert not {i for i in imports if not i.startswith("thalweg.engine")}, f"{module}: {imports}"
    assert "thalweg._base" not in graph["thalweg.distributed"]
    assert not {i for i in graph["thalweg.distributed"] if i.startswith("thalweg")}, graph["thalweg.distributed"]


def test_each_optimizer_is_named_in_at_most_three_files():
    """Outside the arena and the CLI, an optimizer's class name (or its thalweg.create name as a string)
    appears in the code of its own module and the package exports only; docstrings and comments do not count.
    One pairing is by design: Muon's module builds MuonWithAdamW, which hands a model's non-matrices to AdamW."""
    names = {cls.__name__: cls.name for cls in map(thalweg.optim.__dict__.get, thalweg.optim.__all__)}
    hyperparameters = {"momentum"}  # Momentum's create name is also SGD's hyper-parameter, spelled in code
    counts = {name: set() for name in names}
    for path in PACKAGE.rglob("*.py"):
        relative = path.relative_to(PACKAGE)
        if relative.parts[0] == "arena" or relative.name == "cli.py":
            continue
        tree = ast.parse(path.read_text())
        docstrings = {id(n.body[0].value) for n in ast.walk(tree) if isinstance(
            n, (ast.Module, ast.FunctionDef, ast.ClassDef)) and n.body and isinstance(n.body[0], ast.Expr)}
        for node in ast.walk(tree):
            for cls_name, create_name in names.items():
                if isinstance(node, ast.Name) and node.id == cls_name or \
                        isinstance(node, ast.Attribute) and node.attr == cls_name or \
                        isinstance(node, ast.ClassDef) and node.name == cls_name or \
                        isinstance(node, ast.alias) and node.name == cls_name or \
                        (isinstance(node, ast.Constant) and node.value in (cls_name, create_name)
                         and id(node) not in docstrings and node.value not in hyperparameters):
                    counts[cls_name].add(str(relative))
    paired = {"AdamW": {str(Path("optim") / "muon.py")}}
    for name, files in counts.items():
        assert len(files - paired.get(name, set())) <= 3, f"{name} is named in {sorted(files)}"
        assert files, f"{name} is named nowhere?"


def test_every_optimizer_is_one_rule():
    for cls in map(thalweg.optim.__dict__.get, thalweg.optim.__all__):
        assert isinstance(cls.rule, engine.Rule), cls
        module = Path(sys.modules[cls.__module__].__file__)
        assert cls.rule.filename == str(module), (cls, cls.rule.filename)


def _write_rule(source: str, name: str):
    """A rule defined in a module file of its own (rules read their source)."""
    import importlib.util

    path = Path(__file__).with_name(f"_generated_{name}_for_test.py")
    path.write_text("from thalweg.engine import Flag, PerTensor, rule, sqrt, where\n\n\n" + source)
    try:
        spec = importlib.util.spec_from_file_location(path.stem, path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return getattr(module, name)
    finally:
        path.unlink()


def test_a_value_read_twice_in_one_statement_is_not_overwritten_in_place():
    """where(c, x * y, x): the reference and foreach code must not form x * y in x's memory while the other
    side still reads x (RAdam's two branches). Checked against the rule called on float64 tensors."""
    mixed = _write_rule(
        "@rule\n"
        "def mixed(param, grad, *, step, lr):\n"
        "    update = grad * lr\n"
        "    param = param - where(step > 2, update * sqrt(abs(grad) + 1), update)\n"
        "    return (param,)\n", "mixed")
    for backend in ("reference", "foreach"):
        params = [torch.linspace(-1, 1, 7, dtype=torch.float64) for _ in range(2)]
        grads = [torch.linspace(2, -3, 7, dtype=torch.float64) for _ in range(2)]
        steps = [torch.tensor(float(k)) for k in (1, 4)]  # one tensor on each side of the condition
        expected = [p - (g * 0.1 * torch.sqrt(g.abs() + 1) if float(s) + 1 > 2 else g * 0.1)
                    for p, g, s in zip(params, grads, steps)]
        program = mixed.program(dict(lr=0.1))
        engine.run(program, backend, params, grads, [], steps, None, dict(lr=0.1))
        for got, want in zip(params, expected):
            torch.testing.assert_close(got, want, rtol=1e-14, atol=0, msg=lambda m: f"{backend}: {m}")


def test_per_tensor_values_supplied_by_the_optimizer_reach_every_backend(monkeypatch):
    """A PerTensor input (NAdam's mu_product, ASGD's eta) is a float64 column: per tensor on the host, as step
    is, and the same on every backend."""
    scaled = _write_rule(
        "@rule\n"
        "def scaled(param, grad, *, lr, factor: PerTensor):\n"
        "    param = param - lr * (1 - factor) * grad\n"
        "    return (param,)\n", "scaled")
    assert scaled.supplied == ("factor",) and "factor" not in scaled.scalars
    factors = np.array([0.25, 0.5, 0.75])
    for backend in ("reference", "foreach") + (("fused",) if FUSED else ()):
        params = [torch.ones(5) * k for k in (1.0, 2.0, 3.0)]
        grads = [torch.ones(5) for _ in range(3)]
        engine.run(scaled.program(dict(lr=0.5)), backend, params, grads, [], None, None, dict(lr=0.5, factor=factors))
        for k, param in enumerate(params):
            torch.testing.assert_close(param, torch.full((5,), (k + 1.0) - 0.5 * (1 - factors[k])),
                                       msg=lambda m: f"{backend}, tensor {k}: {m}")


ALIASING_RULES = {  # where() with a per-tensor condition returns the tensor it picks: a role's own tensor
    "moved": ("    z = where(first, param, z)\n    param = param - lr * grad\n    z = z - 2 * lr * grad\n",
              lambda p, z, g, first: (p - 0.1 * g, (p if first else z) - 0.2 * g)),
    "kept": ("    z = where(first, param, z)\n    param = param - lr * grad\n",
             lambda p, z, g, first: (p - 0.1 * g, p if first else z)),
    "swapped": ("    new = where(first, param, z)\n    z = where(first, z, param)\n    param = new - lr * grad\n",
                lambda p, z, g, first: ((p if first else z) - 0.1 * g, z if first else p)),
}


@pytest.mark.parametrize("name", ALIASING_RULES)
def test_a_role_is_not_overwritten_while_a_value_picked_from_it_is_still_read(name):
    """``z = where(first, param, z)`` makes z the parameter's own tensor on a first step: writing the new
    parameter must wait until z has been read (and stored), on every backend; the order of the final copies
    must not let one overwrite what another still copies (the swap). Checked against the formula by hand."""
    body, formula = ALIASING_RULES[name]
    aliasing = _write_rule(f"@rule\ndef {name}(param, grad, z, *, first, lr):\n{body}    return param, z\n", name)
    for backend in ("reference", "foreach") + (("fused",) if FUSED else ()):
        for first in (True, False):
            p, z, g = torch.linspace(-1, 1, 6, dtype=torch.float64), torch.full((6,), 3.0, dtype=torch.float64), \
                torch.linspace(2, -1, 6, dtype=torch.float64)
            want_p, want_z = formula(p.clone(), z.clone(), g, first)
            params, states = [p], [[z]]
            engine.run(aliasing.program(dict(lr=0.1)), backend, params, [g], states, None, np.array([first]),
                       dict(lr=0.1))
            torch.testing.assert_close(params[0], want_p, rtol=1e-14, atol=0, msg=lambda m: f"{backend} param: {m}")
            torch.testing.assert_close(states[0][0], want_z, rtol=1e-14, atol=0, msg=lambda m: f"{backend} z: {m}")
