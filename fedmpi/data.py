"""Volume files for training: a lazy torch Dataset, a cheap header read, the checks of a file's contents.

The file format is documented in preprocess/h5io.py and docs/data.md. Every error about a
volume file is a DataError whose message names the file.
"""

from __future__ import annotations

import hashlib
import json
import os
import unicodedata
from pathlib import Path

import h5py
import numpy as np
import torch
from torch.utils.data import Dataset

from preprocess import bids, h5io

from .errors import DataError

SAMPLED_VOLUMES = 3  # volumes the preflight reads per file (first, middle, last) to check their values


def open_volumes(path, cfg, device: torch.device) -> VolumeDataset:
    """A rank's volume file with the configured cache (data.cache: memory, device or off)."""
    cache = cfg.data.cache
    return VolumeDataset(path, cache=cache != "off", cache_device=device if cache == "device" else None)


def loader_options(cfg, device: torch.device) -> dict:
    """DataLoader settings for a rank's volumes: workers only where volumes are read from disk (the
    configuration refuses them with a cache), pinned memory for non-blocking copies to a GPU unless the
    volumes are already on it. Workers are not kept across epochs (persistent_workers): a reused iterator
    skips a draw from the shuffling generator, so later epochs would come in another order than with no
    workers, and same-seed runs would differ by worker count."""
    return {"num_workers": cfg.data.workers, "pin_memory": device.type == "cuda" and cfg.data.cache != "device"}


def read_header(path) -> dict:
    """n, shape (X, Y, Z), voxel_size and mean_age of a volume file, without reading images."""
    with h5io.open_checked(path) as f:
        return _header(f)


def _header(f: h5py.File) -> dict:
    ages = f["age"][:]
    return {
        "n": int(f["images"].shape[0]),
        "shape": tuple(int(s) for s in f["images"].shape[1:]),
        "voxel_size": float(f.attrs["voxel_size"]),
        "mean_age": float(ages.mean()) if len(ages) else float("nan"),
    }


def file_digest(path) -> str:
    """SHA-256 of what makes a volume file's data what it is, cheap to compute: its subjects, ages, image
    shape and dtype, and the fingerprint preprocessing stored of its inputs and parameters. A run records
    the digests of its split, so resuming or attacking it on re-split data is caught."""
    with h5io.open_checked(path) as f:
        return _digest(f, f["age"][:])


def _digest(f: h5py.File, ages: np.ndarray) -> str:
    h = hashlib.sha256()
    h.update("\n".join(f["subject_id"].asstr()[:]).encode())
    h.update(np.ascontiguousarray(ages, dtype="<f4").tobytes())
    h.update(f"{f['images'].shape} {f['images'].dtype} {f.attrs.get('input_fingerprint', '')}".encode())
    return h.hexdigest()


# What a preprocessed file's pipeline record names that is a site's own, not how its scans were processed: where its
# scans were, and which image of a session it chose.
SITE_PARAMETERS = ("source", "select")


def pipeline(f: h5py.File) -> dict:
    """How the file's volumes were preprocessed (its "preprocessing" attribute) less SITE_PARAMETERS; empty for a
    file made otherwise."""
    try:
        params = json.loads(f.attrs.get("preprocessing", "{}"))
    except (TypeError, ValueError):
        return {}
    return {k: v for k, v in params.items() if k not in SITE_PARAMETERS} if isinstance(params, dict) else {}


def check_volumes(path, ages_required: bool = True) -> dict:
    """read_header plus what the preflight can afford to check, naming the file: at least one volume, every
    age finite and within the file's plausible range (the (MIN, MAX] preprocessing accepted, by default
    bids.DEFAULT_AGE_RANGE), a sample of volumes finite; the file's digest ("digest") and pipeline ("pipeline").
    Without `ages_required` (a file to predict on) an age may be NaN, the unknown age preprocessing's
    --ages-optional stores; one that is given must still be plausible."""
    with h5io.open_checked(path) as f:
        head = _header(f)
        if head["n"] == 0:
            raise DataError(f"volume file {path}: no volumes")
        ages = f["age"][:]
        try:
            age_range = bids.stored_age_range(f.attrs)
        except ValueError as e:
            raise DataError(f"volume file {path}: {e}") from None
        bad = bids.bad_ages(ages, age_range)
        if not ages_required:
            bad = bad[~np.isnan(ages[bad])]
        if bad.size:
            shown = ", ".join(f"#{i} ({ages[i]})" for i in bad[:5]) + (" ..." if bad.size > 5 else "")
            hint = bids.unknown_ages_note(ages, bad, "trained, split or calibrated on")
            raise DataError(
                f"volume file {path}: {bad.size} age(s) not in {bids.age_range_text(age_range)}: {shown}{hint}"
            )
        for key in ("subject_id", "sex", "site"):  # the csv module leaves a carriage return unquoted
            for i, text in enumerate(f[key].asstr()[:]):
                if any(unicodedata.category(c) == "Cc" for c in text):
                    raise DataError(
                        f"volume file {path}: {key} #{i} {text!r} holds a control character (a line break, a tab), "
                        f"which one CSV row per subject cannot carry and preprocessing never writes: fix the file's "
                        f"{key}"
                    )
        reader = h5io.ChunkReader(f["images"])
        for i in sorted({0, head["n"] // 2, head["n"] - 1})[:SAMPLED_VOLUMES]:
            read_volume(reader, path, i)
        return dict(head, digest=_digest(f, ages), pipeline=pipeline(f))


def read_volume(reader: h5io.ChunkReader, path: Path, i: int) -> np.ndarray:
    """Volume i of the file at `path`, or DataError naming the file and the volume: a damaged chunk, or values
    that are not finite (one such volume makes the model NaN)."""
    try:
        volume = reader.read(i)
    except Exception as exc:  # zlib/h5py errors on a damaged chunk
        raise DataError(f"volume file {path}: cannot read volume {i}: {exc}") from None
    if not np.isfinite(volume).all():
        raise DataError(f"volume file {path}: volume {i} holds non-finite values")
    return volume


class VolumeDataset(Dataset):
    """(volume (1, X, Y, Z) float32, age float32) pairs from one volume file.

    The HDF5 handle is opened on first access in each process (a pid check), so the
    dataset can be handed to DataLoader workers, forked or spawned. With cache=True the
    decoded float32 volumes are kept in memory (per process: each worker has its own) and
    the same tensor is returned on every access, so callers must not modify it in place.
    `cache_device` keeps them on that device instead (a GPU: no copy per step; then the
    DataLoader must run in the training process, with no workers and no pinned memory).
    """

    def __init__(self, path, cache: bool = False, cache_device: torch.device | None = None):
        self.path = Path(path)
        self.cache_device = cache_device
        with h5io.open_checked(self.path) as f:
            self._ages = f["age"][:].astype(np.float32)
            x, y, z = (int(s) for s in f["images"].shape[1:])
            self._shape = (x, y, z)
            self._voxel = float(f.attrs["voxel_size"])
        self._cache: dict[int, torch.Tensor] | None = {} if cache else None
        self._file: h5py.File | None = None
        self._reader: h5io.ChunkReader | None = None
        self._pid: int | None = None

    @property
    def shape(self) -> tuple[int, int, int]:
        """The grid (X, Y, Z) every volume of the file shares."""
        return self._shape

    @property
    def ages(self) -> np.ndarray:
        """Every subject's age (float32), in file order, read once when the dataset opened."""
        return self._ages

    @property
    def subject_ids(self) -> list[str]:
        """The subjects' identifiers, in file order (read on demand: only reports need them)."""
        with h5io.open_checked(self.path) as f:
            return list(f["subject_id"].asstr()[:])

    @property
    def voxel_size(self) -> float:
        """The grid's voxel size in mm (the file's voxel_size attribute)."""
        return self._voxel

    def __len__(self) -> int:
        return len(self._ages)

    def _open(self) -> h5io.ChunkReader:
        if self._reader is None or self._pid != os.getpid():
            self._file = h5io.open_checked(self.path)
            self._reader = h5io.ChunkReader(self._file["images"])
            self._pid = os.getpid()
        return self._reader

    def __getitem__(self, index):
        i = int(index)
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} volumes in {self.path}")
        age = torch.tensor(self._ages[i])
        if self._cache is not None and i in self._cache:
            return self._cache[i], age
        vol = read_volume(self._open(), self.path, i)  # the preflight checked a few; this one is checked as it is read
        # torch converts float16 -> float32 several times faster than numpy does
        x = torch.from_numpy(vol).to(torch.float32).unsqueeze(0)
        if self._cache is not None:
            if self.cache_device is not None:
                x = x.to(self.cache_device)
            self._cache[i] = x
        return x, age

    def warm(self) -> VolumeDataset:
        """Decode every volume into the cache now (at start-up, beside the other ranks' set-up) rather
        than during the first round's first epoch."""
        if self._cache is not None:
            for i in range(len(self)):
                self[i]
        return self

    def __getstate__(self):
        state = dict(self.__dict__)
        state.update(_file=None, _reader=None, _pid=None)
        return state

    def close(self) -> None:
        """Close this process's file handle (reopened on the next access)."""
        if self._file is not None and self._pid == os.getpid():
            self._file.close()
        self._file = self._reader = self._pid = None
