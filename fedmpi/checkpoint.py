"""Checkpoints and saved models, as .npz files read with allow_pickle=False (never pickle).

A checkpoint is the server's whole state: learners are stateless between rounds (their RNG
streams derive from (seed, round, rank)), so the global values, the mask and the round number
are enough to resume bit for bit. Each file carries a SHA-256 of its arrays; a file that is
truncated, corrupt or fails its checksum is skipped in favour of the previous one.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import sys
from pathlib import Path

import numpy as np

from . import encoding
from .errors import CheckpointError, CheckpointUnreadable, EncodingError
from .files import atomic_write, remove_stale_temporaries

CHECKPOINT = re.compile(r"^round-(\d{6})\.npz$")


def _digest(arrays: dict[str, np.ndarray]) -> str:
    h = hashlib.sha256()
    for name in sorted(arrays):
        a = np.ascontiguousarray(arrays[name])
        h.update(name.encode())
        h.update(str(a.dtype).encode())
        h.update(str(a.shape).encode())
        h.update(a.tobytes())
    return h.hexdigest()


def save_arrays(path: Path, arrays: dict[str, np.ndarray], meta: dict) -> int:
    """Atomically write arrays plus JSON metadata and a checksum; returns the size in bytes."""
    meta = dict(meta, sha256=_digest(arrays))
    buf = io.BytesIO()
    members = dict(arrays, meta=np.frombuffer(json.dumps(meta, sort_keys=True).encode(), dtype=np.uint8))
    np.savez(buf, **members)  # type: ignore[arg-type]  # numpy's stub types **kwds as its bool options
    data = buf.getvalue()
    atomic_write(Path(path), data)
    return len(data)


def load_arrays(path: Path) -> tuple[dict[str, np.ndarray], dict]:
    """Read and verify a file written by save_arrays; raise CheckpointError with the reason."""
    path = Path(path)
    try:
        loaded = np.load(path, allow_pickle=False)
        if not isinstance(loaded, np.lib.npyio.NpzFile):
            raise CheckpointError(f"{path}: not a fedmpi file (a bare array, not an .npz archive)")
        with loaded as z:
            arrays = {k: z[k] for k in z.files}
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such file") from None
    except CheckpointError:
        raise
    except Exception as e:  # damaged bytes surface from zipfile, zlib and numpy's header parser as many kinds
        if isinstance(e, OSError) and e.errno is not None:  # the system's refusal, not the file's bytes
            raise CheckpointUnreadable(f"{path}: cannot be read ({e.strerror or e})") from None
        raise CheckpointError(f"{path}: unreadable or truncated ({type(e).__name__}: {e})") from None
    if "meta" not in arrays:
        raise CheckpointError(f"{path}: not a fedmpi file (no metadata)")
    try:
        meta = json.loads(arrays.pop("meta").tobytes())
    except ValueError:
        raise CheckpointError(f"{path}: corrupt metadata") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path}: corrupt metadata (not a JSON object)")
    if meta.pop("sha256", None) != _digest(arrays):
        raise CheckpointError(f"{path}: checksum mismatch (corrupt file)")
    return arrays, meta


def _round_of(path: Path) -> int:
    """The round in a checkpoint's name (Checkpoints.paths lists only names that CHECKPOINT matches)."""
    return int(CHECKPOINT.match(path.name).group(1))  # type: ignore[union-attr]


class Checkpoints:
    """round-NNNNNN.npz files in one directory, the newest `keep` kept (pruned once the round's metrics row is
    written, since resuming never goes past the rows)."""

    def __init__(self, directory: Path, keep: int = 2):
        self.dir = Path(directory)
        self.keep = keep

    def paths(self) -> list[Path]:
        """The round-NNNNNN.npz files in the directory, oldest round first (none before the directory exists)."""
        if not self.dir.is_dir():
            return []
        return sorted(p for p in self.dir.iterdir() if CHECKPOINT.match(p.name))

    def save(self, round_: int, values: np.ndarray, mask: np.ndarray, meta: dict) -> Path:
        """Write round_'s checkpoint (values, mask, and `meta` with the round) atomically; returns its path."""
        path = self.dir / f"round-{round_:06d}.npz"
        # a checkpoint cut short by a kill is a temporary of its round's name, which a resume may never write again
        remove_stale_temporaries(path, r"round-\d{6}\.npz")
        save_arrays(path, {"values": values, "mask": mask}, dict(meta, round=round_))
        return path

    def prune(self) -> None:
        """Drop all but the newest `keep`: call it after the newest one's metrics row is written, or a crash in
        between leaves (with keep=1) only a checkpoint that resuming must skip."""
        for old in self.paths()[: -self.keep]:
            old.unlink()

    def drop_after(self, round_: int) -> None:
        """Remove the checkpoints of rounds after round_ (a resume from round_ runs them again): left, they count
        among the newest `keep` and prune would remove the new ones, which resuming can use, before them."""
        for path in self.paths():
            if _round_of(path) > round_:
                path.unlink()

    def latest(self, at_most: int | None = None) -> tuple[np.ndarray, np.ndarray, dict] | None:
        """The newest checkpoint that verifies (of round <= at_most: the last round the run recorded, so that
        a crash between a checkpoint and its metrics row never resumes past the metrics); corrupt ones are
        reported and skipped."""
        for path in reversed(self.paths()):
            if at_most is not None and _round_of(path) > at_most:
                continue
            try:
                arrays, meta = load_arrays(path)
            except CheckpointUnreadable as e:  # an older one, or a fresh start, would undo the rounds after it
                raise CheckpointUnreadable(
                    f"{e}: a resume neither goes back past it nor starts afresh; resume again once it can be read, "
                    "or start afresh with --overwrite"
                ) from None
            except CheckpointError as e:
                print(f"fedmpi: skipping checkpoint: {e}", file=sys.stderr)
                continue
            return arrays["values"], arrays["mask"], meta
        return None


def save_model(path: Path, values: np.ndarray, mask: np.ndarray, meta: dict) -> int:
    """The final model in sparse form (encoding.encode); returns its size on disk."""
    return save_arrays(Path(path), {"sparse": encoding.encode(values.astype(np.float32), mask)}, meta)


def model_digest(values: np.ndarray) -> str:
    """SHA-256 of a model's parameters as float32: the same for the same model in any file (model.npz also
    holds the run's config), so a record made from a model (attack.json) can be matched to the summary of
    the run that trained it."""
    return hashlib.sha256(np.ascontiguousarray(values, dtype="<f4").tobytes()).hexdigest()


def load_model(path: Path) -> tuple[np.ndarray, np.ndarray, dict]:
    """(values, mask, meta) of a saved model."""
    arrays, meta = load_arrays(path)
    if "sparse" not in arrays:
        raise CheckpointError(f"{path}: not a fedmpi model file")
    try:
        values, mask = encoding.decode(arrays["sparse"])
    except EncodingError as e:
        raise CheckpointError(f"{path}: {e}") from None
    return values, mask, meta
