"""Brain extraction with deepbet (skullstrip.py) on scanner-space synthetic heads, and end to end."""

import shutil

import h5py
import nibabel as nib
import numpy as np
import pytest

from preprocess import cli, grid, nifti, skullstrip, synth

PID = "sub-0002"  # site D: 2 mm voxels, the smallest image, so the test stays short


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Overlap of two boolean masks: 2|A and B| / (|A| + |B|)."""
    a, b = np.asarray(a, bool), np.asarray(b, bool)
    total = int(a.sum()) + int(b.sum())
    return 2.0 * int((a & b).sum()) / total if total else 1.0


@pytest.fixture(scope="session")
def deepbet():
    """Skips where the register extra is not installed (before building any cohort)."""
    return pytest.importorskip("deepbet")


def test_mask_overlaps_the_true_brain(deepbet, native_cohort):
    img = nib.load(native_cohort / PID / "anat" / f"{PID}_T1w.nii.gz")
    mask = skullstrip.brain_mask(np.asarray(img.dataobj, np.float32), img.affine)
    truth = np.asarray(nib.load(synth.truth_paths(native_cohort, PID)["brain_mask"]).dataobj) > 0
    assert mask.shape == truth.shape
    print(f"{PID}: deepbet Dice {dice(mask, truth):.3f}")
    assert dice(mask, truth) >= 0.8, dice(mask, truth)


def test_no_brain_is_bad_input(deepbet):
    with pytest.raises(nifti.BadImage, match=r"skull stripping .deepbet. found no brain"):
        skullstrip.brain_mask(np.zeros((64, 64, 64), np.float32), np.eye(4))


def test_skull_strip_then_register_end_to_end(deepbet, native_cohort, tmp_path):
    pytest.importorskip("ants")
    root = tmp_path / "bids"
    root.mkdir()
    shutil.copytree(native_cohort / PID, root / PID)
    (root / "participants.tsv").write_text(f"participant_id\tage\n{PID}\t60\n")
    out = tmp_path / "v6.h5"
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
                "--skull-strip",
                "deepbet",
                "--workers",
                "1",
                "--quiet",
            ]
        )
        == 0
    )
    mask = grid.brain_mask(6)
    truth = nifti.preprocess_file(synth.truth_paths(native_cohort, PID)["mni"], 6, mask)
    with h5py.File(out, "r") as f:
        vol = f["images"][0].astype(np.float32)
        assert '"skull_strip": "deepbet"' in f.attrs["preprocessing"]
    r = np.corrcoef(vol[mask], truth[mask])[0, 1]
    print(f"{PID}: deepbet + affine r={r:.3f}")
    assert r >= 0.9
