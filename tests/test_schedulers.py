"""Issue 2, point 5: torch's lr schedulers drive thalweg optimizers exactly as they drive the counterpart
(torch.optim, or the paper reference for LARS/LAMB) — same lrs, momenta/betas and params — and
thalweg.schedules' warm-up schedules have the stated values, validation and state_dict round-trip."""

from __future__ import annotations

import io
import math

import pytest
import torch
from torch.optim import lr_scheduler

import thalweg
from specs import SPECS, Spec, assert_same_state, grad_stream, make_params, split_groups

SHAPES = [(3, 5), (7,), ()]
STEPS = 30


def scheduler_combo(spec: Spec):
    """A grid combination with momentum on (so cycling it matters) and the trust ratio on."""
    return next(c for c in spec.grid if c.get("momentum", 1) and c.get("trust_ratio", True) and not c.get("maximize"))


SCHEDULERS = {
    "StepLR": lambda o, spec: lr_scheduler.StepLR(o, step_size=5, gamma=0.5),
    "CosineAnnealingLR": lambda o, spec: lr_scheduler.CosineAnnealingLR(o, T_max=20, eta_min=1e-4),
    "LambdaLR": lambda o, spec: lr_scheduler.LambdaLR(o, lambda step: 0.95**step),
    "OneCycleLR": lambda o, spec: lr_scheduler.OneCycleLR(
        o, max_lr=[g["lr"] * 2 for g in o.param_groups], total_steps=STEPS, cycle_momentum=spec.cycle_momentum is not None),
    "CyclicLR": lambda o, spec: lr_scheduler.CyclicLR(
        o, base_lr=[g["lr"] / 4 for g in o.param_groups], max_lr=[g["lr"] for g in o.param_groups], step_size_up=4,
        cycle_momentum=spec.cycle_momentum is not None, base_momentum=0.8, max_momentum=0.95),
    "ReduceLROnPlateau": lambda o, spec: lr_scheduler.ReduceLROnPlateau(o, factor=0.5, patience=1),
}


def scheduled_run(spec, cls, scheduler_name, **extra):
    combo = scheduler_combo(spec)
    params = make_params(SHAPES, torch.float64, 9)
    optimizer = spec.build(cls, split_groups(params, combo, spec), combo, **extra)
    scheduler = SCHEDULERS[scheduler_name](optimizer, spec)
    seen = []
    for step, grads in enumerate(grad_stream(SHAPES, torch.float64, 9, STEPS)):
        for param, grad in zip(params, grads):
            param.grad = grad
        optimizer.step()
        if scheduler_name == "ReduceLROnPlateau":
            scheduler.step(float(sum(p.detach().square().sum() for p in params)) + (step % 3 == 0))
        else:
            scheduler.step()
        seen.append([(g["lr"], g.get("momentum"), g.get("betas")) for g in optimizer.param_groups])
    return optimizer, params, seen


@pytest.mark.parametrize("scheduler_name", list(SCHEDULERS))
@pytest.mark.parametrize("spec", SPECS, ids=repr)
def test_torch_schedulers_drive_thalweg_like_the_counterpart(spec, scheduler_name, backend):
    ours, params, our_values = scheduled_run(spec, spec.cls, scheduler_name, backend=backend)
    theirs, twin, their_values = scheduled_run(spec, spec.counterpart, scheduler_name)
    assert our_values == their_values
    assert len({v[0][0] for v in our_values}) > 1, "the schedule never changed the lr"
    if scheduler_name in ("OneCycleLR", "CyclicLR") and spec.cycle_momentum:
        key = 1 if spec.cycle_momentum == "momentum" else 2
        assert len({v[0][key] for v in our_values}) > 1, f"{spec.cycle_momentum} was not cycled"
    assert_same_state(ours, theirs, params, twin)


# -- thalweg.schedules -------------------------------------------------------------------------


def lrs(make_schedule, steps, base_lr=0.1, **kwargs):
    optimizer = thalweg.SGD(make_params([(2,)], torch.float32, 0), lr=base_lr)
    scheduler = make_schedule(optimizer, **kwargs)
    values = []
    for _ in range(steps):
        values.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return values


def cosine(progress):
    return 0.5 * (1 + math.cos(math.pi * progress))


@pytest.mark.parametrize("schedule, decay", [(thalweg.schedules.warmup_cosine, cosine),
                                             (thalweg.schedules.warmup_linear, lambda p: 1 - p)])
def test_warmup_schedule_values(schedule, decay):
    values = lrs(schedule, 26, warmup_steps=4, total_steps=20, min_lr_ratio=0.1)
    expected = [0.1 * (s + 1) / 4 for s in range(4)]
    expected += [0.1 * (0.1 + 0.9 * decay(min(1.0, (s - 4) / 16))) for s in range(4, 26)]
    assert values == pytest.approx(expected, rel=1e-12)
    assert values[0] == pytest.approx(0.025) and values[3] == pytest.approx(0.1) and values[4] == pytest.approx(0.1)
    assert values[20:] == pytest.approx([0.01] * 6)  # held at min_lr_ratio after total_steps
    assert values[12] == pytest.approx(0.1 * 0.55)  # half-way: half-way between 1 and min_lr_ratio


@pytest.mark.parametrize("schedule", [thalweg.schedules.warmup_cosine, thalweg.schedules.warmup_linear])
def test_no_warmup_starts_at_the_full_lr(schedule):
    assert lrs(schedule, 2, warmup_steps=0, total_steps=10)[0] == pytest.approx(0.1)


@pytest.mark.parametrize("schedule", [thalweg.schedules.warmup_cosine, thalweg.schedules.warmup_linear])
@pytest.mark.parametrize("kwargs, error, match", [
    (dict(warmup_steps=-1, total_steps=10), ValueError, r"warmup_steps must be >= 0, got -1"),
    (dict(warmup_steps=0, total_steps=0), ValueError, r"total_steps must be > 0, got 0"),
    (dict(warmup_steps=11, total_steps=10), ValueError, r"warmup_steps must be <= total_steps, got warmup_steps=11, total_steps=10"),
    (dict(warmup_steps=2.5, total_steps=10), TypeError, r"warmup_steps must be an int, got 2\.5"),
    (dict(warmup_steps=2, total_steps=True), TypeError, r"total_steps must be an int, got True"),
    (dict(warmup_steps=2, total_steps=10, min_lr_ratio=1.5), ValueError, r"min_lr_ratio must be in \[0, 1\], got 1\.5"),
    (dict(warmup_steps=2, total_steps=10, min_lr_ratio=-0.1), ValueError, r"min_lr_ratio must be in \[0, 1\], got -0\.1"),
])
def test_warmup_schedule_validation(schedule, kwargs, error, match):
    optimizer = thalweg.SGD(make_params([(2,)], torch.float32, 0), lr=0.1)
    with pytest.raises(error, match=match):
        schedule(optimizer, **kwargs)


@pytest.mark.parametrize("schedule", [thalweg.schedules.warmup_cosine, thalweg.schedules.warmup_linear])
def test_warmup_schedule_state_dict_round_trip(schedule):
    def fresh():
        optimizer = thalweg.Adam(make_params([(2,)], torch.float32, 0), lr=0.1)
        return optimizer, schedule(optimizer, warmup_steps=3, total_steps=12, min_lr_ratio=0.2)

    straight_opt, straight = fresh()
    expected = []
    for _ in range(12):
        straight_opt.step()
        straight.step()
        expected.append(straight_opt.param_groups[0]["lr"])

    first_opt, first = fresh()
    for _ in range(5):
        first_opt.step()
        first.step()
    buffer = io.BytesIO()
    torch.save({"optimizer": first_opt.state_dict(), "scheduler": first.state_dict()}, buffer)
    buffer.seek(0)
    checkpoint = torch.load(buffer)
    # A schedule built with other settings must be restored by the checkpoint, not by its arguments.
    resumed_opt = thalweg.Adam(make_params([(2,)], torch.float32, 0), lr=0.1)
    resumed = schedule(resumed_opt, warmup_steps=1, total_steps=50)
    resumed_opt.load_state_dict(checkpoint["optimizer"])
    resumed.load_state_dict(checkpoint["scheduler"])
    got = []
    for _ in range(7):
        resumed_opt.step()
        resumed.step()
        got.append(resumed_opt.param_groups[0]["lr"])
    assert got == pytest.approx(expected[5:], rel=1e-12)
