"""``state_dtype="int8"``: blockwise 8-bit optimizer state (thalweg.engine.codec).

What is checked:
- the codec: the maps, absmax and codes equal torchao's and bitsandbytes' (pinned test-only packages;
  skipped when absent), and the fused kernels' encoder equals the codec's on every kind of hard input;
- the semantics, exactly: an 8-bit step is the float step on the decoded state, the new state encoded
  (the reference backend against a float optimizer driven by hand);
- every optimizer with 8-bit state, on every backend, against the reference backend (params and decoded
  state), float32 and bfloat16 parameters, shapes below, at and across the block and chunk sizes;
- torchao's AdamW8bit, 20 steps; checkpoints (torch and distributed), conversions from and to float
  state, damaged checkpoints; the memory it saves, measured from the state tensors; the errors.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import thalweg
from specs import SPECS, dcp_round_trip, make_params, run_seeded
from thalweg.engine import codec

FUSED = thalweg.engine.unavailable_reason(torch.device("cpu")) is None

INT8_SPECS = [spec for spec in SPECS if spec.cls.state_codecs]
# below the 4096-element threshold (float state), 0-d, empty, a partial last block, several blocks, and more
# than one 65536-element kernel chunk
SHAPES = [(64, 300), (5000,), (10,), (), (0,), (70000,)]
STEPS = 6


def _int8_params(params):
    return [p for p in params if p.numel() >= codec.SMALLEST]


# -- the codec ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("signed", [True, False])
def test_maps_equal_the_reference_packages(signed):
    ours = codec.dynamic_map(signed)
    assert ours.dtype == torch.float32 and ours.shape == (256,)
    assert bool((ours.diff() > 0).all()), "a map is strictly increasing"
    assert float(ours[-1]) == 1.0 and (float(ours[0]) < 0) == signed
    torchao = pytest.importorskip("torchao.optim.quant_utils")
    assert torch.equal(ours, torch.tensor(torchao.create_dynamic_map(signed), dtype=torch.float32))
    bnb = pytest.importorskip("bitsandbytes.functional")
    assert torch.equal(ours, bnb.create_dynamic_map(signed=signed))


def _log_spread(shape, seed, signed=True):
    generator = torch.Generator().manual_seed(seed)
    values = torch.randn(shape, generator=generator) * torch.logspace(-9, 3, shape[0])[:, None]
    return values if signed else values.abs()


@pytest.mark.parametrize("signed", [True, False])
def test_codes_and_absmax_equal_torchao(signed):
    quant = pytest.importorskip("torchao.optim.quant_utils")
    values = _log_spread((96, 256), 0, signed)
    codes, absmax = codec.encode(values, signed)
    scaled, scale = quant.scale_tensor(values, 256)
    table = torch.tensor(quant.create_dynamic_map(signed))
    assert torch.equal(absmax, scale)
    assert torch.equal(codes, quant.quantize_8bit_with_qmap(scaled, table))
    assert torch.equal(codec.decode(codes, absmax, signed), quant.dequant_with_qmap(codes, table, scale))


def test_absmax_equals_bitsandbytes_and_codes_are_never_farther():
    """bitsandbytes' CPU kernel searches the map with its own approximation: the absmax is equal, and where a
    code differs (measured: 28 of 16384 values here, 27 of them a neighbour at a midpoint, one 3e-6 value
    sent to 2.1e-5), ours is the map value at least as close to the input as theirs."""
    bnb = pytest.importorskip("bitsandbytes.functional")
    values = _log_spread((64, 256), 1)
    codes, absmax = codec.encode(values, True)
    try:
        theirs, state = bnb.quantize_blockwise(values, code=bnb.create_dynamic_map(signed=True), blocksize=256)
    except (RuntimeError, NotImplementedError) as error:  # a bitsandbytes build without its CPU kernels
        pytest.skip(f"bitsandbytes cannot quantise on CPU here: {error}")
    assert torch.equal(state.absmax, absmax)
    differ = theirs != codes
    assert differ.float().mean() < 0.01
    table = codec.dynamic_map(True).double()
    normalised = (values / absmax.repeat_interleave(256).view(values.shape)).double()
    ours_distance = (table[codes.long()] - normalised).abs()
    their_distance = (table[theirs.long()] - normalised).abs()
    assert bool((ours_distance <= their_distance).all())


@settings(max_examples=60, deadline=None)
@given(shape=st.one_of(st.just(()), st.tuples(st.integers(0, 1100)), st.tuples(st.integers(0, 40), st.integers(0, 40)),
                       st.tuples(st.integers(0, 12), st.integers(0, 12), st.integers(0, 12))), signed=st.booleans(),
       scale=st.floats(1e-30, 1e30), seed=st.integers(0, 2**16))
def test_encoding_any_tensor_keeps_each_value_within_its_map_step(shape, signed, scale, seed):
    """Any shape (0-d, empty, odd, several blocks with a short last one) and magnitude: the codes have the tensor's
    shape, one absmax per block equals the block's largest magnitude, and each decoded value is the nearest map
    value times it (within half a step of the map around the value, relative to the absmax)."""
    generator = torch.Generator().manual_seed(seed)
    values = torch.randn(shape, generator=generator) * scale
    if not signed:
        values = values.abs()
    codes, absmax = codec.encode(values, signed)
    n = values.numel()
    assert codes.shape == values.shape and codes.dtype == torch.uint8 and absmax.shape == (codec.n_blocks(n),)
    flat = values.reshape(-1)
    for block in range(codec.n_blocks(n)):
        expected = flat[block * 256:(block + 1) * 256].abs().max().clamp_min(1e-12)
        assert float(absmax[block]) == float(expected)
    table = codec.dynamic_map(signed).double()
    scales = absmax.double().repeat_interleave(256)[:n]
    normalised = flat.double() / scales
    chosen = table[codes.reshape(-1).long()]
    distance = (chosen - normalised).abs()
    best = (table[None, :] - normalised[:, None]).abs().min(dim=1).values if n else distance
    assert bool((distance <= best + 1e-6).all())  # (1e-6: x / absmax is rounded to float32 before the search)
    decoded = codec.decode(codes, absmax, signed).reshape(-1).double()
    assert torch.allclose(decoded, chosen * scales, rtol=1e-6, atol=0)


def test_blocks_follow_the_flattened_tensor_with_a_short_last_block():
    values = torch.randn(3, 300)  # 900 elements: blocks of 256, 256, 256, 132
    values.view(-1)[800] = 50.0
    codes, absmax = codec.encode(values, True)
    assert absmax.shape == (4,) and codes.shape == values.shape and codes.dtype == torch.uint8
    flat = values.reshape(-1)
    expected = torch.stack([flat[i:i + 256].abs().max() for i in range(0, 900, 256)])
    assert torch.equal(absmax, expected)
    assert float(absmax[3]) == 50.0
    decoded = codec.decode(codes, absmax, True)
    # the dynamic map's steps: a few % of the block's absmax near it, finer below
    assert torch.allclose(decoded, values, rtol=0.04, atol=absmax.max().item() * 2e-3)


def test_an_all_zero_block_encodes_to_zero():
    codes, absmax = codec.encode(torch.zeros(512), False)
    assert torch.equal(absmax, torch.full((2,), 1e-12))
    assert torch.equal(codec.decode(codes, absmax, False), torch.zeros(512))


def _adversarial(signed: bool) -> np.ndarray:
    """Every map value and boundary, one float32 step either side, every lookup interval's ends, and a grid."""
    table = codec.dynamic_map(signed).numpy()
    edges = codec.boundaries(signed)[:-1]
    starts = (np.arange(1 << 16, dtype=np.uint64) << 16).astype(np.uint32).view(np.float32)
    with np.errstate(invalid="ignore"):
        points = np.concatenate([table, edges, starts, np.linspace(-1, 1, 200001, dtype=np.float32)])
        points = np.concatenate([np.nextafter(points, np.float32(-2)), points, np.nextafter(points, np.float32(2))])
    points = points.astype(np.float32)
    points = points[np.isfinite(points) & (np.abs(points) <= 1) & ((points >= 0) | signed)]
    return points


@pytest.mark.parametrize("signed", [True, False])
def test_the_lookup_encoder_equals_the_search_of_the_map(signed):
    """encode() finds codes with a lookup table and one comparison (codec._code, as the kernels do); the definition
    is the nearest map value (codec._nearest, a search). They agree on every hard input."""
    points = torch.from_numpy(_adversarial(signed))
    assert torch.equal(codec._code(points, signed), codec._nearest(points, codec.dynamic_map(signed)))


@pytest.mark.parametrize("signed", [True, False])
def test_the_kernels_encoder_equals_the_codec(signed):
    """The fused kernels encode with a lookup table and one comparison (numba_runtime.encode); the codec's
    encoder searches the map. They agree on every map value, every rounding boundary and the floats next to
    them, every lookup interval's first value, and a fine grid."""
    numba = pytest.importorskip("numba")
    from thalweg.engine import numba_runtime as rt

    edges, table = (rt.SIGNED_EDGES, rt.SIGNED_LOOKUP) if signed else (rt.UNSIGNED_EDGES, rt.UNSIGNED_LOOKUP)

    @numba.njit
    def encode_all(values, out):
        for i in range(values.size):
            out[i] = rt.encode(edges, table, values[i])

    points = _adversarial(signed)
    ours = np.empty(points.size, dtype=np.uint8)
    encode_all(points, ours)
    expected = codec._nearest(torch.from_numpy(points), codec.dynamic_map(signed)).numpy()
    assert points.size > 100000
    np.testing.assert_array_equal(ours, expected)


# -- the optimizers ----------------------------------------------------------------------------------


def _stepped(spec, combo, backend, dtype=torch.float32, **extra):
    return run_seeded(spec.cls, SHAPES, dtype, combo, 3, steps=STEPS, backend=backend, **extra)


def _decoded_state(optimizer, param, *, scalars: bool = False) -> dict[str, torch.Tensor]:
    """A parameter's state with every 8-bit entry decoded (and its absmax left out); the step count and other
    one-element entries only with ``scalars``."""
    state = optimizer.state[param]
    out = {}
    for key, value in state.items():
        if key.endswith("_absmax") or (not scalars and (key == "step" or value.dim() == 0)):
            continue
        if isinstance(value, torch.Tensor) and value.dtype == torch.uint8:
            value = codec.decode(value, state[key + "_absmax"], optimizer.state_codecs[key] == "signed")
        out[key] = value
    return out


def _mostly_close(actual, expected, what, *, tight=1e-5, loose=2e-2, share=2e-3):
    """Within ``tight`` (relative to the largest entry) but for a ``share`` of the entries, which are within
    ``loose``: a value on a rounding boundary of the map may take the next code in one backend (float32
    results differ in the last bit between backends), and the step after it moves by that code's width."""
    assert actual.shape == expected.shape and actual.dtype == expected.dtype, what
    if expected.numel() == 0:
        return
    actual, expected = actual.double(), expected.double()
    scale = max(float(expected.abs().max()), 1e-30)
    error = (actual - expected).abs() / scale
    assert float(error.max()) <= loose, f"{what}: off by {float(error.max()):.3g} of its largest entry"
    assert float((error > tight).double().mean()) <= share, f"{what}: {float((error > tight).sum())} entries off"


def _combos(spec):
    """The spec's first and last grid entries (the plain options and the most options on), without the options
    only a param group takes (LARS's and LAMB's trust_ratio)."""
    chosen = [spec.grid[0], spec.grid[-1]] if len(spec.grid) > 1 else spec.grid
    return [{k: v for k, v in combo.items() if k not in spec.group_only} for combo in chosen]


@pytest.mark.parametrize("backend", ["foreach", "fused"])
@pytest.mark.parametrize("spec", INT8_SPECS, ids=lambda s: s.name)
def test_every_backend_equals_the_reference_backend(spec, backend):
    # The fused kernels: float32 with the plain options and with the most options on, bfloat16 with the latter (each
    # case compiles its kernels, a few seconds each on a fresh machine). foreach runs the reference's torch ops on
    # lists (the same decode and encode): the most options on, float32.
    plain, most = _combos(spec)[0], _combos(spec)[-1]
    cases = [(most, torch.float32)]
    if backend == "fused":
        cases += [(most, torch.bfloat16)] + ([(plain, torch.float32)] if plain != most else [])
    for combo, dtype in cases:
        expected_params, expected = _stepped(spec, combo, "reference", dtype, state_dtype="int8")
        params, optimizer = _stepped(spec, combo, backend, dtype, state_dtype="int8")
        tight = 1e-5 if dtype == torch.float32 else 8e-3
        for index, (param, reference) in enumerate(zip(params, expected_params)):
            what = f"{spec.name} {combo} {dtype} param {index}"
            _mostly_close(param.detach(), reference.detach(), what, tight=tight)
            ours, theirs = _decoded_state(optimizer, param), _decoded_state(expected, reference)
            assert set(ours) == set(theirs), what
            for key in theirs:
                _mostly_close(ours[key], theirs[key], f"{what} {key}", tight=1e-5 if theirs[key].dtype == torch.float32 else 8e-3)


@pytest.mark.parametrize("name,options", [("LAMB", dict(lr=1e-2, weight_decay=0.1)), ("LARS", dict(lr=0.1)),
                                          ("StableAdamW", dict(lr=1e-2)), ("AdamW", dict(lr=1e-2, cautious=True))])
def test_rules_with_norms_run_8bit_state_in_the_kernels(name, options, monkeypatch):
    """A rule with per-tensor norms runs 8-bit state in its two kernel passes (the first only sums, the last steps from
    the moments' float values and encodes them), nothing on the foreach path, and steps as the reference backend."""
    if not FUSED:
        pytest.skip("backend='fused' unavailable on CPU")
    from thalweg.engine import host

    seen = []
    original = host.codec_partition

    def partition(*args):
        buckets, rest, addresses = original(*args)
        seen.append(([bucket.codecs for bucket in buckets], rest))
        return buckets, rest, addresses

    monkeypatch.setattr(host, "codec_partition", partition)
    results = {}
    for backend in ("reference", "fused"):
        generator = torch.Generator().manual_seed(4)
        params = [torch.nn.Parameter(torch.randn(s, generator=generator)) for s in [(5000,), (64, 80), (7,)]]
        optimizer = getattr(thalweg, name)(params, backend=backend, state_dtype="int8", **options)
        for _ in range(4):
            for param in params:
                param.grad = torch.randn(param.shape, generator=generator)
            optimizer.step()
        results[backend] = params, optimizer
    assert seen and all(rest == [] and any(codecs) for codecs, rest in seen), seen
    (expected_params, expected), (params, optimizer) = results["reference"], results["fused"]
    for index, (param, reference) in enumerate(zip(params, expected_params)):
        _mostly_close(param.detach(), reference.detach(), f"{name} param {index}")
        ours, theirs = _decoded_state(optimizer, param), _decoded_state(expected, reference)
        for key in theirs:
            _mostly_close(ours[key], theirs[key], f"{name} param {index} {key}")


@pytest.mark.parametrize("spec", INT8_SPECS, ids=lambda s: s.name)
def test_an_8bit_step_is_the_float_step_on_the_decoded_state(spec):
    """The semantics, exactly: decode, step in float (the same optimizer without 8-bit state, on the reference
    backend), encode the new state. The parameter's update uses the float state, before it is encoded."""
    combo = _combos(spec)[-1]
    params = make_params([(40, 300), (70,)], torch.float32, 5)
    float_params = [p.detach().clone().requires_grad_() for p in params]
    eight = spec.cls(params, **combo, backend="reference", state_dtype="int8")
    plain = spec.cls(float_params, **combo, backend="reference")
    generator = torch.Generator().manual_seed(9)
    for _ in range(4):
        grads = [torch.randn(p.shape, generator=generator) for p in params]
        for p, q, g in zip(params, float_params, grads):
            p.grad, q.grad = g.clone(), g.clone()
            q.data.copy_(p.data)
            if p in eight.state:  # the float optimizer starts from the decoded 8-bit state (and its step counts)
                plain.state[q] = {k: v.clone() for k, v in _decoded_state(eight, p, scalars=True).items()}
        eight.step()
        plain.step()
        for p, q in zip(params, float_params):
            assert torch.equal(p, q), spec.name
            state = eight.state[p]
            for key, value in plain.state[q].items():
                kind = eight._codec(key, p)
                if kind is None:
                    assert torch.equal(state[key], value), f"{spec.name} {key}"
                    continue
                codes, absmax = codec.encode(value, kind == "signed")
                assert torch.equal(state[key], codes) and torch.equal(state[key + "_absmax"], absmax), \
                    f"{spec.name} {key}"


def test_state_layout_and_what_stays_float():
    big, small = torch.nn.Parameter(torch.randn(80, 64)), torch.nn.Parameter(torch.randn(3, 5, dtype=torch.bfloat16))
    optimizer = thalweg.AdamW([big, small], state_dtype="int8")
    big.grad, small.grad = torch.randn_like(big), torch.randn_like(small)
    optimizer.step()
    state = optimizer.state[big]
    assert state["exp_avg"].dtype == state["exp_avg_sq"].dtype == torch.uint8
    assert state["exp_avg"].shape == big.shape
    assert state["exp_avg_absmax"].dtype == torch.float32 and state["exp_avg_absmax"].shape == (20,)
    assert set(optimizer.state[small]) == {"step", "exp_avg", "exp_avg_sq"}
    assert optimizer.state[small]["exp_avg"].dtype == torch.float32  # below 4096 elements: float32 state
    rprop = thalweg.Rprop([big], state_dtype="int8")
    rprop.step()
    assert rprop.state[big]["prev"].dtype == torch.uint8 and rprop.state[big]["step_size"].dtype == torch.float32


def test_matches_torchao_adamw8bit():
    """torchao's AdamW8bit (pinned, test-only) against AdamW(state_dtype="int8"), 20 steps on CPU. torchao
    computes its bias corrections in float32 and its second moment with lerp; a value on a rounding boundary
    may then take the neighbouring code for a step, which moves that element by a fraction of one update:
    within 1e-5 of the parameter's scale."""
    optim = pytest.importorskip("torchao.optim")
    generator = torch.Generator().manual_seed(11)
    start = torch.randn(32, 256, generator=generator)
    theirs_param, ours_param = torch.nn.Parameter(start.clone()), torch.nn.Parameter(start.clone())
    theirs = optim.AdamW8bit([theirs_param], lr=1e-3, weight_decay=0.01)
    ours = thalweg.AdamW([ours_param], lr=1e-3, weight_decay=0.01, state_dtype="int8")
    for _ in range(20):
        grad = torch.randn(start.shape, generator=generator)
        theirs_param.grad, ours_param.grad = grad.clone(), grad.clone()
        theirs.step()
        ours.step()
    scale = float(theirs_param.detach().abs().max())
    assert float((ours_param - theirs_param).abs().max()) <= 1e-5 * scale
    assert float((ours_param - start).abs().max()) > 1e-3  # it moved
    state = theirs.state[theirs_param]
    for key in ("exp_avg", "exp_avg_sq"):
        assert float((ours.state[ours_param][key] != state[key].codes).float().mean()) < 1e-3
        torch.testing.assert_close(ours.state[ours_param][key + "_absmax"], state[key].scale, rtol=1e-4, atol=0)


# -- checkpoints -------------------------------------------------------------------------------------


def _trained(dtype=torch.float32, **options):
    params = make_params([(64, 128), (100,)], dtype, 2)
    optimizer = thalweg.AdamW(params, lr=1e-2, **options)
    generator = torch.Generator().manual_seed(4)
    for _ in range(3):
        for p in params:
            p.grad = torch.randn(p.shape, generator=generator).to(dtype)
        optimizer.step()
    return params, optimizer


def _continue(params, optimizer, seed=8):
    generator = torch.Generator().manual_seed(seed)
    for _ in range(2):
        for p in params:
            p.grad = torch.randn(p.shape, generator=generator).to(p.dtype)
        optimizer.step()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_checkpoints_round_trip_bit_exactly(dtype):
    params, optimizer = _trained(dtype, state_dtype="int8")
    saved = copy.deepcopy(optimizer.state_dict())  # (as torch.save/torch.load: the step counters are not shared)
    copies = [p.detach().clone().requires_grad_() for p in params]
    resumed = thalweg.AdamW(copies, lr=1e-2, state_dtype="int8")
    resumed.load_state_dict(saved)
    for p, q in zip(params, copies):
        assert optimizer.state[p].keys() == resumed.state[q].keys()
        for key, value in optimizer.state[p].items():  # torch's cast to bfloat16 does not touch codes or absmax
            assert resumed.state[q][key].dtype == value.dtype and torch.equal(resumed.state[q][key], value), key
    _continue(params, optimizer)
    _continue(copies, resumed)
    for p, q in zip(params, copies):
        assert torch.equal(p, q)
        for key, value in optimizer.state[p].items():
            assert torch.equal(resumed.state[q][key], value), key


def test_a_float_checkpoint_is_encoded_on_load_and_an_8bit_one_decoded():
    params, plain = _trained()
    eight = thalweg.AdamW(params, lr=1e-2, state_dtype="int8")
    eight.load_state_dict(copy.deepcopy(plain.state_dict()))
    big = params[0]
    for key in ("exp_avg", "exp_avg_sq"):
        codes, absmax = codec.encode(plain.state[big][key], key == "exp_avg")
        assert torch.equal(eight.state[big][key], codes) and torch.equal(eight.state[big][key + "_absmax"], absmax)
    assert eight.state[params[1]]["exp_avg"].dtype == torch.float32  # small: stays float
    back = thalweg.AdamW(params, lr=1e-2)
    back.load_state_dict(copy.deepcopy(eight.state_dict()))
    assert set(back.state[big]) == {"step", "exp_avg", "exp_avg_sq"}
    for key in ("exp_avg", "exp_avg_sq"):
        expected = codec.decode(eight.state[big][key], eight.state[big][key + "_absmax"], key == "exp_avg")
        assert torch.equal(back.state[big][key], expected)
    torch.optim.AdamW(params, lr=1e-2).load_state_dict(back.state_dict())  # plain float state again


@pytest.mark.parametrize("damage, message", [
    (lambda s: s.pop("exp_avg_absmax"), "absmax must be a float32 tensor"),
    (lambda s: s.update(exp_avg_absmax=torch.ones(3)), "absmax must be a float32 tensor of shape \\(32,\\)"),
    (lambda s: s.update(exp_avg_sq=s["exp_avg_sq"].float()), "holds 'exp_avg_sq_absmax' without the 8-bit"),
    (lambda s: s.update(exp_avg=s["exp_avg"][:10]), "codes have shape"),
])
def test_a_damaged_8bit_checkpoint_is_refused_with_nothing_changed(damage, message):
    params, optimizer = _trained(state_dtype="int8")
    saved = optimizer.state_dict()
    damage(saved["state"][0])
    target_params, target = _trained(state_dtype="int8")
    before = {k: v.clone() for k, v in target.state[target_params[0]].items()}
    with pytest.raises(ValueError, match=message):
        target.load_state_dict(saved)
    for key, value in before.items():
        assert torch.equal(target.state[target_params[0]][key], value)


def test_an_8bit_entry_for_a_role_kept_in_float_is_refused():
    param = torch.nn.Parameter(torch.randn(80, 64))
    rprop = thalweg.Rprop([param], state_dtype="int8")
    param.grad = torch.randn_like(param)
    rprop.step()
    saved = rprop.state_dict()
    saved["state"][0]["step_size"] = saved["state"][0]["prev"].clone()
    saved["state"][0]["step_size_absmax"] = saved["state"][0]["prev_absmax"].clone()
    with pytest.raises(ValueError, match="'step_size'"):
        thalweg.Rprop([param], state_dtype="int8").load_state_dict(saved)


def test_distributed_checkpoint_round_trip(tmp_path):
    """Through torch.distributed.checkpoint (one process): codes and absmax come back bit-exactly."""
    def model_and_optimizer():
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 4))
        return model, thalweg.AdamW(model.parameters(), lr=1e-2, state_dtype="int8")

    model, optimizer = dcp_round_trip(model_and_optimizer, torch.randn(32, 64), tmp_path)
    assert optimizer.state[model[0].weight]["exp_avg"].dtype == torch.uint8


# -- memory and errors ---------------------------------------------------------------------------------


class _TinyGPT(torch.nn.Module):
    def __init__(self, vocab=512, width=128, layers=2):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, width)
        self.blocks = torch.nn.ModuleList(torch.nn.TransformerEncoderLayer(width, 4, 4 * width, batch_first=True)
                                          for _ in range(layers))
        self.head = torch.nn.Linear(width, vocab)

    def forward(self, tokens):
        x = self.embed(tokens)
        for block in self.blocks:
            x = block(x)
        return self.head(x)


def _state_bytes_per_param(model, **options):
    optimizer = thalweg.AdamW(model.parameters(), lr=1e-3, **options)
    tokens = torch.randint(0, 512, (4, 16))
    model(tokens).logsumexp(-1).mean().backward()
    optimizer.step()
    storages = {}
    for state in optimizer.state.values():
        for value in state.values():
            if isinstance(value, torch.Tensor):
                storage = value.untyped_storage()
                storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values()) / sum(p.numel() for p in model.parameters())


def test_8bit_adamw_state_is_about_two_bytes_per_parameter():
    torch.manual_seed(0)
    model = _TinyGPT()
    full = _state_bytes_per_param(model)
    eight = _state_bytes_per_param(model, state_dtype="int8")
    assert 7.9 < full <= 8.1
    assert eight <= 2.1, f"{eight:.3f} bytes per parameter"


def test_errors():
    param = torch.nn.Parameter(torch.randn(80, 64))
    with pytest.raises(ValueError, match="state_dtype must be None, torch.float32 or 'int8', got 'int4'"):
        thalweg.Adam([param], state_dtype="int4")
    with pytest.raises(ValueError, match="not available for ASGD: its state 'ax' has no 8-bit form"):
        thalweg.ASGD([param], state_dtype="int8")
    for cls in (thalweg.Prodigy, thalweg.DAdaptAdam):
        with pytest.raises(ValueError, match=f"not available for {cls.__name__}"):
            cls([param], state_dtype="int8")
    with pytest.raises(ValueError, match="differentiable=True"):
        thalweg.Adam([param], state_dtype="int8", differentiable=True)
    embedding = torch.nn.Embedding(5000, 4, sparse=True)
    adagrad = thalweg.Adagrad(embedding.parameters(), state_dtype="int8")
    embedding(torch.tensor([1, 2])).sum().backward()
    before = {k: v.clone() for k, v in adagrad.state[embedding.weight].items()}  # (Adagrad makes it at once, as torch)
    with pytest.raises(RuntimeError, match="state_dtype='int8' cannot be used with sparse gradients"):
        adagrad.step()
    assert all(torch.equal(adagrad.state[embedding.weight][k], v) for k, v in before.items())


def test_a_dtensor_parameter_keeps_the_same_8bit_state_and_other_shardings_are_refused():
    """A DTensor parameter (one process: the path FSDP2 takes, collectives included) steps and stores exactly what the
    plain tensor does; a parameter sharded on another dim than 0 is refused, with nothing changed."""
    from specs import one_process_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    start, grads = torch.randn(80, 70), [torch.randn(80, 70) for _ in range(3)]
    plain = torch.nn.Parameter(start.clone())
    # (the same backend on both: a shard's 8-bit state steps through float copies, the kernels round alike but not
    # bit for bit)
    expected = thalweg.AdamW([plain], lr=1e-2, state_dtype="int8", backend="foreach")
    for grad in grads:
        plain.grad = grad.clone()
        expected.step()
    with one_process_mesh() as mesh:
        param = torch.nn.Parameter(distribute_tensor(start.clone(), mesh, [Shard(0)]))
        optimizer = thalweg.AdamW([param], lr=1e-2, state_dtype="int8", backend="foreach")
        for grad in grads:
            param.grad = distribute_tensor(grad.clone(), mesh, [Shard(0)])
            optimizer.step()
        assert torch.equal(param.detach().full_tensor(), plain.detach())
        for key, value in expected.state[plain].items():
            got = optimizer.state[param][key]
            got = got.full_tensor() if hasattr(got, "full_tensor") else got
            assert got.dtype == value.dtype and torch.equal(got, value), key
        other = torch.nn.Parameter(distribute_tensor(torch.randn(80, 70), mesh, [Shard(1)]))
        refusing = thalweg.AdamW([other], state_dtype="int8")
        other.grad = distribute_tensor(torch.randn(80, 70), mesh, [Shard(1)])
        before = other.detach().full_tensor().clone()
        with pytest.raises(NotImplementedError, match="sharded on dim 0"):
            refusing.step()
        assert other not in refusing.state or not refusing.state[other]
        assert torch.equal(other.detach().full_tensor(), before)


def test_blocks_of_the_whole_tensor_differ_from_blocks_of_each_shard():
    """Why the blocks follow the whole tensor: two shards split at 2500 elements (not a multiple of 256), encoded
    each on its own as bitsandbytes and torchao do, give other absmax and codes than the whole tensor — the same
    model would train differently on 1 and on 2 processes. encode_shard gives the whole tensor's, on each part."""
    values = _log_spread((20, 256), 5).reshape(-1)[:4950]
    codes, absmax = codec.encode(values, True)
    local = [codec.encode(part, True) for part in (values[:2500], values[2500:])]
    assert not torch.equal(torch.cat([c for c, _ in local]), codes)
    maxima = []

    def max_across(partial):  # the two processes' all-reduce MAX, played out in one process
        maxima.append(partial.clone())
        if len(maxima) == 2:
            partial.copy_(torch.maximum(maxima[0], maxima[1]))

    codec.encode_shard(values[:2500], True, 0, codec.n_blocks(4950), max_across)
    second, shared = codec.encode_shard(values[2500:], True, 2500, codec.n_blocks(4950), max_across)
    assert torch.equal(shared, absmax) and torch.equal(second, codes[2500:])
    assert torch.equal(codec.decode_shard(second, shared, True, 2500), codec.decode(codes, absmax, True)[2500:])


def test_the_fused_step_writes_8bit_state_in_place():
    """The fused CPU step writes codes and absmax into the state's own tensors (no new tensors per step)."""
    params = make_params([(300, 300)], torch.float32, 1)
    optimizer = thalweg.AdamW(params, state_dtype="int8", backend="fused")
    params[0].grad = torch.randn(300, 300)
    optimizer.step()
    pointers = {k: v.data_ptr() for k, v in optimizer.state[params[0]].items()}
    optimizer.step()
    assert pointers == {k: v.data_ptr() for k, v in optimizer.state[params[0]].items()}


@pytest.mark.timeout(300)
def test_fsdp2_on_two_processes_stores_what_one_process_stores(tmp_path):
    """2 gloo processes, FSDP2 splitting an 8-bit state inside a block (tests/int8_dist_worker.py): the gathered codes
    and absmax equal one process's bit for bit, and so do the parameters; deciding the blocks from each shard (the
    cross-process maximum patched out) gives other codes; a DCP checkpoint resumes exactly. bfloat16 parameters with
    param_update "stochastic" and "kahan": parameters and state (compensation included) equal one process's, DCP
    resumes exactly, and drawing each shard's random bits as if it began the tensor gives other parameters."""
    from pathlib import Path

    from specs import run_on_processes

    results = run_on_processes(Path(__file__).with_name("int8_dist_worker.py"), tmp_path)
    for rank, entries in enumerate(results):
        for key, entry in entries.items():
            assert "exception" not in entry, f"rank {rank} {key} raised:\n{entry['exception']}"
        fsdp2, naive = entries["fsdp2"], entries["blocks_of_each_shard"]
        assert fsdp2["local_shape"] == [50 - rank, 50] and fsdp2["offset"] == 2500 * rank  # (49 rows on rank 1)
        assert fsdp2["codes_dtype"] == "torch.uint8"
        assert all(fsdp2["state_equal"].values()), fsdp2["state_equal"]
        assert fsdp2["param_max_abs_diff"] == 0.0
        assert not naive["state_equal"]["exp_avg_absmax"] and not naive["state_equal"]["exp_avg"]
        assert entries["dcp"]["max_abs_diff"] == 0.0 and entries["dcp"]["materialise_change"] == 0.0
        for mode in ("stochastic", "kahan"):  # bfloat16 parameters without float32 master weights (param_update)
            rounded = entries[f"bf16_{mode}"]
            assert rounded["params_equal"] and all(rounded["state_equal"].values()), rounded
            assert ("kahan_comp" in rounded["state_equal"]) == (mode == "kahan")
            assert entries[f"dcp_bf16_{mode}"]["max_abs_diff"] == 0.0, entries[f"dcp_bf16_{mode}"]
        assert entries["bf16_stochastic"]["rounding_steps"] == 5
        assert not entries["bf16_stochastic_offsets_of_each_shard"]["params_equal"]
