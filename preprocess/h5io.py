"""The HDF5 volume format: writing (atomic), row copying, and checked reading.

Layout (one file per cohort, learner or test set):
  images      (N, X, Y, Z) float16 (or float32), one volume per chunk, gzip level 1
  age         (N,) float32
  subject_id, sex, site   (N,) UTF-8 strings
  attrs: format, voxel_size, shape, affine, preprocessing (JSON), version, created,
         input_fingerprint (what the file was built from), age_range (the (MIN, MAX] in years
         `nifti` accepted), split (JSON, learner/test files)
Optional, only in files made with `nifti --register` (readers must not require them, so files
written before registration existed stay valid and keep format /1):
  mni_to_native    (N, 4, 4) float64: template world mm -> scanner world mm, RAS (p_native = T @ p_mni)
  registration_ncc (N,) float32: correlation with the MNI152 template inside the brain mask (qc.py)
open_checked refuses other types (images not float16/float32, ages not numbers, ids not text),
another `format` and a voxel_size without an MNI grid (grid.GRIDS). Images stored in another
layout (contiguous, several volumes per chunk, another filter) are read, more slowly, and
copy_rows writes them in this one.
gzip level 1 is the fastest standard HDF5 filter to decode here (about the 300 volumes/s
target for 2 mm float16 on one core) and every HDF5 reader has it, unlike lzf.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import re
import zlib
from collections.abc import Iterable, Iterator
from pathlib import Path

import h5py
import numpy as np

from fedmpi.errors import DataError
from fedmpi.files import NO_LOCKS, atomic_path
from preprocess import grid

FORMAT = "fedmpi-volumes/1"
DATASETS = ("images", "age", "subject_id", "sex", "site")
OPTIONAL = {"mni_to_native": np.float64, "registration_ncc": np.float32}
DTYPES = {"float16": np.float16, "float32": np.float32}
GZIP_LEVEL = 1
LOCK_FAILED = re.compile(r"unable to lock file, errno = (\d+)")  # HDF5's words when its flock fails
LOCKS_DIFFER = "file locking flag values don't match"  # the file is open in this process without locks


def h5file(path, mode: str = "r") -> h5py.File:
    """h5py.File, without HDF5's file locks where the file system takes none. There (NFS without a lock
    daemon: errno 37; Lustre without flock: 38) every locking open fails, and the locks protect nothing here:
    volume files appear by rename once complete, so no reader meets one being written, and a temporary file
    has one writer. Where locks work they are kept (other code in the process may open the same file with
    h5py's defaults, and a file another process holds for writing is refused). A site's
    HDF5_USE_FILE_LOCKING still wins over this. DataError for a lock that cannot be had."""
    try:
        return h5py.File(path, mode)
    except OSError as exc:
        if LOCKS_DIFFER not in str(exc) and lock_errno(exc) not in NO_LOCKS:
            raise _lock_error(path, exc) from None
    try:
        return h5py.File(path, mode, locking=False)
    except OSError as exc:
        raise _lock_error(path, exc) from None


def lock_errno(exc: OSError) -> int | None:
    """The errno of HDF5's failed flock in `exc`, or None when `exc` is not about a lock."""
    found = LOCK_FAILED.search(str(exc))
    return int(found.group(1)) if found else None


def _lock_error(path, exc: OSError) -> Exception:
    """`exc` itself unless it is a lock HDF5 could not take: then a DataError that says why."""
    code = lock_errno(exc)
    if code is None:
        return exc
    if code in NO_LOCKS:
        return DataError(
            f"{path}: HDF5 could not lock it ({exc}); this file system does not take locks, and fedmpi goes "
            "without them unless HDF5_USE_FILE_LOCKING says otherwise: unset it or set it to FALSE"
        )
    return DataError(f"{path} is locked by another process (being written?): {exc}")


class _Sink:
    """The temporary file under h5py's file-object driver, which keeps a failed write (a full disk, a quota, a
    file size limit) to raise after the file is closed instead of handing it to HDF5: HDF5 cannot close a file
    one of its writes failed in, and the open file it is left with crashes the process at exit (SIGSEGV). A
    short write is finished, not left as a hole the driver would not notice."""

    def __init__(self, raw):
        self.raw = raw
        self.error: OSError | None = None

    def seek(self, offset: int, whence: int = 0) -> int:
        return self.raw.seek(offset, whence)

    def tell(self) -> int:
        return self.raw.tell()

    def read(self, size: int = -1) -> bytes:
        return self.raw.read(size)

    def readinto(self, buffer) -> int:
        return self.raw.readinto(buffer)

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        size = len(view)
        try:
            while self.error is None and view:
                view = view[self.raw.write(view) :]
        except OSError as exc:
            self.error = exc
        return size

    def truncate(self, size: int) -> int:
        try:
            return self.raw.truncate(size)
        except OSError as exc:
            self.error = self.error or exc
            return size

    def flush(self) -> None:
        """Nothing to do: the file is unbuffered, and atomic_path fsyncs it once complete."""

    def check(self) -> None:
        """Raise the first failed write, so that a writer stops at it rather than at the end."""
        if self.error is not None:
            raise self.error


@contextlib.contextmanager
def _writing(tmp: Path) -> Iterator[tuple[h5py.File, _Sink]]:
    """A new HDF5 file at `tmp` (atomic_path's temporary) that closes cleanly whatever its writes met; the
    first failed write is raised after the close. No chunk cache: each chunk is written once, and holding it
    (HDF5 2 holds 8 MiB) only delays the write and the error a full disk gives it."""
    with open(tmp, "w+b", buffering=0) as raw:
        sink = _Sink(raw)
        with h5py.File(sink, "w", rdcc_nbytes=0) as f:
            yield f, sink
        sink.check()


def base_attrs(voxel: int, shape, affine, params: dict, fingerprint: str) -> dict:
    """File attributes shared by a preprocessed file and every split made from it."""
    from fedmpi import __version__

    return {
        "format": FORMAT,
        "voxel_size": float(voxel),
        "shape": np.asarray(shape, dtype=np.int64),
        "affine": np.asarray(affine, dtype=np.float64),
        "preprocessing": json.dumps(params, sort_keys=True),
        "version": __version__,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "input_fingerprint": fingerprint,
    }


def _create(f: h5py.File, n: int, shape, dtype, table: dict, attrs: dict) -> h5py.Dataset:
    images = f.create_dataset(
        "images",
        (n, *tuple(shape)),
        dtype=dtype,
        chunks=(1, *tuple(shape)),
        compression="gzip",
        compression_opts=GZIP_LEVEL,
    )
    f.create_dataset("age", data=np.asarray(table["age"], dtype=np.float32))
    text = h5py.string_dtype("utf-8")
    for key in ("subject_id", "sex", "site"):
        f.create_dataset(key, data=np.asarray([str(v) for v in table[key]], dtype=object), dtype=text)
    for key, dtype in OPTIONAL.items():
        if key in table:
            f.create_dataset(key, data=np.asarray(table[key], dtype=dtype))
    for key, value in attrs.items():
        f.attrs[key] = value
    return images


def write_volumes(path, volumes: Iterable[np.ndarray], table: dict, attrs: dict, dtype: str = "float16") -> Path:
    """Write N volumes (an iterable, consumed one at a time) and their table atomically.

    `table` holds equal-length sequences age, subject_id, sex, site (and any of OPTIONAL).
    """
    n = len(table["age"])
    shape = tuple(int(s) for s in attrs["shape"])
    with atomic_path(path) as tmp, _writing(tmp) as (f, sink):
        images = _create(f, n, shape, DTYPES[dtype], table, attrs)
        count = 0
        for i, vol in enumerate(volumes):
            images[i] = vol
            sink.check()
            count += 1
        if count != n:
            raise ValueError(f"got {count} volumes for {n} table rows")
    return Path(path)


def copy_rows(src, dst, rows, extra_attrs: dict) -> Path:
    """Copy the given rows of `src` into a new file `dst` (same attrs; compressed chunks copied raw when
    `src` has the documented layout)."""
    rows = np.asarray(rows, dtype=np.int64)
    with open_checked(src) as f:
        table = {k: (f[k][:] if k == "age" else f[k].asstr()[:])[rows] for k in DATASETS[1:]}
        table.update({k: f[k][:][rows] for k in OPTIONAL if k in f})
        attrs = dict(f.attrs)
        attrs.update(extra_attrs)
        images = f["images"]
        with atomic_path(dst) as tmp, _writing(tmp) as (g, sink):
            out = _create(g, len(rows), images.shape[1:], images.dtype, table, attrs)
            # raw chunks only when they are encoded as _create encodes them; otherwise (contiguous,
            # several volumes per chunk, another filter) decode and re-encode in the documented layout
            raw = ChunkReader(images).raw
            for j, i in enumerate(rows):
                if raw:
                    mask, chunk = images.id.read_direct_chunk((int(i), 0, 0, 0))
                    out.id.write_direct_chunk((j, 0, 0, 0), chunk, mask)
                else:
                    out[j] = images[int(i)]
                sink.check()
    return Path(dst)


def open_checked(path) -> h5py.File:
    """Open a volume file read-only; DataError (naming the file) unless it is complete and valid."""
    path = Path(path)
    if path.is_dir():
        raise DataError(f"volume file {path} is a directory; give the HDF5 file")
    if path.parent.is_file():  # data.dir or --h5's folder given as a file: "does not exist" misled
        raise DataError(f"volume file {path}: {path.parent} is a file, not a directory")
    if not path.is_file():
        raise DataError(f"volume file {path} does not exist")
    try:
        f = h5file(path)
    except DataError as exc:
        raise DataError(f"volume file {exc}") from None
    except OSError as exc:
        raise DataError(f"volume file {path} is not a readable HDF5 file (corrupt or truncated?): {exc}") from None
    try:
        missing = [k for k in DATASETS if k not in f]
        if missing:
            raise DataError(f"volume file {path} lacks dataset(s) {', '.join(missing)}")
        n = f["images"].shape[0]
        if (
            f["images"].ndim != 4
            or any(f[k].shape != (n,) for k in DATASETS[1:])
            or any(f[k].shape[:1] != (n,) for k in OPTIONAL if k in f)
        ):
            raise DataError(f"volume file {path} has inconsistent dataset shapes")
        if 0 in f["images"].shape[1:]:  # else the preflight's record of it "is one no volume file gives"
            raise DataError(f"volume file {path} has images of shape {f['images'].shape}: a volume axis of size 0")
        problem = _layout_problem(f)
        if problem:
            raise DataError(f"volume file {path} {problem}")
    except DataError:
        f.close()
        raise
    except Exception as exc:  # h5py raises several types on damaged metadata
        f.close()
        raise DataError(f"volume file {path} is damaged: {exc}") from None
    return f


def _layout_problem(f: h5py.File) -> str | None:
    """What makes the types or attributes of an open file unlike what _create writes (None: nothing).

    Readers index the tables as numbers and text and pick the MNI grid by voxel_size; a file that
    passed the shape checks but stores, say, numeric subject ids would otherwise fail deep inside
    them. `format` may be absent (files written by other tools) but not another format.
    """
    images = f["images"].dtype
    if images.kind != "f" or images.itemsize not in (2, 4):
        return f"stores images as {images}, not {' or '.join(DTYPES)}"
    for key in ["age", *(k for k in OPTIONAL if k in f)]:
        if f[key].dtype.kind not in "fiu":
            return f"stores {key} as {f[key].dtype}, not numbers"
    for key in DATASETS[2:]:
        if h5py.check_string_dtype(f[key].dtype) is None:
            return f"stores {key} as {f[key].dtype}, not text"
    fmt = f.attrs.get("format", FORMAT)
    if not (isinstance(fmt, str) and fmt == FORMAT):
        return f"has format {fmt!r}, not {FORMAT!r}"
    if "voxel_size" not in f.attrs:
        return "lacks the voxel_size attribute"
    voxel = f.attrs["voxel_size"]
    if not isinstance(voxel, (int, float, np.integer, np.floating)):
        return f"has a voxel_size that is not a number: {voxel!r}"
    if float(voxel) not in grid.GRIDS:
        return f"has voxel_size {float(voxel):g}, not one of the MNI grids ({', '.join(map(str, grid.GRIDS))} mm)"
    return None


class ChunkReader:
    """Fast reads of single volumes: raw chunk + zlib, skipping h5py's filter pipeline.

    Falls back to h5py's own reading when the dataset is not gzip-only, one volume per chunk.
    """

    def __init__(self, images: h5py.Dataset):
        self.images = images
        self.shape = images.shape[1:]
        self.dtype = images.dtype
        plist = images.id.get_create_plist()
        filters = [plist.get_filter(i)[0] for i in range(plist.get_nfilters())]
        self.raw = images.chunks == (1, *self.shape) and filters == [h5py.h5z.FILTER_DEFLATE]

    def read(self, i: int) -> np.ndarray:
        """Volume i as a fresh, writable array of the stored dtype in this machine's byte order
        (torch.from_numpy-ready: torch refuses the big-endian floats other tools may store)."""
        if not self.raw:
            vol = self.images[i]
        else:
            mask, chunk = self.images.id.read_direct_chunk((i, 0, 0, 0))
            data = bytearray(chunk if mask & 1 else zlib.decompress(chunk))
            vol = np.frombuffer(data, dtype=self.dtype).reshape(self.shape)
        return vol if vol.dtype.isnative else vol.astype(vol.dtype.newbyteorder("="))
