"""CUDA: every Triton kernel checked against the reference backend, then timed against torch.optim.

    python benchmarks/gpu_step_speed.py            # writes benchmarks/results/gpu-<device>-<date>.{json,md}
    python benchmarks/gpu_step_speed.py --quick    # smoke run: small layouts, few repeats
    TRITON_INTERPRET=1 python benchmarks/gpu_step_speed.py --dry-run   # the check only, CPU tensors, interpreter

First the check: every optimizer and option set of ``CHECK_CASES`` (every kernel the library derives: the classics and
each optimizer added since), in float32, float64, bfloat16, float16,
bfloat16/float16 with float32 state, float32/bfloat16 with 8-bit state, and bfloat16 with ``param_update``
"stochastic" and "kahan" (``check_rounding``), on 0-d, empty, odd-sized and
multi-chunk tensors (some without a gradient on some steps): backend="fused" against backend="reference" on
the same device after 10 steps, params and every state tensor (8-bit state decoded), each against the
tolerance of its dtype. The results head the report; a
kernel that disagrees is listed there and does not stop the timing.

Layouts: (a) 64 tensors of 4M float32 (256M parameters), (b) 2000 tensors of 1000 (many small). Then fused AdamW
on layout (a) in bfloat16 with param_update "nearest", "stochastic" and "kahan" (float32 and 8-bit state), against
torch's fused AdamW on the same parameters (``time_param_update``).
Candidates per optimizer: thalweg backend="fused" (Triton; also with 8-bit state where the optimizer has it),
thalweg backend="foreach", torch.optim's
foreach and fused modes (fused where torch has it: SGD, Adam, Adagrad). Timing: CUDA events around
each step after warm-up, median of repeats, one candidate at a time (each holds its own state, freed
before the next). Also: device copy bandwidth (``copy_`` of 1 GiB, bytes read + written) and each
fused time's share of it, from the minimum bytes per element the step must move (``FLOOR``).
Exits with a message when no CUDA device exists.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import pathlib
import statistics
import sys

import torch

import thalweg

# Minimum bytes per float32 element each step must move (read + write).
FLOOR = {"sgd": 12, "momentum": 20, "adam": 28, "rmsprop": 20, "adagrad": 20,
         "lars": 28,   # norm pass reads w, g (8) + SGD-momentum pass (20)
         "lamb": 40}   # pass 1 reads g, m, v, w, writes m, v (24); pass 2 reads m, v, w, writes w (16)

OPTIMIZERS = {
    "sgd": (thalweg.SGD, dict(lr=0.01), torch.optim.SGD, True),
    "momentum": (thalweg.SGD, dict(lr=0.01, momentum=0.9), torch.optim.SGD, True),
    "adam": (thalweg.Adam, dict(lr=1e-3), torch.optim.Adam, True),
    "rmsprop": (thalweg.RMSprop, dict(lr=1e-3), torch.optim.RMSprop, False),
    "adagrad": (thalweg.Adagrad, dict(lr=1e-2), torch.optim.Adagrad, True),
    "lars": (thalweg.LARS, dict(lr=0.1), None, False),
    "lamb": (thalweg.LAMB, dict(lr=1e-3), None, False),
}


# -- the check ---------------------------------------------------------------------------------------

CHECK_CASES = [
    ("SGD", dict(lr=0.1)), ("SGD", dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.1)),
    ("SGD", dict(lr=0.1, momentum=0.9, dampening=0.3, maximize=True)),
    ("Adam", dict(lr=0.01)), ("Adam", dict(lr=0.01, weight_decay=0.1, amsgrad=True)),
    ("Adam", dict(lr=0.01, betas=(0.3, 0.4), maximize=True)),
    ("AdamW", dict(lr=0.01, weight_decay=0.1, amsgrad=True, maximize=True)),
    ("RMSprop", dict(lr=0.01)), ("RMSprop", dict(lr=0.01, centered=True, momentum=0.9, weight_decay=0.1)),
    ("Adagrad", dict(lr=0.1)), ("Adagrad", dict(lr=0.1, lr_decay=0.05, weight_decay=0.1, initial_accumulator_value=0.1)),
    ("LARS", dict(lr=0.5)), ("LARS", dict(lr=0.5, nesterov=True, weight_decay=0.01, maximize=True)),
    ("LARS", dict(lr=0.5, trust_ratio=False)),
    ("LAMB", dict(lr=0.01)), ("LAMB", dict(lr=0.01, bias_correction=False, weight_decay=0)),
    ("LAMB", dict(lr=0.01, maximize=True, trust_ratio=False)),
]
# the optimizers added with the rule engine: their kernels are derived from their rules like the classics', and checked
# alike (a dtype an optimizer does not offer — state_dtype, 8-bit state — is left out for it). Muon steps matrices only.
CHECK_CASES += [
    ("NAdam", dict(lr=0.01)), ("NAdam", dict(lr=0.01, weight_decay=0.1, decoupled_weight_decay=True)),
    ("RAdam", dict(lr=0.01)), ("RAdam", dict(lr=0.01, weight_decay=0.1, decoupled_weight_decay=True)),
    ("Adamax", dict(lr=0.01, weight_decay=0.1)), ("Adadelta", dict(lr=1.0, weight_decay=0.1)),
    ("ASGD", dict(lr=0.01, t0=2.0)), ("Rprop", dict(lr=0.01)),
    ("Lion", dict(lr=1e-3)), ("Lion", dict(lr=1e-3, weight_decay=0.1, cautious=True)),
    ("Adan", dict(lr=0.01, weight_decay=0.02)), ("AdEMAMix", dict(lr=0.01, alpha_warmup=3, beta3_warmup=3)),
    ("ADOPT", dict(lr=0.01)), ("StableAdamW", dict(lr=0.01, weight_decay=0.1)),
    ("Adam", dict(lr=0.01, cautious=True)),
    ("ScheduleFreeAdamW", dict(lr=0.01, warmup_steps=2)), ("ScheduleFreeSGD", dict(lr=0.1)),
    ("Prodigy", dict(lr=1.0)), ("DAdaptAdam", dict(lr=1.0)),
    ("Adafactor", dict(lr=0.01, weight_decay=0.1)), ("SOAP", dict(lr=0.01, precondition_frequency=2)),
    ("Muon", dict(lr=0.02, shapes=[(3, 5), (7, 4), (2, 3, 4), (60, 75)])),
]
CHECK_DTYPES = {"float32": (torch.float32, None), "float64": (torch.float64, None), "bfloat16": (torch.bfloat16, None),
                "float16": (torch.float16, None), "bfloat16+float32-state": (torch.bfloat16, torch.float32),
                "float16+float32-state": (torch.float16, torch.float32),
                # 8-bit state: compared decoded; a value on a rounding boundary of the map may take the next code
                "float32+int8-state": (torch.float32, "int8"), "bfloat16+int8-state": (torch.bfloat16, "int8")}
# bf16/fp16: the kernels round each stored value once, the reference after every torch op
CHECK_TOLERANCE = {torch.float32: 1e-5, torch.float64: 1e-10, torch.bfloat16: 5e-2, torch.float16: 5e-3}
CHECK_SHAPES = [(3, 5), (), (0,), (7,), (70_001,), (2, 3, 4), (1,), (1 << 17,)]


def offers(name: str, dtype: torch.dtype, state_dtype) -> bool:
    """Whether optimizer ``name`` takes parameters of ``dtype`` with ``state_dtype`` (8-bit state where it declares its
    codecs; Prodigy refuses float16 parameters without float32 state, by name: its d²·g² underflows)."""
    import inspect

    cls = getattr(thalweg, name)
    if state_dtype is not None and not ("state_dtype" in inspect.signature(cls).parameters
                                        and (state_dtype != "int8" or bool(cls.state_codecs))):
        return False
    try:
        cls([torch.zeros((2, 2), dtype=dtype, requires_grad=True)], **({} if state_dtype is None else
                                                                        {"state_dtype": state_dtype}))
    except ValueError as refusal:
        print(f"check {name:8s} {str(dtype):24s} state_dtype={state_dtype}: not offered ({refusal})", flush=True)
        return False
    return True


def _check_run(name, options, backend, dtype, state_dtype, device, steps=10):
    generator = torch.Generator().manual_seed(0)
    options = dict(options)
    params = [torch.randn(s, generator=generator, dtype=torch.float64).to(dtype).to(device).requires_grad_()
              for s in options.pop("shapes", CHECK_SHAPES)]
    group = {"params": params}
    if "trust_ratio" in options:
        group["trust_ratio"] = options.pop("trust_ratio")
    if state_dtype is not None:
        options["state_dtype"] = state_dtype
    optimizer = getattr(thalweg, name)([group], backend=backend, **options)
    for step in range(steps):
        for i, param in enumerate(params):
            skip = (step + i) % 4 == 0 and i % 2 == 0
            grad = torch.randn(param.shape, generator=generator, dtype=torch.float64).to(dtype).to(device)
            param.grad = None if skip else grad
        optimizer.step()
    return params, optimizer


def check(device: torch.device) -> list[dict]:
    """backend="fused" against backend="reference" on ``device``, every case and dtype (see the docstring)."""
    rows = []
    for name, options in CHECK_CASES:
        for label, (dtype, state_dtype) in CHECK_DTYPES.items():
            if not offers(name, dtype, state_dtype):
                continue
            row = dict(optimizer=name, options=options, dtype=label)
            # low-precision state: the reference rounds after every op, the kernels once per stored value, and
            # an ill-conditioned rule (centred RMSprop's E[g²] - E[g]²) drifts apart: 5 steps, as the tests
            steps = 5 if dtype in (torch.bfloat16, torch.float16) and state_dtype is None else 10
            try:
                expected = _check_run(name, options, "reference", dtype, state_dtype, device, steps)
                actual = _check_run(name, options, "fused", dtype, state_dtype, device, steps)
                # errors relative to the largest magnitude of the run (a one-element tensor that has drifted
                # near zero would make its own maximum a meaningless scale in bfloat16)
                param_scale = max((float(e.detach().abs().max().double()) for e in expected[0] if e.numel()), default=1.0)
                param_error, state_diff, state_scale = 0.0, 0.0, 0.0
                for e, a in zip(expected[0], actual[0]):
                    if e.numel():
                        param_error = max(param_error, float((a.detach().double() - e.detach().double()).abs().max()))
                    for key, value in expected[1].state[e].items():
                        got = actual[1].state[a][key]
                        if value.numel() and key != "step":
                            state_scale = max(state_scale, float(value.abs().max().double()))
                            state_diff = max(state_diff, float((got.double() - value.double()).abs().max()))
                param_error /= param_scale or 1.0
                state_error = state_diff / (state_scale or 1.0)
                if state_dtype == "int8":
                    row.update(**_check_int8(expected, actual, dtype))
                    rows.append(row)
                    print(f"check {name:8s} {label:24s} {str(options):60s} " + ("ok" if row["ok"] else "FAILED")
                          + f" (share of elements off {row['off_share']:.1e}, largest {row['largest']:.1e})", flush=True)
                    continue
                state_tolerance = CHECK_TOLERANCE[state_dtype or dtype]
                # a low-precision parameter is its float32 result rounded once: one ulp either way
                param_tolerance = max(CHECK_TOLERANCE[dtype], 2.0 ** -7 if dtype == torch.bfloat16 else 2.0 ** -10) \
                    if state_dtype is not None else CHECK_TOLERANCE[dtype]
                row.update(param_error=param_error, state_error=state_error,
                           ok=param_error <= param_tolerance and state_error <= state_tolerance)
            except Exception as error:  # noqa: BLE001 - recorded: the report lists every failing kernel
                row.update(ok=False, error=f"{type(error).__name__}: {str(error)[:300]}")
            rows.append(row)
            print(f"check {name:8s} {label:24s} {str(options):60s} "
                  + ("ok" if row["ok"] else f"FAILED {row.get('error', '')}")
                  + (f" (param {row['param_error']:.1e}, state {row['state_error']:.1e})" if "param_error" in row else ""),
                  flush=True)
    return rows


ROUNDING_CASES = [("SGD", dict(lr=2.0**-6), True), ("AdamW", dict(lr=0.01, weight_decay=0.1), False),
                  ("LAMB", dict(lr=0.01), False)]


def _rounding_run(name, options, backend, state_dtype, mode, exact, device, steps=5):
    generator = torch.Generator().manual_seed(0)
    params = [torch.randn(s, generator=generator).bfloat16().to(device).requires_grad_() for s in CHECK_SHAPES]
    optimizer = getattr(thalweg, name)(params, backend=backend, state_dtype=state_dtype, param_update=mode, **options)
    for _ in range(steps):
        for param in params:
            grad = (torch.randint(-2048, 2048, param.shape, generator=generator) / 256 if exact
                    else torch.randn(param.shape, generator=generator))
            param.grad = grad.bfloat16().to(device)
        optimizer.step()
    return [(p.detach().cpu(), optimizer.state[p].get("kahan_comp")) for p in params]


def check_rounding(device: torch.device) -> list[dict]:
    """param_update: bfloat16 parameters stored stochastically or with a compensation, fused against reference on
    ``device``. SGD steps whose float32 results are exact (lr 2^-6, gradients multiples of 2^-8) must store the same
    bits; AdamW and LAMB the same bits on all but 0.5 % of the elements (a float32 ulp across a rounding boundary),
    one bfloat16 spacing at most, and weight + compensation within 1e-5 of the reference's."""
    rows = []
    for mode in ("stochastic", "kahan"):
        for state_dtype in (torch.float32, "int8"):
            for name, options, exact in ROUNDING_CASES:
                row = dict(optimizer=name, options=options, dtype=f"bfloat16+{state_dtype}-state+{mode}")
                try:
                    expected, actual = (_rounding_run(name, options, backend, state_dtype, mode, exact, device)
                                        for backend in ("reference", "fused"))
                    differ, total, spacing, comp_error = 0, 0, 0.0, 0.0
                    for (p, c), (q, d) in zip(actual, expected):
                        differ, total = differ + int((p != q).sum()), total + p.numel()
                        if p.numel():
                            spacing = max(spacing, float(((p.float() - q.float()).abs() / q.float().abs().clamp_min(
                                1e-30)).max()))
                        if c is not None and p.numel():
                            comp_error = max(comp_error, float(((p.float() + c.cpu().float()) - (q.float() + d.cpu().float()))
                                                               .abs().max()) / max(float(q.float().abs().max()), 1e-30))
                    share = differ / max(total, 1)
                    ok = share == 0 and comp_error == 0 if exact else share <= 5e-3 and spacing <= 2.0**-7 and comp_error <= 1e-5
                    row.update(param_error=share, state_error=comp_error, ok=ok)
                except Exception as error:  # noqa: BLE001 - recorded: the report lists every failing kernel
                    row.update(ok=False, error=f"{type(error).__name__}: {str(error)[:300]}")
                rows.append(row)
                print(f"check {name:8s} {row['dtype']:24s} {str(options):60s} "
                      + ("ok" if row["ok"] else f"FAILED {row.get('error', '')}")
                      + (f" (share of bits off {row['param_error']:.1e}, weight + compensation {row['state_error']:.1e})"
                         if "param_error" in row else ""), flush=True)
    return rows


def _check_int8(expected, actual, dtype) -> dict:
    """Parameters and decoded 8-bit state: at most 0.2 % of the elements beyond the dtype's tolerance (a code on a
    rounding boundary of the map, taken differently after a last-bit difference), none beyond 2 % of the scale."""
    from thalweg.engine import codec

    def decoded(optimizer, param):
        state = optimizer.state[param]
        for key, value in state.items():
            if key == "step" or key.endswith("_absmax") or not value.numel():
                continue
            if value.dtype == torch.uint8:
                value = codec.decode(value, state[key + "_absmax"], optimizer.state_codecs[key] == "signed")
            yield key, value.double()

    tight = 1e-5 if dtype == torch.float32 else 8e-3
    off, total, largest = 0, 0, 0.0
    for e, a in zip(expected[0], actual[0]):
        pairs = [(a.detach().double(), e.detach().double())] if e.numel() else []
        pairs += [(dict(decoded(actual[1], a))[key], value) for key, value in decoded(expected[1], e)]
        for got, want in pairs:
            error = (got.cpu() - want.cpu()).abs() / max(float(want.abs().max()), 1e-30)
            off, total, largest = off + int((error > tight).sum()), total + error.numel(), max(largest, float(error.max()))
    share = off / max(total, 1)
    return dict(off_share=share, largest=largest, ok=share <= 2e-3 and largest <= 2e-2)


def layouts(quick: bool) -> dict[str, list[tuple[int, ...]]]:
    if quick:
        return {"a:8x1M": [(1 << 20,)] * 8, "b:200x1000": [(1000,)] * 200}
    return {"a:64x4M": [(1 << 22,)] * 64, "b:2000x1000": [(1000,)] * 2000}


def time_ms(fn, warmup: int, repeats: int) -> float:
    """Median over ``repeats`` of one call's GPU time (CUDA events), after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        stop.record()
        stop.synchronize()
        times.append(start.elapsed_time(stop))
    return statistics.median(times)


def copy_bandwidth(warmup: int, repeats: int) -> float:
    """GB/s of a device-to-device ``copy_`` of 1 GiB (bytes read + written)."""
    source = torch.empty(1 << 28, dtype=torch.float32, device="cuda").normal_()
    target = torch.empty_like(source)
    ms = time_ms(lambda: target.copy_(source), warmup, repeats)
    nbytes = 2 * source.numel() * source.element_size()
    return nbytes / ms / 1e6


def make_params(shapes):
    params = [torch.randn(shape, device="cuda").requires_grad_() for shape in shapes]
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    return params


def candidates(name, params):
    cls, options, torch_cls, torch_fused = OPTIMIZERS[name]
    yield "thalweg fused", lambda: cls(params, backend="fused", **options)
    if cls.state_codecs:
        yield "thalweg fused 8-bit", lambda: cls(params, backend="fused", state_dtype="int8", **options)
    yield "thalweg foreach", lambda: cls(params, backend="foreach", **options)
    if torch_cls is not None:
        yield "torch foreach", lambda: torch_cls(params, foreach=True, **options)
        if torch_fused:
            yield "torch fused", lambda: torch_cls(params, fused=True, **options)


def run(quick: bool) -> dict:
    warmup, repeats = (2, 5) if quick else (5, 30)
    bandwidth = copy_bandwidth(warmup, repeats)
    print(f"copy bandwidth: {bandwidth:.0f} GB/s", flush=True)
    rows = []
    for layout, shapes in layouts(quick).items():
        n_elements = sum(torch.Size(s).numel() for s in shapes)
        params = make_params(shapes)
        for name in OPTIMIZERS:
            times = {}
            for label, build in candidates(name, params):  # params keep moving: timing does not care
                try:
                    times[label] = time_ms(build().step, warmup, repeats)
                except (RuntimeError, TypeError, ValueError) as error:  # e.g. a torch without that mode
                    times[label] = None
                    print(f"  {name} {label}: {type(error).__name__}: {error}", file=sys.stderr)
                gc.collect()  # the optimizer and its state are gone before the next candidate
                torch.cuda.empty_cache()
            torch_times = [t for label, t in times.items() if label.startswith("torch") and t is not None]
            fused = times.get("thalweg fused")
            gbps = FLOOR[name] * n_elements / fused / 1e6 if fused else None
            row = dict(layout=layout, optimizer=name, elements=n_elements, tensors=len(shapes), ms=times,
                       torch_fastest_ms=min(torch_times) if torch_times else None,
                       fused_gbps=gbps, share_of_copy=gbps / bandwidth if gbps else None,
                       speedup_vs_torch=min(torch_times) / fused if torch_times and fused else None)
            rows.append(row)
            print(f"{layout:12s} {name:9s} " + "  ".join(f"{k}: {v:.3f} ms" if v is not None else f"{k}: -"
                                                         for k, v in times.items()), flush=True)
        del params
        gc.collect()
        torch.cuda.empty_cache()
    return dict(device=torch.cuda.get_device_name(), torch=torch.__version__, triton=_triton_version(),
                date=datetime.date.today().isoformat(), quick=quick, warmup=warmup, repeats=repeats,
                copy_gbps=bandwidth, floor_bytes_per_element=FLOOR, rows=rows,
                bf16_rows=time_param_update(quick, warmup, repeats))


def time_param_update(quick: bool, warmup: int, repeats: int) -> list[dict]:
    """Fused AdamW on layout (a) in bfloat16 with float32 and 8-bit state: param_update "nearest", "stochastic" and
    "kahan", each against torch's fused AdamW on the same bfloat16 parameters (its state in bfloat16)."""
    layout, shapes = next(iter(layouts(quick).items()))
    params = [torch.randn(shape, device="cuda", dtype=torch.bfloat16).requires_grad_() for shape in shapes]
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    rows = []
    builders = {"torch fused (bf16 state)": lambda: torch.optim.AdamW(params, lr=1e-3, fused=True)}
    for state in ("float32", "int8"):
        for mode in ("nearest", "stochastic", "kahan"):
            builders[f"thalweg fused, {state} state, {mode}"] = (
                lambda state=state, mode=mode: thalweg.AdamW(params, lr=1e-3, backend="fused", param_update=mode,
                                                             state_dtype=torch.float32 if state == "float32" else "int8"))
    for label, build in builders.items():
        try:
            ms = time_ms(build().step, warmup, repeats)
        except (RuntimeError, TypeError, ValueError) as error:
            ms = None
            print(f"  bf16 {label}: {type(error).__name__}: {error}", file=sys.stderr)
        rows.append(dict(layout=layout, candidate=label, ms=ms))
        print(f"{layout:12s} bf16 {label}: " + ("-" if ms is None else f"{ms:.3f} ms"), flush=True)
        gc.collect()
        torch.cuda.empty_cache()
    return rows


def _triton_version() -> str | None:
    try:
        import triton
    except ImportError:
        return None
    return triton.__version__


def markdown(result: dict) -> str:
    def fmt(value, spec=".3f"):
        return "-" if value is None else format(value, spec)

    checks = result.get("checks", [])
    failed = [c for c in checks if not c["ok"]]
    lines = [f"# GPU step speed: {result['device']} ({result['date']})", "",
             f"Check, backend='fused' against 'reference' on the GPU: {len(checks) - len(failed)} of {len(checks)} "
             "cases within tolerance." + ("" if not failed else " Failing:"), ""]
    lines += [f"- {c['optimizer']} {c['options']} {c['dtype']}: {c.get('error') or (c['param_error'], c['state_error'])}"
              for c in failed]
    lines += ["",
             f"torch {result['torch']}, triton {result['triton']}; copy bandwidth {result['copy_gbps']:.0f} GB/s "
             f"(read + write). Median of {result['repeats']} steps after {result['warmup']} warm-up steps, CUDA events.",
             "", "| layout | optimizer | thalweg fused ms | thalweg foreach ms | torch foreach ms | torch fused ms "
             "| fused GB/s | share of copy | speed-up vs torch's fastest |", "|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        ms = r["ms"]
        lines.append(f"| {r['layout']} | {r['optimizer']} | {fmt(ms.get('thalweg fused'))} | {fmt(ms.get('thalweg foreach'))} "
                     f"| {fmt(ms.get('torch foreach'))} | {fmt(ms.get('torch fused'))} | {fmt(r['fused_gbps'], '.0f')} "
                     f"| {fmt(r['share_of_copy'], '.0%')} | {fmt(r['speedup_vs_torch'], '.2f')} |")
    bf16 = result.get("bf16_rows", [])
    if bf16:
        base = {r["candidate"].split(", ")[1]: r["ms"] for r in bf16 if r["candidate"].endswith("nearest")}
        lines += ["", "bfloat16 parameters (param_update), fused AdamW:", "",
                  "| layout | candidate | ms | vs nearest, same state |", "|---|---|---|---|"]
        for r in bf16:
            parts = r["candidate"].split(", ")
            ratio = (r["ms"] / base[parts[1]] if len(parts) == 3 and r["ms"] and base.get(parts[1]) else None)
            lines.append(f"| {r['layout']} | {r['candidate']} | {fmt(r['ms'])} | {fmt(ratio, '.2f')} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small layouts, few repeats (smoke run)")
    parser.add_argument("--dry-run", action="store_true",
                        help="run the check on CPU tensors through Triton's interpreter (TRITON_INTERPRET=1), no timing")
    args = parser.parse_args()
    if args.dry_run:
        from thalweg.engine import driver, gpu

        driver._launcher = lambda device: gpu  # CPU buckets to the Triton launcher, as tests/test_triton.py does
        # the interpreter is slow: small programs (a BLOCK of 8-bit state holds whole 256-element blocks), small
        # tensors, one still above the 4096 elements 8-bit state starts at and spanning several chunks
        gpu.CHUNK, gpu.BLOCK, gpu.SEGMENT_BLOCK = 512, 256, 2
        CHECK_SHAPES[:] = [s if torch.Size(s).numel() < 5000 else (4100,) for s in CHECK_SHAPES]
        rows = check(torch.device("cpu")) + check_rounding(torch.device("cpu"))
        failed = [r for r in rows if not r["ok"]]
        sys.exit(f"{len(failed)} of {len(rows)} checks failed" if failed else None)
    if not torch.cuda.is_available():
        sys.exit("gpu_step_speed.py needs a CUDA device (torch.cuda.is_available() is False); "
                 "for CPU timings run benchmarks/step_speed.py")
    from thalweg import engine

    reason = engine.unavailable_reason(torch.device("cuda"))
    if reason is not None:
        sys.exit(f"backend='fused' is not available on CUDA here: {reason}")
    checks = check(torch.device("cuda")) + check_rounding(torch.device("cuda"))
    result = run(args.quick)
    result["checks"] = checks
    out = pathlib.Path(__file__).parent / "results"
    out.mkdir(exist_ok=True)
    device = torch.cuda.get_device_name().lower().replace(" ", "-")
    stem = out / f"gpu-{device}-{result['date']}{'-quick' if args.quick else ''}"
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2))
    stem.with_suffix(".md").write_text(markdown(result))
    print(f"wrote {stem}.json and {stem}.md")


if __name__ == "__main__":
    main()
