"""The Triton (CUDA) kernels of backend="fused", generated from each rule and run by Triton's interpreter.

``TRITON_INTERPRET=1`` makes ``@triton.jit`` functions run through numpy on host memory, so the CUDA
kernels' math, pointer tables, chunking and per-tensor norms are checked on a machine without a GPU.
Each case runs the optimizer class with backend="fused" and the bucket launcher pointed at
:mod:`thalweg.engine.gpu`, against the reference backend: params and every state tensor, after 25 steps
on 0-d, empty, odd-sized and multi-chunk tensors, some without a gradient on some steps (so step counts
differ per tensor). What the interpreter cannot show — that the real compiler accepts the generated
source for a GPU — is checked by compiling every kernel for sm_90 (Hopper) in a subprocess, no GPU needed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

# Read by triton when a kernel is decorated (conftest.py sets it first on a machine without CUDA).
os.environ["TRITON_INTERPRET"] = "1"

try:
    import triton  # noqa: F401
    import triton.language as tl
except ImportError as error:  # the CPU suite without the [cuda] extra
    pytest.skip(f"triton is not installed ({error}): the Triton kernels cannot be interpreted",
                allow_module_level=True)
if type(tl.zeros).__name__ != "InterpretedFunction":
    pytest.skip("triton was imported before TRITON_INTERPRET=1 was set (conftest.py sets it only without CUDA): "
                "run TRITON_INTERPRET=1 pytest tests/test_triton.py on its own", allow_module_level=True)

import thalweg
from thalweg.engine import driver, gpu, triton_runtime

# Small chunks so a 1000-element tensor spans four programs (the interpreter is slow with large ones).
SHAPES = [(3, 5), (), (0,), (7,), (1000,), (2, 3, 4), (1,)]

CASES = [
    ("SGD", dict(lr=0.1)),
    ("SGD", dict(lr=0.1, momentum=0.9)),
    ("SGD", dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.1)),
    ("SGD", dict(lr=0.1, momentum=0.9, dampening=0.3, maximize=True, weight_decay=0.05)),
    ("Adam", dict(lr=0.01)),
    ("Adam", dict(lr=0.01, weight_decay=0.1, amsgrad=True)),
    ("Adam", dict(lr=0.01, betas=(0.3, 0.4), maximize=True)),  # betas < 0.5: lerp's other form
    ("AdamW", dict(lr=0.01, weight_decay=0.1, amsgrad=True, maximize=True)),
    ("AdamW", dict(lr=0.01, weight_decay=0.1)),
    ("RMSprop", dict(lr=0.01)),
    ("RMSprop", dict(lr=0.01, centered=True)),
    ("RMSprop", dict(lr=0.01, momentum=0.5, weight_decay=0.1)),
    ("RMSprop", dict(lr=0.01, centered=True, momentum=0.9, alpha=0.3, maximize=True)),
    ("Adagrad", dict(lr=0.1)),
    ("Adagrad", dict(lr=0.1, lr_decay=0.05, weight_decay=0.1, initial_accumulator_value=0.1, maximize=True)),
    ("LARS", dict(lr=0.5)),
    ("LARS", dict(lr=0.5, momentum=0, weight_decay=0.01)),
    ("LARS", dict(lr=0.5, nesterov=True, weight_decay=0.01, maximize=True)),
    ("LARS", dict(lr=0.5, trust_ratio=False)),
    ("LAMB", dict(lr=0.01)),
    ("LAMB", dict(lr=0.01, bias_correction=False, weight_decay=0)),
    ("LAMB", dict(lr=0.01, maximize=True, trust_ratio=False)),
    ("LAMB", dict(lr=0.01, weight_decay=0.1, maximize=True)),
]
IDS = [f"{n}-{'-'.join(f'{k}={v}' for k, v in o.items())}" for n, o in CASES]


@pytest.fixture
def triton_launcher(monkeypatch):
    """backend="fused" buckets go to the Triton launcher (they would go to numba for CPU tensors); returns
    the names of the kernels launched, in order."""
    monkeypatch.setattr(driver, "_launcher", lambda device: gpu)
    monkeypatch.setattr(gpu, "CHUNK", 256)
    monkeypatch.setattr(gpu, "BLOCK", 128)
    monkeypatch.setattr(gpu, "SEGMENT_BLOCK", 2)  # a tensor's 4 partial sums take two iterations
    launches = []

    class Counted:  # counts launches: one per bucket and pass, never one per tensor
        def __init__(self, kernel, name):
            self.kernel, self.name = kernel, name

        def __getitem__(self, grid):
            launches.append(self.name)
            return self.kernel[grid]

    original = gpu.kernels
    monkeypatch.setattr(gpu, "kernels", lambda *args: [Counted(k, f"pass{i}") for i, k in enumerate(original(*args))])
    monkeypatch.setattr(triton_runtime, "segment_sums", Counted(triton_runtime.segment_sums, "segment_sums"))
    return launches


def _run(name, options, dtype, steps, seed=0, state_dtype=None):
    generator = torch.Generator().manual_seed(seed)
    params = [torch.randn(shape, generator=generator, dtype=torch.float64).to(dtype).requires_grad_()
              for shape in SHAPES]
    options = dict(options)
    backend = options.pop("backend")
    group = {"params": params}
    if "trust_ratio" in options:
        group["trust_ratio"] = options.pop("trust_ratio")
    optimizer = getattr(thalweg, name)([group], backend=backend, state_dtype=state_dtype, **options)
    for step in range(steps):
        for i, param in enumerate(params):
            skip = (step + i) % 4 == 0 and i % 2 == 0  # no gradient: this tensor's step count lags
            param.grad = None if skip else torch.randn(param.shape, generator=generator, dtype=torch.float64).to(dtype)
        optimizer.step()
    return params, optimizer


def _assert_same(expected_run, actual_run, rtol):
    (ref_params, ref_opt), (params, opt) = expected_run, actual_run

    def close(actual, expected, what):
        # a bfloat16 parameter is the float32 result rounded once: a float32 difference of one ulp may
        # fall on either side of a bfloat16 rounding boundary, so allow one bfloat16 ulp there
        tolerance = max(rtol, 2.0**-7) if expected.dtype == torch.bfloat16 else rtol
        actual, expected = actual.double(), expected.double()
        scale = expected.abs().max().item() if expected.numel() else 0.0
        torch.testing.assert_close(actual, expected, rtol=tolerance, atol=rtol * max(scale, 1e-30),
                                   msg=lambda m: f"{what}: {m}")

    for i, (expected, actual) in enumerate(zip(ref_params, params)):
        close(actual.detach(), expected.detach(), f"param {i} {tuple(expected.shape)}")
        ref_state, state = ref_opt.state[expected], opt.state[actual]
        assert ref_state.keys() == state.keys(), f"param {i}: state keys differ"
        for key in ref_state:
            assert state[key].dtype == ref_state[key].dtype, f"param {i} state {key}: dtype"
            close(state[key], ref_state[key], f"param {i} state {key}")


def _norm_passes(name, options):
    return name in ("LARS", "LAMB") and options.get("trust_ratio", True)


@pytest.mark.parametrize("name,options", CASES, ids=IDS)
def test_triton_matches_reference_float32(name, options, triton_launcher):
    steps = 25
    expected = _run(name, dict(options, backend="reference"), torch.float32, steps)
    actual = _run(name, dict(options, backend="fused"), torch.float32, steps)
    _assert_same(expected, actual, rtol=1e-5)
    start = _run(name, dict(options, backend="reference"), torch.float32, 0)[0]
    assert any((a - b).abs().max() > 0 for a, b in zip(actual[0], start) if a.numel()), "nothing moved"
    # one launch per step, or the norm pass, the per-tensor sums and the storing pass
    per_step = ["pass0", "segment_sums", "pass1"] if _norm_passes(name, options) else ["pass0"]
    assert triton_launcher == per_step * steps


@pytest.mark.parametrize("name,options", CASES[::2], ids=IDS[::2])
def test_triton_float64(name, options, triton_launcher):
    """float64 storage computes in float64 (as the reference does)."""
    expected = _run(name, dict(options, backend="reference"), torch.float64, 10)
    actual = _run(name, dict(options, backend="fused"), torch.float64, 10)
    _assert_same(expected, actual, rtol=1e-10)


@pytest.mark.parametrize("name,options", CASES[::2], ids=IDS[::2])
def test_triton_bfloat16_close_to_reference(name, options, triton_launcher):
    """bf16: float32 math, each stored value rounded once (the reference rounds once per torch op)."""
    expected = _run(name, dict(options, backend="reference"), torch.bfloat16, 5)
    actual = _run(name, dict(options, backend="fused"), torch.bfloat16, 5)
    for ref, got in zip(expected[0], actual[0]):
        scale = ref.float().abs().max().item() if ref.numel() else 0.0
        torch.testing.assert_close(got.detach().float(), ref.detach().float(), rtol=0, atol=5e-2 * max(scale, 1e-30))


@pytest.mark.parametrize("name,options", CASES[1::3], ids=IDS[1::3])
def test_triton_bfloat16_params_with_float32_state(name, options, triton_launcher):
    """``state_dtype=torch.float32``: the kernels read bfloat16 parameters and float32 state in one pass (the
    state roles are typed apart), as the reference steps a float32 copy and rounds it once."""
    expected = _run(name, dict(options, backend="reference"), torch.bfloat16, 10, state_dtype=torch.float32)
    actual = _run(name, dict(options, backend="fused"), torch.bfloat16, 10, state_dtype=torch.float32)
    _assert_same(expected, actual, rtol=1e-5)
    assert all(v.dtype == torch.float32 for s in actual[1].state.values() for k, v in s.items() if k != "step")
    assert triton_launcher, "the kernels did not run"


def test_bfloat16_rounding_is_round_to_nearest_even(triton_launcher):
    """Plain SGD with lr a power of two is one exact product and one rounding: bit for bit torch's.

    Triton's interpreter truncates on a float32 -> bfloat16 cast; the kernels round by integer
    operations instead, so the interpreter and CUDA store the same bits.
    """
    bits = torch.arange(0, 1 << 16, dtype=torch.int32)
    values = bits.to(torch.int16).view(torch.bfloat16)
    values = values[torch.isfinite(values)][::7].contiguous()
    for lr in (1.0, 0.5):
        params = [values.clone().requires_grad_(), values.flip(0).contiguous().requires_grad_()]
        grads = [values.roll(1).contiguous(), values.clone()]
        expected = [p.detach().clone() for p in params]
        for p, g in zip(expected, grads):
            p.add_(g, alpha=-lr)
        for p, g in zip(params, grads):
            p.grad = g
        thalweg.SGD(params, lr=lr, backend="fused").step()
        for p, e in zip(params, expected):
            p = p.detach()
            same = (p.view(torch.int16) == e.view(torch.int16)) | (p.isnan() & e.isnan())
            assert bool(same.all()), f"lr={lr}: {(~same).sum().item()} values rounded differently"


def test_many_tensors_one_launch(triton_launcher):
    """40 tensors of two dtypes: one launch per dtype bucket; a strided gradient takes the foreach path."""
    params = [torch.randn(5 + i, dtype=torch.float32 if i % 3 else torch.bfloat16).requires_grad_() for i in range(40)]
    grads = [torch.randn_like(p) for p in params]
    grads[4] = torch.randn(2 * params[4].numel(), dtype=params[4].dtype)[::2]  # not contiguous
    expected = [p.detach().clone() for p in params]
    for p, g in zip(expected, grads):
        p.add_(g, alpha=-0.1)
    for p, g in zip(params, grads):
        p.grad = g
    thalweg.SGD(params, lr=0.1, backend="fused").step()
    assert triton_launcher == ["pass0", "pass0"]
    for p, e in zip(params, expected):  # bf16: torch's fma may round p - lr·g one ulp apart
        tol = 1e-6 if p.dtype == torch.float32 else 8e-3
        torch.testing.assert_close(p.detach(), e, rtol=tol, atol=tol)


INT8_CASES = [
    ("AdamW", dict(lr=0.01, weight_decay=0.1, amsgrad=True)),
    ("SGD", dict(lr=0.1, momentum=0.9, nesterov=True)),
    ("RMSprop", dict(lr=0.01, centered=True, momentum=0.5)),
    ("Lion", dict(lr=1e-3)),
    ("Adan", dict(lr=0.01, weight_decay=0.1)),
    ("Rprop", dict(lr=0.01)),  # prev in 8 bits, step_size in float: both kinds of state in one kernel
    ("LAMB", dict(lr=0.01, weight_decay=0.1)),  # norms: a first pass that only sums, a last that encodes
    ("AdamW", dict(lr=0.01, cautious=True)),
]


@pytest.mark.parametrize("name,options,dtype", [(n, o, torch.float32) for n, o in INT8_CASES]
                         + [(n, o, torch.bfloat16) for n, o in INT8_CASES[::2]],  # (the interpreter is slow)
                         ids=[f"{n}-float32" for n, _ in INT8_CASES] + [f"{n}-bfloat16" for n, _ in INT8_CASES[::2]])
def test_triton_8bit_state_matches_reference(name, options, dtype, triton_launcher, monkeypatch):
    """state_dtype="int8": the kernels decode, step and encode in one launch per bucket (blocks of 256 in the
    BLOCK elements a program holds); codes, absmax and parameters against the reference backend's 8-bit step.
    Tensors of 4100 elements (a short last block) and 5120 (two chunks), and a small one with float state."""
    from test_state_int8 import _decoded_state, _mostly_close

    monkeypatch.setattr(gpu, "CHUNK", 512)
    monkeypatch.setattr(gpu, "BLOCK", 256)

    def run(backend):
        generator = torch.Generator().manual_seed(1)
        params = [torch.randn(shape, generator=generator).to(dtype).requires_grad_() for shape in [(4100,), (64, 80), (7,)]]
        optimizer = getattr(thalweg, name)(params, backend=backend, state_dtype="int8", **options)
        for _ in range(4):
            for param in params:
                param.grad = torch.randn(param.shape, generator=generator).to(dtype)
            optimizer.step()
        return params, optimizer

    expected_params, expected = run("reference")
    launched = len(triton_launcher)
    params, optimizer = run("fused")
    assert len(triton_launcher) - launched >= 4, "the 8-bit steps ran through the Triton kernels"
    tight = 1e-5 if dtype == torch.float32 else 8e-3
    for index, (param, reference) in enumerate(zip(params, expected_params)):
        _mostly_close(param.detach(), reference.detach(), f"{name} param {index}", tight=tight)
        ours, theirs = _decoded_state(optimizer, param), _decoded_state(expected, reference)
        for key in theirs:
            _mostly_close(ours[key], theirs[key], f"{name} param {index} {key}", tight=1e-5)
        for key, value in expected.state[reference].items():
            if value.dtype == torch.uint8:
                assert float((optimizer.state[param][key] != value).float().mean()) < 1e-3, key


def test_unavailable_reason_for_cuda_is_honest():
    """backend="fused" on CUDA is offered only where CUDA and triton both work."""
    reason = thalweg.engine.unavailable_reason(torch.device("cuda"))
    if not torch.cuda.is_available():
        assert reason is not None and "CUDA" in reason
    else:
        assert reason is None


# -- the real compiler ---------------------------------------------------------------------------------

COMPILE_SCRIPT = Path(__file__).with_name("compile_triton_sm90.py")


def test_every_generated_kernel_compiles_for_sm90(tmp_path):
    """The generated source of every optimizer's kernels (every flag its grid switches, float32, float64,
    bfloat16, bfloat16 with float32 state, float16), compiled by Triton's real pipeline for an H100/H200
    (sm_90) down to a cubin — no GPU needed. The interpreter runs Python: it would accept code the
    compiler rejects (a float64 ``div_rn``, a type mismatch between branches)."""
    try:
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.compiler import make_backend

        make_backend(GPUTarget("cuda", 90, 32))
    except Exception as error:  # noqa: BLE001 - a triton without its NVIDIA backend cannot say more
        pytest.skip(f"this triton cannot target NVIDIA GPUs: {type(error).__name__}: {error}")
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    out = tmp_path / "compiled.json"
    result = subprocess.run([sys.executable, str(COMPILE_SCRIPT), str(out)], capture_output=True, text=True,
                            timeout=500, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    compiled = json.loads(out.read_text())
    failures = {name: entry["error"] for name, entry in compiled.items() if entry.get("error")}
    assert not failures, failures
    assert len(compiled) >= 100, f"only {len(compiled)} kernels compiled"
    assert {"stochastic", "kahan", "int8-kahan"} <= {name.split("/")[1].split("float32-")[-1] for name in compiled}
    for name, entry in compiled.items():
        assert entry["cubin_bytes"] > 0, name
        if "float32" in name.split("/")[1]:
            # IEEE-rounded division and square root, no contraction into fma where the rule has none
            assert "div.approx" not in entry["ptx_ops"] and "sqrt.approx" not in entry["ptx_ops"], name


@pytest.mark.parametrize("mode", ["stochastic", "kahan"])
def test_triton_rounds_bfloat16_parameters_as_the_reference(mode, triton_launcher, monkeypatch):
    """param_update: the kernels' hash, stochastic rounding and compensated store. SGD steps whose float32 results
    are exact give the reference's bits exactly; AdamW with float32 and with 8-bit state, and two-pass LAMB, give
    the reference's parameters (almost all bits) and weight + compensation."""
    from test_param_update import _mostly_equal

    monkeypatch.setattr(gpu, "CHUNK", 512)
    monkeypatch.setattr(gpu, "BLOCK", 256)

    def run(backend, name, state_dtype, exact, **options):
        generator = torch.Generator().manual_seed(2)
        params = [torch.randn(s, generator=generator).bfloat16().requires_grad_() for s in [(4100,), (7,), ()]]
        optimizer = getattr(thalweg, name)(params, backend=backend, state_dtype=state_dtype, param_update=mode,
                                           **options)
        for _ in range(3):
            for param in params:
                param.grad = ((torch.randint(-2048, 2048, param.shape, generator=generator) / 256) if exact
                              else torch.randn(param.shape, generator=generator)).bfloat16()
            optimizer.step()
        return [(p.detach(), optimizer.state[p].get("kahan_comp")) for p in params]

    cases = [("SGD", torch.float32, True, dict(lr=2.0**-6)), ("AdamW", torch.float32, False, dict(lr=1e-2)),
             ("AdamW", "int8", False, dict(lr=1e-2)), ("LAMB", torch.float32, False, dict(lr=1e-2))]
    for name, state_dtype, exact, options in cases:
        expected = run("reference", name, state_dtype, exact, **options)
        launched = len(triton_launcher)
        ours = run("fused", name, state_dtype, exact, **options)
        assert len(triton_launcher) > launched
        for index, ((param, comp), (reference, reference_comp)) in enumerate(zip(ours, expected)):
            what = f"{name} {state_dtype} param {index}"
            if exact:
                assert torch.equal(param, reference), what
                assert comp is None or torch.equal(comp, reference_comp), what
            else:
                _mostly_equal(param, reference, what)
                if comp is not None:
                    torch.testing.assert_close(param.float() + comp.float(), reference.float() + reference_comp.float(),
                                               rtol=1e-5, atol=1e-6)
