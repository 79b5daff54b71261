"""The HDF5 volume format: contents, attributes, atomic writes, row copies, checked opening."""

import csv
import errno
import json
import os
import shutil
import subprocess
import sys

import h5py
import numpy as np
import pytest

import fedmpi
from fedmpi.errors import DataError
from preprocess import grid, h5io


def _table(n):
    return {
        "age": np.linspace(50, 70, n),
        "subject_id": [f"s{i}" for i in range(n)],
        "sex": ["F"] * n,
        "site": ["X"] * n,
    }


def _attrs(shape=(3, 4, 5)):
    return h5io.base_attrs(4, shape, np.eye(4), {"k": 1}, "fp")


def test_file_matches_participants_tsv(cohort):
    with open(cohort.bids / "participants.tsv", newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    with h5py.File(cohort.h5, "r") as f:
        assert list(f["subject_id"].asstr()[:]) == [r["participant_id"] for r in rows]
        np.testing.assert_allclose(f["age"][:], [float(r["age"]) for r in rows], atol=1e-4)
        assert list(f["sex"].asstr()[:]) == [r["sex"] for r in rows]
        assert list(f["site"].asstr()[:]) == [r["site"] for r in rows]
        assert f["age"].dtype == np.float32


def test_layout_and_attributes(cohort):
    shape, affine = grid.target_grid(4)
    with h5py.File(cohort.h5, "r") as f:
        images = f["images"]
        assert images.shape == (cohort.subjects, *shape) and images.dtype == np.float16
        assert images.chunks == (1, *shape) and images.compression == "gzip"
        assert f.attrs["format"] == h5io.FORMAT and f.attrs["voxel_size"] == 4.0
        assert tuple(f.attrs["shape"]) == shape
        np.testing.assert_array_equal(f.attrs["affine"], affine)
        assert json.loads(f.attrs["preprocessing"])["voxel_mm"] == 4
        assert f.attrs["version"] == fedmpi.__version__ and f.attrs["created"]
        vol = images[0].astype(np.float32)
        assert np.all(vol[~grid.brain_mask(4)] == 0) and abs(vol[grid.brain_mask(4)].std() - 1) < 0.01


def test_write_is_atomic(tmp_path):
    def volumes():
        yield np.zeros((3, 4, 5))
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        h5io.write_volumes(tmp_path / "x.h5", volumes(), _table(2), _attrs())
    assert list(tmp_path.iterdir()) == []


def test_write_rejects_too_few_volumes(tmp_path):
    with pytest.raises(ValueError, match="1 volumes for 2"):
        h5io.write_volumes(tmp_path / "x.h5", [np.zeros((3, 4, 5))], _table(2), _attrs())
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_round_trip_and_fast_reader(tmp_path, dtype):
    vols = np.random.default_rng(0).normal(size=(3, 3, 4, 5)).astype(dtype)
    vols[1] = 0  # a chunk that compresses to almost nothing
    h5io.write_volumes(tmp_path / "x.h5", iter(vols), _table(3), _attrs(), dtype=dtype)
    with h5io.open_checked(tmp_path / "x.h5") as f:
        reader = h5io.ChunkReader(f["images"])
        assert reader.raw
        for i in range(3):
            np.testing.assert_array_equal(reader.read(i), vols[i])
            np.testing.assert_array_equal(f["images"][i], vols[i])


def test_copy_rows_copies_volumes_table_and_attributes(cohort, tmp_path):
    rows = [5, 0, 7]
    h5io.copy_rows(cohort.h5, tmp_path / "sub.h5", rows, {"split": "{}"})
    with h5py.File(cohort.h5, "r") as src, h5py.File(tmp_path / "sub.h5", "r") as dst:
        for j, i in enumerate(rows):
            np.testing.assert_array_equal(dst["images"][j], src["images"][i])
            assert dst["subject_id"].asstr()[j] == src["subject_id"].asstr()[i]
            assert dst["age"][j] == src["age"][i]
        for key in ("voxel_size", "version", "preprocessing", "format"):
            assert dst.attrs[key] == src.attrs[key]
        assert dst.attrs["split"] == "{}"


def test_a_volume_file_under_a_file_says_so_not_that_it_does_not_exist(tmp_path):
    (tmp_path / "split").touch()  # data.dir=split, a file
    with pytest.raises(h5io.DataError, match=r"test.h5: .*split is a file, not a directory$"):
        h5io.open_checked(tmp_path / "split" / "test.h5")


def test_open_checked_names_the_file_for_every_defect(cohort, tmp_path):
    with pytest.raises(h5io.DataError, match=r"missing.h5 does not exist"):
        h5io.open_checked(tmp_path / "missing.h5")
    (tmp_path / "junk.h5").write_bytes(b"\x00" * 4096)
    with pytest.raises(h5io.DataError, match=r"junk.h5 is not a readable HDF5"):
        h5io.open_checked(tmp_path / "junk.h5")
    data = cohort.h5.read_bytes()
    (tmp_path / "trunc.h5").write_bytes(data[: len(data) // 3])
    with pytest.raises(h5io.DataError, match=r"trunc.h5"):
        h5io.open_checked(tmp_path / "trunc.h5")
    shutil.copy(cohort.h5, tmp_path / "noage.h5")
    with h5py.File(tmp_path / "noage.h5", "a") as f:
        del f["age"]
    with pytest.raises(h5io.DataError, match=r"noage.h5 lacks dataset.s. age"):
        h5io.open_checked(tmp_path / "noage.h5")


def test_registration_datasets_are_optional_and_copied(tmp_path):
    table = dict(
        _table(3),
        mni_to_native=np.tile(np.eye(4), (3, 1, 1)) * [[[1], [2], [3], [1]]],
        registration_ncc=[0.7, 0.8, 0.9],
    )
    h5io.write_volumes(tmp_path / "r.h5", iter(np.zeros((3, 3, 4, 5))), table, _attrs())
    h5io.copy_rows(tmp_path / "r.h5", tmp_path / "sub.h5", [2, 0], {})
    with h5io.open_checked(tmp_path / "sub.h5") as f:
        np.testing.assert_allclose(f["registration_ncc"][:], [0.9, 0.7])
        assert f["registration_ncc"].dtype == np.float32 and f["mni_to_native"].dtype == np.float64
        np.testing.assert_array_equal(f["mni_to_native"][:], table["mni_to_native"][[2, 0]])
    with h5py.File(tmp_path / "r.h5", "a") as f:
        del f["registration_ncc"]
        f["registration_ncc"] = np.zeros(2, np.float32)
    with pytest.raises(h5io.DataError, match="inconsistent dataset shapes"):
        h5io.open_checked(tmp_path / "r.h5")
    h5io.write_volumes(tmp_path / "old.h5", iter(np.zeros((3, 3, 4, 5))), _table(3), _attrs())
    h5io.copy_rows(tmp_path / "old.h5", tmp_path / "old_sub.h5", [1], {})
    with h5io.open_checked(tmp_path / "old_sub.h5") as f:  # files without registration stay valid
        assert "mni_to_native" not in f and len(f["age"]) == 1


def _replace(path, key, data, **options):
    with h5py.File(path, "a") as f:
        del f[key]
        f.create_dataset(key, data=data, **options)


def _set_attr(path, key, value):
    with h5py.File(path, "a") as f:
        f.attrs[key] = value


@pytest.mark.parametrize(
    "spoil, message",
    [
        (lambda p: _replace(p, "subject_id", np.arange(3)), "stores subject_id as int64, not text"),
        (lambda p: _replace(p, "site", np.zeros(3)), "stores site as float64, not text"),
        (lambda p: _replace(p, "age", np.array([b"old"] * 3)), "stores age as |S3, not numbers"),
        (lambda p: _replace(p, "images", np.zeros((3, 3, 4, 5))), "stores images as float64, not float16 or float32"),
        (
            lambda p: _replace(p, "images", np.zeros((3, 3, 0, 5), np.float16)),
            r"has images of shape \(3, 3, 0, 5\): a volume axis of size 0",
        ),
        (lambda p: _set_attr(p, "voxel_size", 3.0), r"has voxel_size 3, not one of the MNI grids \(2, 4, 6 mm\)"),
        (lambda p: _set_attr(p, "voxel_size", "4"), "has a voxel_size that is not a number: '4'"),
        (lambda p: _set_attr(p, "format", "fedmpi-volumes/2"), "has format 'fedmpi-volumes/2', not 'fedmpi-volumes/1'"),
    ],
)
def test_open_checked_refuses_types_and_attributes_the_readers_cannot_use(tmp_path, spoil, message):
    path = h5io.write_volumes(tmp_path / "x.h5", iter(np.zeros((3, 3, 4, 5))), _table(3), _attrs())
    spoil(path)
    with pytest.raises(h5io.DataError, match=rf"^volume file {path} {message}$"):
        h5io.open_checked(path)


def test_open_checked_accepts_a_file_without_format_and_names_a_directory(tmp_path):
    path = h5io.write_volumes(tmp_path / "x.h5", iter(np.zeros((3, 3, 4, 5))), _table(3), _attrs())
    with h5py.File(path, "a") as f:
        del f.attrs["format"]  # as files written by other tools (tests/fedtools.py)
    h5io.open_checked(path).close()
    with pytest.raises(h5io.DataError, match=rf"^volume file {tmp_path} is a directory; give the HDF5 file$"):
        h5io.open_checked(tmp_path)


@pytest.mark.parametrize(
    "layout",
    [{}, {"chunks": (2, 3, 4, 5), "compression": "gzip"}, {"chunks": (1, 3, 4, 5), "compression": "lzf"}],
    ids=["contiguous", "two-per-chunk", "lzf"],
)
def test_copy_rows_writes_other_image_layouts_in_the_documented_one(tmp_path, layout):
    vols = np.random.default_rng(0).normal(size=(3, 3, 4, 5)).astype(np.float16)
    vols[:, :2] = 0  # compressible: lzf stores incompressible chunks unfiltered, which a raw copy survives
    path = h5io.write_volumes(tmp_path / "x.h5", iter(vols), _table(3), _attrs())
    _replace(path, "images", vols, **layout)
    h5io.copy_rows(path, tmp_path / "sub.h5", [2, 0], {})
    with h5io.open_checked(tmp_path / "sub.h5") as f:
        reader = h5io.ChunkReader(f["images"])
        assert reader.raw and f["images"].chunks == (1, 3, 4, 5)
        np.testing.assert_array_equal(reader.read(0), vols[2])
        np.testing.assert_array_equal(reader.read(1), vols[0])


def test_open_checked_refuses_registration_figures_stored_as_text(tmp_path):
    table = dict(_table(3), registration_ncc=[0.7, 0.8, 0.9])
    path = h5io.write_volumes(tmp_path / "x.h5", iter(np.zeros((3, 3, 4, 5))), table, _attrs())
    _replace(path, "registration_ncc", np.array([b"0.7"] * 3))
    with pytest.raises(h5io.DataError, match=rf"^volume file {path} stores registration_ncc as \|S3, not numbers$"):
        h5io.open_checked(path)


def test_copy_rows_is_atomic(tmp_path, monkeypatch):
    src = h5io.write_volumes(tmp_path / "x.h5", iter(np.zeros((3, 3, 4, 5))), _table(3), _attrs())

    def broken(images):
        raise RuntimeError("boom")

    monkeypatch.setattr(h5io, "ChunkReader", broken)
    with pytest.raises(RuntimeError, match="boom"):
        h5io.copy_rows(src, tmp_path / "sub.h5", [2, 0], {})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.h5"]


def test_copy_rows_puts_raw_chunks_in_their_new_rows(tmp_path):
    vols = np.random.default_rng(1).normal(size=(3, 3, 4, 5)).astype(np.float16)
    path = h5io.write_volumes(tmp_path / "x.h5", iter(vols), _table(3), _attrs())
    h5io.copy_rows(path, tmp_path / "sub.h5", [2, 0], {})
    with h5io.open_checked(tmp_path / "sub.h5") as f:
        assert h5io.ChunkReader(f["images"]).raw
        np.testing.assert_array_equal(f["images"][:], vols[[2, 0]])
        assert list(f["subject_id"].asstr()[:]) == ["s2", "s0"]


# writes past a file size limit fail (EFBIG) as on a full disk (ENOSPC), without needing one: HDF5's own driver met
# either by raising an error it could not close the file after, and the process crashed at exit (SIGSEGV)
FILE_LIMIT_SCRIPT = """
import resource, sys
import numpy as np
from preprocess import h5io
resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, resource.RLIM_INFINITY))
out = sys.argv[1] + "/out.h5"
shape = (40, 48, 40)
attrs = h5io.base_attrs(4, shape, np.eye(4), {}, "fp")
table = {"age": [60.0] * 40, "subject_id": ["s%d" % i for i in range(40)], "sex": ["F"] * 40, "site": ["X"] * 40}
made = []

def volumes():
    for i in range(40):
        made.append(i)
        yield np.random.default_rng(i).normal(size=shape)

try:
    if sys.argv[2] == "write":
        h5io.write_volumes(out, volumes(), table, attrs)
    else:
        h5io.copy_rows(sys.argv[2], out, list(range(40)), {})
except OSError as exc:
    print(exc.errno, len(made), exc.strerror)
"""


@pytest.mark.parametrize("how", ["write", "copy"])
def test_a_write_that_does_not_fit_is_an_error_the_process_survives(tmp_path, how):
    source = "write"
    if how == "copy":
        vols = np.random.default_rng(2).normal(size=(40, 40, 48, 40)).astype(np.float16)
        source = str(h5io.write_volumes(tmp_path / "src.h5", iter(vols), _table(40), _attrs((40, 48, 40))))
    out = tmp_path / "out"
    out.mkdir()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    run = subprocess.run(
        [sys.executable, "-c", FILE_LIMIT_SCRIPT, str(out), source], env=env, capture_output=True, text=True
    )
    assert run.returncode == 0, run.stderr
    code, made, reason = run.stdout.split(maxsplit=2)
    assert int(code) == errno.EFBIG and reason.startswith("File too large (writing ")
    if how == "write":
        assert int(made) < 20  # it stopped at the write that failed, not after the last volume
    assert "Traceback" not in run.stderr
    assert list(out.iterdir()) == []  # the temporary removed, nothing under the real name


class _ShortWrites:
    """A file whose writes take at most 3 bytes, as a nearly full disk may."""

    def __init__(self):
        self.data = bytearray()

    def write(self, view):
        self.data += bytes(view[:3])
        return min(3, len(view))


def test_sink_finishes_short_writes():
    raw = _ShortWrites()
    sink = h5io._Sink(raw)
    assert sink.write(memoryview(b"0123456789")) == 10
    assert raw.data == b"0123456789" and sink.error is None


# flock() failing as on NFS without a lock daemon, for every process this library is preloaded into
NO_LOCKS_C = """
#include <errno.h>
int flock(int fd, int op) { (void)fd; (void)op; errno = ENOLCK; return -1; }
"""
NO_LOCKS_SCRIPT = """
import sys
import numpy as np
from fedmpi.errors import DataError
from preprocess import h5io
path = sys.argv[1]
try:
    if sys.argv[2] == "write":
        attrs = h5io.base_attrs(4, (3, 4, 5), np.eye(4), {}, "fp")
        table = {"age": [60.0], "subject_id": ["s"], "sex": ["F"], "site": ["X"]}
        h5io.write_volumes(path, [np.ones((3, 4, 5))], table, attrs)
        h5io.copy_rows(path, path + ".copy", [0], {})
    with h5io.open_checked(path + ".copy") as f:
        print("read", f["images"].shape[0])
except DataError as e:
    print(e)
"""


def test_volume_files_are_written_and_read_where_the_file_system_takes_no_locks(tmp_path):
    """Without locks (NFS with no lock daemon, Lustre without flock) HDF5's own opens fail with errno 37 or 38;
    the volume files do not need them. A site that asks for locks gets a line that says what failed."""
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.skip("needs a C compiler to build the flock stand-in")
    (tmp_path / "nolocks.c").write_text(NO_LOCKS_C)
    library = tmp_path / "nolocks.so"
    subprocess.run([cc, "-shared", "-fPIC", "-o", str(library), str(tmp_path / "nolocks.c")], check=True)
    env = {k: v for k, v in os.environ.items() if k != "HDF5_USE_FILE_LOCKING"}
    env["LD_PRELOAD"] = str(library)

    def run(what, **extra):
        command = [sys.executable, "-c", NO_LOCKS_SCRIPT, str(tmp_path / "v.h5"), what]
        proc = subprocess.run(command, env={**env, **extra}, capture_output=True, text=True, timeout=120)
        return proc.stdout.strip() + proc.stderr.strip()

    assert run("write") == "read 1"
    for what in ("read", "write"):  # a site that asks for locks there gets one line, reading or writing
        refused = run(what, HDF5_USE_FILE_LOCKING="TRUE")
        assert "could not lock" in refused and "set it to FALSE" in refused and "Traceback" not in refused


def test_a_file_another_process_holds_for_writing_is_refused_not_read(tmp_path):
    """The unlocked open is for file systems without locks only: a lock held elsewhere (errno 11) is one line."""
    path = h5io.write_volumes(tmp_path / "v.h5", [np.ones((3, 4, 5))], _table(1), _attrs())
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            f"import h5py, time; f = h5py.File({str(path)!r}, 'a'); print('held', flush=True); time.sleep(60)",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(DataError, match=r"v.h5 is locked by another process \(being written\?\)"):
            h5io.open_checked(path)
    finally:
        holder.kill()
        holder.wait()
    h5io.open_checked(path).close()
