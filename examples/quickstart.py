"""Train a small MLP on scikit-learn's digits with every thalweg optimizer and print a table.

The training loop is the one every PyTorch user knows; only the optimizer line changes:

    optimizer = thalweg.Adam(model.parameters(), lr=lr)      # or thalweg.create(name, model, lr=lr)
    for x, y in batches:
        optimizer.zero_grad()
        loss_fn(model(x), y).backward()
        optimizer.step()
"""

from __future__ import annotations

import time

import torch
from sklearn.datasets import load_digits
from torch import nn

import thalweg

# A working learning rate per optimizer for this task (not tuned to the last digit: `thalweg arena`
# does the fair search). LARS's local rate is lr · 0.001 · ‖w‖/‖g‖, hence its large global lr.
LEARNING_RATES = {"sgd": 0.1, "momentum": 0.02, "adam": 1e-3, "adamw": 1e-3, "rmsprop": 1e-3,
                  "adagrad": 0.05, "lars": 2.0, "lamb": 1e-2}
EPOCHS, BATCH_SIZE = 20, 64


def digits() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32) / 16.0
    y = torch.tensor(data.target)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    train, valid = order[:1500], order[1500:]
    return x[train], y[train], x[valid], y[valid]


def train(name: str, lr: float, data) -> tuple[float, float, float]:
    x_train, y_train, x_valid, y_valid = data
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))
    optimizer = thalweg.create(name, model, lr=lr)
    loss_fn = nn.CrossEntropyLoss()
    generator = torch.Generator().manual_seed(1)
    start = time.perf_counter()
    for _ in range(EPOCHS):
        for batch in torch.randperm(len(x_train), generator=generator).split(BATCH_SIZE):
            optimizer.zero_grad()
            loss = loss_fn(model(x_train[batch]), y_train[batch])
            loss.backward()
            optimizer.step()
    seconds = time.perf_counter() - start
    with torch.no_grad():
        train_loss = loss_fn(model(x_train), y_train).item()
        accuracy = (model(x_valid).argmax(1) == y_valid).float().mean().item()
    return train_loss, accuracy, seconds


def main() -> None:
    torch.set_num_threads(1)  # a model this small is fastest on one thread
    data = digits()
    print(f"digits MLP 64-128-10, {EPOCHS} epochs, batch {BATCH_SIZE}, 1500 train / 297 validation images\n")
    print(f"{'optimizer':<10} {'lr':>8} {'train loss':>11} {'val acc':>8} {'seconds':>8}")
    for name in thalweg.names():
        loss, accuracy, seconds = train(name, LEARNING_RATES[name], data)
        print(f"{name:<10} {LEARNING_RATES[name]:>8g} {loss:>11.4f} {accuracy:>8.1%} {seconds:>8.2f}")
    print("\nFor a fair comparison (lr grids, seeds, plots and a recommendation): thalweg arena --quick")


if __name__ == "__main__":
    main()
