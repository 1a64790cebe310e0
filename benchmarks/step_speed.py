"""Optimizer step speed: every optimizer x backend x layout, against torch.optim and memory bandwidth.

    python benchmarks/step_speed.py            # full run, writes benchmarks/results/<device>-<date>.{json,md}
    python benchmarks/step_speed.py --quick    # smoke run: small layouts, few repeats

Layouts: (a) 32 tensors of 1M float32, (b) 2000 tensors of 1000, (c) a small GPT-style transformer.
Per cell: ms/step (median of repeats after warm-up, all candidates of a cell timed round-robin), effective GB/s (floor bytes / time; floor bytes
per float32 element below), its share of the copy bandwidth measured in the same run (``copy_`` of
256 MB, bytes read + written), and the speed-up over torch.optim's fastest mode (for-loop, foreach,
fused) or, where torch has no such optimizer, over the other packages that have it (``PEERS``: pytorch-optimizer,
lion-pytorch, torch-optimi, torch-adopt; each skipped if absent).
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import pathlib
import statistics
import time

import torch

import thalweg

# Minimum bytes per float32 element each step must move (read + write), fused in one pass.
FLOOR = {"sgd": 12, "momentum": 20, "adam": 28, "rmsprop": 20, "adagrad": 20,
         "lars": 28,   # norm pass reads w, g (8) + SGD-momentum pass (20)
         "lamb": 40,   # pass 1 reads g, m, v, w, writes m, v (24); pass 2 reads m, v, w, writes w (16)
         "lion": 20, "adan": 44, "ademamix": 36, "adopt": 28,
         "stableadamw": 36,  # pass 1 reads g, v (the RMS of g/sqrt(v)) (8); pass 2 is Adam's (28)
         "schedulefree_adamw": 28, "schedulefree_sgd": 20,
         "prodigy": 48,      # the estimate reads g, w, x0, s, writes s (20); then Adam's step (28)
         "dadaptadam": 44}   # the estimate reads g, s, v, writes s (16); then Adam's step (28)

OPTIMIZERS = {
    "sgd": (thalweg.SGD, dict(lr=0.01), torch.optim.SGD),
    "momentum": (thalweg.SGD, dict(lr=0.01, momentum=0.9), torch.optim.SGD),
    "adam": (thalweg.Adam, dict(lr=1e-3), torch.optim.Adam),
    "rmsprop": (thalweg.RMSprop, dict(lr=1e-3), torch.optim.RMSprop),
    "adagrad": (thalweg.Adagrad, dict(lr=1e-2), torch.optim.Adagrad),
    "lars": (thalweg.LARS, dict(lr=0.1), None),
    "lamb": (thalweg.LAMB, dict(lr=1e-3), None),
    "lion": (thalweg.Lion, dict(lr=1e-4), None),
    "adan": (thalweg.Adan, dict(lr=1e-3), None),
    "ademamix": (thalweg.AdEMAMix, dict(lr=1e-3), None),
    "adopt": (thalweg.ADOPT, dict(lr=1e-3), None),
    "stableadamw": (thalweg.StableAdamW, dict(lr=1e-3), None),
    "schedulefree_adamw": (thalweg.ScheduleFreeAdamW, dict(lr=2.5e-3), None),
    "schedulefree_sgd": (thalweg.ScheduleFreeSGD, dict(lr=1.0), None),
    "prodigy": (thalweg.Prodigy, dict(lr=1.0), None),
    "dadaptadam": (thalweg.DAdaptAdam, dict(lr=1.0), None),
}

# What a user could pick instead where torch.optim has no such optimizer: (package module, class[, options])
# per label, each built with the lr (and those options) only, its own defaults otherwise; a package that is
# not installed is left out.
_OPTIMI = {"triton": False}  # optimi takes its Triton kernels whenever triton is installed, CPU tensors too (they fail)
PEERS = {
    "lars": {"pytorch-optimizer": ("pytorch_optimizer", "LARS")},
    "lamb": {"pytorch-optimizer": ("pytorch_optimizer", "Lamb")},
    "lion": {"pytorch-optimizer": ("pytorch_optimizer", "Lion"), "lion-pytorch": ("lion_pytorch", "Lion"),
             "torch-optimi": ("optimi", "Lion", _OPTIMI)},
    "adan": {"pytorch-optimizer": ("pytorch_optimizer", "Adan"), "torch-optimi": ("optimi", "Adan", _OPTIMI)},
    "ademamix": {"pytorch-optimizer": ("pytorch_optimizer", "AdEMAMix")},
    "adopt": {"pytorch-optimizer": ("pytorch_optimizer", "ADOPT"), "torch-adopt": ("adopt", "ADOPT")},
    "stableadamw": {"pytorch-optimizer": ("pytorch_optimizer", "StableAdamW"), "torch-optimi": ("optimi", "StableAdamW", _OPTIMI)},
    "schedulefree_adamw": {"schedulefree": ("schedulefree", "AdamWScheduleFree"),
                           "pytorch-optimizer": ("pytorch_optimizer", "ScheduleFreeAdamW")},
    "schedulefree_sgd": {"schedulefree": ("schedulefree", "SGDScheduleFree"),
                         "pytorch-optimizer": ("pytorch_optimizer", "ScheduleFreeSGD")},
    "prodigy": {"prodigyopt": ("prodigyopt", "Prodigy"), "pytorch-optimizer": ("pytorch_optimizer", "Prodigy")},
    "dadaptadam": {"dadaptation": ("dadaptation", "DAdaptAdam"), "pytorch-optimizer": ("pytorch_optimizer", "DAdaptAdam")},
}


def gpt_shapes(vocab=8192, d=256, layers=4, context=256):
    shapes = [(vocab, d), (context, d)]
    for _ in range(layers):
        shapes += [(d,), (d,), (3 * d, d), (3 * d,), (d, d), (d,), (d,), (d,), (4 * d, d), (4 * d,), (d, 4 * d), (d,)]
    return shapes + [(d,), (d,)]


def layouts(quick):
    if quick:
        return {"a:4x256k": [(1 << 18,)] * 4, "b:200x1000": [(1000,)] * 200, "c:gpt-tiny": gpt_shapes(1024, 64, 2, 64)}
    return {"a:32x1M": [(1 << 20,)] * 32, "b:2000x1000": [(1000,)] * 2000, "c:gpt-small": gpt_shapes()}


def make_params(shapes):
    params = [torch.randn(shape).requires_grad_() for shape in shapes]
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    return params


class Copy:
    """A 256 MB ``copy_`` timed like an optimizer step: the memory-bandwidth yardstick of the same run."""

    def __init__(self):
        self.source = torch.randn(64 << 20)  # written first, so no page is a shared zero page
        self.target = torch.empty_like(self.source)
        self.bytes = 2 * self.source.numel() * 4  # read + write

    def step(self):
        self.target.copy_(self.source)


def interleaved_medians(candidates, repeats, flush, warmup=2):
    """Median seconds per ``step()`` of each candidate, timed round-robin, each from a cold cache.

    The machines are shared and noisy: timing each candidate in its own block would let a burst of
    load land on one of them. Round-robin spreads the noise over all candidates of a cell, so their
    ratios (what the README reports) stay meaningful. ``flush`` runs before every timed step: in
    training the forward and backward passes evict the optimizer's tensors from the caches, and a
    candidate that followed another one's warm data would be favoured.
    """
    for candidate in candidates.values():
        for _ in range(warmup):
            candidate.step()
    times = {label: [] for label in candidates}
    for _ in range(repeats):
        for label, candidate in candidates.items():
            flush()
            start = time.perf_counter()
            candidate.step()
            times[label].append(time.perf_counter() - start)
    return {label: statistics.median(values) for label, values in times.items()}


def peer_classes(name):
    """The installed alternatives to thalweg's ``name``, by label."""
    import importlib

    found = {}
    for label, (module, attribute, *options) in PEERS.get(name, {}).items():
        try:
            cls = getattr(importlib.import_module(module), attribute, None)
        except ImportError:
            continue
        if cls is not None:
            found[label] = functools.partial(cls, **(options[0] if options else {}))
    return found


TORCH_MODES = {"torch for-loop": {"foreach": False}, "torch foreach": {"foreach": True}, "torch fused": {"fused": True}}


def run(quick, only=None):
    repeats = 5 if quick else 15
    copy = Copy()
    rows = []
    bandwidths = []
    for layout, shapes in layouts(quick).items():
        params = make_params(shapes)
        elements = sum(p.numel() for p in params)
        for name, (cls, options, torch_cls) in OPTIMIZERS.items():
            if only and name not in only:
                continue
            cell = {"layout": layout, "optimizer": name, "elements": elements, "floor_bytes": FLOOR[name] * elements}
            candidates = {"copy": copy}
            for backend in ("reference", "foreach", "fused"):
                candidates[backend] = cls(params, backend=backend, **options)
            if torch_cls is not None:
                for label, mode in TORCH_MODES.items():
                    try:
                        candidates[label] = torch_cls(params, **options, **mode)
                        candidates[label].step()  # some modes refuse only at the first step
                    except (RuntimeError, TypeError) as error:  # a mode torch lacks for this optimizer
                        candidates.pop(label, None)
                        cell.setdefault("notes", []).append(f"{label}: {str(error)[:80]}")
            else:
                for label, peer in peer_classes(name).items():
                    candidates[label] = peer(params, **options)
            for candidate in candidates.values():  # Schedule-Free's packages start in eval mode
                if callable(getattr(candidate, "train", None)):
                    candidate.train()
            seconds = interleaved_medians(candidates, repeats, flush=copy.step)
            cell["copy_gbps"] = copy.bytes / seconds.pop("copy") / 1e9
            bandwidths.append(cell["copy_gbps"])
            for backend in ("reference", "foreach", "fused"):
                cell[backend] = seconds.pop(backend) * 1e3
            peers = {label: value * 1e3 for label, value in seconds.items()}
            cell["peers"] = peers
            fastest = min(peers.values(), default=None)
            cell["gbps_fused"] = cell["floor_bytes"] / (cell["fused"] / 1e3) / 1e9
            cell["copy_share"] = cell["gbps_fused"] / cell["copy_gbps"]
            cell["vs_fastest_peer"] = None if fastest is None else fastest / cell["fused"]
            cell["vs_torch_fused"] = (peers["torch fused"] / cell["fused"]) if peers.get("torch fused") else None
            rows.append(cell)
            print(f"{layout:12s} {name:9s} ref {cell['reference']:8.2f}  foreach {cell['foreach']:8.2f}  fused "
                  f"{cell['fused']:8.2f} ms  {cell['gbps_fused']:6.1f} GB/s ({cell['copy_share']:.2f} of copy "
                  f"{cell['copy_gbps']:.1f})  x{cell['vs_fastest_peer'] or float('nan'):.2f} vs fastest peer", flush=True)
            del candidates
    return {"copy_gbps": statistics.median(bandwidths), "threads": torch.get_num_threads(), "torch": torch.__version__,
            "quick": quick, "repeats": repeats, "rows": rows}


def markdown(result):
    fmt = lambda v: "—" if v is None else f"{v:.2f}"  # noqa: E731
    lines = [f"Median of {result['repeats']} interleaved steps; copy bandwidth (read + write) measured in the same "
             f"rounds, median {result['copy_gbps']:.1f} GB/s; torch {result['torch']}, {result['threads']} threads.", "",
             "| layout | optimizer | thalweg reference ms | thalweg foreach ms | **thalweg fused ms** | torch for-loop ms "
             "| torch foreach ms | torch fused ms | other packages ms | fused GB/s | share of copy "
             "| fused vs fastest peer | fused vs torch fused |", "|" + "---|" * 13]
    for r in result["rows"]:
        peers = r["peers"]
        others = ", ".join(f"{label} {ms:.2f}" for label, ms in peers.items() if not label.startswith("torch ")) or "—"
        lines.append(f"| {r['layout']} | {r['optimizer']} | {r['reference']:.2f} | {r['foreach']:.2f} | **{r['fused']:.2f}** "
                     f"| {fmt(peers.get('torch for-loop'))} | {fmt(peers.get('torch foreach'))} "
                     f"| {fmt(peers.get('torch fused'))} | {others} | {r['gbps_fused']:.1f} "
                     f"| {r['copy_share']:.2f} | {fmt(r['vs_fastest_peer'])} | {fmt(r['vs_torch_fused'])} |")
    return "\n".join(lines) + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small layouts, few repeats (smoke run)")
    parser.add_argument("--out", default=str(pathlib.Path(__file__).parent / "results"))
    parser.add_argument("--only", nargs="+", choices=list(OPTIMIZERS), help="these optimizers only")
    args = parser.parse_args()
    result = run(args.quick, args.only)
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = (f"cpu-{datetime.date.today().isoformat()}" + ("-" + "-".join(args.only) if args.only else "")
            + ("-quick" if args.quick else ""))
    (out / f"{stem}.json").write_text(json.dumps(result, indent=1))
    (out / f"{stem}.md").write_text(markdown(result))
    print(f"wrote {out / stem}.json and .md")


if __name__ == "__main__":
    main()
