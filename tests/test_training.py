"""Issue 2, point 9: every optimizer, built by name with thalweg.create, trains a small MLP on scikit-learn's
digits to >= 90 % training accuracy (full batch, a few hundred steps, the spec's lr)."""

from __future__ import annotations

import pytest
import torch
from sklearn.datasets import load_digits

import thalweg
from specs import SPECS

STEPS = 300


@pytest.fixture(scope="module")
def digits():
    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x / 16.0, dtype=torch.float32)
    return x, torch.tensor(y)


@pytest.mark.parametrize("spec", SPECS, ids=repr)
def test_trains_digits_to_90_percent(spec, digits):
    x, y = digits
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: one thread is faster, and leaves the other core to xdist
    try:
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10))
        optimizer = thalweg.create(spec.name, model, lr=spec.train_lr)
        assert isinstance(optimizer, spec.cls)
        initial = torch.nn.functional.cross_entropy(model(x), y).item()
        for _ in range(STEPS):
            optimizer.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(x), y)
            loss.backward()
            optimizer.step()
        with torch.no_grad():
            accuracy = (model(x).argmax(1) == y).float().mean().item()
    finally:
        torch.set_num_threads(threads)
    assert loss.item() < initial
    assert accuracy >= 0.90, f"{spec.name} at lr={spec.train_lr}: training accuracy {accuracy:.3f}"
