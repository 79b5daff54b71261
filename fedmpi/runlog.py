"""The run directory: its lock, the resolved config, metrics.jsonl (one line per round), summary.json.

Whole files are written to a temporary name and renamed; metrics lines are appended and fsynced, and
a resumed run first drops the lines past its checkpoint so nothing is duplicated. JSON is always
standard JSON: a non-finite number is written as null, never as NaN or Infinity.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import math
import os
import socket
import sys
import time
from pathlib import Path

from .errors import ConfigError, ReportError
from .files import NO_LOCKS, atomic_write, fsync_directory, make_dirs

LOCK = ".lock"


def finite_json(value):
    """`value` with every non-finite float replaced by None (JSON has no NaN)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: finite_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_json(v) for v in value]
    return value


def dumps(value, **kwargs) -> str:
    """Standard JSON text of `value`, keys sorted: a non-finite number becomes null (finite_json)."""
    return json.dumps(finite_json(value), allow_nan=False, sort_keys=True, **kwargs)


def read_json(path: Path, error: type[Exception]) -> dict:
    """A run's JSON file, or `error` with a message saying what is wrong with it."""
    try:
        value = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise error(f"{path}: missing (is the run finished?)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise error(f"{path}: not valid JSON ({e})") from None
    except OSError as e:
        raise error(f"{path}: cannot be read ({e.strerror})") from None
    if not isinstance(value, dict):
        raise error(f"{path}: not a fedmpi record (JSON {type(value).__name__}, not an object)")
    return value


def stopped_early(run_dir: Path) -> bool:
    """True when the run's summary says it was preempted: its model is not the run's final one. A summary that
    cannot be read is not decided here (False): whatever reads the run next names what is wrong with it."""
    try:
        return read_json(Path(run_dir) / "summary.json", ReportError).get("preempted") is True
    except ReportError:
        return False


class RunLock:
    """An exclusive lock on a run directory, held for the run's whole life by the process that writes it.

    flock is released by the kernel whenever the holder exits, crash or kill included, so a lock left by
    a dead run is simply taken over; the file keeps the holder's host and pid for the refusal message.
    Lock files on NFS work through the client's lock manager (flock is emulated with POSIX locks). Where the
    file system takes no locks at all (NFS mounted without a lock daemon, Lustre without flock) the run goes
    on unlocked and `unlocked` says why: refusing every run there would protect nothing.
    """

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / LOCK
        self._fd: int | None = None
        self._made: list[Path] = []  # what acquire created: a start refused by the preflight takes it away again
        self.unlocked = ""

    def acquire(self) -> RunLock:
        """Take the lock, or ConfigError naming the job that holds it; where the file system takes no locks, go on and
        say why in `unlocked`. Returns self."""
        while True:
            try:
                made = make_dirs(self.path.parent)
                existed = self.path.exists()
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as e:
                raise ConfigError(f"cannot write the run directory {self.path.parent}: {e.strerror}") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "another process"
                os.close(fd)
                raise ConfigError(
                    f"{self.path.parent} is in use by a running job ({holder}); wait for it to end or "
                    f"choose another run.name"
                ) from None
            except OSError as e:
                if e.errno not in NO_LOCKS:
                    os.close(fd)
                    raise ConfigError(f"cannot lock the run directory {self.path.parent}: {e.strerror}") from None
                self.unlocked = (
                    f"{self.path.parent}: this file system takes no locks ({e.strerror}), so a second run on this "
                    "run.name would not be refused; going on without the lock"
                )
            if self.unlocked or _names(self.path, fd):
                break
            os.close(fd)  # a refused start removed the file between our open and our lock: lock the one there now
        self._made = [*made, *([] if existed else [self.path])]
        os.ftruncate(fd, 0)
        os.pwrite(
            fd, f"pid {os.getpid()} on {socket.gethostname()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}\n".encode(), 0
        )
        self._fd = fd
        return self

    def release(self) -> None:
        """Drop the lock by closing the file (the file stays, for the next run to take over)."""
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = None

    def abandon(self) -> None:
        """Release after a start the preflight refused, taking away the lock file and the directories acquire
        made (when still empty): a mistyped run leaves no run directory behind. The file goes before the lock,
        so a run waiting on it locks a fresh one (acquire checks that its file is still the one named)."""
        for made in reversed(self._made):
            with contextlib.suppress(OSError):  # a directory something else wrote into stays
                if made == self.path:
                    made.unlink()
                else:
                    made.rmdir()
        self._made = []
        self.release()


def _names(path: Path, fd: int) -> bool:
    """Whether `path` still names the file open on `fd`."""
    try:
        named, held = os.stat(path), os.fstat(fd)
    except FileNotFoundError:
        return False
    return (named.st_dev, named.st_ino) == (held.st_dev, held.st_ino)


class RunLog:
    """A run directory's records: config.json, summary.json and metrics.jsonl (one row per round)."""

    def __init__(self, run_dir: Path):
        self.dir = Path(run_dir)
        self.metrics_path = self.dir / "metrics.jsonl"

    def write_config(self, config_json: str) -> None:
        """config.json: the resolved configuration (Config.to_json), written whole."""
        atomic_write(self.dir / "config.json", config_json.encode())

    def write_summary(self, summary: dict) -> None:
        """summary.json, written whole: it marks the run finished (or stopped on request, with preempted true)."""
        atomic_write(self.dir / "summary.json", (dumps(summary, indent=2) + "\n").encode())

    def append(self, row: dict) -> None:
        """One round's row at the end of metrics.jsonl, fsynced: a crash can cut only the line being written, which
        `rows` leaves out."""
        make_dirs(self.dir)
        created = not self.metrics_path.exists()
        with open(self.metrics_path, "a") as fh:
            fh.write(dumps(row) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        if created:  # the new file's name must reach the disk too, or a power loss takes the fsynced row with it
            fsync_directory(self.dir)

    def read(self) -> tuple[list[dict], list[int]]:
        """(the rows that parse, the 1-based numbers of the lines that do not)."""
        if not self.metrics_path.exists():
            return [], []
        rows, bad = [], []
        for number, line in enumerate(self.metrics_path.read_text(errors="replace").splitlines(), start=1):
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                bad.append(number)
        return rows, bad

    def rows(self) -> list[dict]:
        """The rows up to the first damaged line (a crash can cut the last line; resume drops it)."""
        rows, bad = self.read()
        return rows[: bad[0] - 1] if bad else rows

    def checked_rows(self) -> list[dict]:
        """All rows for a reader that must not miss any: a cut last line is reported and skipped, damage
        before the last line is an error naming the lines."""
        rows, bad = self.read()
        if not bad:
            return rows
        total = len(rows) + len(bad)
        if bad == [total]:
            print(
                f"fedmpi: {self.metrics_path}: line {total} is cut short (an interrupted write); skipped",
                file=sys.stderr,
            )
            return rows
        raise ReportError(
            f"{self.metrics_path}: {len(bad)} damaged line(s) before the last ({', '.join(map(str, bad))}"
            f" of {total}); the run's metrics are not trustworthy"
        )

    def keep_through(self, round_: int) -> list[dict]:
        """Keep the rows of rounds <= round_ (resume): returns them."""
        rows = [r for r in self.rows() if r["round"] <= round_]
        atomic_write(self.metrics_path, "".join(dumps(r) + "\n" for r in rows).encode())
        return rows

    def reset(self) -> None:
        """Forget an earlier run: its summary first, since that is what marks a run finished (an old one
        left beside a new run that then crashed would let a plain start replace the new run's checkpoints)."""
        for path in (self.dir / "summary.json", self.metrics_path):
            path.unlink(missing_ok=True)
