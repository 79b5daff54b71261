"""Registration quality (qc.py): the template-correlation figure and the QC report."""

import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

from preprocess import cli, grid, h5io, qc


def test_template_ncc_is_a_correlation_inside_the_mask():
    rng = np.random.default_rng(0)
    template = rng.normal(size=(6, 7, 8)).astype(np.float32)
    mask = np.zeros(template.shape, bool)
    mask[1:5, 1:6, 2:7] = True
    assert qc.template_ncc(3 * template + 2, template, mask) == pytest.approx(1.0)
    assert qc.template_ncc(-template, template, mask) == pytest.approx(-1.0)
    outside_only = np.where(mask, template, 100.0)
    assert qc.template_ncc(outside_only, template, mask) == pytest.approx(1.0)
    assert abs(qc.template_ncc(rng.normal(size=template.shape), template, mask)) < 0.3
    assert np.isnan(qc.template_ncc(np.ones(template.shape), template, mask))


def test_mni_space_cohort_scores_above_the_threshold(cohort):
    _table, figures, source = qc.quality(cohort.h5)
    assert source == "computed" and len(figures) == cohort.subjects
    assert figures.min() > qc.DEFAULT_MIN_NCC, figures.min()


def _with_one_upside_down(cohort, path, row=2):
    """A copy of the session cohort file whose subject `row` is stored upside down."""
    h5io.copy_rows(cohort.h5, path, np.arange(6), {})
    with h5py.File(path, "a") as f:
        f["images"][row] = f["images"][row][:, :, ::-1]
        return f["subject_id"].asstr()[row]


def test_report_lists_worst_first_and_flags_bad_subjects(cohort, tmp_path):
    pytest.importorskip("matplotlib")
    bad = _with_one_upside_down(cohort, tmp_path / "v.h5")
    out = tmp_path / "qc"
    assert qc.write_report(tmp_path / "v.h5", out) == (out, 6, 1)
    rows = (out / "qc.tsv").read_text().splitlines()
    assert rows[0] == "participant_id\tsite\tage\tregistration_ncc\tstatus" and len(rows) == 7
    first = rows[1].split("\t")
    assert first[0] == bad and first[4] == f"below {qc.DEFAULT_MIN_NCC:g}" and float(first[3]) < 0.45
    assert all(r.endswith("\tok") for r in rows[2:])
    png = (out / "mosaic-001.png").read_bytes()
    assert png.startswith(b"\x89PNG") and 10_000 < len(png) < 1_000_000
    assert sorted(p.name for p in out.iterdir()) == ["mosaic-001.png", "qc.tsv"]

    assert qc.write_report(tmp_path / "v.h5", out, min_ncc=0.99)[2] == 6  # a report is replaced as a whole
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "keep.txt").write_text("x")
    with pytest.raises(FileExistsError, match="not a QC report"):
        qc.write_report(tmp_path / "v.h5", tmp_path / "mine")


def _registered(path, shape_voxel=6, voxel=6):
    """A two-subject file with stored figures: a report of it draws one small mosaic page."""
    shape, affine = grid.target_grid(shape_voxel)
    table = {
        "age": [50.0, 60.0],
        "subject_id": ["a", "b"],
        "sex": ["F", "M"],
        "site": ["X", "X"],
        "registration_ncc": [0.8, 0.3],
        "mni_to_native": [np.eye(4), np.eye(4)],
    }
    attrs = h5io.base_attrs(voxel, shape, affine, {"min_ncc": 0.35}, "fp")
    return h5io.write_volumes(path, [np.zeros(shape)] * 2, table, attrs)


def test_stored_figures_and_threshold_are_used(tmp_path):
    _registered(tmp_path / "r.h5")
    _, figures, source = qc.quality(tmp_path / "r.h5")
    assert source == "stored" and figures == pytest.approx([0.8, 0.3])
    assert qc.recorded_threshold(tmp_path / "r.h5") == 0.35


def test_cli_qc_and_missing_matplotlib(cohort, tmp_path, capsys, monkeypatch):
    pytest.importorskip("matplotlib")
    h5io.copy_rows(cohort.h5, tmp_path / "v.h5", np.arange(3), {})
    assert cli.main(["qc", "--h5", str(tmp_path / "v.h5"), "--out", str(tmp_path / "qc")]) == 0
    assert "mosaics of 3 subjects" in capsys.readouterr().out
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert cli.main(["qc", "--h5", str(tmp_path / "v.h5"), "--out", str(tmp_path / "qc2")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pip install -e '.[report]'" in err and not (tmp_path / "qc2").exists()


def _out_under_a_file(tmp_path):
    (tmp_path / "somefile").write_text("x")
    return tmp_path / "somefile" / "qc", "somefile is a file, not a directory"


def _out_under_proc(tmp_path):
    return Path("/proc/fedmpi-qc/qc"), "cannot write --out /proc/fedmpi-qc/qc: cannot create files in /proc"


def _out_holding_the_input(tmp_path):
    out = tmp_path / "rep"
    out.mkdir()
    (out / qc.REPORT_MARKER).write_text("an earlier report")
    return out, "lies inside --out"


@pytest.mark.parametrize("make", [_out_under_a_file, _out_under_proc, _out_holding_the_input])
def test_cli_qc_refuses_an_out_it_cannot_write_in_one_line(tmp_path, capsys, make):
    pytest.importorskip("matplotlib")
    out, message = make(tmp_path)
    h5 = _registered((out if make is _out_holding_the_input else tmp_path) / "v.h5")
    before = sorted(tmp_path.rglob("*"))
    assert cli.main(["qc", "--h5", str(h5), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err
    assert sorted(tmp_path.rglob("*")) == before and h5.is_file()


def test_qc_refuses_images_off_the_mni_grid_of_their_voxel_size(tmp_path):
    h5 = _registered(tmp_path / "v.h5", shape_voxel=6, voxel=4)
    with pytest.raises(
        h5io.DataError, match=r"v.h5 holds images of 30x36x30 voxels, not the 4 mm MNI grid \(45x54x45\)"
    ):
        qc.quality(h5)


def test_a_blank_volume_is_flagged_and_listed_first(tmp_path):
    """A constant volume has no template correlation (nan): it is below any threshold and the worst."""
    pytest.importorskip("matplotlib")
    shape, affine = grid.target_grid(6)
    table = {"age": [50.0, 60.0], "subject_id": ["good", "blank"], "sex": ["F", "M"], "site": ["X", "X"]}
    attrs = h5io.base_attrs(6, shape, affine, {}, "fp")
    h5 = h5io.write_volumes(tmp_path / "v.h5", [grid.template(6), np.zeros(shape)], table, attrs)
    assert qc.write_report(h5, tmp_path / "qc") == (tmp_path / "qc", 2, 1)
    rows = [r.split("\t") for r in (tmp_path / "qc" / "qc.tsv").read_text().splitlines()[1:]]
    assert [(r[0], r[3], r[4]) for r in rows] == [("blank", "nan", "below 0.5"), ("good", "1.0000", "ok")]


def test_min_ncc_zero_is_a_threshold_not_a_default(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    h5 = _registered(tmp_path / "r.h5")  # stored figures 0.8 and 0.3, registered with --min-ncc 0.35
    assert qc.write_report(h5, tmp_path / "a")[2] == 1
    assert qc.write_report(h5, tmp_path / "b", min_ncc=0.0)[2] == 0
    assert cli.main(["qc", "--h5", str(h5), "--out", str(tmp_path / "c"), "--min-ncc", "0"]) == 0
    assert "0 below the threshold" in capsys.readouterr().out


def test_an_existing_empty_directory_is_a_valid_out(tmp_path):
    pytest.importorskip("matplotlib")
    h5 = _registered(tmp_path / "r.h5")
    (tmp_path / "empty").mkdir()
    assert qc.write_report(h5, tmp_path / "empty")[1] == 2
    assert (tmp_path / "empty" / "qc.tsv").is_file()


@pytest.mark.parametrize("value", ["nan", "x", "1.5", "-2"])
def test_min_ncc_must_be_a_correlation(tmp_path, capsys, value):
    with pytest.raises(SystemExit, match=r"^2$"):
        cli.main(["qc", "--h5", str(tmp_path / "v.h5"), "--out", str(tmp_path / "qc"), "--min-ncc", value])
    err = capsys.readouterr().err
    assert f"argument --min-ncc: must be a correlation in [-1, 1], got {value}" in err and "Traceback" not in err


def test_an_existing_foreign_directory_as_out_is_one_error_line(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "keep.txt").write_text("x")
    h5 = _registered(tmp_path / "r.h5")
    assert cli.main(["qc", "--h5", str(h5), "--out", str(tmp_path / "mine")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is not a QC report directory" in err
    assert sorted(p.name for p in (tmp_path / "mine").iterdir()) == ["keep.txt"]


def test_an_unknown_age_is_n_a_in_the_report():
    """preprocess nifti --ages-optional stores an unknown age as NaN; qc.tsv wrote it as nan."""
    assert qc._age(float("nan")) == "n/a" and qc._age(61.26) == "61.3"
