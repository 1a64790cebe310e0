"""``param_update``: bfloat16 parameters without float32 master weights ("stochastic" and "kahan" rounding).

The definition is :mod:`thalweg.engine.rounding`: the roundings themselves are tested first (stochastic
rounding is unbiased and lands on a neighbour; the Kahan buffer keeps what rounding dropped), then every
optimizer on every backend against its counterpart run on float32 copies whose values are stored into the
bfloat16 parameters by those functions, the fused kernels against the reference bit for bit, a task where
rounding to nearest stalls, checkpoints (a resumed run rounds as one never stopped), memory, and errors.
"""

from __future__ import annotations

import inspect

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import thalweg
from specs import SPECS, assert_same_state, draw_case, grad_stream, make_params, split_groups
from test_backends import SHAPES, groups_for, none_at
from thalweg.engine import rounding

MODES = ("stochastic", "kahan")
STEPS = 12
ROUNDED = [s for s in SPECS if "param_update" in inspect.signature(s.cls).parameters]


def _neighbours(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The bfloat16 values at or below and at or above each float32 value (toward zero, away from zero)."""
    bits = values.view(torch.int32).to(torch.int64)
    down = (bits & ~0xFFFF).to(torch.int32).view(torch.float32)
    up = ((bits & ~0xFFFF) + 0x10000).to(torch.int32).view(torch.float32)
    exact = (bits & 0xFFFF) == 0
    return down, torch.where(exact, down, up)


# -- the roundings ------------------------------------------------------------------------------------


def test_stochastic_rounding_lands_on_a_neighbour_and_keeps_bfloat16_values():
    values = torch.randn(100_000) * torch.logspace(-30, 30, 100_000)
    rounded = rounding.stochastic(values, rounding.key(3, 1), 0).float()
    down, up = _neighbours(values)
    assert bool(((rounded == down) | (rounded == up)).all())
    assert 0.3 < float((rounded == up).float().mean()) < 0.7  # (both sides taken)
    exact = values.bfloat16().float()
    assert torch.equal(rounding.stochastic(exact, rounding.key(3, 1), 0).float(), exact)
    special = torch.tensor([float("nan"), float("inf"), -float("inf"), 0.0, -0.0, 3e38])
    torch.testing.assert_close(rounding.stochastic(special[:5], 5, 0).float(), special[:5].bfloat16().float(),
                               equal_nan=True, rtol=0, atol=0)
    assert float(rounding.stochastic(special[5:], 5, 0).float()) in (float(_neighbours(special[5:])[0]),
                                                                      float(_neighbours(special[5:])[1]))


@pytest.mark.parametrize("fraction", [0.01, 0.3, 0.5, 0.77])
def test_stochastic_rounding_is_unbiased_across_elements_and_across_steps(fraction):
    """E[round(x)] = x: the mean over 2^17 elements of one step, and over 4096 steps of one element (what lets a
    weight move by updates far below bfloat16's spacing), within 5 standard deviations of a fair coin."""
    spacing = 2.0**-7  # between bfloat16 values in [1, 2)
    x = 1.0 + fraction * spacing
    n = 1 << 17
    rounded = rounding.stochastic(torch.full((n,), x), rounding.key(0, 0), 0).double()
    sd = spacing * (fraction * (1 - fraction) / n) ** 0.5
    assert abs(float(rounded.mean()) - x) < 5 * sd + 1e-12
    steps = 4096
    over_time = torch.stack([rounding.stochastic(torch.tensor([x]), rounding.key(s, 2), 7) for s in range(steps)])
    sd = spacing * (fraction * (1 - fraction) / steps) ** 0.5
    assert abs(float(over_time.double().mean()) - x) < 5 * sd


def test_the_random_bits_follow_the_element_in_the_whole_tensor():
    """A shard starting at element 1000 draws the bits the whole tensor draws there (FSDP2 rounds as one process)."""
    values = torch.rand(3000) + 1
    whole = rounding.stochastic(values, 12345, 0)
    assert torch.equal(rounding.stochastic(values[1000:], 12345, 1000), whole[1000:])
    assert not torch.equal(rounding.stochastic(values[1000:], 12345, 0), whole[1000:])
    assert not torch.equal(rounding.stochastic(values, 12346, 0), whole)


def test_kahan_keeps_what_rounding_dropped():
    """1000 additions of 1e-4 to 1.0: to nearest the weight never moves (half a spacing is 0.0039); with the
    compensation it ends within one spacing of 1.1, and weight + compensation within 5 % of the distance moved (the
    buffer is bfloat16 itself: each step rounds it by up to 2^-9 of its size, here always the same way)."""
    param, comp = torch.ones(4, dtype=torch.bfloat16), torch.zeros(4, dtype=torch.bfloat16)
    nearest = torch.ones(4, dtype=torch.bfloat16)
    exact = torch.ones(4, dtype=torch.float64)
    for _ in range(1000):
        rounding.kahan(param, param.float() + 1e-4, comp)
        nearest.copy_(nearest.float() + 1e-4)
        exact += 1e-4
    assert torch.equal(nearest, torch.ones(4, dtype=torch.bfloat16))
    assert float((param.double() - exact).abs().max()) <= 2.0**-7  # within one spacing of 1.1
    assert float((param.double() + comp.double() - exact).abs().max()) < 0.05 * 0.1


# -- every optimizer, every backend -------------------------------------------------------------------


def _emulation(spec, mode, **options):
    """The counterpart on float32 copies of bfloat16 parameters (test_state_dtype.run_emulation), each copy's new value
    stored into its parameter by ``rounding.stochastic`` (the key of the step's count and the parameter's position) or
    ``rounding.kahan``; returns the optimizer, the parameters and their compensations."""
    from test_state_dtype import run_emulation

    comps = {}

    def store(step, index, param, copy):
        if copy.grad is None:  # (not stepped)
            return
        if mode == "stochastic":
            param.copy_(rounding.stochastic(copy, rounding.key(step, index), 0))
        else:
            rounding.kahan(param, copy, comps.setdefault(index, torch.zeros_like(param)))

    optimizer, params = run_emulation(spec, torch.bfloat16, store=store, **options)
    return optimizer, params, [comps.get(index, torch.zeros_like(p)) for index, p in enumerate(params)]


def _ours(spec, backend, mode, **extra):
    params = make_params(SHAPES, torch.bfloat16, 7)
    ctor = {**spec.required, **{k: spec.grid[-1][k] for k in spec.counterpart_ctor_only}}
    optimizer = spec.cls(groups_for(spec, params, counterpart=True), **ctor, backend=backend, param_update=mode,
                         **{"state_dtype": torch.float32, **extra})
    for step, grads in enumerate(grad_stream(SHAPES, torch.bfloat16, 7, STEPS)):
        for index, (param, grad) in enumerate(zip(params, grads)):
            param.grad = None if none_at(step, index) else grad.clone()
        optimizer.step()
    return optimizer, params


def _without_comp(optimizer):
    """The optimizer as assert_same_state reads it, its state_dict without ``kahan_comp`` (which the counterpart
    does not keep; a parameter whose state is only that has none)."""
    class View:
        @staticmethod
        def state_dict():
            saved = optimizer.state_dict()
            state = {i: {k: v for k, v in s.items() if k != "kahan_comp"} for i, s in saved["state"].items()}
            return {"state": {i: s for i, s in state.items() if s}, "param_groups": saved["param_groups"]}
    return View


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("spec", ROUNDED, ids=repr)
def test_every_optimizer_rounds_its_float32_step_by_the_mode(spec, backend, mode):
    """Params, state and compensation against the counterpart on float32 copies rounded by the definition."""
    ours, params = _ours(spec, backend, mode)
    expected, expected_params, comps = _emulation(spec, mode)
    assert all(p.dtype is torch.bfloat16 for p in params)
    assert_same_state(_without_comp(ours), expected, params, expected_params)
    if mode == "kahan":
        for index, (param, comp) in enumerate(zip(params, comps)):
            if param.numel() and comp.abs().max() > 0:
                got = ours.state[param]["kahan_comp"]
                assert got.dtype is torch.bfloat16 and got.shape == param.shape
                # weight + compensation is the float32 weight; it may differ by the float32 steps' ulps
                torch.testing.assert_close((param.float() + got.float()), (expected_params[index].float() + comp.float()),
                                           rtol=1e-4, atol=1e-4 * float(param.detach().float().abs().max()))
    else:
        assert not any("kahan_comp" in s for s in ours.state.values())


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("spec", [s for s in ROUNDED if s.name in ("adamw", "momentum", "lamb", "rmsprop", "lion")],
                         ids=repr)
@settings(max_examples=6, deadline=None)
@given(data=st.data())
def test_random_hyperparameters_and_shapes(spec, mode, data):
    combo, shapes, _, seed = draw_case(data, spec, [torch.bfloat16])
    params = make_params(shapes, torch.bfloat16, seed)
    ours = spec.build(spec.cls, split_groups(params, combo, spec), combo, backend="fused", state_dtype=torch.float32,
                      param_update=mode)
    for grads in grad_stream(shapes, torch.bfloat16, seed, STEPS):
        for param, grad in zip(params, grads):
            param.grad = grad.clone()
        ours.step()
    expected, expected_params, _ = _emulation(
        spec, mode, shapes=shapes, seed=seed,
        build=lambda copies: spec.build(spec.counterpart, split_groups(copies, combo, spec), combo),
        missing=lambda step, index: False)
    assert_same_state(_without_comp(ours), expected, params, expected_params)


def _stepped(name, backend, mode, state_dtype, steps=4, **options):
    generator = torch.Generator().manual_seed(5)
    shapes = [(4100,), (64, 70), (7,), (), (0,), (2, 3, 4)]
    params = [torch.randn(s, generator=generator).bfloat16().requires_grad_() for s in shapes]
    params.append(torch.randn(3, 5, generator=generator).requires_grad_())  # float32: stored as before
    strided = torch.randn(2, 3, 4, 5, generator=generator).bfloat16().to(memory_format=torch.channels_last)
    params.append(strided.requires_grad_())  # (not contiguous: the fused path leaves it to foreach)
    optimizer = getattr(thalweg, name)(params, backend=backend, state_dtype=state_dtype, param_update=mode, **options)
    for _ in range(steps):
        for param in params:
            param.grad = torch.randn(param.shape, generator=generator).to(param.dtype)
        optimizer.step()
    return params, optimizer


def _mostly_equal(actual, expected, what):
    """bfloat16 values: the same bits almost everywhere, one spacing apart at most where the two backends' float32
    steps differ by an ulp across a rounding boundary (their float32 ops need not round alike: see test_backends)."""
    same = (actual == expected) | (actual.isnan() & expected.isnan())
    assert float(same.float().mean()) > 0.995 if actual.numel() else True, f"{what}: {int((~same).sum())} differ"
    torch.testing.assert_close(actual.float(), expected.float(), rtol=2.0**-7, atol=0, msg=what)


@pytest.mark.parametrize("state_dtype", [torch.float32, "int8"], ids=str)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name,options", [("AdamW", dict(lr=1e-2, weight_decay=0.1)), ("SGD", dict(lr=0.1)),
                                          ("SGD", dict(lr=0.1, momentum=0.9)), ("LAMB", dict(lr=1e-2)),
                                          ("Lion", dict(lr=1e-3))], ids=lambda v: str(v))
def test_the_fused_kernels_round_as_the_reference(name, options, mode, state_dtype):
    """The numba kernels' hash, stochastic rounding and compensated store against the reference backend's (one and
    two-pass programs, 8-bit state, a float32 parameter and a strided one in the same group)."""
    from specs import assert_close

    expected_params, expected = _stepped(name, "reference", mode, state_dtype, **options)
    for backend in ("foreach", "fused"):
        params, optimizer = _stepped(name, backend, mode, state_dtype, **options)
        for index, (param, reference) in enumerate(zip(params, expected_params)):
            what = f"{backend} param {index}"
            if param.dtype is torch.bfloat16:
                _mostly_equal(param.detach(), reference.detach(), what)
            else:
                assert_close(param.detach(), reference.detach(), what=what)
            ours, theirs = optimizer.state[param], expected.state[reference]
            assert ours.keys() == theirs.keys()
            for key, value in theirs.items():
                if value.dtype is torch.uint8:  # 8-bit codes: a float32 ulp may move a value across a code boundary
                    assert float((ours[key] != value).float().mean()) < 1e-3, f"{what} {key}"
                elif key == "kahan_comp":  # weight + compensation is the float32 weight
                    assert_close(param.detach().float() + ours[key].float(),
                                 reference.detach().float() + value.float(), what=f"{what} weight + {key}")
                else:
                    assert_close(ours[key], value, what=f"{what} {key}")


@pytest.mark.parametrize("mode", MODES)
def test_from_the_same_float32_values_every_backend_stores_the_same_bits(mode):
    """SGD steps whose float32 results are exact (lr 2^-6, gradients multiples of 2^-8 below 8): every backend has the
    same float32 values to round, so the parameters and compensations must be equal bit for bit (the kernels' hash,
    stochastic rounding and compensated store are the reference's)."""
    results = {}
    for backend in ("reference", "foreach", "fused"):
        generator = torch.Generator().manual_seed(3)
        params = [torch.randn(s, generator=generator).bfloat16().requires_grad_() for s in [(70_000,), (7,), ()]]
        optimizer = thalweg.SGD(params, lr=2.0**-6, backend=backend, state_dtype=torch.float32, param_update=mode)
        for _ in range(5):
            for param in params:
                param.grad = (torch.randint(-2048, 2048, param.shape, generator=generator) / 256).bfloat16()
            optimizer.step()
        results[backend] = [(p.detach(), optimizer.state[p].get("kahan_comp")) for p in params]
    for backend in ("foreach", "fused"):
        for index, ((param, comp), (expected, expected_comp)) in enumerate(zip(results[backend], results["reference"])):
            assert torch.equal(param, expected), f"{backend} param {index}"
            assert (comp is None) == (mode == "stochastic")
            assert comp is None or torch.equal(comp, expected_comp), f"{backend} param {index} kahan_comp"


def test_only_bfloat16_parameters_get_a_compensation():
    params, optimizer = _stepped("AdamW", "fused", "kahan", torch.float32, steps=1)
    for param in params:
        assert ("kahan_comp" in optimizer.state[param]) == (param.dtype is torch.bfloat16)


# -- a task where rounding to nearest stalls ----------------------------------------------------------


def _regression(dtype, backend="fused", name="Adam", **options):
    """Least squares on 16 weights of magnitude 1-2 started 0.05 off, Adam at lr 2e-4: each update is about 2e-4,
    below half of bfloat16's spacing there (2^-8 = 0.0039). Returns the loss before and after 600 steps."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(1024, 16, generator=generator)
    target = (torch.rand(16, generator=generator) + 1) * torch.sign(torch.randn(16, generator=generator))
    y = x @ target + 0.3 * torch.randn(1024, generator=generator)
    weight = torch.nn.Parameter((target + 0.1 * (torch.rand(16, generator=generator) - 0.5)).to(dtype))
    optimizer = getattr(thalweg, name)([weight], lr=2e-4, backend=backend, **options)

    def loss():
        return ((x @ weight.float() - y) ** 2).mean()

    start = float(loss())
    for _ in range(600):
        optimizer.zero_grad()
        loss().backward()
        optimizer.step()
    return start, float(loss())


@pytest.mark.parametrize("backend", ["reference", "fused"])
def test_where_rounding_to_nearest_stalls_both_modes_keep_learning(backend):
    _, float32 = _regression(torch.float32, backend)
    start, nearest = _regression(torch.bfloat16, backend, state_dtype=torch.float32)
    assert nearest == start and nearest > 1.1 * float32  # not one weight moved
    for mode in MODES:
        _, loss = _regression(torch.bfloat16, backend, state_dtype=torch.float32, param_update=mode)
        assert abs(loss - float32) < 0.01 * float32, f"{mode}: {loss} vs float32 {float32}"
    _, eight_bit = _regression(torch.bfloat16, backend, state_dtype="int8", param_update="kahan")
    assert abs(eight_bit - float32) < 0.01 * float32


# -- checkpoints -------------------------------------------------------------------------------------


def _trained(mode, steps, seed=0, state=None):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(80, 64), torch.nn.Tanh(), torch.nn.Linear(64, 1)).bfloat16()
    optimizer = thalweg.AdamW(model.parameters(), lr=1e-3, state_dtype="int8", param_update=mode)
    if state is not None:
        model.load_state_dict(state[0])
        optimizer.load_state_dict(state[1])
    generator = torch.Generator().manual_seed(1)
    batches = [(torch.randn(32, 80, generator=generator).bfloat16(), torch.randn(32, 1, generator=generator).bfloat16())
               for _ in range(steps[1])]
    for x, y in batches[steps[0]:]:
        optimizer.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        optimizer.step()
    return model, optimizer


@pytest.mark.parametrize("mode", MODES)
def test_a_resumed_run_rounds_as_one_never_stopped(mode):
    import copy

    model, optimizer = _trained(mode, (0, 6))
    saved_model, saved = _trained(mode, (0, 3))
    checkpoint = copy.deepcopy((saved_model.state_dict(), saved.state_dict()))
    if mode == "stochastic":
        assert checkpoint[1]["param_groups"][0]["rounding_steps"] == 3
    else:
        comps = [s["kahan_comp"] for s in checkpoint[1]["state"].values()]
        assert comps and all(c.dtype is torch.bfloat16 for c in comps) and any(c.abs().max() > 0 for c in comps)
    resumed_model, resumed = _trained(mode, (3, 6), seed=1, state=checkpoint)
    for p, q in zip(model.parameters(), resumed_model.parameters()):
        assert torch.equal(p, q)
        for key, value in optimizer.state[p].items():
            assert torch.equal(resumed.state[q][key], value), key
    assert resumed.rounding_steps == optimizer.rounding_steps == (6 if mode == "stochastic" else 0)


def test_checkpoints_cross_between_modes():
    """A "nearest" checkpoint starts a "kahan" run with zero compensation; a "kahan" one loads into "nearest" (or
    into torch.optim.AdamW) without its compensation, which nothing there would read."""
    torch.manual_seed(0)
    param = torch.nn.Parameter(torch.randn(50, 50).bfloat16())
    kahan = thalweg.AdamW([param], lr=1e-3, state_dtype=torch.float32, param_update="kahan")
    param.grad = torch.randn_like(param)
    kahan.step()
    saved = kahan.state_dict()
    nearest = thalweg.AdamW([param], lr=1e-3, state_dtype=torch.float32)
    nearest.load_state_dict(saved)
    assert "kahan_comp" not in nearest.state[param]
    assert nearest.state[param]["exp_avg"].dtype is torch.float32
    again = thalweg.AdamW([param], lr=1e-3, state_dtype=torch.float32, param_update="kahan")
    again.load_state_dict(nearest.state_dict())
    assert "kahan_comp" not in again.state[param]
    again.step()
    assert again.state[param]["kahan_comp"].dtype is torch.bfloat16


# -- memory and errors ---------------------------------------------------------------------------------


def test_the_compensation_is_two_bytes_per_parameter():
    """Measured: the storage the state holds beyond the float32-state run's, per parameter of a bfloat16 model."""
    from test_state_int8 import _TinyGPT, _state_bytes_per_param

    torch.manual_seed(0)
    model = _TinyGPT().bfloat16()
    plain = _state_bytes_per_param(model, state_dtype="int8")
    kahan = _state_bytes_per_param(model, state_dtype="int8", param_update="kahan")
    stochastic = _state_bytes_per_param(model, state_dtype="int8", param_update="stochastic")
    assert stochastic == plain
    assert 1.99 < kahan - plain <= 2.0, f"{kahan - plain:.3f} bytes per parameter"


def test_errors_name_the_argument_and_change_nothing():
    param = torch.nn.Parameter(torch.randn(10).bfloat16())
    with pytest.raises(ValueError, match="param_update must be 'nearest', 'stochastic' or 'kahan', got 'up'"):
        thalweg.Adam([param], param_update="up")
    with pytest.raises(ValueError, match="param_update='kahan' rounds .* state_dtype=torch.float32 or state_dtype='int8'"):
        thalweg.Adam([param], param_update="kahan")
    half = torch.nn.Parameter(torch.randn(10).half())
    with pytest.raises(ValueError, match=r"params\[1\] is float16: param_update='kahan' rounds bfloat16"):
        thalweg.Adam([param, half], state_dtype=torch.float32, param_update="kahan")
    later = torch.nn.Parameter(torch.randn(10))  # float32 when the optimizer is built, float16 by the step
    optimizer = thalweg.Adam([param, later], state_dtype=torch.float32, param_update="stochastic")
    later.data = later.data.half()
    for p in (param, later):
        p.grad = torch.ones_like(p)
    before = param.detach().clone()
    with pytest.raises(RuntimeError, match=r"params\[1\] is float16: param_update='stochastic' rounds bfloat16"):
        optimizer.step()
    assert torch.equal(param, before) and not optimizer.state and optimizer.rounding_steps == 0

    kahan = thalweg.Adam([param], state_dtype=torch.float32, param_update="kahan")
    param.grad = torch.ones_like(param)
    kahan.step()
    kahan.state[param]["kahan_comp"] = torch.zeros(10)  # float32: damaged
    before = {k: v.clone() for k, v in kahan.state[param].items()}
    with pytest.raises(RuntimeError, match=r"state\['kahan_comp'\] is \(10,\) float32 cpu but the parameter is"):
        kahan.step()
    assert all(torch.equal(kahan.state[param][k], v) for k, v in before.items())

    embedding = torch.nn.Embedding(10, 4, sparse=True).bfloat16()
    sgd = thalweg.SGD(embedding.parameters(), lr=0.1, state_dtype=torch.float32, param_update="kahan")
    embedding(torch.tensor([1])).float().sum().backward()
    with pytest.raises(RuntimeError, match="param_update='kahan' cannot be used with sparse gradients"):
        sgd.step()
