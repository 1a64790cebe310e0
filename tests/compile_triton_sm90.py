"""Compile every generated Triton kernel of every optimizer for sm_90, without a GPU (run by test_triton.py).

    python tests/compile_triton_sm90.py OUT.json

For each optimizer, each option combination of its test grid (tests/specs.py) in float32, and the grid's
fullest combination in every other dtype pair (float64, bfloat16, bfloat16 with float32 state, float16), the
rule's program is generated as Triton source and pushed through Triton's own pipeline (TTIR, TTGIR, LLVM
IR, PTX, and the cubin through the bundled ptxas) for ``GPUTarget("cuda", 90, 32)``, with floating-point
contraction off as the launcher sets it. Nothing touches a CUDA driver: the target is given, never
queried. Writes ``{kernel: {"cubin_bytes", "ptx_ops", "seconds"} or {"error"}}``.
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
import traceback
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)  # the real JIT functions, not interpreted ones

import torch  # noqa: E402
from triton._C.libtriton import ir  # noqa: E402
from triton.backends.compiler import GPUTarget, Language  # noqa: E402
from triton.compiler import ASTSource, make_backend  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from specs import SPECS  # noqa: E402

from thalweg.engine import gpu  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)
DTYPES = [(torch.float32, torch.float32), (torch.float64, torch.float64), (torch.bfloat16, torch.bfloat16),
          (torch.bfloat16, torch.float32), (torch.float16, torch.float16)]
SIGNATURE = {"ptrs": "*i64", "n": "i64", "chunks": "*i64", "sc": "*fp64", "late": "*fp64", "partial": "*fp64",
             "qmaps": "*fp32", "qlookup": "*i32"}  # (the last two: kernels with 8-bit state)
ROUNDED = ("adamw", "sgd", "lamb")  # optimizers whose kernels are compiled with param_update's stores too


def compile_sm90(kernel) -> dict:
    """Triton's stages for sm_90, driven one by one (as triton.compile does) without its on-disk cache."""
    start = time.perf_counter()
    signature = {name: SIGNATURE[name] for name in kernel.arg_names if name != "BLOCK"}
    source = ASTSource(fn=kernel, signature={**signature, "BLOCK": "constexpr"}, constexprs={"BLOCK": gpu.BLOCK})
    backend = make_backend(TARGET)
    options = backend.parse_options({"num_warps": gpu.NUM_WARPS, "enable_fp_fusion": False})
    stages: dict = {}
    backend.add_stages(stages, options, Language.TRITON)
    context = ir.context()
    ir.load_dialects(context)
    backend.load_dialects(context)
    metadata = {"target": TARGET, **options.__dict__}
    module = source.make_ir(TARGET, options, backend.get_codegen_implementation(options), backend.get_module_map(),
                            context)
    ptx = ""
    for name, stage in stages.items():
        module = stage(module, metadata)
        if name == "ptx":
            ptx = str(module)
    ops = sorted(set(re.findall(r"\b(div\.[a-z.0-9]+|sqrt\.[a-z.0-9]+|fma\.[a-z.0-9]+)", ptx)))
    return {"cubin_bytes": len(module), "ptx_ops": ops, "seconds": round(time.perf_counter() - start, 3)}


def main() -> None:
    results: dict[str, dict] = {}
    for spec in SPECS:
        optimizer = None
        programs = {}
        for combo in spec.grid:
            params = [torch.zeros(3, requires_grad=True)]
            optimizer = spec.cls([{"params": params, **{k: combo[k] for k in spec.group_only if k in combo}}],
                                 **{k: v for k, v in combo.items() if k not in spec.group_only})
            group = optimizer.param_groups[0]
            program = optimizer.rule.program(optimizer._scalars(group))
            programs[program.digest] = program
        fullest = program  # the grid's last combination: the most options on
        cases = [(program, dtype, state_dtype, (), None) for program in programs.values()
                 for dtype, state_dtype in (DTYPES if program is fullest else DTYPES[:1])]
        # param_update: bfloat16 parameters stored stochastically or with a compensation, for one and two-pass programs
        if spec.name in ROUNDED:
            cases += [(fullest, torch.bfloat16, torch.float32, (), mode) for mode in ("stochastic", "kahan")]
        # 8-bit state: the fullest program and the last one with norms (as the driver runs it: its first pass only
        # sums), every role that has an 8-bit form in 8 bits, float32 and bfloat16 parameters
        with_norms = [program.recomputing() for program in programs.values() if len(program.passes) > 1]
        for program in ([fullest] + with_norms[-1:]) if spec.cls.state_codecs else []:
            codecs = tuple(kind if kind in ("signed", "unsigned") else None
                           for kind in map(spec.cls.state_codecs.get, program.state_roles))
            if any(codecs):
                cases += [(program, dtype, torch.float32, codecs, None) for dtype in (torch.float32, torch.bfloat16)]
                if spec.name in ROUNDED:
                    cases.append((program, torch.bfloat16, torch.float32, codecs, "kahan"))
        for program, dtype, state_dtype, codecs, rounding in cases:
            kernels = gpu.kernels(program, dtype, state_dtype, codecs, rounding)
            for index, kernel in enumerate(kernels):
                name = (f"{spec.name}/{str(dtype)[6:]}-{str(state_dtype)[6:]}{'-int8' if codecs else ''}"
                        f"{'-' + rounding if rounding else ''}/{program.digest}/pass{index}")
                try:
                    results[name] = compile_sm90(kernel)
                except Exception:  # noqa: BLE001 - recorded for the test, which names the kernel
                    results[name] = {"error": traceback.format_exc()[-2000:]}
    Path(sys.argv[1]).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
