"""Generated source files: written once to a cache directory, imported as modules.

numba's on-disk cache and Triton's JIT both need a kernel's source in a real file (numba keys its cache
on the file, Triton reads the source with ``inspect``), and a traceback then points at a real line.
Each file's name holds the hash of its content, so a changed rule or engine writes a new file and an
unchanged one is imported as it is (its numba cache stays valid).

Directory: ``$THALWEG_CACHE_DIR``, else ``$XDG_CACHE_HOME/thalweg`` or ``~/.cache/thalweg``, else the
system's temporary directory when those cannot be written.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import sys
import tempfile
import types
from pathlib import Path

_DIRECTORY: Path | None = None
_MODULES: dict[str, types.ModuleType] = {}


def directory() -> Path:
    """Where generated files are written (created on first use)."""
    global _DIRECTORY
    if _DIRECTORY is None:
        candidates = []
        if os.environ.get("THALWEG_CACHE_DIR"):
            candidates.append(Path(os.environ["THALWEG_CACHE_DIR"]))
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        candidates += [Path(base) / "thalweg", Path(tempfile.gettempdir()) / f"thalweg-{os.getuid() if hasattr(os, 'getuid') else 'user'}"]
        for candidate in candidates:
            try:
                (candidate / "generated").mkdir(parents=True, exist_ok=True)
                probe = candidate / "generated" / f".probe-{os.getpid()}"
                probe.write_text("")
                probe.unlink()
            except OSError:
                continue
            _DIRECTORY = candidate / "generated"
            break
        else:
            raise OSError(f"no writable directory for generated kernels among {[str(c) for c in candidates]}; "
                          "set THALWEG_CACHE_DIR")
    return _DIRECTORY


def module(stem: str, source: str) -> types.ModuleType:
    """Import ``source`` as a module from ``<directory>/<stem>_<hash>.py`` (written if missing)."""
    digest = hashlib.sha256(source.encode()).hexdigest()[:20]
    name = f"{stem}_{digest}"
    loaded = _MODULES.get(name)
    if loaded is not None:
        return loaded
    path = directory() / f"{name}.py"
    if not path.exists() or path.read_text() != source:
        # written whole and renamed: a second process importing at the same moment sees all or nothing
        temporary = path.with_suffix(f".{os.getpid()}.tmp")
        temporary.write_text(source)
        os.replace(temporary, path)
    spec = importlib.util.spec_from_file_location(f"thalweg_generated.{name}", path)
    loaded = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = loaded  # numba and Triton look functions' modules up by name
    spec.loader.exec_module(loaded)
    _MODULES[name] = loaded
    return loaded
