"""Registration to MNI (register.py): matrix convention and missing extra without ANTs; with ANTs,
on scanner-space synthetic subjects: recovered anatomy, transform round trip, quality check."""

import json
import os
import shutil
import subprocess
import sys

import h5py
import nibabel as nib
import numpy as np
import pytest

from preprocess import cli, convert, grid, nifti, register, synth

VOXEL = 4
# MNI mm: brain centre, 60 mm left/right, front and back of the brain, vertex, temporal lobe level.
LANDMARKS = np.array(
    [[0, -18, 12], [60, -18, 12], [-60, -18, 12], [0, 60, 12], [0, -90, 12], [0, -18, 70], [0, -18, -40]], dtype=float
)


def _apply(matrix, points):
    return points @ matrix[:3, :3].T + matrix[:3, 3]


def _corr(a, b, mask):
    return float(np.corrcoef(a[mask], b[mask])[0, 1])


def _image(root, pid):
    return root / pid / "anat" / f"{pid}_T1w.nii.gz"


def _truth(root, pid):
    """The subject's ground-truth MNI-space volume, preprocessed like the registered output."""
    return nifti.preprocess_file(synth.truth_paths(root, pid)["mni"], VOXEL, grid.brain_mask(VOXEL))


def test_ras_from_itk_follows_the_itk_convention():
    rng = np.random.default_rng(0)
    q, _ = np.linalg.qr(rng.normal(size=(3, 3)))
    a = q * np.sign(np.linalg.det(q)) @ np.diag([1.05, 0.97, 1.02])
    t, c = rng.uniform(-20, 20, 3), rng.uniform(-10, 10, 3)
    ras = register.ras_from_itk(np.concatenate([a.ravel(), t]), c)
    flip = np.array([-1.0, -1.0, 1.0])
    for x in rng.uniform(-80, 80, (5, 3)):
        lps = a @ (x * flip - c) + t + c  # ITK: fixed (template) point -> moving (subject) point, LPS
        np.testing.assert_allclose(_apply(ras, x[None])[0], lps * flip, atol=1e-9)
    np.testing.assert_array_equal(ras[3], [0, 0, 0, 1])


@pytest.mark.parametrize(
    "flags, expected",
    [
        (["--register", "affine"], "--register affine needs the optional antspyx"),
        (
            ["--register", "rigid", "--skull-strip", "deepbet"],
            "--register rigid and --skull-strip deepbet need the optional antspyx and deepbet",
        ),
    ],
)
def test_missing_extra_is_one_line_and_exit_2(tmp_path, capsys, monkeypatch, flags, expected):
    for module in ("ants", "deepbet"):
        monkeypatch.setitem(sys.modules, module, None)  # as if the register extra were not installed
    out = tmp_path / "v.h5"
    assert cli.main(["nifti", "--bids", str(tmp_path), "--out", str(out), "--quiet", *flags]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"preprocess: error: {expected}, not installed"), err
    assert err.rstrip().endswith("pip install -e '.[register]'") and "Traceback" not in err
    assert not out.exists()


def test_registration_options_need_register(tmp_path, capsys):
    for flag in (["--skull-strip", "deepbet"], ["--min-ncc", "0.4"]):
        with pytest.raises(SystemExit) as exc:
            cli.main(["nifti", "--bids", str(tmp_path), "--out", str(tmp_path / "v.h5"), *flag])
        assert exc.value.code == 2
        assert "add --register affine or rigid" in capsys.readouterr().err


def test_retries_with_the_next_seed_and_reports_the_best(native_cohort, monkeypatch):
    """Pure logic (ANTs replaced): a failed attempt is retried; no good attempt is bad input."""
    pid = "sub-0001"
    truth = synth.read_truth_matrix(synth.truth_paths(native_cohort, pid)["mni_to_native"])
    far = np.eye(4)
    far[:3, 3] = 500.0
    seen = []

    def fake(attempts):
        def estimate(data, affine, method, ref, seed):
            seen.append(seed)
            return attempts[seed]

        return estimate

    args = (
        _image(native_cohort, pid),
        VOXEL,
        grid.brain_mask(VOXEL),
        register.Options("affine"),
        register.reference(VOXEL),
    )
    monkeypatch.setattr(register, "estimate", fake({1: far, 2: np.eye(4), 3: truth}))
    done = register.preprocess_file(*args)
    assert seen == [1, 2, 3] and np.array_equal(done.mni_to_native, truth) and done.ncc >= 0.5
    monkeypatch.setattr(register, "estimate", fake({1: np.eye(4), 2: far, 3: np.eye(4)}))
    with pytest.raises(
        nifti.BadImage,
        match=r"sub-0001_T1w.nii.gz registration quality too low: template "
        r"correlation 0\.\d\d < 0.5 \(--min-ncc\) after 3 attempts.*--skull-strip deepbet$",
    ):
        register.preprocess_file(*args)
    monkeypatch.setattr(register, "estimate", fake({1: far, 2: far, 3: far}))
    with pytest.raises(nifti.BadImage, match="every attempt left the brain outside the image"):
        register.preprocess_file(*args)


def test_non_finite_voxels_are_refused_before_registration(tmp_path):
    """Missing (NaN) voxels are for images already in MNI space; registration needs every voxel."""
    data = np.ones((20, 20, 20), np.float32)
    data[0, 0, :2] = np.nan
    nib.save(nib.Nifti1Image(data, np.eye(4)), tmp_path / "nan.nii.gz")
    mask = grid.brain_mask(VOXEL)
    with pytest.raises(nifti.BadImage, match=r"nan.nii.gz has 2 non-finite voxels .* registration needs every voxel"):
        register.preprocess_file(tmp_path / "nan.nii.gz", VOXEL, mask, register.Options("affine"), None)


@pytest.fixture(scope="session")
def ants():
    """Skips ANTs tests where the register extra is not installed (before building any cohort)."""
    return pytest.importorskip("ants")


@pytest.fixture(scope="module")
def registered(ants, native_cohort, tmp_path_factory):
    out = tmp_path_factory.mktemp("registered") / f"v{VOXEL}.h5"
    assert (
        cli.main(
            [
                "nifti",
                "--bids",
                str(native_cohort),
                "--out",
                str(out),
                "--voxel",
                str(VOXEL),
                "--register",
                "affine",
                "--workers",
                "2",
                "--quiet",
            ]
        )
        == 0
    )
    return out


def test_affine_output_matches_the_ground_truth(registered, native_cohort):
    """r >= 0.9 with the true MNI-space volume for every subject; without registration far below."""
    mask = grid.brain_mask(VOXEL)
    with h5py.File(registered, "r") as f:
        ids = list(f["subject_id"].asstr()[:])
        images = f["images"][:].astype(np.float32)
        ncc = f["registration_ncc"][:]
        assert f["mni_to_native"].shape == (len(ids), 4, 4) and f["mni_to_native"].dtype == np.float64
        params = json.loads(f.attrs["preprocessing"])
    assert len(ids) == 4 and params["registration"] == "affine" and params["min_ncc"] == 0.5
    assert np.all(ncc >= 0.5)
    for pid, vol in zip(ids, images):
        truth = _truth(native_cohort, pid)
        plain = nifti.preprocess_file(_image(native_cohort, pid), VOXEL, mask)
        r_reg, r_plain = _corr(vol, truth, mask), _corr(plain, truth, mask)
        print(f"{pid}: registered r={r_reg:.3f}, unregistered r={r_plain:.3f}")
        assert r_reg >= 0.9, (pid, r_reg)
        assert r_plain < 0.7 and r_reg - r_plain > 0.3, (pid, r_plain)


def test_stored_transform_maps_template_landmarks_to_the_subject(registered, native_cohort):
    """Template landmarks -> scanner space by the true pose -> back by the stored matrix: within a voxel."""
    with h5py.File(registered, "r") as f:
        ids = list(f["subject_id"].asstr()[:])
        stored = f["mni_to_native"][:]
    for pid, matrix in zip(ids, stored):
        truth = synth.read_truth_matrix(synth.truth_paths(native_cohort, pid)["mni_to_native"])
        back = _apply(np.linalg.inv(matrix), _apply(truth, LANDMARKS))
        err = np.linalg.norm(back - LANDMARKS, axis=1)
        print(f"{pid}: landmark round trip max {err.max():.2f} mm")
        assert err.max() < VOXEL, (pid, err)
        moved = np.linalg.norm(_apply(truth, LANDMARKS) - LANDMARKS, axis=1)
        assert moved.max() > 2 * VOXEL  # the pose was worth recovering


def test_rigid_registration_is_a_rotation_and_a_shift(ants, native_cohort):
    pid = "sub-0001"
    data, affine = nifti.to_ras(*nifti.load(_image(native_cohort, pid)))
    matrix = register.estimate(data, affine, "rigid", register.reference(VOXEL))
    rot = matrix[:3, :3]
    np.testing.assert_allclose(rot.T @ rot, np.eye(3), atol=1e-4)
    assert abs(np.linalg.det(rot) - 1) < 1e-4
    truth = synth.read_truth_matrix(synth.truth_paths(native_cohort, pid)["mni_to_native"])
    centre = np.array([[0.0, -18.0, 12.0]])
    assert np.linalg.norm(_apply(matrix, centre) - _apply(truth, centre)) < 2 * VOXEL


def test_registration_is_reproducible_whatever_itk_threads_the_environment_asks_for(ants, native_cohort):
    """ITK sums the metric over its threads in no fixed order: with several, the same seed gave another matrix
    from run to run (so the volumes differed and two copies of one scan escaped the duplicate check). A fresh
    process whose environment asks ITK for 4 threads must give the same matrix twice, and the one-thread one."""
    image = _image(native_cohort, "sub-0001")
    script = (
        "import sys, numpy as np\n"
        "from preprocess import nifti, register\n"
        "data, affine = nifti.to_ras(*nifti.load(sys.argv[1]))\n"
        "ref = register.reference(4)\n"
        "np.save(sys.argv[2], np.stack([register.estimate(data, affine, 'affine', ref) for _ in range(2)]))\n"
    )
    out = {}
    for threads in ("4", None):
        env = {k: v for k, v in os.environ.items() if k != "ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"}
        if threads:
            env["ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"] = threads
        path = native_cohort.parent / f"matrices-{threads}.npy"
        subprocess.run([sys.executable, "-c", script, str(image), str(path)], env=env, check=True)
        out[threads] = np.load(path)
    assert np.array_equal(out["4"][0], out["4"][1])
    assert np.array_equal(out["4"][0], out[None][0])


def _bad_subjects(native_cohort, root, good=(), bad=("sub-flip", "sub-noise")):
    """A BIDS dir with `good` copied from the native cohort plus an upside-down head and/or an image of noise."""
    root.mkdir()
    rows = [f"{pid}\t60\tF\tA" for pid in good + bad]
    for pid in good:
        shutil.copytree(native_cohort / pid, root / pid)
    img = nib.load(_image(native_cohort, "sub-0002"))
    data, affine = nifti.to_ras(np.asarray(img.dataobj, np.float32), img.affine)
    noise = np.random.default_rng(0).rayleigh(50.0, data.shape).astype(np.float32)
    for pid, arr in (("sub-flip", data[:, :, ::-1]), ("sub-noise", noise)):
        if pid not in bad:
            continue
        _image(root, pid).parent.mkdir(parents=True)
        nib.save(nib.Nifti1Image(np.ascontiguousarray(arr), affine), _image(root, pid))
    (root / "participants.tsv").write_text("participant_id\tage\tsex\tsite\n" + "\n".join(rows) + "\n")
    return root


def test_wrong_input_fails_the_quality_check(ants, native_cohort, tmp_path, capsys):
    root = _bad_subjects(native_cohort, tmp_path / "bad")
    out = tmp_path / "v.h5"
    args = [
        "nifti",
        "--bids",
        str(root),
        "--out",
        str(out),
        "--voxel",
        "6",
        "--register",
        "affine",
        "--workers",
        "2",
        "--quiet",
    ]
    assert cli.main(args) == 2
    err = capsys.readouterr().err
    for pid in ("sub-flip", "sub-noise"):
        assert any(
            line.strip().startswith(f"{pid}:") and "registration quality too low" in line for line in err.splitlines()
        ), err
    assert "Traceback" not in err and not out.exists() and not convert.parts_dir(out).exists()


def test_skip_bad_keeps_the_good_registrations(ants, native_cohort, tmp_path, capsys):
    root = _bad_subjects(native_cohort, tmp_path / "bad", good=("sub-0003",), bad=("sub-flip",))
    out = tmp_path / "v.h5"
    assert (
        cli.main(
            [
                "nifti",
                "--bids",
                str(root),
                "--out",
                str(out),
                "--voxel",
                "6",
                "--register",
                "affine",
                "--workers",
                "2",
                "--quiet",
                "--skip-bad",
                "--min-ncc",
                "0.45",
            ]
        )
        == 0
    )
    assert "skipped 1 bad subject(s)" in capsys.readouterr().err
    with h5py.File(out, "r") as f:
        assert list(f["subject_id"].asstr()[:]) == ["sub-0003"]
        assert f["registration_ncc"][0] >= 0.45
        assert json.loads(f.attrs["preprocessing"])["min_ncc"] == 0.45
    report = convert.skipped_report_path(out).read_text()
    assert report.startswith("participant_id\treason\nsub-flip\t") and "< 0.45 (--min-ncc)" in report
