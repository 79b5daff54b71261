"""The synthetic cohort: reproducible subjects, per-site acquisition, a real age effect."""

import csv
import json
import os
import signal

import nibabel as nib
import numpy as np
import pytest

from fedmpi.config import MAX_WORKERS
from preprocess import cli, grid, nifti, parallel, synth


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
    assert (
        cli.main(
            ["synth", "--out", str(tmp_path / "n"), "--subjects", "1", "--workers", "1", "--quiet", "--space", "native"]
        )
        == 0
    )
    assert all(p.is_file() for p in synth.truth_paths(tmp_path / "n", "sub-0001").values())
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


@pytest.mark.parametrize(
    "args, message",
    [
        (["--subjects", "abc"], "argument --subjects: expected an integer, got 'abc'"),
        (["--seed", "1.5"], "argument --seed: expected an integer, got '1.5'"),
        (["--workers", ""], "argument --workers: expected an integer, got ''"),
        (["--subjects", "1e400"], "argument --subjects: expected an integer, got '1e400'"),
        (["--subjects", "0.0"], "argument --subjects: must be >= 1, got 0"),
    ],
)
def test_cli_synth_non_integers_name_what_is_expected(tmp_path, capsys, args, message):
    """In the words of fedmpi's --set for an integer option ("train.epochs: expected an integer, got '1.5'")."""
    with pytest.raises(SystemExit, match=r"^2$"):
        cli.main(["synth", "--out", str(tmp_path / "d"), *args])
    assert capsys.readouterr().err.splitlines()[-1] == f"preprocess: error: {message}"
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("given", ["1e3", "1000.0", "1_000", "1000"])
def test_cli_counts_take_a_whole_valued_float_as_fedmpi_does(given):
    """--subjects 1e3 was refused while fedmpi's --set data.subjects=1e3 takes it: the same integer rule for both."""
    parser = cli.build_parser()
    synth_args = parser.parse_args(["synth", "--out", "d", "--subjects", given, "--seed", given, "--workers", "2.0"])
    assert (synth_args.subjects, synth_args.seed, synth_args.workers) == (1000, 1000, 2)
    assert parser.parse_args(["split", "--h5", "a.h5", "--out", "d", "--learners", "8.0"]).learners == 8
    assert parser.parse_args(["nifti", "--bids", "b", "--out", "o.h5", "--workers", "1e0"]).workers == 1


def test_cli_synth_a_count_the_disk_cannot_hold_is_one_line_before_any_work(tmp_path, capsys):
    """10**12 subjects died in a traceback drawing 7 TiB of ages; the disk check comes first."""
    assert cli.main(["synth", "--out", str(tmp_path / "d"), "--subjects", "1e12", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"preprocess: error: --out {tmp_path / 'd'} needs at least 1,500,000 TB and {tmp_path} has ")
    assert err.count("\n") == 1 and list(tmp_path.iterdir()) == []


def test_cli_synth_out_under_proc_is_one_line(capsys):
    assert cli.main(["synth", "--out", "/proc/fedmpi-synth", "--subjects", "1", "--quiet"]) == 2
    err = capsys.readouterr().err  # the reason (errno) differs between root and other users
    assert err.startswith("preprocess: error: cannot write --out /proc/fedmpi-synth: cannot create files in /proc (")
    assert err.count("\n") == 1


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
    assert err.startswith("preprocess: error: a synth worker process died while processing ") and "sub-0002" in err
    assert "Traceback" not in err and list(tmp_path.iterdir()) == []


def test_head_pose_is_rigid_bounded_and_reproducible():
    people = synth.draw_subjects(40, seed=0)
    poses = [synth.head_pose(p) for p in people]
    for pose in poses:
        rot = pose[:3, :3]
        np.testing.assert_allclose(rot.T @ rot, np.eye(3), atol=1e-12)
        assert np.linalg.det(rot) == pytest.approx(1.0)
        shift = pose[:3, :3] @ synth.BRAIN_CENTRE + pose[:3, 3] - synth.BRAIN_CENTRE
        assert np.all(np.abs(shift) <= synth.MAX_SHIFT_MM)
        angle = np.degrees(np.arccos((np.trace(rot) - 1) / 2))
        assert angle <= np.sqrt(3) * synth.MAX_ROTATION_DEG
    angles = [np.degrees(np.arccos((np.trace(p[:3, :3]) - 1) / 2)) for p in poses]
    assert np.median(angles) > 5  # most heads are really turned
    np.testing.assert_array_equal(synth.head_pose(people[3]), poses[3])


def test_native_space_head_is_moved_in_the_voxels(native_cohort):
    """Resampling through the true matrix recovers the truth; reading the scan as MNI does not."""
    mask = grid.brain_mask(4)
    desc = json.loads((native_cohort / "dataset_description.json").read_text())
    assert desc["space"] == "native" and synth.is_complete(native_cohort, 4, 1, "native")
    assert not synth.is_complete(native_cohort, 4, 1)
    for row in _participants(native_cohort):
        pid = row["participant_id"]
        paths = synth.truth_paths(native_cohort, pid)
        img = nib.load(native_cohort / pid / "anat" / f"{pid}_T1w.nii.gz")
        data = np.asarray(img.dataobj, np.float32)
        matrix = synth.read_truth_matrix(paths["mni_to_native"])
        truth = nifti.preprocess_file(paths["mni"], 4, mask)
        placed = nifti.to_mni(data, np.linalg.inv(matrix) @ img.affine, 4, mask)
        as_is = nifti.to_mni(data, img.affine, 4, mask)
        assert np.corrcoef(placed[mask], truth[mask])[0, 1] > 0.98
        assert np.corrcoef(as_is[mask], truth[mask])[0, 1] < 0.7
        brain = np.asarray(nib.load(paths["brain_mask"]).dataobj) > 0
        assert brain.shape == data.shape and 1.3 < brain.sum() * np.prod(img.header.get_zooms()) / 1e6 < 2.4
        assert data[brain].mean() > 2 * data[~brain].mean()  # a head with a dark skull/air around the brain


def test_mni_space_cohort_is_unchanged(cohort):
    desc = json.loads((cohort.bids / "dataset_description.json").read_text())
    assert "space" not in desc and not (cohort.bids / "derivatives").exists()
    assert not synth.is_complete(cohort.bids, cohort.subjects, cohort.seed, "native")
    with pytest.raises(ValueError, match="space must be one of"):
        synth.write_cohort(cohort.bids, cohort.subjects, cohort.seed, space="scanner")


def test_linear_part_of_a_known_affine_warp():
    shape, affine = (20, 22, 18), np.diag([2.0, 2.0, 2.0, 1.0])
    d = np.array([[1.05, 0.02, 0, 3], [0, 0.97, 0.01, -2], [0, 0, 1.01, 1], [0, 0, 0, 1]])
    vox = np.linalg.inv(affine) @ d @ affine
    idx = np.indices(shape, dtype=np.float32).reshape(3, -1)
    coords = (vox[:3, :3] @ idx + vox[:3, 3:4]).reshape((3, *shape))
    np.testing.assert_allclose(synth.linear_part(coords, affine, np.ones(shape, bool)), d, atol=1e-4)


def test_draw_subjects_depends_on_the_seed_has_one_decimal_and_shuffles_sites():
    a = synth.draw_subjects(100, seed=3)
    b = synth.draw_subjects(100, seed=4)
    assert [s.age for s in a] != [s.age for s in b]  # not only Subject.seed: the demographics differ
    ages = np.array([s.age for s in a])
    np.testing.assert_allclose(ages, np.round(ages, 1))
    assert np.mean(ages != np.round(ages)) > 0.5  # one decimal, not whole years
    assert [s.site for s in a] != [synth.SITES[i % 4].name for i in range(100)]  # shuffled, not round-robin


def test_each_subject_gets_its_own_head_pose():
    people = synth.draw_subjects(10, seed=0)
    assert len({synth.head_pose(p).tobytes() for p in people}) == 10
    other_seed = synth.draw_subjects(10, seed=1)[0]
    assert not np.array_equal(synth.head_pose(other_seed), synth.head_pose(people[0]))


def test_is_complete_compares_subjects_seed_and_space(tmp_path):
    (tmp_path / "dataset_description.json").write_text(json.dumps(synth.description(4, 7)))
    assert synth.is_complete(tmp_path, 4, 7)
    assert not synth.is_complete(tmp_path, 4, 8)
    assert not synth.is_complete(tmp_path, 5, 7)
    assert not synth.is_complete(tmp_path, 4, 7, "native")


def test_ventricle_growth_accelerates_with_age():
    anat = synth.anatomy()
    vent = [float((synth.tissue_fractions(anat, age)[2] * anat.vent_roi).sum()) for age in (45, 55, 65, 75)]
    assert np.all(np.diff(vent, 2) > 0), vent


def _head_volume_ml(subject, anat):
    img = synth.render(subject, anat)
    data = np.asarray(img.dataobj, np.float32)
    return (data > 0.3 * np.percentile(data, 99)).sum() * np.prod(img.header.get_zooms()[:3]) / 1000


def test_subjects_differ_beyond_demographics_and_female_heads_are_smaller():
    anat = synth.anatomy()
    one, other = (synth.Subject(i, f"sub-{i + 1:04d}", 60.0, "M", "A", 0) for i in (0, 1))
    a, b = (np.asarray(synth.render(s, anat).dataobj) for s in (one, other))
    assert a.shape != b.shape or np.mean(a != b) > 0.5  # own deformation, field of view, bias and noise
    female = synth.Subject(0, "sub-0001", 60.0, "F", "A", 0)  # same random stream as `one`: only the scale differs
    ratio = _head_volume_ml(female, anat) / _head_volume_ml(one, anat)
    assert 0.85 < ratio < 0.92, ratio  # 0.96 ** 3 = 0.885


def test_an_existing_foreign_directory_as_out_is_one_error_line(tmp_path, capsys):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "keep.txt").write_text("x")
    assert cli.main(["synth", "--out", str(tmp_path / "mine"), "--subjects", "2", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is not the cohort --subjects 2 --seed 0" in err
    assert sorted(p.name for p in (tmp_path / "mine").iterdir()) == ["keep.txt"]


@pytest.mark.parametrize("command", ["synth", "nifti"])
def test_cli_workers_are_bounded(tmp_path, capsys, command):
    """`--workers 10000` would start one process per subject, each with its imports and volumes: refused above
    fedmpi's MAX_WORKERS, before anything is written."""
    args = [command, "--out", str(tmp_path / "d"), "--workers", str(MAX_WORKERS + 1)]
    with pytest.raises(SystemExit, match=r"^2$"):
        cli.main(args + (["--bids", str(tmp_path)] if command == "nifti" else []))
    assert f"argument --workers: must be <= {MAX_WORKERS}, got {MAX_WORKERS + 1}" in capsys.readouterr().err
    assert not (tmp_path / "d").exists()


def test_cli_notes_more_workers_than_cpus(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(parallel, "default_workers", lambda: 1)
    assert cli.main(["synth", "--out", str(tmp_path / "c"), "--subjects", "2", "--workers", "2", "--quiet"]) == 0
    assert "note: --workers 2 on 1 CPU: the extra worker takes memory, not time" in capsys.readouterr().err
    assert cli.main(["synth", "--out", str(tmp_path / "c"), "--subjects", "2", "--workers", "1", "--quiet"]) == 0
    assert "note" not in capsys.readouterr().err
