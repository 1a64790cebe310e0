"""The Triton (CUDA) kernels of backend="fused", run by Triton's interpreter on CPU tensors.

``TRITON_INTERPRET=1`` makes ``@triton.jit`` functions run through numpy on host memory, so the CUDA
kernels' math, pointer tables, chunking and per-tensor norms are checked on a machine without a GPU
(what the interpreter cannot show: compilation for a real GPU, CUDA's rounding of fused multiply-adds,
speed). Each case runs the optimizer class with backend="fused" and the bucket launcher pointed at
:mod:`thalweg.kernels.triton_gpu`, against the reference backend: params and every state tensor,
after 25 steps on 0-d, empty, odd-sized and multi-chunk tensors, some without a gradient on some steps
(so step counts differ per tensor).
"""

from __future__ import annotations

import importlib
import os
import sys

import pytest
import torch

# Read by triton when a kernel is decorated: set before thalweg.kernels.triton_gpu is imported.
os.environ["TRITON_INTERPRET"] = "1"

try:
    import triton  # noqa: F401
except ImportError as error:  # the CPU suite without the [fused] extra
    pytest.skip(f"triton is not installed ({error}): the Triton kernels cannot be interpreted",
                allow_module_level=True)

import thalweg
from thalweg.kernels import fused
from thalweg.optim.sgd import sgd_reference

if "thalweg.kernels.triton_gpu" in sys.modules:  # imported earlier without the interpreter: rebuild
    triton_gpu = importlib.reload(sys.modules["thalweg.kernels.triton_gpu"])
else:
    triton_gpu = importlib.import_module("thalweg.kernels.triton_gpu")

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
    """backend="fused" buckets go to the Triton module (they would go to numba for CPU tensors)."""
    monkeypatch.setattr(fused, "_launcher", lambda device: triton_gpu)
    monkeypatch.setattr(triton_gpu, "CHUNK", 256)
    monkeypatch.setattr(triton_gpu, "BLOCK", 128)
    monkeypatch.setattr(triton_gpu, "SEGMENT_BLOCK", 2)  # a tensor's 4 partial sums take two iterations
    launches = []
    for name in ("_sgd_kernel", "_sum_squares_kernel", "_segment_kernel", "_adam_kernel", "_lamb_kernel",
                 "_rmsprop_kernel", "_adagrad_kernel"):
        kernel = getattr(triton_gpu, name)

        class Counted:  # counts launches: one per bucket (LARS/LAMB: three), never one per tensor
            def __getitem__(self, grid, kernel=kernel, name=name):
                launches.append(name)
                return kernel[grid]

        monkeypatch.setattr(triton_gpu, name, Counted())
    return launches


def _run(name, options, dtype, steps, seed=0):
    generator = torch.Generator().manual_seed(seed)
    params = [torch.randn(shape, generator=generator, dtype=torch.float64).to(dtype).requires_grad_()
              for shape in SHAPES]
    options = dict(options)
    backend = options.pop("backend")
    group = {"params": params}
    if "trust_ratio" in options:
        group["trust_ratio"] = options.pop("trust_ratio")
    optimizer = getattr(thalweg, name)([group], backend=backend, **options)
    for step in range(steps):
        for i, param in enumerate(params):
            skip = (step + i) % 4 == 0 and i % 2 == 0  # no gradient: this tensor's step count lags
            param.grad = None if skip else torch.randn(param.shape, generator=generator, dtype=torch.float64).to(dtype)
        optimizer.step()
    return params, optimizer


def _assert_same(expected_run, actual_run, rtol):
    (ref_params, ref_opt), (params, opt) = expected_run, actual_run

    def close(actual, expected, what):
        actual, expected = actual.double(), expected.double()
        scale = expected.abs().max().item() if expected.numel() else 0.0
        torch.testing.assert_close(actual, expected, rtol=rtol, atol=rtol * max(scale, 1e-30),
                                   msg=lambda m: f"{what}: {m}")

    for i, (expected, actual) in enumerate(zip(ref_params, params)):
        close(actual.detach(), expected.detach(), f"param {i} {tuple(expected.shape)}")
        ref_state, state = ref_opt.state[expected], opt.state[actual]
        assert ref_state.keys() == state.keys(), f"param {i}: state keys differ"
        for key in ref_state:
            assert state[key].dtype == ref_state[key].dtype, f"param {i} state {key}: dtype"
            close(state[key], ref_state[key], f"param {i} state {key}")


@pytest.mark.parametrize("name,options", CASES, ids=IDS)
def test_triton_matches_reference_float32(name, options, triton_launcher):
    steps = 25
    expected = _run(name, dict(options, backend="reference"), torch.float32, steps)
    actual = _run(name, dict(options, backend="fused"), torch.float32, steps)
    _assert_same(expected, actual, rtol=1e-5)
    start = _run(name, dict(options, backend="reference"), torch.float32, 0)[0]
    assert any((a - b).abs().max() > 0 for a, b in zip(actual[0], start) if a.numel()), "nothing moved"
    per_step = {"LARS": 3, "LAMB": 3}.get(name, 1)
    if name == "LARS" and options.get("trust_ratio") is False or name == "LAMB" and options.get("trust_ratio") is False:
        per_step = 1
    assert len(triton_launcher) == steps * per_step, f"launches: {sorted(set(triton_launcher))}"


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


def test_bfloat16_rounding_is_round_to_nearest_even(triton_launcher):
    """Plain SGD with lr a power of two is one exact product and one rounding: bit for bit torch's.

    Triton's interpreter truncates on a float32 -> bfloat16 cast; the kernels round by integer
    operations instead, so the interpreter and CUDA store the same bits.
    """
    bits = torch.arange(0, 1 << 16, dtype=torch.int32)
    values = bits.to(torch.int16).view(torch.bfloat16)
    values = values[torch.isfinite(values)][::7].contiguous()
    for lr in (1.0, 0.5):
        params = [values.clone(), values.flip(0).contiguous()]
        grads = [values.roll(1).contiguous(), values.clone()]
        expected = [p.clone() for p in params]
        for p, g in zip(expected, grads):
            p.add_(g, alpha=-lr)
        fused.sgd_fused(params, grads, momentum_buffers=[], lr=lr, momentum=0.0, dampening=0.0, weight_decay=0.0,
                        nesterov=False, maximize=False)
        for p, e in zip(params, expected):
            same = (p.view(torch.int16) == e.view(torch.int16)) | (p.isnan() & e.isnan())
            assert bool(same.all()), f"lr={lr}: {(~same).sum().item()} values rounded differently"


def test_many_tensors_one_launch(triton_launcher):
    """40 tensors of two dtypes: one launch per dtype bucket; a strided gradient takes the reference."""
    params = [torch.randn(5 + i, dtype=torch.float32 if i % 3 else torch.bfloat16) for i in range(40)]
    grads = [torch.randn_like(p) for p in params]
    grads[4] = torch.randn(2 * params[4].numel(), dtype=params[4].dtype)[::2]  # not contiguous
    expected = [p.clone() for p in params]
    sgd_reference(expected, grads, momentum_buffers=[], lr=0.1, momentum=0.0, dampening=0.0,
                                    weight_decay=0.0, nesterov=False, maximize=False)
    fused.sgd_fused(params, grads, momentum_buffers=[], lr=0.1, momentum=0.0, dampening=0.0, weight_decay=0.0,
                    nesterov=False, maximize=False)
    assert triton_launcher == ["_sgd_kernel", "_sgd_kernel"]
    for p, e in zip(params, expected):  # bf16: the reference's fma may round p - lr·g one ulp apart
        tol = 1e-6 if p.dtype == torch.float32 else 8e-3
        torch.testing.assert_close(p, e, rtol=tol, atol=tol)


def test_unavailable_reason_for_cuda_is_honest():
    """backend="fused" on CUDA is offered only where CUDA and triton both work."""
    from thalweg import kernels

    reason = kernels.unavailable_reason(torch.device("cuda"))
    if not torch.cuda.is_available():
        assert reason is not None and "CUDA" in reason
    else:
        assert reason is None
