"""Test hold-out and learner partitions: sizes, skew, disjointness, age structure, files."""

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

from preprocess import cli, h5io, split
from preprocess.distributions import DISTRIBUTIONS

AGES = np.random.default_rng(7).uniform(44.6, 80.7, size=2000)


def _check_cover(n, test, parts):
    everything = np.concatenate([test, *parts])
    assert len(everything) == n and len(np.unique(everything)) == n  # disjoint and complete


@pytest.mark.parametrize("distribution", DISTRIBUTIONS)
def test_partitions_are_disjoint_and_complete(distribution):
    test, parts = split.partition(AGES, learners=8, distribution=distribution, seed=1)
    assert len(parts) == 8
    _check_cover(len(AGES), test, parts)


def test_test_set_holds_20_percent_of_every_age_bin():
    test, _ = split.partition(AGES, learners=8, distribution="uniform-iid", seed=2)
    bins = split.age_bins(AGES)
    held = np.bincount(bins[test], minlength=20)
    total = np.bincount(bins, minlength=20)
    np.testing.assert_array_equal(held, np.floor(0.2 * total + 0.5))
    assert split.age_bins(np.array([1.0, 2.0, 3.0]), 20).tolist() == [
        0,
        10,
        19,
    ]  # bins closed on the left, last one on both sides


def test_uniform_iid_sizes_and_histograms_match():
    _, parts = split.partition(AGES, learners=8, distribution="uniform-iid", seed=3)
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1
    means = [AGES[p].mean() for p in parts]
    assert max(means) - min(means) < 1.0
    edges = np.linspace(AGES.min(), AGES.max(), 11)
    hists = np.array([np.histogram(AGES[p], edges)[0] for p in parts])
    assert (hists.max(axis=0) - hists.min(axis=0)).max() <= 2


def test_uniform_noniid_equal_sizes_shifted_pairs():
    _, parts = split.partition(AGES, learners=8, distribution="uniform-noniid", seed=4)
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1
    means = np.array([AGES[p].mean() for p in parts])
    pair_means = means.reshape(4, 2)
    assert np.all(np.abs(pair_means[:, 0] - pair_means[:, 1]) < 1.5)  # pairs share a range
    assert np.all(np.diff(pair_means.mean(axis=1)) > 5)  # ranges shift by pair
    assert means.max() - means.min() > 20


def test_skewed_noniid_sizes_follow_1_35_and_ages_differ():
    _test, parts = split.partition(AGES, learners=8, distribution="skewed-noniid", seed=5)
    sizes = np.array([len(p) for p in parts])
    n = sizes.sum()
    w = 1.35 ** -np.arange(8)
    assert np.all(np.abs(sizes - n * w / w.sum()) < 1)  # exact up to rounding
    ratios = sizes[:-1] / sizes[1:]
    assert np.all(np.abs(ratios - 1.35) < 0.1)
    means = [AGES[p].mean() for p in parts]
    assert max(means) - min(means) > 15


def test_skewed_sizes_are_close_to_the_paper():
    paper = np.array([2401, 1765, 1303, 964, 714, 528, 391, 290])
    ours = split.skewed_sizes(int(paper.sum()), 8)
    assert ours.sum() == paper.sum()
    np.testing.assert_allclose(ours, paper, rtol=0.01)


def test_any_learner_count_and_seeds():
    for k in (1, 2, 3, 5):
        test, parts = split.partition(AGES, learners=k, distribution="skewed-noniid", seed=0)
        _check_cover(len(AGES), test, parts)
    a = split.partition(AGES, learners=4, distribution="uniform-iid", seed=0)
    b = split.partition(AGES, learners=4, distribution="uniform-iid", seed=0)
    c = split.partition(AGES, learners=4, distribution="uniform-iid", seed=1)
    assert all(np.array_equal(x, y) for x, y in zip(a[1], b[1]))
    assert not all(np.array_equal(x, y) for x, y in zip(a[1], c[1]))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(learners=3, distribution="uniform-noniid"), "must be even"),
        (dict(learners=0, distribution="uniform-iid"), ">= 1"),
        (dict(learners=2, distribution="zipf"), "unknown distribution"),
        (dict(learners=2, distribution="uniform-iid", test_fraction=1.0), "between 0 and 1"),
        (dict(learners=900, distribution="skewed-noniid"), "cannot give each of 900 learners"),
    ],
)
def test_impossible_splits_are_refused(kwargs, message):
    with pytest.raises(split.SplitError, match=message):
        split.partition(AGES[:1000], **kwargs)


def test_too_many_learners_are_refused_before_any_is_sized(monkeypatch):
    def sized(n, k):
        raise AssertionError(f"skewed_sizes({n}, {k}) allocates {k} numbers")

    monkeypatch.setattr(split, "skewed_sizes", sized)
    with pytest.raises(split.SplitError, match="cannot give each of 1000000000 learners"):
        split.partition(AGES[:100], learners=10**9, distribution="skewed-noniid")


def _directory(tmp_path):
    return tmp_path, f"volume file {tmp_path} is a directory; give the HDF5 file"


def _numeric_ids(tmp_path):
    table = {"age": [50.0, 60.0], "subject_id": ["a", "b"], "sex": ["F", "M"], "site": ["X", "X"]}
    attrs = h5io.base_attrs(4, (3, 4, 5), np.eye(4), {}, "fp")
    path = h5io.write_volumes(tmp_path / "v.h5", iter(np.zeros((2, 3, 4, 5))), table, attrs)
    with h5py.File(path, "a") as f:
        del f["subject_id"]
        f["subject_id"] = np.arange(2)
    return path, f"volume file {path} stores subject_id as int64, not text"


@pytest.mark.parametrize("make", [_directory, _numeric_ids])
def test_unusable_input_files_are_one_line(tmp_path, capsys, make):
    h5, message = make(tmp_path)
    out = tmp_path / "s"
    assert cli.main(["split", "--h5", str(h5), "--out", str(out), "--learners", "2"]) == 2
    err = capsys.readouterr().err
    assert err == f"preprocess: error: {message}\n" and not out.exists()


def test_write_split_files_and_partition_json(cohort, tmp_path):
    out = split.write_split(cohort.h5, tmp_path / "s", learners=2, distribution="skewed-noniid", seed=0)
    summary = json.loads((out / "partition.json").read_text())
    assert summary["distribution"] == "skewed-noniid" and summary["seed"] == 0
    with h5py.File(cohort.h5, "r") as src:
        ids = list(src["subject_id"].asstr()[:])
        seen = []
        for entry, name in [(summary["test"], "test.h5")] + [
            (e, f"learner_{e['learner']}.h5") for e in summary["per_learner"]
        ]:
            with h5py.File(out / name, "r") as f:
                rows = [ids.index(s) for s in f["subject_id"].asstr()[:]]
                seen += rows
                assert entry["size"] == len(rows)
                assert entry["age_mean"] == pytest.approx(float(f["age"][:].mean()), abs=1e-3)
                np.testing.assert_array_equal(f["images"][0], src["images"][rows[0]])
                assert f.attrs["voxel_size"] == src.attrs["voxel_size"]
                assert json.loads(f.attrs["split"])["distribution"] == "skewed-noniid"
        assert sorted(seen) == list(range(len(ids)))
    # a second split replaces the first; a foreign directory is refused
    split.write_split(cohort.h5, out, learners=3, distribution="uniform-iid")
    assert sorted(p.name for p in out.glob("learner_*.h5")) == ["learner_1.h5", "learner_2.h5", "learner_3.h5"]
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "notes.txt").write_text("x")
    with pytest.raises(split.SplitError, match="not a split directory"):
        split.write_split(cohort.h5, tmp_path / "foreign")


def test_cli_split_errors_leave_no_output(cohort, tmp_path, capsys):
    out = tmp_path / "s"
    assert (
        cli.main(
            ["split", "--h5", str(cohort.h5), "--out", str(out), "--learners", "3", "--distribution", "uniform-noniid"]
        )
        == 2
    )
    assert "must be even" in capsys.readouterr().err
    assert cli.main(["split", "--h5", str(tmp_path / "none.h5"), "--out", str(out)]) == 2
    assert "none.h5 does not exist" in capsys.readouterr().err
    assert not out.exists() and list(tmp_path.iterdir()) == []
    assert cli.main(["split", "--h5", str(cohort.h5), "--out", str(out), "--learners", "2"]) == 0
    assert (out / "learner_2.h5").is_file()


def test_a_second_split_into_the_same_directory_is_refused(cohort, tmp_path, capsys):
    """Two splits into one --out: the second swept the first's temporary directory as a killed split's, and the
    first failed writing into it; now the second is refused while the first runs, and the first's files stay."""
    import fcntl

    out = tmp_path / "s"
    assert cli.main(["split", "--h5", str(cohort.h5), "--out", str(out), "--learners", "2"]) == 0
    before = (out / "partition.json").read_bytes()
    with open(tmp_path / ".s.lock", "w") as held:  # as the running one holds it
        fcntl.flock(held, fcntl.LOCK_EX)
        assert cli.main(["split", "--h5", str(cohort.h5), "--out", str(out), "--learners", "3"]) == 2
    assert f"another process is writing --out {out}" in capsys.readouterr().err
    assert (out / "partition.json").read_bytes() == before and not (out / "learner_3.h5").exists()
    assert cli.main(["split", "--h5", str(cohort.h5), "--out", str(out), "--learners", "3"]) == 0
    assert (out / "learner_3.h5").is_file()


@pytest.mark.parametrize(
    "ages, kwargs, message",
    [
        (np.r_[AGES[:99], np.nan], {}, "1 of 100 ages are not finite numbers"),
        (np.r_[AGES[:98], np.inf, -np.inf], {}, "2 of 100 ages are not finite numbers"),
        (AGES[:100], {"seed": -1}, "--seed must be >= 0, got -1"),
        (AGES[:1000], {"test_fraction": 0.005}, "holds out no subject"),
        (AGES[:40], {"test_fraction": 0.05}, "holds out no subject"),
    ],
)
def test_unusable_ages_and_parameters_are_split_errors(ages, kwargs, message):
    with pytest.raises(split.SplitError, match=message):
        split.partition(ages, learners=2, distribution="uniform-iid", **kwargs)


def test_smallest_fraction_named_in_the_message_works():
    with pytest.raises(split.SplitError, match=r"use at least (\S+)$") as exc:
        split.partition(AGES[:40], learners=2, distribution="uniform-iid", test_fraction=0.05)
    least = float(str(exc.value).rsplit(" ", 1)[1])
    test, _ = split.partition(AGES[:40], learners=2, distribution="uniform-iid", test_fraction=least)
    assert len(test) > 0


@pytest.mark.parametrize("largest", [3, 6, 7, 9, 11, 13, 14])
def test_the_smallest_fraction_named_is_rounded_up_so_that_it_works(largest):
    # 0.5 / 7 = 0.0714285... once showed as 0.0714, and 0.0714 x 7 = 0.4998 rounds to 0: the suggestion failed
    ages = np.concatenate([np.full(largest, 50.0), 50.0 + 2.0 * np.arange(1, 21)])
    with pytest.raises(split.SplitError, match=r"use at least (\S+)$") as exc:
        split.partition(ages, learners=2, distribution="uniform-iid", test_fraction=0.01)
    least = float(str(exc.value).rsplit(" ", 1)[1])
    assert least <= 0.5 / largest * 1.01
    test, _ = split.partition(ages, learners=2, distribution="uniform-iid", test_fraction=least)
    assert len(test) > 0


def _with_ages(cohort, path, changes, age_range=None):
    shutil.copy(cohort.h5, path)
    with h5py.File(path, "a") as f:
        for row, age in changes.items():
            f["age"][row] = age
        if age_range is not None:
            f.attrs["age_range"] = np.asarray(age_range, dtype=np.float64)
    return path


@pytest.mark.parametrize("age", [-5.0, 0.0, 300.0, 1e3, np.nan, np.inf])
def test_split_refuses_a_file_with_an_unusable_age(cohort, tmp_path, capsys, age):
    h5 = _with_ages(cohort, tmp_path / "v.h5", {3: age})
    out = tmp_path / "s"
    assert cli.main(["split", "--h5", str(h5), "--out", str(out), "--learners", "2"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert f"has 1 subject(s) with an unusable age: sub-0004 ({age:g}); ages must be finite and in (0, 120] " in err
    assert ("--ages-optional) can be dated by fedmpi predict, not split" in err) == bool(np.isnan(age))
    assert not out.exists()


def test_split_honours_the_age_range_recorded_by_nifti(cohort, tmp_path):
    h5 = _with_ages(cohort, tmp_path / "v.h5", {0: 140.0, 1: 0.5}, age_range=(0.0, 150.0))
    split.write_split(h5, tmp_path / "s", learners=2)
    h5 = _with_ages(cohort, tmp_path / "w.h5", {0: 140.0, 1: 0.5, 2: 0.1}, age_range=(1.0, 150.0))
    with pytest.raises(
        split.SplitError,
        match=r"2 subject\(s\) with an unusable age: sub-0002 \(0.5\), "
        r"sub-0003 \(0.1\); ages must be finite and in \(1, 150\] years",
    ):
        split.write_split(h5, tmp_path / "t", learners=2, distribution="skewed-noniid")


@pytest.mark.parametrize(
    "age_range, said",
    [
        ((0.0, 400.0), r"attribute age_range \(0, 400\] years is not within -1 to 150 years"),
        ((-2.0, 100.0), r"attribute age_range \(-2, 100\] years is not within -1 to 150 years"),
        ((90.0, 10.0), r"attribute age_range \(90, 10\] years is not within -1 to 150 years"),
        ((0.0, np.nan), r"attribute age_range \(0, nan\] years is not within -1 to 150 years"),
        ((0.0, 50.0, 100.0), r"attribute age_range \S.* is not two numbers MIN MAX"),
    ],
)
def test_split_refuses_an_age_range_preprocessing_no_longer_writes(cohort, tmp_path, age_range, said):
    """--age-range is held within bids.HUMAN_AGES, the trainer's bound on a learner's mean age: a file made before
    (ages in months, range 0..400) was split, and the server then refused the learner's record as one 'no volume
    file gives'. The split names the attribute and the fix."""
    h5 = _with_ages(cohort, tmp_path / "v.h5", {0: 300.0}, age_range=age_range)
    with pytest.raises(split.SplitError, match=rf"^volume file {re.escape(str(h5))}: {said}"):
        split.write_split(h5, tmp_path / "s", learners=2)
    assert not (tmp_path / "s").exists()


@pytest.mark.parametrize(
    "args, message",
    [
        (["--seed", "-1"], "argument --seed: must be >= 0, got -1"),
        (["--test-fraction", "0.01"], "--test-fraction 0.01 holds out no subject"),
    ],
)
def test_cli_bad_seed_and_empty_test_set_are_one_line(cohort, tmp_path, args, message):
    out = tmp_path / "s"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "preprocess",
            "split",
            "--h5",
            str(cohort.h5),
            "--out",
            str(out),
            "--learners",
            "2",
            *args,
        ],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2
    assert message in proc.stderr and "Traceback" not in proc.stderr
    assert not out.exists()


def test_rerun_replaces_only_the_files_a_split_owns(cohort, tmp_path, monkeypatch):
    out = split.write_split(cohort.h5, tmp_path / "s", learners=3)
    (out / "notes.txt").write_text("mine")
    (out / "learner_notes.h5").write_text("also mine")
    (out / "extra").mkdir()
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    real, calls = split.h5io.copy_rows, []

    def fail_third(*args):
        calls.append(args)
        if len(calls) == 3:
            raise OSError(28, "No space left on device")
        return real(*args)

    monkeypatch.setattr(split.h5io, "copy_rows", fail_third)
    with pytest.raises(OSError, match="No space"):
        split.write_split(cohort.h5, out, learners=4)
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before  # the old split is whole
    monkeypatch.undo()

    split.write_split(cohort.h5, out, learners=2, distribution="skewed-noniid", seed=4)
    assert sorted(p.name for p in out.iterdir()) == [
        "extra",
        "learner_1.h5",
        "learner_2.h5",
        "learner_notes.h5",
        "notes.txt",
        "partition.json",
        "test.h5",
    ]
    assert (out / "notes.txt").read_text() == "mine" and (out / "learner_notes.h5").read_text() == "also mine"
    new = json.loads((out / "partition.json").read_text())
    assert new["learners"] == 2 and new["seed"] == 4 and len(new["per_learner"]) == 2
    with h5py.File(out / "learner_2.h5", "r") as f:
        assert json.loads(f.attrs["split"])["distribution"] == "skewed-noniid"
    assert sorted(tmp_path.iterdir()) == [tmp_path / ".s.lock", out]  # nothing built or left beside it but the lock


def test_an_interrupted_split_directory_is_reused(cohort, tmp_path):
    out = tmp_path / "s"
    (out / (split.TMP_PREFIX + "abc")).mkdir(parents=True)  # a split killed while copying
    (out / (split.TMP_PREFIX + "abc") / "test.h5").write_bytes(b"half")
    (out / "learner_1.h5").write_bytes(b"old")
    split.write_split(cohort.h5, out, learners=2)
    assert sorted(p.name for p in out.iterdir()) == ["learner_1.h5", "learner_2.h5", "partition.json", "test.h5"]


@pytest.mark.parametrize("where", ["test.h5", "v4.h5", "sub/v4.h5"])
def test_out_holding_the_input_is_refused(cohort, tmp_path, capsys, where):
    out = split.write_split(cohort.h5, tmp_path / "s", learners=2)
    h5 = out / where
    h5.parent.mkdir(exist_ok=True)
    shutil.copy(cohort.h5, h5)
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert cli.main(["split", "--h5", str(h5), "--out", str(out), "--learners", "3"]) == 2
    err = capsys.readouterr().err
    assert f"the input {h5} lies inside --out {out}" in err and "Traceback" not in err
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


def _under_a_file(tmp_path):
    (tmp_path / "somefile").write_text("x")
    return tmp_path / "somefile" / "s", "somefile is a file, not a directory"


def _a_file(tmp_path):
    (tmp_path / "s").write_text("x")
    return tmp_path / "s", "exists and is not a directory"


def _owned_name_is_a_directory(tmp_path):
    (tmp_path / "s" / "learner_2.h5").mkdir(parents=True)
    return tmp_path / "s", "learner_2.h5 is not a file"


def _under_proc(tmp_path):
    return Path("/proc/fedmpi-split"), "cannot write --out /proc/fedmpi-split: cannot create files in /proc"


@pytest.mark.parametrize("make", [_under_a_file, _a_file, _owned_name_is_a_directory, _under_proc])
def test_unwritable_split_outputs_are_one_line(cohort, tmp_path, capsys, make):
    out, message = make(tmp_path)
    before = sorted(str(p) for p in tmp_path.rglob("*"))
    assert cli.main(["split", "--h5", str(cohort.h5), "--out", str(out), "--learners", "2"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err and "Traceback" not in err
    assert sorted(str(p) for p in tmp_path.rglob("*")) == before


def test_skewed_sizes_give_the_remainder_to_the_largest_fractions():
    """10 subjects over 3 learners at 1.35^-i: exact shares 4.37, 3.24, 2.40 round to 4, 3, 3."""
    assert split.skewed_sizes(10, 3).tolist() == [4, 3, 3]


def test_a_skewed_split_that_would_leave_a_learner_empty_is_refused():
    with pytest.raises(split.SplitError, match="cannot give each"):
        split.check(5, 5, "skewed-noniid")
