"""SparseAdam (issue 12): torch.optim.SparseAdam's semantics — only the rows a sparse gradient holds are
stepped — on embedding tables, against torch itself; dense gradients and sparse parameters refused as torch
refuses them; checkpoints cross-load both ways. (Not in specs.SPECS: the suites generated there step dense
gradients, which SparseAdam refuses by design.)"""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import thalweg

TOLERANCE = {torch.float32: dict(rtol=1e-6, atol=1e-7), torch.float64: dict(rtol=1e-12, atol=1e-14)}


def _tables(rows, dims, dtype, seed):
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(rows, *dims, generator=generator, dtype=torch.float64).to(dtype)
    return torch.nn.Parameter(weight.clone()), torch.nn.Parameter(weight.clone())


def _sparse_grads(rows, dims, dtype, seed, steps, per_step):
    """Row-sparse gradients with repeated indices (coalescing sums them), some steps with no rows at all."""
    generator = torch.Generator().manual_seed(seed + 1)
    grads = []
    for step in range(steps):
        count = 0 if step % 7 == 3 else per_step
        indices = torch.randint(0, rows, (1, count), generator=generator)
        values = torch.randn(count, *dims, generator=generator, dtype=torch.float64).to(dtype)
        grads.append(torch.sparse_coo_tensor(indices, values, (rows, *dims)))
    return grads


def _run(optimizer, param, grads):
    for grad in grads:
        param.grad = grad.clone()
        optimizer.step()


@given(rows=st.integers(1, 30), dims=st.sampled_from([(), (1,), (4,), (3, 2)]),
       dtype=st.sampled_from([torch.float32, torch.float64]), seed=st.integers(0, 2**16),
       lr=st.floats(1e-4, 0.1), beta1=st.floats(0.0, 0.99), beta2=st.floats(0.5, 0.9999),
       eps=st.floats(1e-10, 1e-3), maximize=st.booleans())
def test_matches_torch(rows, dims, dtype, seed, lr, beta1, beta2, eps, maximize):
    ours, theirs = _tables(rows, dims, dtype, seed)
    options = dict(lr=lr, betas=(beta1, beta2), eps=eps, maximize=maximize)
    mine, torchs = thalweg.SparseAdam([ours], **options), torch.optim.SparseAdam([theirs], **options)
    grads = _sparse_grads(rows, dims, dtype, seed, steps=25, per_step=max(1, rows // 3))
    _run(mine, ours, grads)
    _run(torchs, theirs, grads)
    torch.testing.assert_close(ours, theirs, **TOLERANCE[dtype])
    for key in ("exp_avg", "exp_avg_sq"):
        torch.testing.assert_close(mine.state[ours][key], torchs.state[theirs][key], **TOLERANCE[dtype])
    assert float(mine.state[ours]["step"]) == torchs.state[theirs]["step"] == 25


def test_only_the_rows_present_move():
    param = torch.nn.Parameter(torch.ones(5, 2))
    optimizer = thalweg.SparseAdam([param], lr=0.1)
    param.grad = torch.sparse_coo_tensor([[1, 3, 1]], torch.ones(3, 2), (5, 2))
    optimizer.step()
    moved = (param.detach() != 1).any(dim=1).tolist()
    assert moved == [False, True, False, True, False]
    assert not optimizer.state[param]["exp_avg"][[0, 2, 4]].any()


def test_a_dense_gradient_is_refused_and_nothing_changes():
    param = torch.nn.Parameter(torch.ones(4))
    optimizer = thalweg.SparseAdam([param])
    param.grad = torch.ones(4)
    with pytest.raises(RuntimeError, match="parameter 0 of param group 0: SparseAdam does not support dense gradients"):
        optimizer.step()
    assert torch.equal(param.detach(), torch.ones(4)) and not optimizer.state
    with pytest.raises(RuntimeError):  # torch refuses it alike
        torch.optim.SparseAdam([param]).step()


def test_sparse_parameters_and_bad_hyperparameters_are_refused():
    with pytest.raises(ValueError, match=r"Sparse params at indices \[\[0, 0\]\]: SparseAdam requires dense"):
        thalweg.SparseAdam([torch.zeros(3).to_sparse().requires_grad_()])
    with pytest.raises(ValueError, match="lr must be >= 0, got -0.1"):
        thalweg.SparseAdam([torch.nn.Parameter(torch.zeros(3))], lr=-0.1)
    with pytest.raises(ValueError, match=r"betas\[1\] must be in \[0, 1\), got 1.0"):
        thalweg.SparseAdam([torch.nn.Parameter(torch.zeros(3))], betas=(0.9, 1.0))
    with pytest.raises(TypeError):
        thalweg.SparseAdam([torch.nn.Parameter(torch.zeros(3))], weight_decay=0.1)  # torch has none either


@pytest.mark.parametrize("direction", ["torch->thalweg", "thalweg->torch"])
def test_checkpoints_cross_load_and_resume_as_if_never_stopped(direction):
    first, second = (torch.optim.SparseAdam, thalweg.SparseAdam) if direction == "torch->thalweg" else (
        thalweg.SparseAdam, torch.optim.SparseAdam)
    grads = _sparse_grads(12, (3,), torch.float32, 0, steps=20, per_step=4)
    reference, _ = _tables(12, (3,), torch.float32, 0)
    never_stopped = torch.optim.SparseAdam([reference], lr=0.05)
    _run(never_stopped, reference, grads)
    param, _ = _tables(12, (3,), torch.float32, 0)
    before = first([param], lr=0.05)
    _run(before, param, grads[:10])
    after = second([param], lr=0.05)
    after.load_state_dict(copy.deepcopy(before.state_dict()))
    _run(after, param, grads[10:])
    torch.testing.assert_close(param, reference, rtol=0, atol=0)


def test_trains_a_sparse_embedding_bag():
    torch.manual_seed(0)
    bag = torch.nn.EmbeddingBag(50, 8, mode="mean", sparse=True)
    head = torch.nn.Linear(8, 2)
    words = torch.randint(0, 50, (64, 5))
    labels = (words % 2 == 0).sum(1).gt(2).long()
    sparse, dense = thalweg.SparseAdam(bag.parameters(), lr=0.05), thalweg.Adam(head.parameters(), lr=0.05)
    initial = torch.nn.functional.cross_entropy(head(bag(words)), labels).item()
    for _ in range(100):
        sparse.zero_grad()
        dense.zero_grad()
        loss = torch.nn.functional.cross_entropy(head(bag(words)), labels)
        loss.backward()
        sparse.step()
        dense.step()
    assert loss.item() < 0.5 * initial
