"""Files written whole or not at all: every output (HDF5 volumes, checkpoints, models, run records,
reports) is written under a temporary name beside its destination, flushed to disk and renamed, so
a reader, a crash or a full disk never leaves half a file under the real name. A temporary's name carries
its host and pid, so that one a killed process (kill -9, the OOM killer) could not remove is removed by the
next write of the same output on that host."""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path

from .errors import STORAGE_ERRNOS

# What flock (and HDF5's locking, which uses it) fails with where the file system takes no locks at all: NFS
# without a lock daemon, Lustre without flock. Files here appear by rename once complete, so going without locks
# there costs only the exclusion of a second writer.
NO_LOCKS = (errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP)


def umask_mode(directory: bool = False) -> int:
    """Permissions a plain open()/mkdir() would give (tempfile's are private: 0600/0700)."""
    mask = os.umask(0)
    os.umask(mask)
    return (0o777 if directory else 0o666) & ~mask


def _fsync(path: Path, directory: bool = False) -> None:
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if directory else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_directory(path: Path) -> None:
    """Make the names created in (or renamed into) `path` durable: a file's own fsync does not cover its name."""
    _fsync(path, directory=True)


def make_dirs(directory: Path) -> list[Path]:
    """mkdir -p, each directory it creates fsynced into its parent: a power loss after a file is written and
    renamed into a new directory must not take the directory (and the file with it) away. Returns the
    directories it made, outermost first."""
    missing = []
    path = directory
    while not path.is_dir():
        if path != directory and path.exists():  # a file where a directory belongs: mkdir -p's error, not EEXIST's
            raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(directory))
        missing.append(path)
        if path.parent == path:
            break
        path = path.parent
    for new in reversed(missing):
        new.mkdir(exist_ok=True)
        # a parent one may write and search but not read (0o733) cannot be opened to fsync: mkdir -p works there
        with contextlib.suppress(PermissionError):
            fsync_directory(new.parent)
    return missing[::-1]


def _temporary_prefix(path: Path) -> str:
    return f".{path.name}.tmp-{socket.gethostname()}-{os.getpid()}-"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def remove_stale_temporaries(path: Path, names: str | None = None) -> None:
    """The temporaries of `path` left beside it by processes of this host that are gone; those of a live
    process, or of another host sharing the file system, stay. `names`: a regular expression for the outputs
    whose temporaries go (path.name when None), for a writer of numbered outputs that are not all written again."""
    names = re.escape(path.name) if names is None else names
    mine = re.compile(rf"^\.(?:{names})\.tmp-{re.escape(socket.gethostname())}-(\d+)-")
    try:
        entries = list(path.parent.iterdir())
    except OSError:
        return
    for entry in entries:
        found = mine.match(entry.name)
        if found and not _alive(int(found.group(1))):
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)


def temporary_dir_beside(out: Path) -> Path:
    """A new private directory beside `out` (its parents created), after removing stale ones."""
    make_dirs(out.parent)
    remove_stale_temporaries(out)
    return Path(tempfile.mkdtemp(prefix=_temporary_prefix(out), dir=out.parent))


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = "", sweep: bool = True) -> Iterator[Path]:
    """Yield a temporary path beside `path` for the caller to write; when the block succeeds it is
    fsynced and renamed onto `path` (and the directory fsynced), otherwise removed. `sweep`: first remove
    the temporaries of dead processes (a directory listing: writers of many files into one directory
    sweep it once themselves)."""
    path = Path(path)
    make_dirs(path.parent)
    if sweep:
        remove_stale_temporaries(path)
    tmp: Path | None = None
    try:
        # a read-only file system (or no inode left, an inode quota) refuses the temporary itself, before any write
        fd, name = tempfile.mkstemp(prefix=_temporary_prefix(path), suffix=suffix + ".tmp", dir=path.parent)
        os.close(fd)
        tmp = Path(name)
        os.chmod(tmp, umask_mode())
        yield tmp
        _fsync(tmp)
        os.replace(tmp, path)
        fsync_directory(path.parent)
    except OSError as e:
        if e.errno not in STORAGE_ERRNOS:
            raise
        raise _naming(e, path) from None
    finally:
        if tmp is not None and tmp.exists():
            tmp.unlink()


def _naming(e: OSError, out: Path) -> OSError:
    """A storage error (STORAGE_ERRNOS) as one naming the output `out`: a write's error names no file, and the
    temporary's name is not the user's; which output did not fit is theirs to fix, in one line."""
    return OSError(e.errno, f"{e.strerror} (writing {out})")


def probe_directory(directory: Path) -> None:
    """OSError unless a file can be created in `directory`: tried, since os.access says yes to root on /proc
    or /sys, where creating anything fails."""
    fd, probe = tempfile.mkstemp(prefix=".write-probe-", dir=directory)
    os.close(fd)
    os.unlink(probe)


def atomic_write(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to `path` atomically (see atomic_path)."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_output(path: str | os.PathLike, data: bytes, error: type[Exception]) -> None:
    """A command's --out, written atomically; a file system that refuses it is `error` naming the path."""
    try:
        atomic_write(path, data)
    except OSError as e:
        raise error(f"--out {path}: cannot write there ({e.strerror or e})") from None


@contextlib.contextmanager
def atomic_dir(out: str | os.PathLike) -> Iterator[Path]:
    """Yield a new directory beside `out` for the caller to fill; when the block succeeds its files and
    directories are fsynced and it replaces `out` (replace_dir), otherwise it is removed with everything in it.
    A storage error names `out`, as atomic_path's do."""
    out = Path(out)
    tmp: Path | None = None
    try:
        tmp = temporary_dir_beside(out)
        os.chmod(tmp, umask_mode(directory=True))
        yield tmp
        _fsync_tree(tmp)
        replace_dir(tmp, out)
        fsync_directory(out.parent)
    except OSError as e:
        if e.errno not in STORAGE_ERRNOS:
            raise
        raise _naming(e, out) from None
    finally:
        if tmp is not None and tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _fsync_tree(root: Path) -> None:
    """Every file and directory under root, deepest first, so that a power loss after the rename cannot leave
    truncated files under the real name."""
    for here, _dirs, names in os.walk(root, topdown=False):
        for name in names:
            if not os.path.islink(os.path.join(here, name)):
                _fsync(Path(here, name))
        fsync_directory(Path(here))


def replace_dir(tmp: str | os.PathLike, out: str | os.PathLike) -> None:
    """Rename a finished directory `tmp` onto `out`; an old `out` is moved aside first and deleted after.
    `out` never holds a mix of the two, but between the renames it is absent: a crash there leaves the old
    directory beside it under a temporary's name, which the next write of `out` removes."""
    tmp, out = Path(tmp), Path(out)
    old = None
    if out.exists():
        old = out.with_name(_temporary_prefix(out) + "old")
        os.replace(out, old)
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
