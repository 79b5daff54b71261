"""Test hold-out and learner partitions: sizes, skew, disjointness, age structure, files."""
import json

import h5py
import numpy as np
import pytest

from preprocess import cli, split

AGES = np.random.default_rng(7).uniform(44.6, 80.7, size=2000)


def _check_cover(n, test, parts):
    everything = np.concatenate([test] + parts)
    assert len(everything) == n and len(np.unique(everything)) == n  # disjoint and complete


@pytest.mark.parametrize("distribution", split.DISTRIBUTIONS)
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
    assert split.age_bins(np.array([1.0, 2.0, 3.0]), 20).tolist() == [0, 10, 19]  # bins closed on the left, last one on both sides


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
    test, parts = split.partition(AGES, learners=8, distribution="skewed-noniid", seed=5)
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


@pytest.mark.parametrize("kwargs, message", [
    (dict(learners=3, distribution="uniform-noniid"), "must be even"),
    (dict(learners=0, distribution="uniform-iid"), ">= 1"),
    (dict(learners=2, distribution="zipf"), "unknown distribution"),
    (dict(learners=2, distribution="uniform-iid", test_fraction=1.0), "between 0 and 1"),
    (dict(learners=900, distribution="skewed-noniid"), "cannot give each of 900 learners"),
])
def test_impossible_splits_are_refused(kwargs, message):
    with pytest.raises(split.SplitError, match=message):
        split.partition(AGES[:1000], **kwargs)


def test_write_split_files_and_partition_json(cohort, tmp_path):
    out = split.write_split(cohort.h5, tmp_path / "s", learners=2, distribution="skewed-noniid", seed=0)
    summary = json.loads((out / "partition.json").read_text())
    assert summary["distribution"] == "skewed-noniid" and summary["seed"] == 0
    with h5py.File(cohort.h5, "r") as src:
        ids = list(src["subject_id"].asstr()[:])
        seen = []
        for entry, name in [(summary["test"], "test.h5")] + [
                (e, f"learner_{e['learner']}.h5") for e in summary["per_learner"]]:
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
    assert cli.main(["split", "--h5", str(cohort.h5), "--out", str(out), "--learners", "3",
                     "--distribution", "uniform-noniid"]) == 2
    assert "must be even" in capsys.readouterr().err
    assert cli.main(["split", "--h5", str(tmp_path / "none.h5"), "--out", str(out)]) == 2
    assert "none.h5 does not exist" in capsys.readouterr().err
    assert not out.exists() and list(tmp_path.iterdir()) == []
    assert cli.main(["split", "--h5", str(cohort.h5), "--out", str(out), "--learners", "2"]) == 0
    assert (out / "learner_2.h5").is_file()
