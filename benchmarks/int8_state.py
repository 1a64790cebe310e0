"""8-bit optimizer state (``state_dtype="int8"``): memory measured, and step time against float32 and torchao.

    python benchmarks/int8_state.py            # writes benchmarks/results/int8-state-<device>-<date>.md
    python benchmarks/int8_state.py --quick    # smoke run: small tensors, few repeats

Memory: optimizer state bytes per parameter, summed over the storages the optimizer's state tensors hold
after one step (nothing computed from formulas), for AdamW on a GPT-style model (float32 parameters, then
bfloat16), float32 state against 8-bit.

Speed: AdamW steps on layout (a), 32 tensors of 1M float32 (``--quick``: 8 of 64k): thalweg fused with
float32 state, thalweg fused with 8-bit state, torch's fused AdamW and, when installed, torchao's
``AdamW8bit`` (which compiles each parameter shape's step with ``torch.compile``). All candidates are
timed round-robin, median of the repeats; ratios come from this one run. Then LAMB and StableAdamW, whose norms
take two passes, with float32 and 8-bit state (fused), and 8-bit state on the foreach path. The first step of each (its
compile, in this process: numba's kernels may come from the disk cache) is reported apart.
"""

from __future__ import annotations

import argparse
import datetime
import pathlib
import statistics
import time

import torch

import thalweg


class GPT(torch.nn.Module):
    """A small GPT-style model: token embedding, pre-norm transformer blocks, output head."""

    def __init__(self, vocab: int = 2048, width: int = 256, layers: int = 4) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, width)
        self.blocks = torch.nn.ModuleList(torch.nn.TransformerEncoderLayer(width, 4, 4 * width, batch_first=True,
                                                                           norm_first=True) for _ in range(layers))
        self.head = torch.nn.Linear(width, vocab)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens)
        for block in self.blocks:
            x = block(x)
        return self.head(x)


def state_bytes_per_param(dtype: torch.dtype, **options) -> float:
    torch.manual_seed(0)
    model = GPT().to(dtype)
    optimizer = thalweg.AdamW(model.parameters(), lr=1e-3, **options)
    model(torch.randint(0, 2048, (2, 32))).float().logsumexp(-1).mean().backward()
    optimizer.step()
    storages = {}
    for state in optimizer.state.values():
        for value in state.values():
            if isinstance(value, torch.Tensor):
                storages[value.untyped_storage().data_ptr()] = value.untyped_storage().nbytes()
    return sum(storages.values()) / sum(p.numel() for p in model.parameters())


def candidates(n_tensors: int, numel: int) -> dict:
    def make(build):
        generator = torch.Generator().manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(numel, generator=generator)) for _ in range(n_tensors)]
        for p in params:
            p.grad = torch.randn(numel, generator=generator)
        return build(params)

    out = {
        "thalweg fused, float32 state": lambda: make(lambda ps: thalweg.AdamW(ps, lr=1e-3, backend="fused")),
        "thalweg fused, 8-bit state": lambda: make(lambda ps: thalweg.AdamW(ps, lr=1e-3, backend="fused",
                                                                            state_dtype="int8")),
        "torch fused": lambda: make(lambda ps: torch.optim.AdamW(ps, lr=1e-3, fused=True)),
    }
    try:
        from torchao.optim import AdamW8bit
    except ImportError:
        AdamW8bit = None
    if AdamW8bit is not None:
        out["torchao AdamW8bit (compiled)"] = lambda: make(lambda ps: AdamW8bit(ps, lr=1e-3))
    return out


def norm_candidates(n_tensors: int, numel: int) -> dict:
    """LAMB and StableAdamW (per-tensor norms: two kernel passes) with float32 and 8-bit state, and 8-bit state on the
    foreach path (float copies of the decoded state: where the fused backend sent these rules before)."""
    def make(cls, **options):
        generator = torch.Generator().manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(numel, generator=generator)) for _ in range(n_tensors)]
        for p in params:
            p.grad = torch.randn(numel, generator=generator)
        return cls(params, lr=1e-3, **options)

    out = {}
    for cls in (thalweg.LAMB, thalweg.StableAdamW):
        out[cls.__name__, "fused, float32 state"] = lambda cls=cls: make(cls, backend="fused")
        out[cls.__name__, "fused, 8-bit state"] = lambda cls=cls: make(cls, backend="fused", state_dtype="int8")
        out[cls.__name__, "foreach, 8-bit state"] = lambda cls=cls: make(cls, backend="foreach", state_dtype="int8")
    return out


def timed(builders: dict, repeats: int) -> tuple[dict[str, float], dict[str, float]]:
    """Each candidate's median ms per step over ``repeats`` round-robin rounds (a slow moment of the shared machine
    hits every candidate), and its first step's seconds (its compile), from ``{name: build() -> optimizer}``."""
    built, first = {}, {}
    for name, build in builders.items():
        optimizer = build()
        start = time.perf_counter()
        optimizer.step()
        first[name] = time.perf_counter() - start
        optimizer.step()
        built[name] = optimizer
    times = {name: [] for name in built}
    for _ in range(repeats):
        for name, optimizer in built.items():
            start = time.perf_counter()
            optimizer.step()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) * 1e3 for name, values in times.items()}, first


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    n_tensors, numel, repeats = (8, 1 << 16, 5) if args.quick else (32, 1 << 20, 15)

    memory = [(dtype, state_bytes_per_param(dtype, state_dtype=torch.float32 if dtype != torch.float32 else None),
               state_bytes_per_param(dtype, state_dtype="int8")) for dtype in (torch.float32, torch.bfloat16)]

    median, first = timed(candidates(n_tensors, numel), repeats)
    base = median["thalweg fused, float32 state"]
    norms, norms_first = timed(norm_candidates(n_tensors, numel), repeats)

    today = datetime.date.today().isoformat()
    lines = report_header("8-bit optimizer state", "int8_state.py", args.quick) + [
             "## Memory: AdamW state bytes per parameter (measured storages, GPT-style model)", "",
             "| parameters | float32 state | 8-bit state |", "|---|---|---|"]
    lines += [f"| {str(dtype).removeprefix('torch.')} | {full:.3f} | {eight:.3f} |" for dtype, full, eight in memory]
    lines += ["", f"## Speed: AdamW, {n_tensors} tensors of {numel} float32 (median of {repeats}, round-robin)", "",
              "| candidate | ms/step | vs thalweg fused float32 | first step s |", "|---|---|---|---|"]
    lines += [f"| {name} | {median[name]:.2f} | {median[name] / base:.2f}× | {first[name]:.2f} |" for name in median]
    lines += ["", f"## Speed: rules with norms, {n_tensors} tensors of {numel} float32 (two passes; the same run)", "",
              "| optimizer | candidate | ms/step | vs fused float32 | first step s |", "|---|---|---|---|---|"]
    for (name, label), ms in norms.items():
        lines.append(f"| {name} | {label} | {ms:.2f} | {ms / norms[name, 'fused, float32 state']:.2f}× "
                     f"| {norms_first[name, label]:.2f} |")
    write_report(lines, f"int8-state-cpu-{today}.md", args.quick)


def report_header(title: str, script: str, quick: bool) -> list[str]:
    """A report's first lines: its title and date, torch's version and threads, the command that wrote it."""
    return [f"# {title}, CPU, {datetime.date.today().isoformat()}", "",
            f"torch {torch.__version__}, {torch.get_num_threads()} threads; `python benchmarks/{script}"
            f"{' --quick' if quick else ''}`.", ""]


def write_report(lines: list[str], name: str, quick: bool) -> None:
    """Print the report; a full run (not ``--quick``) also writes it to ``benchmarks/results/<name>``."""
    text = "\n".join(lines) + "\n"
    print(text)
    if not quick:
        path = pathlib.Path(__file__).parent / "results" / name
        path.write_text(text)
        print(f"written: {path}")


if __name__ == "__main__":
    main()
