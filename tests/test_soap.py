"""SOAP (issue 14): the authors' soap.py semantics, against a float64 reference written from the paper and soap.py
(references.PaperSOAP) and against pytorch-optimizer's SOAP (pinned), on every backend, parameters and state.

Which shapes a parity test can use. A parameter's first step builds each factor from one gradient, G_(d)G_(d)ᵀ, of
rank min(n_d, numel/n_d): when n_d² > numel the factor is singular, and the eigenvectors ``eigh`` returns for its
zero eigenvalue — and, at the refreshes, the QR of the power iteration's near-zero columns — are chosen by rounding
noise. Every implementation of SOAP then takes its own basis there, and from it its own steps. Two
implementations agree on such shapes only when they compute the factors and bases with the same operations, in the
same dtype, on operands laid out alike in memory (thalweg's backends among themselves, one process and FSDP2's
shards); the references are held to shapes whose factors are full rank from the start, where the bases are
determined by the mathematics (to a sign, which QR and eigh fix alike).
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from references import PaperSOAP
from specs import dcp_round_trip, one_process_mesh, run_seeded

import thalweg
from thalweg.optim.soap import SOAP, layout, merged_shape, rotate

BACKENDS = ("reference", "foreach", "fused")
pytestmark = pytest.mark.usefixtures("one_torch_thread")  # small matrix products (see conftest)

# every factor full rank from the first gradient (n_d² <= numel); with max_precond_dim=6: (4, 8)'s 8 columns and
# (5,) get none, (2, 3, 4, 4) merges to (6, 4, 4) with merge_dims
FULL_RANK = [(6, 6), (4, 8), (3, 4, 5), (2, 3, 4, 4), (5,), (), (0, 3)]
# singular first factors: (9, 2)'s rows, (1, 7)'s columns, (5,) with precondition_1d
SINGULAR = [(9, 2), (1, 7), (5,), (2, 6, 3)]
OPTIONS = [
    dict(lr=1e-2, precondition_frequency=3),
    dict(lr=1e-2, precondition_frequency=2, merge_dims=True, normalize_grads=True, weight_decay=0.1, maximize=True),
    dict(lr=1e-2, precondition_frequency=4, correct_bias=False, shampoo_beta=0.7, betas=(0.9, 0.99), eps=1e-6,
         weight_decay=0.0),
    dict(),  # soap.py's defaults: a refresh every 10 Adam steps
]
TOLERANCE = {torch.float64: 1e-10, torch.float32: 2e-5}  # relative to the largest magnitude (the issue: <= 1e-4)


def _name(options):
    return "-".join(f"{k}={v}" for k, v in options.items()) or "defaults"


def _close(actual, expected, dtype, what):
    actual, expected = actual.detach().double(), expected.detach().double()
    if expected.numel() == 0:
        assert actual.shape == expected.shape, what
        return
    scale = float(expected.abs().max())
    tol = TOLERANCE[dtype]
    torch.testing.assert_close(actual, expected, rtol=tol, atol=tol * max(scale, 1e-30), msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("options", OPTIONS, ids=_name)
def test_matches_the_float64_reference_parameters_and_state(backend, dtype, options):
    """30 steps (several refreshes of the bases): the parameters, both moments (thalweg keeps the first in the
    eigenbasis: rotated back here), the factors and the bases."""
    options = {"max_precond_dim": 6, **options}
    ours, mine = run_seeded(SOAP, FULL_RANK, dtype, options, seed=3, steps=30, backend=backend)
    theirs, paper = run_seeded(PaperSOAP, FULL_RANK, torch.float64, options, seed=3, steps=30)
    group = mine.param_groups[0]
    for index, (a, b) in enumerate(zip(ours, theirs)):
        _close(a, b, dtype, f"param {index}")
        state, expected = mine.state[a], paper.state[b]
        assert float(state["step"]) == float(expected["step"]) == 30
        work, dims = layout(tuple(a.shape), group)
        bases = {d: state[f"Q_{d}"] for d in dims}
        _close(rotate(state["exp_avg"].reshape(work), bases, back=True).reshape(a.shape), expected["exp_avg"], dtype,
               f"param {index} exp_avg")
        _close(state["exp_avg_sq"], expected["exp_avg_sq"], dtype, f"param {index} exp_avg_sq")
        assert dims == tuple(d for d, factor in enumerate(expected["GG"]) if factor is not None)
        for d in dims:
            _close(state[f"GG_{d}"], expected["GG"][d], dtype, f"param {index} GG_{d}")
            _close(state[f"Q_{d}"], expected["Q"][d], dtype, f"param {index} Q_{d}")


PO_OPTIONS = [dict(lr=1e-2, precondition_frequency=2, precondition_1d=True),
              dict(lr=1e-2, precondition_frequency=3, weight_decay=0.1, maximize=True, max_precond_dim=6),
              dict(lr=1e-2, precondition_frequency=5, normalize_grads=True, correct_bias=False, shampoo_beta=0.5)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("options", PO_OPTIONS, ids=_name)
def test_matches_pytorch_optimizer(backend, dtype, options):
    """pytorch-optimizer 4.1.0's SOAP (the paper's form: its first moment in the original basis, projected each
    step; its QR in float32, in float64 too), on full-rank shapes. (On singular first factors the two took the same
    bases only while thalweg kept LAPACK's column-major bases as it does: the rounding of a product with them depends
    on the layout. Not compared: merge_dims, where its merge_small_dims is another algorithm than soap.py's; its step
    counter is per group, its normalize_grads adds eps rather than 1e-30 to the RMS.)"""
    po = pytest.importorskip("pytorch_optimizer")
    shapes = [s for s in FULL_RANK if len(s) != 1 or not options.get("precondition_1d")]  # (a 1-d factor: rank 1)
    theirs_options = {("max_precondition_dim" if k == "max_precond_dim" else
                       "normalize_gradient" if k == "normalize_grads" else
                       k): (None if k == "shampoo_beta" and v < 0 else v) for k, v in options.items()}
    ours, _ = run_seeded(SOAP, shapes, dtype, options, seed=4, steps=30, backend=backend)
    theirs, _ = run_seeded(po.SOAP, shapes, dtype, theirs_options, seed=4, steps=30)
    tolerance = {torch.float64: 1e-6, torch.float32: 1e-4}[dtype]  # (its float32 QR, in float64 too)
    for index, (a, b) in enumerate(zip(ours, theirs)):
        if b.numel():
            scale = float(b.detach().abs().max())
            torch.testing.assert_close(a, b, rtol=tolerance, atol=tolerance * scale, msg=lambda m: f"param {index}: {m}")


shapes = st.lists(st.sampled_from([(), (1,), (0,), (7,), (5, 3), (3, 5), (1, 4), (0, 2), (2, 3, 4), (3, 1, 2),
                                   (2, 2, 1, 3)]), min_size=1, max_size=4)


@settings(max_examples=25, deadline=None)
@given(shapes_=shapes, dtype=st.sampled_from([torch.float32, torch.float64, torch.bfloat16]),
       seed=st.integers(0, 2**16), frequency=st.integers(1, 4), merge_dims=st.booleans(),
       precondition_1d=st.booleans(), normalize_grads=st.booleans(), max_precond_dim=st.sampled_from([1, 3, 10000]),
       lr=st.floats(1e-4, 1e-1), beta1=st.floats(0.0, 0.99), beta2=st.floats(0.5, 0.999),
       weight_decay=st.sampled_from([0.0, 0.1]))
def test_every_backend_steps_as_the_reference_backend(shapes_, dtype, seed, frequency, merge_dims, precondition_1d,
                                                      normalize_grads, max_precond_dim, lr, beta1, beta2, weight_decay):
    """Over shapes (0-d, empty, odd, singular factors), dtypes and hyper-parameters, 12 steps: the foreach and fused
    backends (Adam's moments in the eigenbasis, the final update) give the reference backend's parameters and state.
    The bases are the same torch ops in each, so singular factors agree too."""
    options = dict(lr=lr, betas=(beta1, beta2), precondition_frequency=frequency, merge_dims=merge_dims,
                   precondition_1d=precondition_1d, normalize_grads=normalize_grads, max_precond_dim=max_precond_dim,
                   weight_decay=weight_decay)
    expected, reference = run_seeded(SOAP, shapes_, dtype, options, seed, steps=12, backend="reference")
    tolerance = {torch.float64: 1e-9, torch.float32: 1e-4, torch.bfloat16: 3e-2}[dtype]
    for backend in ("foreach", "fused"):
        got, optimizer = run_seeded(SOAP, shapes_, dtype, options, seed, steps=12, backend=backend)
        for index, (a, b) in enumerate(zip(got, expected)):
            assert a.dtype == dtype and a.shape == b.shape
            scale = float(b.detach().abs().max()) if b.numel() else 1.0
            torch.testing.assert_close(a, b, rtol=tolerance, atol=tolerance * scale, msg=lambda m: f"{backend} {index}: {m}")
            assert optimizer.state[a].keys() == reference.state[b].keys()
            for key, value in reference.state[b].items():
                scale = float(value.abs().max()) if value.numel() else 1.0
                torch.testing.assert_close(optimizer.state[a][key], value, rtol=tolerance, atol=tolerance * scale,
                                           msg=lambda m: f"{backend} {index} {key}: {m}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_bfloat16_parameters_track_the_float64_run(backend):
    """bfloat16 parameters: factors, bases and moments in float32, the parameter rounded once per step."""
    shapes_, options = [(6, 6), (3, 4, 5), (5,)], dict(lr=1e-2, precondition_frequency=3, max_precond_dim=6)
    ours, optimizer = run_seeded(SOAP, shapes_, torch.bfloat16, options, seed=5, steps=15, backend=backend)
    exact, _ = run_seeded(PaperSOAP, shapes_, torch.float64, options, seed=5, steps=15)
    for index, (a, e) in enumerate(zip(ours, exact)):
        assert a.dtype == torch.bfloat16 and optimizer.state[a]["exp_avg"].dtype == torch.float32
        scale = float(e.detach().abs().max())
        torch.testing.assert_close(a.detach().double(), e.detach(), rtol=3e-2, atol=3e-2 * scale, msg=f"param {index}")


def test_the_first_step_only_builds_the_preconditioner():
    """soap.py's first step: the factors from that gradient and their eigenbases; no update, no weight decay."""
    params = [torch.nn.Parameter(torch.randn(4, 3)), torch.nn.Parameter(torch.randn(5))]
    starts = [p.detach().clone() for p in params]
    optimizer = SOAP(params, lr=0.1, weight_decay=0.5)
    for p in params:
        p.grad = torch.randn_like(p)
    optimizer.step()
    for p, start in zip(params, starts):
        assert torch.equal(p.detach(), start)
        assert float(optimizer.state[p]["step"]) == 1
        assert not optimizer.state[p]["exp_avg"].any() and not optimizer.state[p]["exp_avg_sq"].any()
    state = optimizer.state[params[0]]
    grad = params[0].grad
    torch.testing.assert_close(state["GG_0"], 0.05 * grad @ grad.T)  # (1 − β2)·G Gᵀ
    torch.testing.assert_close(state["GG_1"], 0.05 * grad.T @ grad)
    eigenvalues = torch.diag(state["Q_0"].T @ state["GG_0"] @ state["Q_0"])
    assert torch.all(eigenvalues[:-1] >= eigenvalues[1:] - 1e-6)  # descending
    assert not {"GG_0", "Q_0"} & set(optimizer.state[params[1]])  # 1-d: no factor without precondition_1d
    for p in params:
        p.grad = torch.randn_like(p)
    optimizer.step()
    assert all(not torch.equal(p.detach(), start) for p, start in zip(params, starts))


def test_dims_beyond_max_precond_dim_stay_in_the_original_basis():
    """An embedding-shaped matrix with max_precond_dim below its vocabulary: only the width gets a factor; its
    rotation leaves the rows alone."""
    param = torch.nn.Parameter(torch.randn(12, 4))
    optimizer = SOAP([param], max_precond_dim=8)
    param.grad = torch.randn_like(param)
    optimizer.step()
    assert set(optimizer.state[param]) == {"step", "exp_avg", "exp_avg_sq", "GG_1", "Q_1"}
    basis = optimizer.state[param]["Q_1"]
    x = torch.randn(12, 4)
    torch.testing.assert_close(rotate(x, {1: basis}), x @ basis)


def test_merge_dims_follows_soap_py():
    """soap.py's merge, from the left: a convolution's (out, in, kh, kw) becomes out × (in·kh·kw) when that fits and
    out·in does not, dims of size 1 disappear, and a dim longer than the limit stands alone."""
    assert merged_shape((16, 8, 3, 3), 100) == (16, 72)
    assert merged_shape((128, 64, 3, 3), 1024) == (128, 576)
    assert merged_shape((64, 32, 3, 3), 10000) == (6144, 3)
    assert merged_shape((1, 5), 10) == (5,)
    assert merged_shape((3, 20000, 2), 100) == (3, 20000, 2)
    assert merged_shape((2, 3, 4, 4), 6) == (6, 4, 4)
    assert merged_shape((), 10) == (1,)
    assert PaperSOAP.work_shape((128, 64, 3, 3), dict(max_precond_dim=1024, merge_dims=True)) == [128, 576]


def test_state_is_tensors_and_a_checkpoint_resumes_as_if_never_stopped():
    generator = torch.Generator().manual_seed(7)
    starts = [torch.randn(5, 5, generator=generator), torch.randn(3, generator=generator)]
    grads = [[torch.randn(s.shape, generator=generator) for s in starts] for _ in range(9)]
    make = lambda ps: SOAP(ps, lr=1e-2, precondition_frequency=2, precondition_1d=True)  # noqa: E731
    reference = [torch.nn.Parameter(s.clone()) for s in starts]
    never_stopped = make(reference)
    params = [torch.nn.Parameter(s.clone()) for s in starts]
    optimizer = make(params)
    for step, step_grads in enumerate(grads):
        if step == 5:
            saved = copy.deepcopy(optimizer.state_dict())
            assert all(isinstance(v, torch.Tensor) for state in saved["state"].values() for v in state.values())
            optimizer = make(params)
            optimizer.load_state_dict(saved)
        for ps, opt in ((reference, never_stopped), (params, optimizer)):
            for p, g in zip(ps, step_grads):
                p.grad = g.clone()
            opt.step()
    for a, b in zip(params, reference):
        assert torch.equal(a, b)


def test_distributed_checkpoint_round_trip(tmp_path):
    """Through torch.distributed.checkpoint (one process): factors, bases and moments come back exactly, and the next
    step (a refresh) agrees."""
    def model_and_optimizer():
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
        return model, SOAP(model.parameters(), lr=1e-2, precondition_frequency=2)

    _, optimizer = dcp_round_trip(model_and_optimizer, torch.randn(32, 8), tmp_path, steps=4)
    assert {"GG_0", "Q_0", "GG_1", "Q_1"} <= set(optimizer.state[next(iter(optimizer.state))])


@pytest.mark.parametrize("bad, message", [
    (dict(lr=-1.0), "lr must be >= 0, got -1.0"),
    (dict(betas=(1.0, 0.9)), r"betas\[0\] must be in \[0, 1\), got 1.0"),
    (dict(shampoo_beta=1.0), r"shampoo_beta must be in \[0, 1\), or negative for betas\[1\], got 1.0"),
    (dict(eps=-1e-8), "eps must be >= 0, got -1e-08"),
    (dict(weight_decay=-0.1), "weight_decay must be >= 0, got -0.1"),
    (dict(precondition_frequency=0), "precondition_frequency must be an integer >= 1, got 0"),
    (dict(max_precond_dim=2.5), "max_precond_dim must be an integer >= 1, got 2.5"),
    (dict(merge_dims=1), "merge_dims must be True or False, got 1"),
    (dict(normalize_grads="yes"), "normalize_grads must be True or False, got 'yes'"),
])
def test_bad_hyperparameters_are_refused_by_name(bad, message):
    with pytest.raises((ValueError, TypeError), match=message):
        SOAP([torch.nn.Parameter(torch.zeros(3, 2))], **bad)


def test_a_changed_layout_is_refused_with_nothing_changed():
    """Lowering max_precond_dim after the factors exist would silently mismatch them: refused before anything is
    written (the other parameter's step and state untouched)."""
    params = [torch.nn.Parameter(torch.randn(4)), torch.nn.Parameter(torch.randn(6, 5))]
    optimizer = SOAP(params, lr=1e-2)
    for _ in range(2):
        for p in params:
            p.grad = torch.randn_like(p)
        optimizer.step()
    before = [p.detach().clone() for p in params], copy.deepcopy(optimizer.state_dict())
    optimizer.param_groups[0]["max_precond_dim"] = 5
    with pytest.raises(RuntimeError, match=r"params\[1\]: state\['GG_0'\] exists but dim 0 of \(6, 5\) has no factor"):
        optimizer.step()
    assert all(torch.equal(p.detach(), b) for p, b in zip(params, before[0]))
    after = optimizer.state_dict()
    for index, state in before[1]["state"].items():
        for key, value in state.items():
            assert torch.equal(after["state"][index][key], value), key


def test_too_many_dims_are_refused_also_in_a_group_added_later():
    with pytest.raises(ValueError, match=r"SOAP preconditions up to 8 dims: params\[0\] of param group 0 has shape"):
        SOAP([torch.nn.Parameter(torch.zeros((2,) * 9))])
    optimizer = SOAP([torch.nn.Parameter(torch.zeros((2,) * 9))], merge_dims=True)  # merged to (512,): fine
    with pytest.raises(ValueError, match=r"params\[1\] of param group 1 has shape \(2, 2, 2, 2, 2, 2, 2, 2, 2\)"):
        optimizer.add_param_group({"params": [torch.zeros(3, requires_grad=True), torch.zeros((2,) * 9)],
                                   "merge_dims": False})
    assert len(optimizer.param_groups) == 1  # (the refused group left out)


def test_a_dtensor_parameter_steps_as_the_plain_tensor_and_other_shardings_are_refused():
    """A parameter sharded by rows (FSDP2's Shard(0); one process: the gathers and scatters run, over one rank) steps
    and keeps exactly what the plain tensor does (singular first factors too: the same operations on the same
    layouts), its moments, factors and bases DTensors of the whole shapes (4
    processes: tests/test_distributed.py); a matrix sharded by columns is refused, by name."""
    from torch.distributed.tensor import DTensor, Shard, distribute_tensor

    generator = torch.Generator().manual_seed(0)
    starts = [torch.randn(shape, generator=generator) for shape in [(5, 6), (2, 4, 3), (7,), *SINGULAR]]
    grads = [[torch.randn(t.shape, generator=generator) for t in starts] for _ in range(6)]
    options = dict(lr=1e-2, precondition_frequency=2, precondition_1d=True, normalize_grads=True)
    plain = [torch.nn.Parameter(t.clone()) for t in starts]
    expected = SOAP(plain, **options)
    for step in grads:
        for param, grad in zip(plain, step):
            param.grad = grad.clone()
        expected.step()
    with one_process_mesh() as mesh:
        params = [torch.nn.Parameter(distribute_tensor(t.clone(), mesh, [Shard(0)])) for t in starts]
        optimizer = SOAP(params, **options)
        for step in grads:
            for param, grad in zip(params, step):
                param.grad = distribute_tensor(grad.clone(), mesh, [Shard(0)])
            optimizer.step()
        for param, reference in zip(params, plain):
            assert torch.equal(param.detach().full_tensor(), reference.detach())
            assert optimizer.state[param].keys() == expected.state[reference].keys()
            for key, value in expected.state[reference].items():
                got = optimizer.state[param][key]
                assert isinstance(got, DTensor) or key == "step", key
                assert torch.equal(got.full_tensor() if isinstance(got, DTensor) else got, value), key
        columns = torch.nn.Parameter(distribute_tensor(torch.zeros(4, 3), mesh, [Shard(1)]))
        with pytest.raises(ValueError, match=r"SOAP on a parameter sharded other than by rows"):
            SOAP([columns])


def test_create_by_name_and_a_model_trains():
    """thalweg.create("soap", model): weights decayed, biases not; a small regression is fitted."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    optimizer = thalweg.create("soap", model, lr=1e-2)
    assert isinstance(optimizer, SOAP) and [g["weight_decay"] for g in optimizer.param_groups] == [0.01, 0.0]
    inputs = torch.randn(128, 6)
    targets = inputs[:, :1] * 2 - inputs[:, 1:2] + 0.5
    losses = []
    for _ in range(150):
        optimizer.zero_grad()
        loss = (model(inputs) - targets).square().mean()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.05 * losses[0] and math.isfinite(losses[-1])
