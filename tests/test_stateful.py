"""thalweg and its counterpart side by side through random sequences of what training code does (issue #16).

A hypothesis state machine drives two optimizers over twin float64 parameters: a thalweg optimizer
(every backend) and its counterpart from ``specs`` (torch.optim, or the float64 paper reference). Each
rule is something real training code does — a step with random, missing or non-finite gradients, a
step with a closure, ``zero_grad``, an lr or weight-decay change, an added param group, a scheduler
step, a checkpoint round trip through ``torch.save`` (to a fresh optimizer of the same library, or
across libraries), a ``.data`` swap of a parameter or of the state — and after each one the params and
every state tensor must still match. thalweg runs with ``skip_nonfinite=True``: the counterpart simply
does not step when a gradient is non-finite, and ``skipped_steps`` must count those steps.
"""

from __future__ import annotations

import io
import warnings

import pytest
import torch
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

import thalweg
from specs import BACKENDS, SPECS, assert_same_state, hyperparameters

SHAPES = [(3,), (2, 3), (), (4, 1), (0,)]


def _keep_scalar_state_dtype(optimizer, checkpoint) -> None:
    """torch.optim casts NAdam's mu_product and ASGD's eta and mu to the parameter's dtype on load, so that its
    resumed run differs from one never stopped; thalweg keeps their dtype (README, "Where thalweg knowingly
    differs"). torch's side is put back on the never-stopped path so that the two stay comparable."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    indices = [i for group in checkpoint["param_groups"] for i in group["params"]]
    for index, param in zip(indices, params):
        for key in ("mu_product", "eta", "mu"):
            saved = checkpoint["state"].get(index, {}).get(key)
            if saved is not None:
                optimizer.state[param][key] = saved.clone()


def _through_file(state_dict):
    buffer = io.BytesIO()
    torch.save(state_dict, buffer)
    buffer.seek(0)
    return torch.load(buffer)


def machine_for(spec, backend):
    class SideBySide(RuleBasedStateMachine):
        @initialize(combo=hyperparameters(spec), seed=st.integers(0, 2**16), count=st.integers(1, len(SHAPES)))
        def build(self, combo, seed, count):
            self.combo = combo
            generator = torch.Generator().manual_seed(seed)
            self.generator = generator
            ours = [torch.randn(shape, generator=generator, dtype=torch.float64).requires_grad_() for shape in SHAPES[:count]]
            theirs = [p.detach().clone().requires_grad_() for p in ours]
            self.params = {"ours": ours, "theirs": theirs}
            group_keys = {k: combo[k] for k in spec.group_only if k in combo}
            half = (count + 1) // 2
            self.optimizers = {}
            for side, params in self.params.items():
                groups = [{"params": params[:half], **group_keys}]
                if params[half:]:
                    groups.append({"params": params[half:], **group_keys, "lr": combo["lr"] / 2})
                self.optimizers[side] = self._new(side, groups)
            self.schedulers = None
            self.expected_skips = 0

        def _new(self, side, groups):
            if side == "ours":
                return spec.build(spec.cls, groups, self.combo, backend=backend, skip_nonfinite=True)
            return spec.build(spec.counterpart, groups, self.combo)

        def _set_grads(self, values):
            for side, params in self.params.items():
                for param, value in zip(params, values):
                    param.grad = None if value is None else value.clone()

        # -- the rules -------------------------------------------------------------------------------

        @rule(missing=st.sets(st.integers(0, len(SHAPES) - 1)), non_finite=st.sampled_from([False] * 5 + [True]),
              scale=st.floats(0.01, 10.0))
        def step(self, missing, non_finite, scale):
            values = [None if i in missing else scale * torch.randn(p.shape, generator=self.generator, dtype=torch.float64)
                      for i, p in enumerate(self.params["ours"])]
            present = [v for v in values if v is not None and v.numel()]
            if non_finite and present:
                present[0].view(-1)[0] = float("nan")
            self._set_grads(values)
            self.optimizers["ours"].step()
            if non_finite and present:
                self.expected_skips += 1
            else:
                self.optimizers["theirs"].step()

        @rule()
        def step_with_closure(self):
            weights = [torch.randn(p.shape, generator=self.generator, dtype=torch.float64) for p in self.params["ours"]]
            losses = {}
            for side, optimizer in self.optimizers.items():
                params = self.params[side]

                def closure():
                    optimizer.zero_grad()
                    loss = sum(((p * w).sum() + p.square().sum()) for p, w in zip(params, weights))
                    loss.backward()
                    return loss

                losses[side] = float(optimizer.step(closure).detach())
            # the closure's own loss, of params equal to the tolerance of assert_same_state
            assert losses["ours"] == pytest.approx(losses["theirs"], rel=1e-9, abs=1e-9)

        @rule(set_to_none=st.booleans())
        def zero_grad(self, set_to_none):
            for optimizer in self.optimizers.values():
                optimizer.zero_grad(set_to_none=set_to_none)

        @rule(index=st.integers(0, 3), factor=st.floats(0.1, 3.0))
        def change_lr(self, index, factor):
            for optimizer in self.optimizers.values():
                group = optimizer.param_groups[index % len(optimizer.param_groups)]
                group["lr"] = group["lr"] * factor

        @rule(index=st.integers(0, 3), value=st.floats(0.0, 0.2))
        def change_weight_decay(self, index, value):
            for optimizer in self.optimizers.values():
                group = optimizer.param_groups[index % len(optimizer.param_groups)]
                group["weight_decay"] = value

        # torch's Adagrad creates its state in the constructor only: a group added later has none to step.
        @precondition(lambda self: spec.name != "adagrad" and len(self.params["ours"]) < 8)
        @rule(shape=st.sampled_from(SHAPES), lr=st.floats(1e-3, 0.1))
        def add_group(self, shape, lr):
            value = torch.randn(shape, generator=self.generator, dtype=torch.float64)
            group_keys = {k: self.combo[k] for k in spec.group_only if k in self.combo}
            for side, optimizer in self.optimizers.items():
                param = value.clone().requires_grad_()
                self.params[side].append(param)
                optimizer.add_param_group({"params": [param], "lr": lr, **group_keys})
            if self.schedulers is not None:  # a scheduler knows the groups it was built with
                self.schedulers = None

        @rule(gamma=st.floats(0.5, 1.0))
        def scheduler_step(self, gamma):
            if self.schedulers is None:
                self.schedulers = {side: torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma)
                                   for side, optimizer in self.optimizers.items()}
            with warnings.catch_warnings():  # "lr_scheduler.step() before optimizer.step()": on purpose here
                warnings.simplefilter("ignore", UserWarning)
                for scheduler in self.schedulers.values():
                    scheduler.step()

        @rule(across=st.booleans() if spec.matches_torch else st.just(False))
        def checkpoint_round_trip(self, across):
            """Each side's checkpoint through ``torch.save`` into a fresh optimizer over the same params: of its
            own library, or of the other one (thalweg's into torch.optim and torch.optim's into thalweg)."""
            saved = {side: _through_file(optimizer.state_dict()) for side, optimizer in self.optimizers.items()}
            fresh = {}
            for side, optimizer in self.optimizers.items():
                source = saved[side if not across else ("theirs" if side == "ours" else "ours")]
                new = self._new(side, [{"params": group["params"]} for group in optimizer.param_groups])
                new.load_state_dict(source)
                if side == "theirs":
                    _keep_scalar_state_dtype(new, source)
                fresh[side] = new
            if self.schedulers is not None:
                for side, scheduler in list(self.schedulers.items()):
                    rebuilt = torch.optim.lr_scheduler.ExponentialLR(fresh[side], scheduler.gamma)
                    rebuilt.load_state_dict(scheduler.state_dict())
                    self.schedulers[side] = rebuilt
            self.optimizers = fresh
            if across:  # thalweg's count travels in its param group, which torch.optim carries along unread
                self.expected_skips = saved["theirs"]["param_groups"][0].get("skipped_steps", 0)

        @rule(index=st.integers(0, 7), transpose=st.booleans())
        def swap_parameter_storage(self, index, transpose):
            param = self.params["ours"][index % len(self.params["ours"])]
            if transpose and param.dim() == 2:
                param.data = param.data.t().contiguous().t()  # the same values, column-major
            else:
                param.data = param.data.clone()

        @rule()
        def swap_state_storage(self):
            for state in self.optimizers["ours"].state.values():
                for value in state.values():
                    if torch.is_tensor(value):
                        value.data = value.data.clone()

        # -- what must hold after every rule ---------------------------------------------------------

        @invariant()
        def same_params_and_state(self):
            if not hasattr(self, "optimizers"):
                return
            assert_same_state(self.optimizers["ours"], self.optimizers["theirs"], self.params["ours"],
                              self.params["theirs"])
            assert self.optimizers["ours"].skipped_steps == self.expected_skips
            for ours, theirs in zip(self.optimizers["ours"].param_groups, self.optimizers["theirs"].param_groups):
                assert ours["lr"] == theirs["lr"]

    SideBySide.__name__ = f"SideBySide_{spec.name}_{backend}"
    return SideBySide


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("spec", SPECS, ids=repr)
def test_side_by_side_through_random_training_code(spec, backend):
    if backend == "fused" and thalweg.engine.unavailable_reason(torch.device("cpu")) is not None:
        pytest.skip(f"backend='fused' unavailable on CPU: {thalweg.engine.unavailable_reason(torch.device('cpu'))}")
    machine = machine_for(spec, backend)
    machine.TestCase.settings = settings(max_examples=30, stateful_step_count=40, deadline=None,
                                         suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    machine.TestCase().runTest()
