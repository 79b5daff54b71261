"""Checkpoints and model files: exact round trips, and every kind of bad file is a CheckpointError."""

import hashlib
import json
import os
import zipfile

import numpy as np
import pytest
from fedtools import unreadable

from fedmpi.checkpoint import (
    CheckpointError,
    Checkpoints,
    load_arrays,
    load_model,
    model_digest,
    save_arrays,
    save_model,
)

ARRAYS = {
    "values": np.linspace(-1, 1, 13, dtype=np.float32),
    "mask": np.array([True, False] * 6 + [True]),
    "grid": np.arange(24, dtype=np.int16).reshape(2, 3, 4),
    "wide": np.array([2**40, -3], dtype=np.int64),
    "empty": np.zeros((0, 3), dtype=np.float64),
}


def no_temporaries(directory):
    return [p.name for p in directory.iterdir() if p.name.startswith(".") or p.name.endswith(".tmp")]


def test_save_load_round_trip(tmp_path):
    path = tmp_path / "a.npz"
    size = save_arrays(path, ARRAYS, {"round": 7, "note": "x"})
    assert size == path.stat().st_size
    arrays, meta = load_arrays(path)
    assert meta == {"round": 7, "note": "x"}  # the checksum is verified and removed
    assert set(arrays) == set(ARRAYS)
    for name, a in ARRAYS.items():
        assert arrays[name].dtype == a.dtype and arrays[name].shape == a.shape
        np.testing.assert_array_equal(arrays[name], a)
    assert no_temporaries(tmp_path) == []


def test_save_replaces_existing_file(tmp_path):
    path = tmp_path / "a.npz"
    save_arrays(path, {"x": np.zeros(3)}, {"v": 1})
    save_arrays(path, {"x": np.ones(3)}, {"v": 2})
    arrays, meta = load_arrays(path)
    assert meta == {"v": 2}
    np.testing.assert_array_equal(arrays["x"], np.ones(3))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.npz"]


def rewrite(path, arrays, meta_bytes):
    """An npz whose arrays differ from what its stored checksum describes."""
    np.savez(path, meta=np.frombuffer(meta_bytes, dtype=np.uint8), **arrays)


def _saved(path):
    """ARRAYS saved to path, read back as plain npz members: (arrays, the stored metadata's bytes)."""
    save_arrays(path, ARRAYS, {"round": 1})
    with np.load(path) as z:
        return {k: z[k] for k in z.files if k != "meta"}, z["meta"].tobytes()


def test_checksum_mismatch_on_modified_array(tmp_path):
    path = tmp_path / "a.npz"
    arrays, old_meta = _saved(path)
    raw = arrays["values"].view(np.uint8).copy()
    raw[5] ^= 0x01  # one flipped bit in one value
    arrays["values"] = raw.view(np.float32)
    rewrite(path, arrays, old_meta)
    with pytest.raises(CheckpointError, match="checksum"):
        load_arrays(path)


def test_checksum_mismatch_on_renamed_or_missing_array(tmp_path):
    path = tmp_path / "a.npz"
    save_arrays(path, {"a": np.arange(3), "b": np.arange(2)}, {})
    with np.load(path) as z:
        old_meta = z["meta"].tobytes()
    rewrite(path, {"a": np.arange(3)}, old_meta)
    with pytest.raises(CheckpointError, match="checksum"):
        load_arrays(path)
    rewrite(path, {"a": np.arange(3), "b": np.arange(2).astype(np.int32)}, old_meta)  # dtype change only
    with pytest.raises(CheckpointError, match="checksum"):
        load_arrays(path)


def test_flipped_byte_in_file_is_detected(tmp_path):
    path = tmp_path / "a.npz"
    values = np.arange(1000, dtype=np.float64)
    save_arrays(path, {"values": values}, {})
    data = bytearray(path.read_bytes())
    at = data.find(values[500:501].tobytes())
    assert at > 0
    data[at] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError):  # the zip CRC catches it before the checksum does
        load_arrays(path)


@pytest.mark.parametrize("keep", [0.9, 0.5, 0.1, 0.0])
def test_truncated_file(tmp_path, keep):
    path = tmp_path / "a.npz"
    save_arrays(path, ARRAYS, {"round": 1})
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(CheckpointError, match="unreadable or truncated"):
        load_arrays(path)


@pytest.mark.parametrize("junk", [b"junk" * 100, b"\x00" * 64, b"PK\x03\x04" + b"\x00" * 60])
def test_junk_file(tmp_path, junk):
    path = tmp_path / "a.npz"
    path.write_bytes(junk)
    with pytest.raises(CheckpointError, match="unreadable or truncated"):
        load_arrays(path)


def test_any_damaged_byte_is_a_checkpoint_error_or_harmless(tmp_path):
    """Every byte of a small checkpoint flipped in turn: zipfile, zlib and numpy raise many kinds of error on
    damaged bytes (NotImplementedError, RuntimeError "encrypted", ...); each must come out as CheckpointError
    (so that resume skips to the previous checkpoint), or the file must still read back the same."""
    path = tmp_path / "a.npz"
    save_arrays(path, ARRAYS, {"round": 1})
    good = path.read_bytes()
    kinds = set()
    for at in range(len(good)):
        for flip in (0x01, 0x20, 0xA5):
            data = bytearray(good)
            data[at] ^= flip
            path.write_bytes(bytes(data))
            try:
                arrays, meta = load_arrays(path)
            except CheckpointError as e:
                kinds.add(str(e).split("(")[0])
                continue
            assert meta == {"round": 1} and all(np.array_equal(arrays[k], v) for k, v in ARRAYS.items())
    assert len(kinds) > 1


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match="no such file"):
        load_arrays(tmp_path / "nope.npz")


def test_npz_without_metadata(tmp_path):
    path = tmp_path / "a.npz"
    np.savez(path, values=np.arange(3))
    with pytest.raises(CheckpointError, match="no metadata"):
        load_arrays(path)


def test_corrupt_metadata(tmp_path):
    path = tmp_path / "a.npz"
    rewrite(path, {"values": np.arange(3)}, b"{not json")
    with pytest.raises(CheckpointError, match="corrupt metadata"):
        load_arrays(path)


def test_metadata_that_is_not_an_object(tmp_path):
    path = tmp_path / "a.npz"
    rewrite(path, {"values": np.arange(3)}, b"[1]")
    with pytest.raises(CheckpointError):
        load_arrays(path)


def test_pickled_object_array_is_refused(tmp_path):
    path = tmp_path / "a.npz"
    evil = np.array([{"x": 1}, None], dtype=object)
    np.savez(path, meta=np.frombuffer(b"{}", dtype=np.uint8), values=evil)
    with pytest.raises(CheckpointError, match="pickle"):
        load_arrays(path)


def test_plain_npy_file_is_refused(tmp_path):
    path = tmp_path / "round-000001.npz"
    with open(path, "wb") as fh:
        np.save(fh, np.arange(3))
    with pytest.raises(CheckpointError):
        load_arrays(path)


def save_rounds(ckpt, rounds):
    for r in rounds:
        ckpt.save(r, np.full(5, r, dtype=np.float32), np.ones(5, dtype=bool), {"seed": 3})
        ckpt.prune()


def test_keeping_one_checkpoint_still_leaves_one_to_resume_from_a_crash_before_the_row(tmp_path):
    """keep=1: round 7's checkpoint is written, then the process dies before round 7's metrics row. Resuming
    may not go past the rows (round 6), so round 6's checkpoint must still be there."""
    ckpt = Checkpoints(tmp_path, keep=1)
    save_rounds(ckpt, [6])
    ckpt.save(7, np.full(5, 7, dtype=np.float32), np.ones(5, dtype=bool), {"seed": 3})
    assert ckpt.latest(at_most=6)[2]["round"] == 6
    ckpt.prune()  # once the row is written
    assert [p.name for p in ckpt.paths()] == ["round-000007.npz"]


def test_checkpoints_keep_newest(tmp_path):
    ckpt = Checkpoints(tmp_path / "ck", keep=2)
    assert ckpt.paths() == [] and ckpt.latest() is None
    save_rounds(ckpt, [1, 2, 3, 4, 5])
    assert [p.name for p in ckpt.paths()] == ["round-000004.npz", "round-000005.npz"]
    values, mask, meta = ckpt.latest()
    assert meta == {"seed": 3, "round": 5}
    np.testing.assert_array_equal(values, np.full(5, 5, dtype=np.float32))
    assert mask.dtype == bool and mask.all()
    assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == ["round-000004.npz", "round-000005.npz"]


def test_checkpoints_order_is_numeric_not_by_save_time(tmp_path):
    ckpt = Checkpoints(tmp_path, keep=3)
    save_rounds(ckpt, [10, 9, 100])
    assert ckpt.latest()[2]["round"] == 100


def test_checkpoints_ignore_other_files(tmp_path):
    (tmp_path / "notes.txt").write_text("x")
    (tmp_path / "round-1.npz").write_bytes(b"junk")
    ckpt = Checkpoints(tmp_path, keep=1)
    save_rounds(ckpt, [1, 2])
    assert (tmp_path / "notes.txt").exists() and (tmp_path / "round-1.npz").exists()
    assert [p.name for p in ckpt.paths()] == ["round-000002.npz"]


def test_latest_skips_corrupt_newest(tmp_path, capsys):
    ckpt = Checkpoints(tmp_path, keep=3)
    save_rounds(ckpt, [1, 2, 3])
    newest = tmp_path / "round-000003.npz"
    newest.write_bytes(newest.read_bytes()[:100])
    values, _, meta = ckpt.latest()
    assert meta["round"] == 2
    np.testing.assert_array_equal(values, np.full(5, 2, dtype=np.float32))
    err = capsys.readouterr().err
    assert "skipping checkpoint" in err and "round-000003.npz" in err


def test_a_checkpoint_the_file_system_will_not_give_back_stops_the_resume(tmp_path, monkeypatch, capsys):
    """An I/O error (a flaky parallel file system, permissions) is not damage: skipping the file resumed from an
    older round, or with none left started afresh and cleared the run's rows. It stops the resume instead."""

    from fedmpi.errors import CheckpointUnreadable

    ckpt = Checkpoints(tmp_path, keep=3)
    save_rounds(ckpt, [1, 2])
    unreadable(monkeypatch, "round-000002.npz")
    with pytest.raises(
        CheckpointUnreadable, match=r"round-000002.npz: cannot be read \(Input/output error\).*--overwrite"
    ):
        ckpt.latest()
    assert "skipping" not in capsys.readouterr().err
    monkeypatch.undo()
    assert ckpt.latest()[2]["round"] == 2


def test_latest_none_when_all_corrupt(tmp_path, capsys):
    ckpt = Checkpoints(tmp_path, keep=2)
    save_rounds(ckpt, [1, 2])
    for p in ckpt.paths():
        p.write_bytes(b"")
    assert ckpt.latest() is None
    assert capsys.readouterr().err.count("skipping checkpoint") == 2


def test_model_round_trip_is_sparse(tmp_path):
    rng = np.random.default_rng(0)
    n = 20000
    values = rng.standard_normal(n).astype(np.float32)
    mask = rng.random(n) >= 0.9  # about 90% pruned
    values[~mask] = 0
    path = tmp_path / "model.npz"
    size = save_model(path, values, mask, {"sparsity": 0.9})
    got, got_mask, meta = load_model(path)
    assert meta == {"sparsity": 0.9}
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got_mask, mask)
    np.testing.assert_array_equal(got, values)
    dense = save_arrays(tmp_path / "dense.npz", {"values": values, "mask": mask}, {})
    assert size == path.stat().st_size
    assert size < 0.25 * dense
    assert no_temporaries(tmp_path) == []


def test_model_stores_float32_and_zeroes_pruned(tmp_path):
    values = np.array([1.5, 2.5, -3.0, 4.0], dtype=np.float64)
    mask = np.array([True, False, True, False])
    save_model(tmp_path / "m.npz", values, mask, {})
    got, got_mask, _ = load_model(tmp_path / "m.npz")
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, [1.5, 0, -3.0, 0])
    np.testing.assert_array_equal(got_mask, mask)


def test_model_digest_is_of_the_float32_parameters_not_the_file(tmp_path):
    values = np.array([1.5, 0.0, -3.0], dtype=np.float64)
    assert model_digest(values) == hashlib.sha256(np.array([1.5, 0.0, -3.0], "<f4").tobytes()).hexdigest()
    save_model(tmp_path / "a.npz", values, values != 0, {"config": {"run": {"dir": "runs"}}})
    save_model(tmp_path / "b.npz", values, values != 0, {"config": {"run": {"dir": "/scratch/runs"}}})
    (a, _, _), (b, _, _) = (load_model(tmp_path / n) for n in ("a.npz", "b.npz"))
    assert (tmp_path / "a.npz").read_bytes() != (tmp_path / "b.npz").read_bytes()
    assert model_digest(a) == model_digest(b) == model_digest(values)
    assert model_digest(values + 1e-6) != model_digest(values)


def test_load_model_refuses_a_checkpoint(tmp_path):
    Checkpoints(tmp_path).save(1, np.zeros(3), np.ones(3, bool), {})
    with pytest.raises(CheckpointError, match="not a fedmpi model"):
        load_model(tmp_path / "round-000001.npz")


def test_load_model_refuses_bad_encoding(tmp_path):
    path = tmp_path / "m.npz"
    save_arrays(path, {"sparse": np.frombuffer(b"XXXX" + bytes(40), dtype=np.uint8)}, {})
    with pytest.raises(CheckpointError, match=r"m.npz"):
        load_model(path)


def test_no_temporary_files_after_many_saves(tmp_path):
    ckpt = Checkpoints(tmp_path, keep=2)
    save_rounds(ckpt, range(1, 8))
    save_model(tmp_path / "model.npz", np.ones(10, np.float32), np.ones(10, bool), {})
    assert no_temporaries(tmp_path) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.npz", "round-000006.npz", "round-000007.npz"]


def test_file_is_a_plain_zip_of_npy_members(tmp_path):
    """Readable without fedmpi (np.load, no pickle), metadata as UTF-8 JSON."""
    path = tmp_path / "a.npz"
    save_arrays(path, {"x": np.arange(3)}, {"k": "v"})
    with zipfile.ZipFile(path) as z:
        assert sorted(z.namelist()) == ["meta.npy", "x.npy"]
    with np.load(path, allow_pickle=False) as z:
        meta = json.loads(z["meta"].tobytes())
    assert meta["k"] == "v" and len(meta["sha256"]) == 64


def test_checksum_mismatch_on_reshaped_array(tmp_path):
    path = tmp_path / "a.npz"
    arrays, old_meta = _saved(path)
    arrays["grid"] = arrays["grid"].reshape(4, 3, 2)  # same bytes, same dtype, other shape
    rewrite(path, arrays, old_meta)
    with pytest.raises(CheckpointError, match="checksum"):
        load_arrays(path)


def test_member_order_in_the_archive_does_not_matter(tmp_path):
    path = tmp_path / "a.npz"
    save_arrays(path, ARRAYS, {"round": 1})
    with zipfile.ZipFile(path) as z:
        members = [(i, z.read(i)) for i in z.infolist()]
    with zipfile.ZipFile(path, "w") as z:
        for info, data in reversed(members):
            z.writestr(info, data)
    arrays, meta = load_arrays(path)
    assert meta == {"round": 1} and set(arrays) == set(ARRAYS)


def test_a_save_replaces_the_file_never_rewrites_it_in_place(tmp_path):
    """A reader (or a crash) during a save sees the old file or the new one: the new one is a new inode
    renamed over the name, so a hard link to the old file still holds the old checkpoint whole."""
    ckpt = Checkpoints(tmp_path, keep=2)
    ckpt.save(1, np.zeros(5, np.float32), np.ones(5, bool), {})
    old = tmp_path / "old-link"
    os.link(tmp_path / "round-000001.npz", old)
    ckpt.save(1, np.ones(5, np.float32), np.ones(5, bool), {})
    np.testing.assert_array_equal(load_arrays(old)[0]["values"], np.zeros(5, np.float32))
    np.testing.assert_array_equal(ckpt.latest()[0], np.ones(5, np.float32))


def test_a_checkpoint_killed_mid_write_leaves_no_temporary_once_the_run_goes_on(tmp_path):
    """A kill during round 6's checkpoint (a stop's, with checkpoint_every=5) left its temporary; the resume
    from round 5 never writes round 6's again, so only a write of that name would have removed it: it stayed
    for good, a model's size each time. Any checkpoint's write now removes those of dead processes."""
    import socket
    import subprocess
    import sys

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    host = socket.gethostname()
    ckpt = Checkpoints(tmp_path, keep=1)
    left = tmp_path / f".round-000006.npz.tmp-{host}-{int(dead.stdout)}-abc.tmp"
    live = tmp_path / f".round-000007.npz.tmp-{host}-{os.getpid()}-abc.tmp"
    other = tmp_path / f".notes.txt.tmp-{host}-{int(dead.stdout)}-abc.tmp"
    for path in (left, live, other):
        path.write_bytes(b"half")
    save_rounds(ckpt, [10])
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([live.name, other.name, "round-000010.npz"])
