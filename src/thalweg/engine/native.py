"""Compiled CPU kernels kept as native object code, so that a new process runs them without numba.

numba's own on-disk cache still initialises numba in every process that loads from it: its import and
its target's registries (which import scipy.linalg when scipy is installed) cost about a second before
the first fused step. A kernel here is compiled by numba once per machine; its machine code is written
next to its generated source, and later processes load it with llvmlite's MCJIT in milliseconds.

The key of a kernel holds its generated source, the host CPU's name and features (the code is compiled
for this CPU), the llvmlite and numba versions and a digest of :mod:`.numba_runtime` (whose helpers every
kernel inlines), so another machine sharing the cache directory, a new numba, or a changed runtime
compiles anew. The object's only outside references are the Python C API (in the process)
and three helpers of numba's runtime used on its error path, which a generated kernel never takes (it
raises nothing: no bounds checks, IEEE division, no allocation): where numba is not loaded, they are
bound to a function that aborts with a message rather than to nothing.
"""

from __future__ import annotations

import ctypes
import hashlib
import importlib.metadata
import os
import sys
import threading
from pathlib import Path

from . import generated

_LOCK = threading.Lock()
_STATE: dict = {}
_ENGINES: list = []  # MCJIT engines own the loaded machine code: kept for the life of the process
_RUNTIME_SYMBOLS = ("NRT_MemInfo_call_dtor", "numba_gil_ensure", "numba_gil_release")


@ctypes.CFUNCTYPE(None)
def _unreachable() -> None:  # pragma: no cover - a generated kernel raises nothing
    sys.stderr.write("thalweg: a generated CPU kernel reached numba's error path; please report this\n")
    sys.stderr.flush()
    os.abort()


def _llvm():
    """llvmlite's binding layer, a target machine for this CPU, and the runtime symbols bound (once)."""
    if "llvm" not in _STATE:
        import llvmlite.binding as llvm

        llvm.initialize_native_target()
        llvm.initialize_native_asmprinter()
        target = llvm.Target.from_default_triple()
        cpu, features = llvm.get_host_cpu_name(), llvm.get_host_cpu_features().flatten()
        _STATE["machine"] = target.create_target_machine(cpu=cpu, features=features, opt=3)
        _STATE["host"] = f"{llvm.get_process_triple()} {cpu} {features}"
        # (and the runtime the kernels are compiled with: its helpers are inlined into every kernel)
        # (and the modules whose constants it compiles in: the 8-bit maps, the rounding hash)
        runtime = hashlib.sha256(b"".join((Path(__file__).parent / name).read_bytes() for name in (
            "numba_runtime.py", "codec.py", "rounding.py"))).hexdigest()[:16]
        _STATE["versions"] = (f"llvmlite {importlib.metadata.version('llvmlite')} numba "
                              f"{importlib.metadata.version('numba')} runtime {runtime}")
        _STATE["llvm"] = llvm
    llvm = _STATE["llvm"]
    for name in _RUNTIME_SYMBOLS:  # numba, when loaded, has bound the real ones
        if not llvm.address_of_symbol(name):
            llvm.add_symbol(name, ctypes.cast(_unreachable, ctypes.c_void_p).value)
    return llvm


def key(source: str, name: str) -> str:
    """The cache key of function ``name`` of a generated module with ``source``, on this machine."""
    _llvm()
    text = "\n".join([source, name, _STATE["host"], _STATE["versions"]])
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def _paths(cache_key: str) -> tuple[Path, Path]:
    directory = generated.directory() / "native"
    directory.mkdir(exist_ok=True)
    return directory / f"{cache_key}.o", directory / f"{cache_key}.symbol"


def load(cache_key: str) -> int | None:
    """Address of the cached kernel, loaded into this process, or None when it is not cached."""
    obj, symbol = _paths(cache_key)
    if not (obj.exists() and symbol.exists()):
        return None
    llvm = _llvm()
    with _LOCK:
        engine = llvm.create_mcjit_compiler(llvm.parse_assembly(""), _STATE["machine"])
        engine.add_object_file(llvm.ObjectFileRef.from_data(obj.read_bytes()))
        engine.finalize_object()
        address = engine.get_function_address(symbol.read_text())
        _ENGINES.append(engine)
    return address or None


def save(cache_key: str, compiled) -> None:
    """Write the machine code of a numba cfunc just compiled in this process (best effort)."""
    library = compiled._library
    code = library._codegen._tm.emit_object(library._final_module)
    obj, symbol = _paths(cache_key)
    for path, write in ((obj, lambda p: p.write_bytes(code)), (symbol, lambda p: p.write_text(compiled._wrapper_name))):
        temporary = path.with_suffix(f".{os.getpid()}.tmp")
        write(temporary)
        os.replace(temporary, path)
