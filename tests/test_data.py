"""The trainer's loader: VolumeDataset, read_header, the checks of a file's contents."""

import shutil

import h5py
import numpy as np
import pytest
import torch
from fedtools import SHAPE, write_volumes
from torch.utils.data import DataLoader

from fedmpi.config import Config
from fedmpi.data import VolumeDataset, check_volumes, file_digest, open_volumes, read_header
from fedmpi.errors import DataError, UserError
from preprocess import h5io


def test_item_shape_dtype_and_values(cohort):
    ds = VolumeDataset(cohort.h5)
    assert len(ds) == cohort.subjects and ds.shape == (45, 54, 45) and ds.voxel_size == 4.0
    x, age = ds[3]
    assert x.shape == (1, 45, 54, 45) and x.dtype == torch.float32
    assert age.dtype == torch.float32 and age.shape == ()
    with h5py.File(cohort.h5, "r") as f:
        np.testing.assert_array_equal(x[0].numpy(), f["images"][3].astype(np.float32))
        assert float(age) == f["age"][3]
        np.testing.assert_array_equal(ds.ages, f["age"][:])
    assert torch.equal(ds[-1][0], ds[len(ds) - 1][0])
    with pytest.raises(IndexError):
        ds[len(ds)]


def test_read_header(cohort):
    header = read_header(cohort.h5)
    assert header["n"] == cohort.subjects and header["shape"] == (45, 54, 45)
    assert header["voxel_size"] == 4.0
    assert header["mean_age"] == pytest.approx(float(VolumeDataset(cohort.h5).ages.mean()))


def test_cache_keeps_decoded_volumes(cohort, tmp_path):
    path = tmp_path / "c.h5"
    shutil.copy(cohort.h5, path)
    cached = VolumeDataset(path, cache=True)
    first = cached[0][0]
    assert cached[0][0] is first
    cached.close()
    path.unlink()  # a cached volume no longer needs the file
    assert torch.equal(cached[0][0], first)
    plain = VolumeDataset(cohort.h5)
    assert plain[0][0] is not plain[0][0]


def test_dataloader_workers_open_their_own_handles(cohort):
    ds = VolumeDataset(cohort.h5)
    expected = torch.stack([ds[i][0] for i in range(len(ds))])  # the parent opens a handle first
    loader = DataLoader(ds, batch_size=4, num_workers=2, shuffle=False)
    got = torch.cat([x for x, _ in loader])
    ages = torch.cat([a for _, a in loader])
    assert torch.equal(got, expected)
    np.testing.assert_array_equal(ages.numpy(), ds.ages)


def test_bad_files_raise_data_error_naming_the_file(cohort, tmp_path):
    with pytest.raises(DataError, match=r"absent.h5"):
        VolumeDataset(tmp_path / "absent.h5")
    (tmp_path / "junk.h5").write_bytes(b"junk" * 1000)
    with pytest.raises(DataError, match=r"junk.h5"):
        read_header(tmp_path / "junk.h5")
    data = cohort.h5.read_bytes()
    (tmp_path / "cut.h5").write_bytes(data[: len(data) - 5000])
    with pytest.raises(DataError, match=r"cut.h5"):
        VolumeDataset(tmp_path / "cut.h5")
    with h5py.File(tmp_path / "partial.h5", "w") as f:
        f["images"] = np.zeros((2, 3, 3, 3), np.float16)
    with pytest.raises(DataError, match=r"partial.h5 lacks dataset"):
        VolumeDataset(tmp_path / "partial.h5")
    assert issubclass(DataError, UserError) and DataError is h5io.DataError


def test_damaged_chunk_raises_data_error(cohort, tmp_path):
    path = tmp_path / "d.h5"
    shutil.copy(cohort.h5, path)
    with h5py.File(path, "a") as f:
        f["images"].id.write_direct_chunk((2, 0, 0, 0), b"not deflate data", 0)
    ds = VolumeDataset(path)
    ds[1]
    with pytest.raises(DataError, match=r"d.h5: cannot read volume 2"):
        ds[2]


@pytest.fixture
def small(tmp_path):
    path = tmp_path / "v.h5"
    write_volumes(path, np.array([45.3, 61.7, 79.9, 50.1, 70.2]), np.random.default_rng(0))
    with h5py.File(path, "a") as f:  # subjects not in sorted order, so file order is observable
        del f["subject_id"]
        f.create_dataset(
            "subject_id", data=np.array(["sub-c", "sub-a", "sub-e", "sub-b", "sub-d"], dtype=h5py.string_dtype())
        )
    return path


def test_items_are_the_files_volumes_and_ages_in_file_order(small):
    ds = VolumeDataset(small)
    with h5py.File(small, "r") as f:
        images, ages = f["images"][:], f["age"][:]
    assert ds.subject_ids == ["sub-c", "sub-a", "sub-e", "sub-b", "sub-d"]
    assert ds.ages.dtype == np.float32 and np.array_equal(ds.ages, ages)
    for i in [0, 2, 4, -1, -5]:
        x, age = ds[i]
        assert x.dtype == torch.float32 and x.shape == (1, *SHAPE) and age.dtype == torch.float32
        assert np.array_equal(x[0].numpy(), images[i].astype(np.float32)) and float(age) == ages[i]
    header = read_header(small)
    assert header["mean_age"] == pytest.approx(float(ages.mean())) and header["n"] == 5


@pytest.mark.parametrize("cache,cached", [("memory", True), ("device", True), ("off", False)])
def test_open_volumes_caches_as_configured(small, cache, cached):
    cfg = Config()
    cfg.data.cache = cache
    ds = open_volumes(small, cfg, torch.device("cpu"))
    assert (ds[1][0] is ds[1][0]) == cached


def _file(path, ages, seed=0):
    write_volumes(path, np.asarray(ages, np.float64), np.random.default_rng(seed))
    return path


@pytest.mark.parametrize("bad", [float("nan"), 0.0, -5.0, 300.0, 1e3, float("inf")])
def test_implausible_or_missing_ages_are_refused_naming_the_file(tmp_path, bad):
    path = _file(tmp_path / "learner_3.h5", [50.0, 61.5, 70.0])
    with h5py.File(path, "r+") as f:
        f["age"][1] = bad
    with pytest.raises(DataError, match=r"learner_3.h5: 1 age\(s\) not in \(0, 120\] years: #1"):
        check_volumes(path)


@pytest.mark.parametrize("sid", ["sub-01\rsub-02", "sub-01\n", "sub\t01"])
def test_a_subject_id_with_a_control_character_is_refused_naming_the_file(tmp_path, sid):
    """test_predictions.csv and predict's CSV hold one row per subject: the csv module wrote a carriage return
    unquoted, splitting a row in two."""
    path = _file(tmp_path / "test.h5", [50.0, 61.5, 70.0])
    with h5py.File(path, "r+") as f:
        f["subject_id"][2] = sid
    with pytest.raises(DataError, match=r"test.h5: subject_id #2 .* holds a control character"):
        check_volumes(path)
    with h5py.File(path, "r+") as f:
        f["subject_id"][2] = 'sub-02, "quoted" é'  # a comma, quotes and non-ASCII are an id's to hold
    assert check_volumes(path)["n"] == 3


def test_an_age_range_outside_human_ages_is_refused_naming_the_file(tmp_path):
    """A file made before --age-range was held to bids.HUMAN_AGES (ages in months, range 0..300) passed this check,
    and the server refused its learner's mean age as a record 'no volume file gives', blaming the rank."""
    path = _file(tmp_path / "learner_1.h5", [250.0, 280.0])
    with h5py.File(path, "r+") as f:
        f.attrs["age_range"] = np.asarray([0.0, 300.0])
    with pytest.raises(
        DataError, match=r"learner_1.h5: attribute age_range \(0, 300\] years is not within -1 to 150 years"
    ):
        check_volumes(path)


def test_non_finite_volume_and_empty_file_are_refused(tmp_path):
    path = _file(tmp_path / "test.h5", [50.0, 60.0, 70.0])
    with h5py.File(path, "r+") as f:
        vol = f["images"][2]
        vol[3, 3, 3] = np.nan
        f["images"][2] = vol
    with pytest.raises(DataError, match=r"test.h5: volume 2 holds non-finite values"):
        check_volumes(path)
    empty = tmp_path / "empty.h5"
    with h5py.File(path, "r") as src, h5py.File(empty, "w") as dst:
        for name in src:
            dst.create_dataset(name, data=src[name][:0], maxshape=src[name].shape)
        dst.attrs.update(src.attrs)
    with pytest.raises(DataError, match=r"empty.h5: no volumes"):
        check_volumes(empty)


@pytest.mark.parametrize("cache", [True, False], ids=["cached", "read each time"])
def test_a_non_finite_volume_the_preflight_does_not_sample_is_named_when_read(tmp_path, cache):
    """check_volumes reads three volumes; one of the others with a NaN made the learner's model NaN, blamed on the
    learner ("non-finite model values") with the file unnamed."""
    path = _file(tmp_path / "learner_2.h5", [50.0, 55.0, 60.0, 65.0, 70.0])
    with h5py.File(path, "r+") as f:
        vol = f["images"][1]
        vol[2, 2, 2] = np.inf
        f["images"][1] = vol
    check_volumes(path)  # volumes 0, 2 and 4: the sample misses it
    ds = VolumeDataset(path, cache=cache)
    with pytest.raises(DataError, match=r"learner_2.h5: volume 1 holds non-finite values"):
        ds.warm() if cache else ds[1]


def test_digest_follows_the_subjects_not_the_file(tmp_path):
    a = _file(tmp_path / "a.h5", [50.0, 60.0])
    b = _file(tmp_path / "b.h5", [50.0, 60.0])  # same subjects and ages, written anew
    c = _file(tmp_path / "c.h5", [50.0, 61.0])
    assert file_digest(a) == file_digest(b) != file_digest(c)
    assert check_volumes(a)["digest"] == file_digest(a)


@pytest.mark.parametrize("layout", [{"chunks": (1, *SHAPE), "compression": "gzip"}, {}], ids=["chunked", "contiguous"])
@pytest.mark.parametrize("stored", [">f2", ">f4"])
@pytest.mark.parametrize("cache", ["memory", "device", "off"])
def test_big_endian_images_are_read_as_their_values(small, tmp_path, layout, stored, cache):
    # Files written by other tools may store big-endian floats; they passed the preflight (numpy reads them) and the
    # learner then failed on torch.from_numpy ("byte order different from the native byte order"): a traceback.
    path = tmp_path / "learner_1.h5"
    shutil.copy(small, path)
    with h5py.File(path, "a") as f:
        want = f["images"][:].astype(np.float32)
        del f["images"]
        f.create_dataset("images", data=want.astype(stored), **layout)
    check_volumes(path)
    cfg = Config()
    cfg.data.cache = cache
    ds = open_volumes(path, cfg, torch.device("cpu")).warm()
    for i in range(len(ds)):
        assert ds[i][0].dtype == torch.float32 and np.array_equal(ds[i][0][0].numpy(), want[i])


def test_a_damaged_volume_read_by_a_dataloader_worker_is_one_line(small, tmp_path):
    # torch re-raises a worker's exception in the training process as its type with the worker's traceback for its
    # message, which the rank's one-line failure report printed whole (data.workers > 0)
    from fedmpi.errors import user_message

    path = tmp_path / "learner_1.h5"
    shutil.copy(small, path)
    with h5py.File(path, "r") as f:
        info = f["images"].id.get_chunk_info(3)
    with open(path, "r+b") as fh:
        fh.seek(info.byte_offset + info.size // 2)
        byte = fh.read(1)
        fh.seek(-1, 1)
        fh.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(DataError) as caught:
        list(DataLoader(VolumeDataset(path), batch_size=5, num_workers=1))
    assert "Traceback" in str(caught.value)
    line = user_message(caught.value)
    assert line.startswith(f"volume file {path}: cannot read volume 3: Error -3 while decompressing data"), line
    assert "\n" not in line and user_message(DataError("x: y")) == "x: y"
