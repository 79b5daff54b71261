"""The synthetic cohort: reproducible subjects, per-site acquisition, a real age effect."""

import csv
import os
import signal

import nibabel as nib
import numpy as np
import pytest

from preprocess import cli, grid, synth


def _participants(bids):
    with open(bids / "participants.tsv", newline="") as f:
        return list(csv.DictReader(f, delimiter="\t"))


def test_draw_subjects_is_reproducible_and_in_range():
    a, b = synth.draw_subjects(100, seed=3), synth.draw_subjects(100, seed=3)
    assert a == b
    ages = np.array([s.age for s in a])
    assert ages.min() >= 45 and ages.max() <= 80 and ages.std() > 8
    sites = [s.site for s in a]
    assert {sites.count(x.name) for x in synth.SITES} == {25}
    assert {s.sex for s in a} == {"F", "M"}
    assert synth.draw_subjects(100, seed=4) != a


def test_cohort_layout_matches_participants(cohort):
    rows = _participants(cohort.bids)
    assert len(rows) == cohort.subjects
    assert list(rows[0]) == ["participant_id", "age", "sex", "site"]
    assert synth.is_complete(cohort.bids, cohort.subjects, cohort.seed)
    for row in rows:
        path = cohort.bids / row["participant_id"] / "anat" / f"{row['participant_id']}_T1w.nii.gz"
        assert path.is_file()
        assert 45 <= float(row["age"]) <= 80


def test_each_site_has_its_own_grid_orientation_and_storage(cohort):
    seen = {}
    for row in _participants(cohort.bids):
        pid = row["participant_id"]
        seen.setdefault(row["site"], nib.load(cohort.bids / pid / "anat" / f"{pid}_T1w.nii.gz"))
    assert set(seen) == {s.name for s in synth.SITES}
    for site in synth.SITES:
        img = seen[site.name]
        assert "".join(nib.aff2axcodes(img.affine)) == site.orientation
        np.testing.assert_allclose(img.header.get_zooms()[:3], site.voxel)
        assert img.get_data_dtype() == np.int16
        slope = img.dataobj.slope
        assert (slope != 1.0) == (site.dtype == "int16-scaled")


def test_ventricles_grow_with_age_in_the_model():
    anat = synth.anatomy()
    vent = [float((synth.tissue_fractions(anat, age)[2] * anat.vent_roi).sum()) for age in (45, 55, 65, 75, 80)]
    assert np.all(np.diff(vent) > 0)
    assert vent[-1] > 1.5 * vent[0]


def test_age_effect_survives_preprocessing(cohort):
    """Dark (CSF-like) voxels around the ventricles in the 4 mm volumes correlate with age."""
    import h5py

    with h5py.File(cohort.h5, "r") as f:
        images = f["images"][:].astype(np.float32)
        ages = f["age"][:]
    shape, affine = grid.target_grid(4)
    ijk = np.indices(shape).reshape(3, -1)
    x, y, z = (affine[:3, :3] @ ijk + affine[:3, 3:4]).reshape((3, *shape))
    roi = (np.abs(x) < 30) & (y > -50) & (y < 30) & (z > -5) & (z < 35) & grid.brain_mask(4)
    ventricle_volume = (images[:, roi] < -1.0).sum(axis=1)
    r = np.corrcoef(ventricle_volume, ages)[0, 1]
    assert r > 0.5, r


def test_write_cohort_refuses_a_foreign_directory(tmp_path):
    (tmp_path / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not the cohort"):
        synth.write_cohort(tmp_path, subjects=2, seed=0)
    assert (tmp_path / "keep.txt").read_text() == "mine"


def test_write_cohort_leaves_a_complete_cohort_alone(cohort):
    before = (cohort.bids / "participants.tsv").stat().st_mtime_ns
    assert synth.write_cohort(cohort.bids, cohort.subjects, cohort.seed) == cohort.bids
    assert (cohort.bids / "participants.tsv").stat().st_mtime_ns == before


def test_cli_synth_writes_a_cohort_and_rejects_bad_counts(tmp_path, capsys):
    assert cli.main(["synth", "--out", str(tmp_path / "c"), "--subjects", "2", "--workers", "1", "--quiet"]) == 0
    assert len(_participants(tmp_path / "c")) == 2
    with pytest.raises(SystemExit) as exc:
        cli.main(["synth", "--out", str(tmp_path / "d"), "--subjects", "0"])
    assert exc.value.code == 2
    assert "must be >= 1" in capsys.readouterr().err
    assert not (tmp_path / "d").exists()


def test_cli_synth_bad_seed_and_out_under_a_file_are_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit, match=r"^2$"):
        cli.main(["synth", "--out", str(tmp_path / "d"), "--seed", "-1"])
    assert "argument --seed: must be >= 0, got -1" in capsys.readouterr().err
    (tmp_path / "somefile").write_text("x")
    assert cli.main(["synth", "--out", str(tmp_path / "somefile" / "c"), "--subjects", "2", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "somefile is a file, not a directory" in err and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["somefile"]


def _write_or_die(job):
    """synth._write_subject in a spawned worker, except that sub-0002's worker is killed."""
    if job[0].participant_id == "sub-0002":
        os.kill(os.getpid(), signal.SIGKILL)
    return synth._write_subject(job)


def test_a_killed_synth_worker_is_named_and_leaves_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(synth, "_write_subject", _write_or_die)
    out = tmp_path / "c"
    assert cli.main(["synth", "--out", str(out), "--subjects", "2", "--workers", "2", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: a synth worker process died while processing ") and "sub-0002" in err
    assert "Traceback" not in err and list(tmp_path.iterdir()) == []
