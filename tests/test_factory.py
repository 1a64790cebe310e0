"""Issue 2, point 11: thalweg.create and thalweg.names."""

from __future__ import annotations

import pytest
import torch

import thalweg
from specs import SPECS


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(10, 4)
        self.linear = torch.nn.Linear(4, 4)
        self.norm = torch.nn.LayerNorm(4)
        self.head = torch.nn.Linear(4, 2, bias=False)
        self.frozen = torch.nn.Linear(4, 4)
        self.frozen.requires_grad_(False)


def test_names_lists_every_optimizer_in_order():
    assert thalweg.names() == ["sgd", "momentum", "adam", "adamw", "nadam", "radam", "adamax", "rmsprop", "adagrad",
                               "adadelta", "asgd", "rprop", "sparseadam", "lars", "lamb", "adafactor",
                               "muon", "soap", "lion", "adan", "ademamix", "adopt", "stableadamw", "schedulefree_adamw",
                               "schedulefree_sgd", "prodigy", "dadaptadam"]
    # every optimizer has a spec, but SparseAdam (sparse gradients only: tests/test_sparse_adam.py), Muon (2-D
    # parameters only: tests/test_muon.py), Adafactor (tests/test_adafactor.py), SOAP (its bases from singular factors
    # depend on rounding: tests/test_soap.py) and Schedule-Free AdamW and SGD
    # (train/eval modes and a group schedule: tests/test_schedule_free.py), Prodigy and D-Adapt Adam (one step size
    # estimated over every group: tests/test_prodigy.py)
    assert sorted(set(thalweg.names()) - {"sparseadam", "muon", "adafactor", "soap", "schedulefree_adamw", "schedulefree_sgd",
                                          "prodigy", "dadaptadam"}) == sorted(spec.name for spec in SPECS)


@pytest.mark.parametrize("spec", SPECS, ids=repr)
def test_create_splits_a_module_into_decay_and_no_decay_groups(spec):
    model = Net()
    if "weight_decay" not in spec.ranges:  # no weight decay to exempt anything from: one group, names kept
        optimizer = thalweg.create(spec.name.upper(), model, lr=0.5)
        (group,) = optimizer.param_groups
        assert group["param_names"] == ["embed.weight", "linear.weight", "linear.bias", "norm.weight", "norm.bias",
                                        "head.weight"]
        with pytest.raises(TypeError, match=f"{spec.cls.__name__} has no hyper-parameter 'weight_decay'"):
            thalweg.create(spec.name, model, lr=0.5, weight_decay=0.01)
        return
    optimizer = thalweg.create(spec.name.upper(), model, lr=0.5, weight_decay=0.01)  # names are case-insensitive
    assert type(optimizer) is spec.cls
    weights, others = optimizer.param_groups
    assert weights["param_names"] == ["linear.weight", "head.weight"]
    assert others["param_names"] == ["embed.weight", "linear.bias", "norm.weight", "norm.bias"]
    assert weights["weight_decay"] == 0.01 and others["weight_decay"] == 0.0
    assert weights["lr"] == others["lr"] == 0.5
    if spec.layerwise:
        assert weights["trust_ratio"] is True and others["trust_ratio"] is False
    else:
        assert "trust_ratio" not in others
    # frozen parameters are left out
    in_groups = {id(p) for g in optimizer.param_groups for p in g["params"]}
    assert all(id(p) not in in_groups for p in model.frozen.parameters())
    assert [p for g in optimizer.param_groups for p in g["params"]][0] is model.linear.weight


def test_create_with_only_no_decay_parameters_builds_one_group():
    optimizer = thalweg.create("lamb", torch.nn.LayerNorm(4), lr=1e-3)
    assert len(optimizer.param_groups) == 1 and optimizer.param_groups[0]["trust_ratio"] is False


def test_create_passes_parameters_and_groups_through_unchanged():
    model = torch.nn.Linear(3, 2)
    optimizer = thalweg.create("sgd", model.parameters(), lr=0.1, momentum=0.9)
    assert len(optimizer.param_groups) == 1 and optimizer.param_groups[0]["weight_decay"] == 0
    groups = [{"params": [model.weight], "lr": 0.2}, {"params": [model.bias]}]
    optimizer = thalweg.create("adam", groups, lr=0.1)
    assert [g["lr"] for g in optimizer.param_groups] == [0.2, 0.1]


def test_create_accepts_the_shared_options():
    optimizer = thalweg.create("adamw", torch.nn.Linear(3, 2), backend="foreach", max_grad_norm=1.0, skip_nonfinite=True)
    assert optimizer.backend == "foreach" and optimizer.max_grad_norm == 1.0 and optimizer.skip_nonfinite
