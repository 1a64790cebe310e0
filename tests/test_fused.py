"""backend="fused" against the reference backend: params and every state tensor, every option.

The reference backend (torch.optim's for-loop math) is the ground truth. Each case runs 25 steps on a
mix of shapes (0-d, empty, odd sizes, tensors larger than one 64k chunk) where some tensors get no
gradient on some steps, so step counts differ per tensor (a frozen-then-unfrozen layer).
"""

from __future__ import annotations

import builtins
import copy
import subprocess
import sys

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import thalweg
from thalweg import engine
from thalweg.engine import host

pytestmark = pytest.mark.skipif(
    engine.unavailable_reason(torch.device("cpu")) is not None,
    reason=f"backend='fused' unavailable on CPU: {engine.unavailable_reason(torch.device('cpu'))}",
)

SHAPES = [(3, 5), (), (0,), (7,), (70_001,), (2, 3, 4), (1,), (65_536,)]

CASES = [
    ("SGD", dict(lr=0.1)),
    ("SGD", dict(lr=0.1, momentum=0.9)),
    ("SGD", dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.1)),
    ("SGD", dict(lr=0.1, momentum=0.9, dampening=0.3, maximize=True)),
    ("Adam", dict(lr=0.01)),
    ("Adam", dict(lr=0.01, weight_decay=0.1, amsgrad=True)),
    ("Adam", dict(lr=0.01, betas=(0.3, 0.4), maximize=True)),  # betas < 0.5: lerp's other form
    ("AdamW", dict(lr=0.01, weight_decay=0.1, amsgrad=True, maximize=True)),
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
]


def _run(name, options, backend, dtype, shapes=SHAPES, steps=25, seed=0):
    generator = torch.Generator().manual_seed(seed)
    params = [torch.randn(shape, generator=generator, dtype=torch.float64).to(dtype).requires_grad_() for shape in shapes]
    options = dict(options)
    group = {"params": params}
    if "trust_ratio" in options:
        group["trust_ratio"] = options.pop("trust_ratio")
    optimizer = getattr(thalweg, name)([group], backend=backend, **options)
    for step in range(steps):
        for i, param in enumerate(params):
            # no gradient on some steps: step counts differ per tensor
            skip = (step + i) % 4 == 0 and i % 2 == 0
            param.grad = None if skip else torch.randn(param.shape, generator=generator, dtype=torch.float64).to(dtype)
        optimizer.step()
    return params, optimizer


def _assert_same(ref_params, ref_opt, fused_params, fused_opt, rtol):
    def close(actual, expected, what):
        scale = expected.abs().max().item() if expected.numel() else 0.0
        torch.testing.assert_close(actual, expected, rtol=rtol, atol=rtol * max(scale, 1e-30), msg=lambda m: f"{what}: {m}")

    for i, (expected, actual) in enumerate(zip(ref_params, fused_params)):
        close(actual.detach(), expected.detach(), f"param {i}")
        ref_state, fused_state = ref_opt.state[expected], fused_opt.state[actual]
        assert ref_state.keys() == fused_state.keys(), f"param {i}: state keys differ"
        for key in ref_state:
            assert fused_state[key].dtype == ref_state[key].dtype, f"param {i} state {key}: dtype"
            close(fused_state[key], ref_state[key], f"param {i} state {key}")


@pytest.fixture(params=["serial", "parallel"])
def kernel_build(request, monkeypatch):
    """Both ways a kernel runs: on the calling thread (small buckets) and on torch's thread team (large ones)."""
    from thalweg.engine import cpu

    monkeypatch.setattr(cpu, "PARALLEL_FROM", 1 << 62 if request.param == "serial" else 0)
    return request.param


@pytest.mark.parametrize("dtype,rtol", [(torch.float32, 1e-5), (torch.float64, 1e-10)], ids=["float32", "float64"])
@pytest.mark.parametrize("name,options", CASES, ids=[f"{n}-{'-'.join(f'{k}={v}' for k, v in o.items())}" for n, o in CASES])
def test_fused_matches_reference(name, options, dtype, rtol, kernel_build):
    ref = _run(name, options, "reference", dtype)
    fused = _run(name, options, "fused", dtype)
    _assert_same(*ref, *fused, rtol=rtol)
    # the case really moved the parameters (a kernel that does nothing would fail above, but say so)
    start = _run(name, options, "reference", dtype, steps=0)[0]
    assert any((a - b).abs().max() > 0 for a, b in zip(fused[0], start) if a.numel())


@pytest.mark.parametrize("name,options", CASES[::3], ids=[n for n, _ in CASES[::3]])
def test_fused_bfloat16_close_to_reference(name, options):
    """bf16: the kernel rounds once per stored value, the reference once per torch op: a few bf16 ulps apart."""
    ref = _run(name, options, "reference", torch.bfloat16, steps=5)
    fused = _run(name, options, "fused", torch.bfloat16, steps=5)
    for expected, actual in zip(ref[0], fused[0]):
        scale = expected.float().abs().max().item() if expected.numel() else 0.0
        torch.testing.assert_close(actual.float(), expected.float(), rtol=0, atol=5e-2 * max(scale, 1e-30))


def test_bfloat16_rounding_is_round_to_nearest_even():
    """Plain SGD is one torch op (fp32 math, one rounding): the kernel must match it bit for bit.

    Powers of two for lr keep lr·g exact, so only the final float32 -> bfloat16 rounding is compared.
    """
    bits = torch.arange(0, 1 << 16, dtype=torch.int32)
    values = bits.to(torch.int16).view(torch.bfloat16)
    values = values[torch.isfinite(values)]
    for lr in (1.0, 0.5, 0.25):
        params = [values.clone().requires_grad_() for _ in range(2)]
        grads = [values.roll(1), values.flip(0)]
        expected = [p.detach().clone() for p in params]
        for p, g in zip(expected, grads):
            p.add_(g, alpha=-lr)
        for p, g in zip(params, grads):
            p.grad = g
        thalweg.SGD(params, lr=lr, backend="fused").step()
        for p, e in zip(params, expected):
            same = (p.detach().view(torch.int16) == e.view(torch.int16)) | (p.detach().isnan() & e.isnan())
            assert bool(same.all()), f"lr={lr}: {(~same).sum().item()} values rounded differently"


def test_many_tensors_one_call_and_mixed_dtypes():
    """200 tensors in two dtypes plus ones no kernel takes (float16 on CPU, strided) in the same group.

    Those go to the program's foreach path (the fused backend's fallback, one collective per group when
    sharded whatever the mix), so the float16 one equals the foreach backend's result exactly, and every
    other tensor the reference's to 1e-5. (float16 foreach ops round their Python scalars to float16, as
    torch's do; the for-loop's do not: the two differ by an ulp there.)"""
    shapes = [(i % 37 + 1,) for i in range(200)]
    for name, options in [("Adam", dict(lr=0.01, weight_decay=0.1)), ("LAMB", dict(lr=0.01)), ("LARS", dict(lr=0.5))]:
        results = []
        for backend in ("reference", "fused", "foreach"):
            generator = torch.Generator().manual_seed(1)
            params = [torch.randn(s, generator=generator).to(torch.float64 if i % 3 == 0 else torch.float32).requires_grad_()
                      for i, s in enumerate(shapes)]
            params.append(torch.randn(8, generator=generator).half().requires_grad_())
            params.append(torch.randn(6, 4, generator=generator).t().detach().requires_grad_())  # non-contiguous
            optimizer = getattr(thalweg, name)(params, backend=backend, **options)
            for _ in range(5):
                for p in params:
                    grad = torch.randn(p.shape, generator=generator).to(p.dtype)
                    p.grad = grad.t().contiguous().t() if not p.is_contiguous() else grad
                optimizer.step()
            results.append((params, optimizer))
        (ref_params, ref_opt), (params, fused_opt), (foreach_params, foreach_opt) = results
        half = len(shapes)
        _assert_same(ref_params[:half] + ref_params[half + 1:], ref_opt, params[:half] + params[half + 1:], fused_opt,
                     rtol=1e-5)
        _assert_same(foreach_params[half:half + 1], foreach_opt, params[half:half + 1], fused_opt, rtol=0)


def test_adagrad_sparse_gradients_fall_back():
    results = []
    for backend in ("reference", "fused"):
        generator = torch.Generator().manual_seed(2)
        embedding = torch.randn(50, 4, generator=generator, requires_grad=True)
        dense = torch.randn(9, generator=generator, requires_grad=True)
        optimizer = thalweg.Adagrad([embedding, dense], lr=0.1, backend=backend)
        for _ in range(5):
            rows = torch.randint(0, 50, (7,), generator=generator)
            embedding.grad = torch.sparse_coo_tensor(rows[None], torch.randn(7, 4, generator=generator), (50, 4))
            dense.grad = torch.randn(9, generator=generator)
            optimizer.step()
        results.append(([embedding, dense], optimizer))
    _assert_same(*results[0], *results[1], rtol=1e-5)


def test_state_dict_round_trip_between_backends():
    """A checkpoint written by the reference backend resumes under the fused one (same state names)."""
    params, optimizer = _run("Adam", dict(lr=0.01, amsgrad=True), "reference", torch.float32, steps=10)
    clone = [p.detach().clone().requires_grad_() for p in params]
    fused = thalweg.Adam(clone, lr=0.01, amsgrad=True, backend="fused")
    fused.load_state_dict(copy.deepcopy(optimizer.state_dict()))  # state_dict() shares tensors
    for p, c in zip(params, clone):
        g = torch.randn(p.shape)
        p.grad, c.grad = g, g.clone()
    optimizer.step()
    fused.step()
    _assert_same(params, optimizer, clone, fused, rtol=1e-5)


@given(sizes=st.lists(st.integers(0, 200_000), min_size=1, max_size=6), chunk=st.sampled_from([1, 7, 1 << 16]))
def test_chunk_table_covers_every_element_once(sizes, chunk):
    table = host.chunk_table(sizes, chunk)
    covered = np.zeros(sum(sizes) if sizes else 0, dtype=np.int64) if chunk > 1 or sum(sizes) < 50_000 else None
    if covered is None:
        return
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    for tensor, start, stop in table:
        assert 0 <= start < stop <= sizes[tensor] and stop - start <= chunk
        covered[offsets[tensor] + start: offsets[tensor] + stop] += 1
    assert (covered == 1).all()


def test_missing_numba_gives_install_hint(monkeypatch):
    real_import = builtins.__import__

    def fail_numba(name, *args, **kwargs):
        if name == "numba" or name.startswith("numba."):
            raise ImportError("No module named 'numba'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fail_numba)
    monkeypatch.setattr(engine, "_CHECKED", {})
    monkeypatch.setitem(sys.modules, "numba", None)  # what an uninstalled module looks like to find_spec
    reason = engine.unavailable_reason(torch.device("cpu"))
    assert reason is not None and "pip install" in reason and "numba" in reason
    param = torch.zeros(3, requires_grad=True)
    param.grad = torch.ones(3)
    with pytest.raises(RuntimeError, match="pip install"):
        thalweg.Adam([param], backend="fused").step()
    assert thalweg.Adam([param]).backend_for(torch.device("cpu"), [param], {}) == "reference"


def test_import_thalweg_without_numba_or_triton():
    code = (
        "import sys; sys.modules['numba'] = None; sys.modules['triton'] = None\n"
        "import torch, thalweg\n"
        "p = torch.zeros(3, requires_grad=True); p.grad = torch.ones(3)\n"
        "thalweg.Adam([p]).step()\n"  # auto falls back to the reference path
        "try:\n    thalweg.Adam([p], backend='fused').step()\nexcept RuntimeError as e:\n    print('ERR', e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "ERR" in out.stdout and "pip install" in out.stdout


def test_state_verdicts_follow_the_state_tensors():
    """partition() remembers which state tensors passed its checks, by identity: a state replaced by a
    strided one must be checked anew (and fall back to the reference path), and a dead one forgotten."""
    import gc

    def run(backend):
        torch.manual_seed(0)
        params = [torch.randn(6, 5, requires_grad=True), torch.randn(7, requires_grad=True)]
        optimizer = thalweg.Adam(params, lr=0.1, backend=backend)
        replaced = []  # kept alive: the verdict must follow the new object, not the death of the old one
        for step in range(6):
            for p in params:
                p.grad = torch.randn_like(p)
            optimizer.step()
            if step == 2:  # same values, now a transposed (non-contiguous) view
                state = optimizer.state[params[0]]
                replaced.append(state["exp_avg"])
                state["exp_avg"] = state["exp_avg"].t().contiguous().t()
                assert not state["exp_avg"].is_contiguous()
        return params, optimizer

    _assert_same(*run("reference"), *run("fused"), rtol=1e-6)
    entries = len(host._LAYOUTS)
    params, optimizer = run("fused")
    assert len(host._LAYOUTS) > entries
    del params, optimizer
    gc.collect()
    assert len(host._LAYOUTS) == entries


@pytest.mark.parametrize("name", ["SGD", "Adam", "Adagrad"])
def test_a_parameter_given_new_storage_is_checked_again(name):
    """``p.data = ...`` (what ``model.to`` and ``model.half`` do) keeps the Parameter object but gives it
    new storage, maybe of another layout: the remembered layout must notice, or the kernel would read a
    column-major parameter as a row-major one."""

    def run(backend):
        torch.manual_seed(0)
        params = [torch.randn(6, 5, requires_grad=True), torch.randn(7, requires_grad=True)]
        optimizer = getattr(thalweg, name)(params, lr=0.1, **({"momentum": 0.9} if name == "SGD" else {}),
                                           backend=backend)
        for step in range(5):
            for p in params:
                p.grad = torch.randn(p.shape)  # row-major whatever the parameter's layout
            optimizer.step()
            if step == 1:
                params[1].data = params[1].data.clone()
            if step == 3:  # same values and shape, column-major: the reference path's now
                params[0].data = params[0].data.t().contiguous().t()
        return params, optimizer

    _assert_same(*run("reference"), *run("fused"), rtol=1e-6)


@pytest.mark.parametrize("name", ["SGD", "Adam", "LAMB"])
def test_autograd_sees_the_kernels_in_place_writes(name):
    """As with torch's in-place ops: a graph that saved a parameter before the step refuses a second
    backward after it, instead of silently using the updated values."""
    for backend in ("reference", "fused"):
        weight, inputs = torch.randn(5, requires_grad=True), torch.randn(5)
        optimizer = getattr(thalweg, name)([weight], lr=0.1, backend=backend)
        loss = (weight * weight * inputs).sum()
        loss.backward(retain_graph=True)
        optimizer.step()
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            loss.backward()


@pytest.mark.parametrize("change", ["size", "dtype"])
def test_a_gradient_that_no_longer_matches_its_parameter_is_not_read_by_a_kernel(change):
    """torch lets ``p.grad.data = x`` give a gradient another size or dtype than its parameter; a
    kernel reading it as the parameter's would read past its end or misread it. The parameter goes to
    the reference path instead, which fails as torch does."""
    params = [torch.randn(64, requires_grad=True), torch.randn(64, requires_grad=True)]
    outcomes = []
    for backend in ("reference", "fused"):
        optimizer = thalweg.Adam([p.detach().clone().requires_grad_() for p in params], lr=0.1, backend=backend)
        for p in optimizer.param_groups[0]["params"]:
            p.grad = torch.ones_like(p)
        optimizer.step()
        grad = optimizer.param_groups[0]["params"][1].grad
        grad.data = torch.ones(8) if change == "size" else torch.ones(64, dtype=torch.float64)
        with pytest.raises(RuntimeError) as error:
            optimizer.step()
        outcomes.append(type(error.value))
    assert outcomes[0] is outcomes[1]


@pytest.mark.parametrize("with_float64", [False, True], ids=["float32+bf16", "with-float64"])
def test_fused_global_grad_norm_matches_float64_sum(with_float64, kernel_build):
    """max_grad_norm's norm on the fused path: one numba sum per dtype, strided/float16 grads through torch."""
    from thalweg._base import global_grad_norm, report_dtype

    generator = torch.Generator().manual_seed(3)
    grads = [torch.randn(shape, generator=generator) for shape in SHAPES]
    grads += [torch.randn(6, generator=generator).to(torch.bfloat16), torch.randn(5, generator=generator).half(),
              torch.randn(4, 6, generator=generator).t()]  # float16 and a transposed view fall back
    if with_float64:
        grads.append(torch.randn(9, generator=generator, dtype=torch.float64))
    expected = torch.linalg.vector_norm(torch.cat([g.double().flatten() for g in grads]))
    norm = global_grad_norm(grads, fused_cpu=True)
    assert norm.dtype == torch.float64  # accumulated in float64 on every backend (issue #16, finding 5)
    assert report_dtype(grads) == (torch.float64 if with_float64 else torch.float32)  # as clip_grad_norm_ returns it
    torch.testing.assert_close(norm, expected, rtol=1e-12, atol=0)
    torch.testing.assert_close(global_grad_norm(grads), expected, rtol=1e-12, atol=0)  # the foreach path alike


def test_a_fused_cpu_step_takes_the_clipping_norm_with_the_kernel(monkeypatch):
    from thalweg.engine import cpu

    calls = []
    original = cpu.sum_of_squares
    monkeypatch.setattr(cpu, "sum_of_squares", lambda grads: calls.append(len(grads)) or original(grads))
    params = [torch.randn(5, requires_grad=True), torch.randn(3, 2, requires_grad=True)]
    for backend, expected_calls in (("reference", []), ("fused", [2])):
        calls.clear()
        optimizer = thalweg.Adam(params, lr=0.1, max_grad_norm=0.5, backend=backend)
        for p in params:
            p.grad = torch.full_like(p, 3.0)
        optimizer.step()
        assert calls == expected_calls, backend
        torch.testing.assert_close(optimizer.last_grad_norm, torch.tensor(3.0 * 11 ** 0.5), rtol=1e-6, atol=0)


def test_kernels_run_on_torchs_openmp_team():
    """On Linux torch runs on an OpenMP runtime, and the kernels must find its entry: otherwise every
    "parallel" case above would quietly run on one thread."""
    from thalweg.engine import cpu

    if sys.platform.startswith("linux") and torch.backends.openmp.is_available():
        assert cpu.OPENMP_ENTRY != 0
    assert cpu.threads_for(1 << 20) == (torch.get_num_threads() if cpu.OPENMP_ENTRY else 1)
    assert cpu.threads_for(10) == 1  # a small bucket stays on the caller


@pytest.mark.parametrize("grab", [1, 3, 1000])
def test_team_takes_every_chunk_once(grab, monkeypatch):
    """The team shares chunks through an atomic counter, ``grab`` at a time: each chunk must be
    updated exactly once whatever the grab (an SGD step with lr=1 and grad=1 subtracts 1 per visit)."""
    from thalweg.engine import cpu

    monkeypatch.setattr(cpu, "PARALLEL_FROM", 0)
    monkeypatch.setattr(cpu, "CHUNK_FOR_GRAB", grab * host.CHUNK)
    params = [torch.zeros(size).requires_grad_() for size in (5, 70_001, 1, 200_000, 65_536, 3)]
    for param in params:
        param.grad = torch.ones_like(param)
    thalweg.SGD(params, lr=1.0, backend="fused").step()
    for param in params:
        assert torch.equal(param.detach(), torch.full_like(param, -1.0))


def test_steps_from_several_python_threads_at_once():
    """Two optimizers stepping at the same time from two threads (each thread leads its own team)
    give what they give one after the other."""
    import threading

    from thalweg.engine import cpu

    def make(seed):
        generator = torch.Generator().manual_seed(seed)
        params = [torch.randn(300_000, generator=generator).requires_grad_() for _ in range(3)]
        return params, thalweg.Adam(params, lr=0.01, backend="fused"), generator

    def train(params, optimizer, generator):
        for _ in range(20):
            for param in params:
                param.grad = torch.randn(param.shape, generator=generator)
            optimizer.step()

    assert cpu.PARALLEL_FROM < 900_000  # the buckets below do run on teams
    together = [make(seed) for seed in (1, 2)]
    threads = [threading.Thread(target=train, args=case) for case in together]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for seed, (params, _, _) in zip((1, 2), together):
        alone = make(seed)
        train(*alone)
        for a, b in zip(params, alone[0]):
            assert torch.equal(a.detach(), b.detach())
