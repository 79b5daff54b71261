"""What software a run used, for its records and for the ranks' agreement: a digest of fedmpi's own sources (the
same for a checkout and an install of the same code) and the versions of what it runs on. A result is only
as reproducible as this: the same seed gives the same model bit for bit on the same software and CPU kind."""

from __future__ import annotations

import functools
import hashlib
import platform
import sys
from pathlib import Path


def code_digest(packages: tuple[Path, ...] | None = None) -> str:
    """SHA-256 over the Python sources of `packages` (fedmpi's and preprocess's, by default): relative paths and
    contents, in path order. Hidden files are left out, as an install (a wheel) leaves them out of what it holds: a
    checkout has its editors' (Emacs's lock of an unsaved module is a dangling link named .#module.py)."""
    if packages is None:
        return _running_code_digest()
    digest = hashlib.sha256()
    for package in packages:
        sources = (p.relative_to(package) for p in package.rglob("*.py"))
        for path in sorted(p for p in sources if not any(part.startswith(".") for part in p.parts)):
            digest.update(f"{package.name}/{path.as_posix()}\0".encode())
            digest.update((package / path).read_bytes())
    return digest.hexdigest()


@functools.cache
def _running_code_digest() -> str:
    """fedmpi's and preprocess's digest, taken once per process (at start-up, for the ranks' agreement): summary.json
    then records the code the run started with, not what an edit of the checkout during a long run left, and the
    sources are read once."""
    from preprocess import __file__ as preprocess_init

    return code_digest((Path(__file__).parent, Path(preprocess_init).parent))


def mpi_library() -> str:
    """The first line of the MPI library's version, or "" where MPI was not started in this process (a record
    written outside a job must not start MPI for it)."""
    mpi = sys.modules.get("mpi4py.MPI")
    if mpi is None or not mpi.Is_initialized():
        return ""
    return " ".join((mpi.Get_library_version().splitlines() or [""])[0].split())


def software() -> dict:
    """fedmpi's version and source digest, and the versions of Python, torch, numpy, mpi4py and the MPI library."""
    import mpi4py
    import numpy
    import torch

    from . import __version__

    return {
        "fedmpi": __version__,
        "source_sha256": code_digest(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "mpi4py": mpi4py.__version__,
        "mpi": mpi_library(),
    }
