"""Check where a command will write before it does any work.

A bad --out (under a file, an existing directory where a file goes) would otherwise surface as
a traceback, some of them only after every subject has been processed.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

from fedmpi.errors import UserError
from fedmpi.files import NO_LOCKS, make_dirs, probe_directory


class OutputError(UserError, ValueError):
    """An output path that cannot be written; the message names it and why."""


def _check_parent(path: Path, what: str) -> None:
    """The nearest existing ancestor must be a directory this process can create entries in."""
    for parent in path.absolute().parents:
        if parent.exists():
            if not parent.is_dir():
                raise OutputError(f"cannot write {what} {path}: {parent} is a file, not a directory")
            try:
                probe_directory(parent)
            except OSError as exc:
                raise OutputError(
                    f"cannot write {what} {path}: cannot create files in {parent} ({exc.strerror or exc})"
                ) from None
            return


def check_file(path, what: str) -> None:
    """OutputError unless `path` can be created or replaced as a file."""
    path = Path(path)
    if path.is_dir():
        raise OutputError(f"{what} {path} is an existing directory; it must name a file")
    if path.exists() and not path.is_file():
        # the output is renamed onto its path: /dev/null (run as root, in a container), /dev/stdout or a named pipe
        # would itself be replaced by a regular file, and the command would say it wrote there
        raise OutputError(
            f"{what} {path} exists and is not a regular file (a device, a named pipe or a socket); "
            "an output replaces its path, so it is refused: give a file name"
        )
    _check_parent(path, what)


def check_dir(path, what: str) -> None:
    """OutputError unless `path` is a directory or can be created as one."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise OutputError(f"{what} {path} exists and is not a directory")
    _check_parent(path, what)


def check_space(path, needed: int, what: str) -> None:
    """OutputError when the file system `path` goes on has fewer than `needed` bytes free.

    `needed` is a lower bound on what the command writes: a count that cannot fit is refused before any
    work, not after hours of it (or, for a count in the trillions, on a memory error while drawing it).
    """
    path = Path(path)
    anchor = next(p for p in (path, *path.absolute().parents) if p.exists())
    free = shutil.disk_usage(anchor).free
    if needed > free:
        raise OutputError(
            f"{what} {path} needs at least {size_text(needed)} and {anchor} has {size_text(free)} free; "
            "free space or write elsewhere"
        )


def size_text(nbytes: float) -> str:
    """Bytes as MB, GB or TB with three significant figures, for messages."""
    for unit, scale in (("TB", 1e12), ("GB", 1e9)):
        if nbytes >= 0.9995 * scale:  # 999.9 MB would read 1e+03 MB
            value = nbytes / scale
            return f"{value:,.0f} {unit}" if value >= 1000 else f"{value:.3g} {unit}"
    return f"{nbytes / 1e6:.3g} MB"


@contextlib.contextmanager
def exclusive(path: Path, what: str, wait: bool) -> Iterator[None]:
    """Hold an exclusive flock on the lock file `path` (created) while the block runs, so that one process at a
    time writes `what`. wait=False: OutputError at once when another process holds it. Where the file system
    takes no locks (NFS without a lock daemon, Lustre without flock) it goes without, as before."""
    make_dirs(path.parent)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            raise OutputError(
                f"another process is writing {what} ({path} is locked); wait for it to end, or choose another --out"
            ) from None
        except OSError as exc:
            if exc.errno not in NO_LOCKS:
                raise
        yield
    finally:
        os.close(fd)
