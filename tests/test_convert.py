"""`python -m preprocess nifti`: bad input, --skip-bad, resume after interruption, up-to-date outputs."""

import gzip
import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import h5py
import nibabel as nib
import numpy as np
import pytest

from preprocess import cli, convert, grid, h5io, nifti, register

GOOD = ("sub-0001", "sub-0002")


def _make_bids(cohort, root, extra_rows=(), ages=None):
    """A BIDS dir with two good subjects copied from the session cohort plus `extra_rows`."""
    ages = ages or {}
    root.mkdir()
    rows = []
    for pid in GOOD:
        shutil.copytree(cohort.bids / pid, root / pid)
        rows.append(f"{pid}\t{ages.get(pid, '60.5')}\tF\tA")
    rows += list(extra_rows)
    (root / "participants.tsv").write_text("participant_id\tage\tsex\tsite\n" + "\n".join(rows) + "\n")
    return root


def _image(root, pid):
    path = root / pid / "anat" / f"{pid}_T1w.nii.gz"
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def _garbage(root, pid):
    _image(root, pid).write_bytes(b"garbage" * 100)


def _truncated(root, pid):
    src = _image(root, GOOD[0]).read_bytes()
    _image(root, pid).write_bytes(src[: len(src) // 2])


def _truncated_nii(root, pid):
    """Uncompressed: nibabel's message for it spans two lines."""
    img = nib.load(_image(root, GOOD[0]))
    path = _image(root, pid).with_suffix("")
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj, np.float32), img.affine), path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _frames(root, pid):
    nib.save(nib.Nifti1Image(np.ones((8, 8, 8, 2), np.float32), np.eye(4)), _image(root, pid))


def _nonfinite(root, pid):
    img = nib.load(_image(root, GOOD[0]))
    nib.save(nib.Nifti1Image(np.full(img.shape, np.nan, np.float32), img.affine), _image(root, pid))


def _zeros(root, pid):
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 8), np.int16), np.eye(4)), _image(root, pid))


def _copy_good(root, pid):
    shutil.copy(_image(root, GOOD[0]), _image(root, pid))


def _huge_header(path):
    """A few hundred bytes whose header claims 700^3 voxels (refused before any voxel is read)."""
    hdr = nib.Nifti1Header()
    hdr.set_data_shape((700, 700, 700))
    hdr.set_data_dtype(np.uint8)
    path.write_bytes(gzip.compress(hdr.binaryblock + b"\0" * 4))


# (how to make the subject's image, its age cell, whether it has a TSV row, expected reason)
CASES = {
    "unreadable": (_garbage, "70", True, "unreadable or truncated"),
    "truncated": (_truncated, "70", True, "unreadable or truncated"),
    "truncated-nii": (_truncated_nii, "70", True, "_T1w.nii - could the file be damaged?"),
    "4d": (_frames, "70", True, "4D with 2 frames"),
    "nonfinite": (_nonfinite, "70", True, "has no finite voxel (all NaN or inf)"),
    "allzero": (_zeros, "70", True, "all zeros"),
    "missing-age": (_copy_good, "n/a", True, "missing age"),
    "nonnumeric-age": (_copy_good, "sixty", True, "non-numeric age 'sixty'"),
    "infinite-age": (_copy_good, "inf", True, "age 'inf' is not a finite number"),
    "negative-age": (_copy_good, "-5", True, "age -5 is outside the plausible range (0, 120] years (--age-range)"),
    "zero-age": (_copy_good, "0", True, "age 0 is outside the plausible range (0, 120] years"),
    "age-300": (_copy_good, "300", True, "age 300 is outside the plausible range (0, 120] years"),
    "age-1e3": (_copy_good, "1e3", True, "age 1e3 is outside the plausible range (0, 120] years"),
    "oversized-image": (
        lambda root, pid: _huge_header(_image(root, pid)),
        "70",
        True,
        "is 700x700x700 voxels (1.37 GB as float32), above the 512 MB limit (--max-image-mb)",
    ),
    "row-without-image": (None, "70", True, "in participants.tsv but no image"),
    "image-without-row": (_copy_good, None, False, "has no row in participants.tsv"),
}


def _bad_bids(cohort, tmp_path, names):
    rows, makers = [], []
    for k, name in enumerate(names):
        pid = f"sub-bad{k}"
        make, age, has_row, _ = CASES[name]
        if has_row:
            rows.append(f"{pid}\t{age}\tM\tB")
        makers.append((make, pid))
    root = _make_bids(cohort, tmp_path / "bids", rows)
    for make, pid in makers:
        if make:
            make(root, pid)
    return root


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_fails_with_reason_and_writes_nothing(cohort, tmp_path, capsys, case):
    root = _bad_bids(cohort, tmp_path, [case])
    out = tmp_path / "out" / "v.h5"
    code = cli.main(["nifti", "--bids", str(root), "--out", str(out), "--workers", "1", "--quiet"])
    err = capsys.readouterr().err
    assert code == 2
    assert "sub-bad0" in err and CASES[case][3] in err and "nothing written" in err
    assert "Traceback" not in err
    assert not out.exists() and not convert.skipped_report_path(out).exists()
    assert _staged(out) == set(GOOD)  # for the re-run


def _staged(out):
    """The subjects staged for `out` (parts are named <participant_id>-<key>.npy)."""
    return {p.name.rsplit("-", 1)[0] for p in convert.parts_dir(out).glob("*.npy")}


def test_every_bad_subject_is_listed_and_skip_bad_keeps_the_good(cohort, tmp_path, capsys):
    names = sorted(CASES)
    root = _bad_bids(cohort, tmp_path, names)
    out = tmp_path / "v.h5"
    assert cli.main(["nifti", "--bids", str(root), "--out", str(out), "--workers", "2", "--quiet"]) == 2
    lines = capsys.readouterr().err.splitlines()
    assert f"{len(names)} bad subject(s)" in lines[0]
    for k, name in enumerate(names):
        assert any(line.strip().startswith(f"sub-bad{k}:") and CASES[name][3] in line for line in lines)
    assert not out.exists()

    assert cli.main(["nifti", "--bids", str(root), "--out", str(out), "--workers", "2", "--quiet", "--skip-bad"]) == 0
    captured = capsys.readouterr()
    assert f"skipped {len(names)} bad subject(s)" in captured.err
    assert "wrote 2 subjects" in captured.out and "(2 reused from an earlier run)" in captured.out
    with h5py.File(out, "r") as f:
        assert list(f["subject_id"].asstr()[:]) == list(GOOD)
    report = convert.skipped_report_path(out).read_text().splitlines()
    assert report[0] == "participant_id\treason" and len(report) == 1 + len(names)
    assert not convert.parts_dir(out).exists()


def test_same_scans_refuses_every_subject_of_a_shared_volume_naming_the_others():
    many = {f"sub-{k:02d}": "placeholder" for k in range(6)}
    reasons = convert.same_scans({"sub-a": "1", "sub-b": "2", "sub-c": "1", "sub-d": "3", **many})
    assert set(reasons) == {"sub-a", "sub-c", *many}  # sub-b and sub-d are scans of their own
    assert reasons["sub-c"] == (
        "the same scan as sub-a (identical voxels after preprocessing): one scan cannot be several subjects; "
        "which subject is it?"
    )
    assert reasons["sub-a"].startswith("the same scan as sub-c (")
    assert reasons["sub-03"].startswith("the same scan as sub-00, sub-01, sub-02 and 2 more (identical voxels")
    assert convert.same_scans({"sub-a": "1", "sub-b": "2"}) == {}


COPIES = (GOOD[0], "sub-copy")  # sub-copy's image is a byte copy of sub-0001's


def _same_scan_line(pid, other):
    return (
        f"  {pid}: the same scan as {other} (identical voxels after preprocessing): one scan cannot be several "
        "subjects; which subject is it?"
    )


def test_a_scan_copied_under_two_ids_refuses_both_until_skipped(cohort, tmp_path, monkeypatch, capsys):
    """A copy is one person counted twice, who could be both trained on and tested: both ids are refused, each
    naming the other; --skip-bad leaves both out and lists them, and an up-to-date re-run neither hides them
    nor reads the parts again."""
    root = _make_bids(cohort, tmp_path / "bids", ["sub-copy\t70\tM\tB"])
    _copy_good(root, "sub-copy")
    out = tmp_path / "v.h5"
    args = ["nifti", "--bids", str(root), "--out", str(out), "--workers", "1", "--quiet"]
    assert cli.main(args) == 2
    err = capsys.readouterr().err.splitlines()
    assert "2 bad subject(s)" in err[0] and "the 1 good subject(s) stay staged" in err[0]
    assert err[1:] == [_same_scan_line(*COPIES), _same_scan_line(*reversed(COPIES))]
    assert not out.exists() and not convert.skipped_report_path(out).exists()
    assert _staged(out) == {*GOOD, "sub-copy"}  # a re-run compares the staged parts again

    assert cli.main([*args, "--skip-bad"]) == 0
    captured = capsys.readouterr()
    assert "skipped 2 bad subject(s)" in captured.err
    assert "wrote 1 subjects" in captured.out and "(1 reused from an earlier run)" in captured.out
    with h5py.File(out, "r") as f:
        assert list(f["subject_id"].asstr()[:]) == [GOOD[1]]
        assert set(json.loads(f.attrs["skipped"])) == set(COPIES)
    report = convert.skipped_report_path(out).read_text().splitlines()
    assert report[1:] == [line.strip().replace(": ", "\t", 1) for line in err[1:]]

    digests = []
    monkeypatch.setattr(convert, "_digest", lambda part: digests.append(part) or "")
    stamp = out.stat().st_mtime_ns
    assert cli.main([*args, "--skip-bad"]) == 0
    assert "is up to date" in capsys.readouterr().out
    assert digests == [] and out.stat().st_mtime_ns == stamp
    monkeypatch.undo()
    assert cli.main(args) == 2  # the skipped copies are still bad input without --skip-bad
    assert capsys.readouterr().err.splitlines()[1:] == err[1:]


def test_an_output_written_before_the_copy_check_is_not_up_to_date(cohort, tmp_path, monkeypatch):
    """Such an output may hold both copies; its fingerprint lacks the check, so the re-run rebuilds it."""
    root = _make_bids(cohort, tmp_path / "bids", ["sub-copy\t70\tM\tB"])
    _copy_good(root, "sub-copy")
    out = tmp_path / "v.h5"
    monkeypatch.setattr(convert, "CHECKS", ())
    monkeypatch.setattr(convert, "same_scans", lambda digests: {})
    assert convert.convert(root, out, workers=1).written == 3
    monkeypatch.undo()
    res = convert.convert(root, out, workers=1, skip_bad=True)
    assert not res.up_to_date and res.written == 1 and set(res.skipped) == set(COPIES)
    assert convert.convert(root, out, workers=1, skip_bad=True).up_to_date


def test_copies_are_refused_with_registration_too(cohort, tmp_path, monkeypatch):
    """The registered volume is staged like any other; ANTs is stood in for by the plain preprocessing."""

    def registered(path, voxel, mask, options, ref, max_image_mb):
        return register.Registered(nifti.preprocess_file(path, voxel, mask, max_image_mb), np.eye(4), 0.9)

    monkeypatch.setattr(register, "preprocess_file", registered)
    root = _make_bids(cohort, tmp_path / "bids", ["sub-copy\t70\tM\tB"])
    _copy_good(root, "sub-copy")
    out = tmp_path / "v.h5"
    options = register.Options("affine")
    with pytest.raises(convert.BadInput) as refused:
        convert.convert(root, out, workers=1, registration=options)
    assert set(refused.value.bad) == set(COPIES) and "the same scan as sub-copy (" in refused.value.bad[GOOD[0]]
    res = convert.convert(root, out, workers=1, registration=options, skip_bad=True)
    assert res.written == 1 and res.reused == 1 and set(res.skipped) == set(COPIES)
    with h5py.File(out, "r") as f:
        assert list(f["subject_id"].asstr()[:]) == [GOOD[1]] and list(f["registration_ncc"][:]) == [np.float32(0.9)]


def test_dataset_level_errors(tmp_path, capsys):
    out = tmp_path / "v.h5"
    assert cli.main(["nifti", "--bids", str(tmp_path / "nope"), "--out", str(out)]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "a_file").write_text("x")
    assert cli.main(["nifti", "--bids", str(tmp_path / "a_file"), "--out", str(out)]) == 2
    said = f"--bids {tmp_path / 'a_file'} is a file; give the dataset's directory"
    assert capsys.readouterr().err == f"preprocess: error: {said}\n"
    (tmp_path / "b").mkdir()
    assert cli.main(["nifti", "--bids", str(tmp_path / "b"), "--out", str(out)]) == 2
    assert "participants.tsv is missing" in capsys.readouterr().err
    (tmp_path / "b" / "participants.tsv").write_text("participant_id\tsex\nsub-1\tF\n")
    assert cli.main(["nifti", "--bids", str(tmp_path / "b"), "--out", str(out)]) == 2
    assert "lacks column(s) age" in capsys.readouterr().err
    assert not out.exists()


def test_interrupted_run_resumes_without_redoing_subjects(cohort, tmp_path, monkeypatch):
    root = _make_bids(cohort, tmp_path / "bids", ["sub-0003\t61\tM\tC", "sub-0004\t62\tF\tD"])
    for pid in ("sub-0003", "sub-0004"):
        shutil.copytree(cohort.bids / pid, root / pid)
    out = tmp_path / "v.h5"
    real = nifti.preprocess_file
    calls = []

    def interrupt_third(path, *args):
        calls.append(path)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(path, *args)

    monkeypatch.setattr(nifti, "preprocess_file", interrupt_third)
    with pytest.raises(KeyboardInterrupt):
        convert.convert(root, out, workers=1)
    assert not out.exists()
    assert len(list(convert.parts_dir(out).glob("*.npy"))) == 2

    calls.clear()
    monkeypatch.setattr(nifti, "preprocess_file", lambda *a: calls.append(a[0]) or real(*a))
    res = convert.convert(root, out, workers=1)
    assert res.reused == 2 and res.written == 4 and len(calls) == 2
    assert not convert.parts_dir(out).exists()

    calls.clear()
    stamp = out.stat().st_mtime_ns
    res = convert.convert(root, out, workers=1)
    assert res.up_to_date and calls == [] and out.stat().st_mtime_ns == stamp

    (root / "participants.tsv").write_text((root / "participants.tsv").read_text().replace("61", "63"))
    res = convert.convert(root, out, workers=1)
    assert not res.up_to_date and len(calls) == 4
    with h5py.File(out, "r") as f:
        assert 63.0 in f["age"][:]


def test_a_cohort_the_disk_cannot_stage_is_refused_before_any_subject(cohort, tmp_path, monkeypatch, capsys):
    root = _make_bids(cohort, tmp_path / "bids")
    part = 45 * 54 * 45 * 2  # one float16 volume on the 4 mm grid
    free = part  # one of the two fits
    monkeypatch.setattr(
        "preprocess.outputs.shutil.disk_usage", lambda path: shutil._ntuple_diskusage(10**12, 10**12 - free, free)
    )
    monkeypatch.setattr(nifti, "preprocess_file", lambda *a: pytest.fail("a subject was processed"))
    out = tmp_path / "v.h5"
    assert cli.main(["nifti", "--bids", str(root), "--out", str(out), "--workers", "1", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err == (
        f"preprocess: error: staging the subjects in {convert.parts_dir(out)} needs at least 0.437 MB and "
        f"{tmp_path} has 0.219 MB free; free space or write elsewhere\n"
    )
    assert not out.exists() and not convert.parts_dir(out).exists()


def test_rerun_after_bad_input_reuses_the_good_subjects_of_the_same_settings(cohort, tmp_path, monkeypatch):
    root = _bad_bids(cohort, tmp_path, ["unreadable"])
    out = tmp_path / "v.h5"
    real = nifti.preprocess_file
    calls = []
    monkeypatch.setattr(nifti, "preprocess_file", lambda path, *a: calls.append(path.name) or real(path, *a))
    with pytest.raises(convert.BadInput, match=r"the 2 good subject\(s\) stay staged in"):
        convert.convert(root, out, workers=1)
    assert len(calls) == 3 and _staged(out) == set(GOOD)

    calls.clear()  # other settings: the float16 parts are not theirs
    with pytest.raises(convert.BadInput):
        convert.convert(root, out, workers=1, dtype="float32")
    assert len(calls) == 3

    calls.clear()
    res = convert.convert(root, out, workers=1, skip_bad=True)
    assert res.reused == 2 and res.written == 2 and calls == ["sub-bad0_T1w.nii.gz"]
    assert not convert.parts_dir(out).exists()
    with h5py.File(out, "r") as f:
        assert f["images"].dtype == np.float16

    with pytest.raises(convert.BadInput):  # stages the good subjects again
        convert.convert(root, out, workers=1)
    assert convert.convert(root, out, workers=1, skip_bad=True).up_to_date
    assert not convert.parts_dir(out).exists()  # the output holds everything they were staged for


def test_a_rerun_with_another_size_limit_is_not_up_to_date(cohort, tmp_path):
    """A subject skipped for --max-image-mb is processed when the limit is raised, not called up to date."""
    root = _make_bids(cohort, tmp_path / "bids", ["sub-big\t70\tM\tB"])
    largest = max(np.prod(nib.load(_image(root, pid)).shape) * 4 / 1e6 for pid in GOOD)  # MB as float32
    img = nib.load(cohort.bids / "sub-0003" / "anat" / "sub-0003_T1w.nii.gz")  # padded GOOD[0]: the same scan
    data = np.asarray(img.dataobj, np.float32)
    padded = np.pad(data, ((0, 0), (0, 0), (0, int(2 * largest * 1e6 / 4 / data[..., 0].size))))  # air above
    nib.save(nib.Nifti1Image(padded, img.affine), _image(root, "sub-big"))
    limit = 1.5 * largest  # between the good images and the padded one
    out = tmp_path / "v.h5"
    res = convert.convert(root, out, workers=1, skip_bad=True, max_image_mb=limit)
    assert set(res.skipped) == {"sub-big"} and "--max-image-mb" in res.skipped["sub-big"]
    assert convert.convert(root, out, workers=1, skip_bad=True, max_image_mb=limit).up_to_date
    res = convert.convert(root, out, workers=1, skip_bad=True)
    assert not res.up_to_date and res.written == 3 and not res.skipped


def test_a_head_out_of_mni_place_is_named_after_writing(cohort, tmp_path, capsys):
    """Without --register the images must be in MNI space; one moved 15 mm still covers the mask but correlates
    poorly with the template: it is written, and named with a pointer to --register and qc."""
    root = _make_bids(cohort, tmp_path / "bids", ["sub-moved\t70\tM\tB"])
    img = nib.load(_image(root, GOOD[0]))
    moved = img.affine.copy()
    moved[2, 3] += 15.0
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj), moved), _image(root, "sub-moved"))
    out = tmp_path / "v.h5"
    assert cli.main(["nifti", "--bids", str(root), "--out", str(out), "--workers", "1", "--quiet"]) == 0
    captured = capsys.readouterr()
    assert "wrote 3 subjects" in captured.out
    warning = captured.err.splitlines()
    assert warning[0].startswith("warning: 1 subject(s) correlate with the MNI152 template below 0.4")
    assert "--register affine" in warning[0] and f"qc --h5 {out}" in warning[0]
    assert warning[1].startswith("  sub-moved: 0.") and len(warning) == 2


def test_select_chooses_the_visit_and_its_age_reaches_the_file(cohort, tmp_path, capsys):
    root = _make_bids(cohort, tmp_path / "bids")
    pid = GOOD[0]
    image = _image(root, pid)
    for session in ("ses-2", "ses-3"):
        visit = root / pid / session / "anat" / f"{pid}_{session}_T1w.nii.gz"
        visit.parent.mkdir(parents=True)
        shutil.copy(image, visit)
    shutil.rmtree(root / pid / "anat")
    (root / pid / f"{pid}_sessions.tsv").write_text("session_id\tage\nses-2\t64.5\nses-3\t66\n")
    out = tmp_path / "v.h5"
    assert cli.main(["nifti", "--bids", str(root), "--out", str(out), "--workers", "1", "--quiet"]) == 2
    assert f"{pid}: several T1w images (choose one with --select" in capsys.readouterr().err
    args = ["nifti", "--bids", str(root), "--out", str(out), "--workers", "1", "--quiet", "--select", "ses-3"]
    assert cli.main([*args, "--skip-bad"]) == 0
    assert f"{GOOD[1]}: no T1w image with ses-3 (--select)" in capsys.readouterr().err  # it has no visits
    with h5py.File(out, "r") as f:
        ages = dict(zip(f["subject_id"].asstr()[:], f["age"][:]))
        assert json.loads(f.attrs["preprocessing"])["select"] == ["ses-3"]
    assert ages == {pid: 66.0}  # the age at that visit, not participants.tsv's 60.5


NOTE = "note: {} subject(s) with their image in a session (ses-*) have participants.tsv's age, as no "


def test_session_images_that_take_participants_age_are_noted_once(cohort, tmp_path, capsys):
    """Brain age needs the age at the scan, and participants.tsv's is often the first visit's: a run that writes
    such ages says so, and how to give each session's, once a subject has a sessions.tsv with ages it is not named."""
    root = _make_bids(cohort, tmp_path / "bids", ages={GOOD[0]: "61", GOOD[1]: "62"})
    for pid in GOOD:
        visit = root / pid / "ses-2" / "anat" / f"{pid}_ses-2_T1w.nii.gz"
        visit.parent.mkdir(parents=True)
        shutil.move(_image(root, pid), visit)
        shutil.rmtree(root / pid / "anat")
    out = tmp_path / "v.h5"
    args = ["nifti", "--bids", str(root), "--out", str(out), "--workers", "1", "--quiet"]
    assert cli.main(args) == 0
    err = capsys.readouterr().err.splitlines()
    assert err == [
        NOTE.format(2) + "sub-X/sub-X_sessions.tsv gives one for that session: often the first visit's, not the age "
        f"at the scan ({GOOD[0]}, {GOOD[1]}); for per-session ages add sub-X/sub-X_sessions.tsv with columns "
        "session_id and age, as BIDS specifies"
    ]
    with h5py.File(out, "r") as f:
        assert list(f["age"][:]) == [61.0, 62.0]
    (root / GOOD[0] / f"{GOOD[0]}_sessions.tsv").write_text("session_id\tage\nses-2\t64\n")
    assert cli.main(args) == 0
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith(NOTE.format(1)) and f"at the scan ({GOOD[1]}); for" in err[0]
    (root / GOOD[1] / f"{GOOD[1]}_sessions.tsv").write_text("session_id\tage\nses-2\t65\n")
    assert cli.main(args) == 0
    assert capsys.readouterr().err == ""
    with h5py.File(out, "r") as f:
        assert list(f["age"][:]) == [64.0, 65.0]


def test_a_note_about_many_subjects_is_one_line_naming_a_few(tmp_path, monkeypatch, capsys):
    """A large longitudinal dataset gives one line with the count, not a line per subject."""
    subjects = [f"sub-{i:05d}" for i in range(1, 40_001)]
    written = convert.Result(tmp_path / "v.h5", len(subjects), {}, 0, False, session_ages_assumed=subjects)
    monkeypatch.setattr(convert, "convert", lambda *args, **kwargs: written)
    assert cli.main(["nifti", "--bids", str(tmp_path), "--out", str(tmp_path / "v.h5"), "--quiet"]) == 0
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(NOTE.format(40000))
    assert "(sub-00001, sub-00002, sub-00003 and 39997 more); for per-session ages" in err


def test_participants_tsv_field_above_the_csv_limit_is_one_clear_error(cohort, tmp_path, capsys):
    root = _make_bids(cohort, tmp_path / "bids")
    tsv = root / "participants.tsv"
    tsv.write_text(tsv.read_text() + "sub-0003\t60\tF\t" + "x" * 200_000 + "\n")
    out = tmp_path / "v.h5"
    assert cli.main(["nifti", "--bids", str(root), "--out", str(out), "--workers", "1", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err == f"preprocess: error: {tsv} cannot be read past line 3: field larger than field limit (131072)\n"
    assert not out.exists() and not convert.parts_dir(out).exists()


def test_cli_reports_interruption_with_exit_130(cohort, tmp_path, monkeypatch, capsys):
    root = _make_bids(cohort, tmp_path / "bids")

    def interrupt(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(nifti, "preprocess_file", interrupt)
    out = tmp_path / "v.h5"
    assert cli.main(["nifti", "--bids", str(root), "--out", str(out), "--workers", "1", "--quiet"]) == 130
    assert "re-run resumes" in capsys.readouterr().err
    assert not out.exists()


def test_module_entry_point_runs_without_traceback(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "preprocess",
            "nifti",
            "--bids",
            str(tmp_path),
            "--out",
            str(tmp_path / "v.h5"),
            "--voxel",
            "3",
        ],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2
    assert "invalid choice: 3" in proc.stderr and "Traceback" not in proc.stderr


def test_float32_output(cohort, tmp_path):
    root = _make_bids(cohort, tmp_path / "bids")
    out = tmp_path / "v.h5"
    assert (
        cli.main(
            [
                "nifti",
                "--bids",
                str(root),
                "--out",
                str(out),
                "--workers",
                "1",
                "--quiet",
                "--dtype",
                "float32",
                "--voxel",
                "2",
            ]
        )
        == 0
    )
    with h5py.File(out, "r") as f:
        assert f["images"].dtype == np.float32 and f["images"].shape == (2, 91, 109, 91)


def test_gzip_is_not_required_for_inputs(cohort, tmp_path):
    root = _make_bids(cohort, tmp_path / "bids")
    gz = _image(root, GOOD[1])
    gz.with_name(gz.name[:-3]).write_bytes(gzip.decompress(gz.read_bytes()))
    gz.unlink()
    res = convert.convert(root, tmp_path / "v.h5", workers=1)
    assert res.written == 2


def test_age_range_is_configurable_and_recorded(cohort, tmp_path, capsys):
    root = _make_bids(cohort, tmp_path / "bids", ages={"sub-0001": "120", "sub-0002": "140"})
    out = tmp_path / "v.h5"
    args = ["nifti", "--bids", str(root), "--out", str(out), "--workers", "1", "--quiet"]
    assert cli.main(args) == 2
    err = capsys.readouterr().err
    assert "1 bad subject(s)" in err and "sub-0002: age 140 is outside" in err and "sub-0001" not in err
    assert cli.main([*args, "--age-range", "100", "150"]) == 0
    with h5py.File(out, "r") as f:
        assert list(f["age"][:]) == [120.0, 140.0]
        assert list(f.attrs["age_range"]) == [100.0, 150.0]


@pytest.mark.parametrize(
    "values, message",
    [
        (["5", "1"], "needs finite MIN < MAX, got 5 1"),
        (["0", "nan"], "needs finite MIN < MAX"),
        (["1", "inf"], "needs finite MIN < MAX"),
        (["0", "x"], "invalid float value: 'x'"),
        # months or days would pass for years, and the trainer refuses a learner whose mean age is past 150
        (["0", "300"], "ages are in years, from -1 (counted from term) to 150, got 0 300"),
        (["-2", "2"], "ages are in years, from -1 (counted from term) to 150, got -2 2"),
    ],
)
def test_impossible_age_ranges_are_usage_errors(tmp_path, capsys, values, message):
    with pytest.raises(SystemExit, match=r"^2$"):
        cli.main(["nifti", "--bids", str(tmp_path), "--out", str(tmp_path / "v.h5"), "--age-range", *values])
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("value", ["0", "-1", "nan", "inf", "lots"])
def test_max_image_mb_must_be_a_positive_number(tmp_path, capsys, value):
    with pytest.raises(SystemExit, match=r"^2$"):
        cli.main(["nifti", "--bids", str(tmp_path), "--out", str(tmp_path / "v.h5"), "--max-image-mb", value])
    err = capsys.readouterr().err
    assert "argument --max-image-mb: must be a positive number of MB" in err and "Traceback" not in err


def test_participants_tsv_with_byte_order_mark_is_read(cohort, tmp_path):
    root = _make_bids(cohort, tmp_path / "bids")
    tsv = root / "participants.tsv"
    tsv.write_bytes(b"\xef\xbb\xbf" + tsv.read_bytes())
    res = convert.convert(root, tmp_path / "v.h5", workers=1)
    assert res.written == 2


@pytest.mark.parametrize("encoding, where", [("latin-1", "byte 0xf4"), ("utf-16", "byte 0xff at offset 0")])
def test_participants_tsv_not_utf8_is_one_clear_error(cohort, tmp_path, capsys, encoding, where):
    root = _make_bids(cohort, tmp_path / "bids")
    tsv = root / "participants.tsv"
    tsv.write_bytes(tsv.read_text().replace("\tA", "\tHôpital").encode(encoding))
    out = tmp_path / "v.h5"
    assert cli.main(["nifti", "--bids", str(root), "--out", str(out), "--workers", "1", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{tsv} is not UTF-8 text ({where}" in err and "Traceback" not in err
    assert not out.exists() and not convert.parts_dir(out).exists()


def _out_under_a_file(tmp_path):
    (tmp_path / "somefile").write_text("x")
    return tmp_path / "somefile" / "x.h5", "somefile is a file, not a directory"


def _out_is_a_directory(tmp_path):
    (tmp_path / "x.h5").mkdir()
    return tmp_path / "x.h5", "x.h5 is an existing directory; it must name a file"


def _stage_is_a_file(tmp_path):
    (tmp_path / "x.h5.parts").write_text("x")
    return tmp_path / "x.h5", "staging directory"


def _report_is_a_directory(tmp_path):
    (tmp_path / "x.skipped.tsv").mkdir()
    return tmp_path / "x.h5", "x.skipped.tsv is an existing directory"


def _out_under_proc(tmp_path):
    return Path("/proc/fedmpi-x.h5"), "cannot write --out /proc/fedmpi-x.h5: cannot create files in /proc"


def _out_is_an_input(tmp_path):
    (tmp_path / "notes.tsv").write_text("participant_id\tage\n")  # a slip of the shell: not an earlier output
    return tmp_path / "notes.tsv", "notes.tsv exists and is not an HDF5 file; it would be replaced, so it is refused"


@pytest.mark.parametrize(
    "make",
    [
        _out_under_a_file,
        _out_is_a_directory,
        _stage_is_a_file,
        _report_is_a_directory,
        _out_under_proc,
        _out_is_an_input,
    ],
)
def test_unwritable_outputs_are_refused_before_any_subject(cohort, tmp_path, monkeypatch, capsys, make):
    root = _make_bids(cohort, tmp_path / "bids")
    out, message = make(tmp_path)
    calls = []
    monkeypatch.setattr(nifti, "preprocess_file", lambda *a, **k: calls.append(a))
    before = sorted(p.name for p in tmp_path.iterdir())
    assert cli.main(["nifti", "--bids", str(root), "--out", str(out), "--workers", "1", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err and "Traceback" not in err
    assert calls == [] and sorted(p.name for p in tmp_path.iterdir()) == before


def test_out_under_a_file_from_the_command_line(tmp_path):
    (tmp_path / "somefile").write_text("x")
    (tmp_path / "bids").mkdir()
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "preprocess",
            "nifti",
            "--bids",
            str(tmp_path / "bids"),
            "--out",
            str(tmp_path / "somefile" / "x.h5"),
        ],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2
    assert "is a file, not a directory" in proc.stderr and "Traceback" not in proc.stderr


def _stage_or_die(job):
    """convert._stage in a spawned worker, except that sub-0002's worker is killed as by the OOM killer."""
    if job[0] == "sub-0002":
        os.kill(os.getpid(), signal.SIGKILL)
    return convert._stage(job)


def test_a_killed_worker_names_its_subject_and_writes_nothing(cohort, tmp_path, monkeypatch, capsys):
    root = _make_bids(cohort, tmp_path / "bids")
    out = tmp_path / "v.h5"
    stage = convert.parts_dir(out)
    stage.mkdir()
    (stage / ".sub-0009-0.npy.abc.tmp").write_bytes(b"half")  # left by a worker killed in an earlier run
    monkeypatch.setattr(convert, "_stage", _stage_or_die)
    assert cli.main(["nifti", "--bids", str(root), "--out", str(out), "--workers", "2", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("preprocess: error: a nifti worker process died while processing ")
    assert "sub-0002" in err.splitlines()[0] and "re-run resumes" in err and "Traceback" not in err
    assert not out.exists() and not convert.skipped_report_path(out).exists()
    assert all(p.name.endswith(".npy") and not p.name.startswith(".") for p in stage.iterdir())

    monkeypatch.undo()
    res = convert.convert(root, out, workers=1)
    assert res.written == 2 and not stage.exists()


def test_skip_bad_keeps_each_good_subject_with_its_own_row(cohort, tmp_path):
    """A bad image listed first: every table column and volume of the output belongs to the good subjects."""
    root = _make_bids(cohort, tmp_path / "bids", ages={"sub-0001": "61.5", "sub-0002": "62.5"})
    tsv = root / "participants.tsv"
    header, *rows = tsv.read_text().splitlines()
    rows = [r.replace("\tF\tA", f"\tF\tsite{k}") for k, r in enumerate(rows)]
    tsv.write_text("\n".join([header, "sub-bad0\t70\tM\tB", *rows]) + "\n")
    _garbage(root, "sub-bad0")
    out = tmp_path / "v.h5"
    res = convert.convert(root, out, workers=1, skip_bad=True)
    assert res.written == 2 and list(res.skipped) == ["sub-bad0"]
    mask = grid.brain_mask(4)
    with h5io.open_checked(out) as f:
        assert list(f["subject_id"].asstr()[:]) == list(GOOD)
        assert list(f["site"].asstr()[:]) == ["site0", "site1"] and list(f["sex"].asstr()[:]) == ["F", "F"]
        np.testing.assert_allclose(f["age"][:], [61.5, 62.5])
        for k, pid in enumerate(GOOD):
            want = nifti.preprocess_file(_image(root, pid), 4, mask).astype(np.float16)
            np.testing.assert_array_equal(f["images"][k], want)


def test_a_part_interrupted_while_written_is_not_reused(cohort, tmp_path, monkeypatch):
    root = _make_bids(cohort, tmp_path / "bids")
    out = tmp_path / "v.h5"

    def save_half(f, arr):
        f.write(b"\x93NUMPY half a part")
        raise KeyboardInterrupt

    monkeypatch.setattr(np, "save", save_half)
    with pytest.raises(KeyboardInterrupt):
        convert.convert(root, out, workers=1)
    assert list(convert.parts_dir(out).glob("*.npy")) == []
    monkeypatch.undo()
    res = convert.convert(root, out, workers=1)
    assert res.written == 2 and res.reused == 0


def test_a_clean_rerun_removes_the_old_skipped_report(cohort, tmp_path):
    root = _bad_bids(cohort, tmp_path, ["unreadable"])
    out = tmp_path / "v.h5"
    assert convert.convert(root, out, workers=1, skip_bad=True).skipped
    assert convert.skipped_report_path(out).is_file()
    shutil.rmtree(root / "sub-bad0")
    tsv = root / "participants.tsv"
    tsv.write_text("".join(line for line in tsv.read_text().splitlines(True) if not line.startswith("sub-bad0")))
    res = convert.convert(root, out, workers=1)
    assert res.written == 2 and not res.skipped and not res.up_to_date
    assert not convert.skipped_report_path(out).exists()
    with h5py.File(out, "r") as f:
        assert f.attrs["skipped"] == "{}"


def test_a_rerun_after_bad_input_sweeps_half_written_parts(cohort, tmp_path):
    root = _bad_bids(cohort, tmp_path, ["unreadable"])
    out = tmp_path / "v.h5"
    stage = convert.parts_dir(out)
    stage.mkdir()
    (stage / ".sub-0009-0.npy.abc.tmp").write_bytes(b"half")  # left by a worker killed in an earlier run
    with pytest.raises(convert.BadInput):
        convert.convert(root, out, workers=1)
    assert sorted(p.name.rsplit("-", 1)[0] for p in stage.iterdir()) == list(GOOD)


def test_an_empty_age_range_is_a_usage_error(tmp_path, capsys):
    with pytest.raises(SystemExit, match=r"^2$"):
        cli.main(["nifti", "--bids", str(tmp_path), "--out", str(tmp_path / "v.h5"), "--age-range", "5", "5"])
    assert "needs finite MIN < MAX, got 5 5" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("value, voxel", [("2.0", 2), ("4e0", 4), ("6", 6)])
def test_voxel_takes_a_whole_number_as_the_other_integer_options_do(tmp_path, value, voxel):
    """--voxel was plain int: 2.0 was refused while --workers 2.0 and fedmpi's integers take it."""
    args = cli.build_parser().parse_args(["nifti", "--bids", str(tmp_path), "--out", "v.h5", "--voxel", value])
    assert args.voxel == voxel


@pytest.mark.parametrize("value, message", [("2.5", "expected an integer, got '2.5'"), ("3", "invalid choice: 3")])
def test_voxel_refuses_a_fraction_or_another_grid(tmp_path, capsys, value, message):
    with pytest.raises(SystemExit, match=r"^2$"):
        cli.main(["nifti", "--bids", str(tmp_path), "--out", str(tmp_path / "v.h5"), "--voxel", value])
    last = capsys.readouterr().err.splitlines()[-1]
    assert last.startswith(f"preprocess: error: argument --voxel: {message}"), last
    assert list(tmp_path.iterdir()) == []


def test_age_range_keeps_min_and_max_in_order(tmp_path):
    args = cli.build_parser().parse_args(["nifti", "--bids", str(tmp_path), "--out", "v.h5", "--age-range", "1", "90"])
    assert args.age_range == (1.0, 90.0)


@pytest.mark.parametrize("sig, group", [(signal.SIGTERM, False), (signal.SIGINT, True)])
def test_a_stop_while_the_workers_start_ends_the_run_and_its_workers(tmp_path, sig, group):
    """SIGTERM to the main process (kill, docker stop, a parent's terminate()): it died at once and a spawned worker
    stayed, blocked on the pool's pipe for ever (holding a pipeline's stdout open); now it stops like Ctrl-C. Ctrl-C
    from a terminal (the whole group) as the workers started: a worker died before reading its start-up data and the
    parent waited for ever to write it."""
    import time

    command = ["synth", "--out", str(tmp_path / "s"), "--subjects", "40", "--workers", "2"]
    job = subprocess.Popen(
        [sys.executable, "-m", "preprocess", *command],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        # as from a terminal: a test run started in the background (nohup ... &) would pass Ctrl-C on ignored
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    deadline = time.monotonic() + 120
    while not subprocess.run(["pgrep", "-P", str(job.pid)], capture_output=True).stdout.split():
        assert job.poll() is None and time.monotonic() < deadline, "no worker started"
        time.sleep(0.1)
    time.sleep(1)  # the workers are starting (the first child is multiprocessing's resource tracker)
    if group:
        os.killpg(job.pid, sig)
    else:
        job.send_signal(sig)
    try:
        _, err = job.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(job.pid, signal.SIGKILL)
        pytest.fail(f"synth did not end after {sig.name}")
    assert job.returncode == 130 and "interrupted" in err and "Traceback" not in err, err
    deadline = time.monotonic() + 20  # the workers and the resource tracker end once they see the parent go
    while True:
        try:
            os.killpg(job.pid, 0)
        except ProcessLookupError:
            break
        if time.monotonic() > deadline:
            os.killpg(job.pid, signal.SIGKILL)
            pytest.fail("processes of the interrupted run were left behind")
        time.sleep(0.2)


def _template_bids(root, subjects=2, suffix=".nii.gz"):
    """A small dataset without the session cohort: nilearn's 2 mm MNI152 T1 with a little noise of its own per
    subject (identical volumes would be refused as one scan), stored int16 in MNI world coordinates."""
    from nilearn import datasets

    template = datasets.load_mni152_template(resolution=2)
    data = np.asarray(template.get_fdata(), np.float32) * 1000
    rng = np.random.default_rng(0)
    rows = []
    for i in range(1, subjects + 1):
        pid = f"sub-{i:02d}"
        img = nib.Nifti1Image((data + rng.normal(0, 20, data.shape)).astype(np.int16), template.affine)
        img.set_qform(template.affine, 1)
        img.set_sform(template.affine, 1)
        cls = nib.Nifti1Pair if suffix == ".hdr" else nib.Nifti1Image
        path = _image(root, pid).with_name(f"{pid}_T1w{suffix}")
        nib.save(cls(np.asarray(img.dataobj), img.affine, img.header), path)
        rows.append(f"{pid}\t{60 + i}\tF\tA")
    (root / "participants.tsv").write_text("participant_id\tage\tsex\tsite\n" + "\n".join(rows) + "\n")
    return root


def test_an_out_that_is_a_device_or_a_named_pipe_is_refused_not_replaced(tmp_path, capsys):
    """The output is renamed onto --out: a named pipe, or /dev/null for a dry run as root in a container, was
    replaced by an HDF5 file, and the command said it wrote there (exit 0)."""
    root = _template_bids(tmp_path / "bids")
    fifo = tmp_path / "pipe.h5"
    os.mkfifo(fifo)
    assert cli.main(["nifti", "--bids", str(root), "--out", str(fifo), "--workers", "1", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pipe.h5 exists and is not a regular file" in err
    assert fifo.is_fifo() and not convert.parts_dir(fifo).exists()


def test_a_nifti_pair_whose_voxels_change_is_not_up_to_date(tmp_path):
    """A .hdr/.img pair keeps its voxels in the .img: an output (and a staged subject) keyed on the .hdr alone
    stayed "up to date" with the old voxels when the .img was written anew."""
    root = _template_bids(tmp_path / "bids", suffix=".hdr")
    out = tmp_path / "v.h5"
    assert not convert.convert(root, out, workers=1).up_to_date
    with h5py.File(out) as f:
        before = f["images"][0]
    hdr = root / "sub-01" / "anat" / "sub-01_T1w.hdr"
    img = nib.load(hdr)
    flipped = np.asarray(img.dataobj)[::-1]  # re-exported: left and right swapped, the header as it was
    hdr.with_suffix(".img").write_bytes(flipped.astype(img.get_data_dtype()).tobytes(order="F"))
    res = convert.convert(root, out, workers=1)
    assert not res.up_to_date and res.written == 2
    with h5py.File(out) as f:
        assert not np.array_equal(f["images"][0], before)
    assert convert.convert(root, out, workers=1).up_to_date


def test_running_out_of_memory_while_resampling_is_the_subjects_reason_not_a_traceback(tmp_path, monkeypatch, capsys):
    """Under a memory limit (ulimit -v, as on some clusters) a 160 MB image was read but its resampling raised
    MemoryError: a traceback and exit 1, the other subjects' work lost. Only the read was caught."""
    root = _template_bids(tmp_path / "bids")
    real = nifti.to_mni

    def short_of_memory(data, affine, voxel, mask):
        if data[0, 0, 0] == -1:  # the marked subject below
            raise MemoryError
        return real(data, affine, voxel, mask)

    monkeypatch.setattr(nifti, "to_mni", short_of_memory)
    img = nib.load(_image(root, "sub-02"))
    marked = np.asarray(img.dataobj).copy()
    marked[0, 0, 0] = -1
    nib.save(nib.Nifti1Image(marked, img.affine, img.header), _image(root, "sub-02"))
    out = tmp_path / "v.h5"
    assert cli.main(["nifti", "--bids", str(root), "--out", str(out), "--workers", "1", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "sub-02: not enough memory to preprocess sub-02_T1w.nii.gz; use fewer --workers" in err
    assert "Traceback" not in err and not out.exists()
    assert cli.main(["nifti", "--bids", str(root), "--out", str(out), "--workers", "1", "--quiet", "--skip-bad"]) == 0
    with h5py.File(out) as f:
        assert list(f["subject_id"].asstr()[:]) == ["sub-01"]


def test_subjects_skipped_for_memory_or_an_io_error_are_retried_by_the_rerun(tmp_path, monkeypatch, capsys):
    """With --skip-bad, a subject skipped for the machine's want (out of memory, an I/O error mid-read) made the
    output up to date: the re-run after more memory or a fixed disk said "is up to date" and never retried it.
    A subject skipped for its own image (garbage) stays skipped, and its output up to date."""
    import errno

    root = _template_bids(tmp_path / "bids", subjects=3)
    (root / "participants.tsv").write_text((root / "participants.tsv").read_text() + "sub-bad\t70\tM\tB\n")
    _garbage(root, "sub-bad")
    real_preprocess, real_array = nifti.preprocess_file, nib.arrayproxy.ArrayProxy.__array__

    def short_of_memory(path, *args):
        if path.name.startswith("sub-02_"):
            raise MemoryError
        return real_preprocess(path, *args)

    def disk_error(self, *args, **kwargs):
        if os.fspath(self.file_like).endswith("sub-03_T1w.nii.gz"):
            raise OSError(errno.EIO, os.strerror(errno.EIO), os.fspath(self.file_like))
        return real_array(self, *args, **kwargs)

    out = tmp_path / "v.h5"
    args = ["nifti", "--bids", str(root), "--out", str(out), "--workers", "1", "--quiet", "--skip-bad"]
    with monkeypatch.context() as patch:
        patch.setattr(nifti, "preprocess_file", short_of_memory)
        patch.setattr(nib.arrayproxy.ArrayProxy, "__array__", disk_error)
        assert cli.main(args) == 0
        err = capsys.readouterr().err
        assert (
            "skipped 3 bad subject(s)" in err
            and "sub-03: sub-03_T1w.nii.gz cannot be read: Input/output error\n" in err
        )
        assert "warning: 2 of them (sub-02, sub-03) failed for want of memory or an I/O error" in err
        with h5io.open_checked(out) as f:
            assert list(f["subject_id"].asstr()[:]) == ["sub-01"]
            assert json.loads(f.attrs["skipped_unavailable"]) == ["sub-02", "sub-03"]
        assert _staged(out) == {"sub-01"}  # kept for the re-run
        assert cli.main(args) == 0  # still short: retried, and skipped again
        assert "is up to date" not in capsys.readouterr().out
    assert cli.main(args) == 0  # more memory, the disk fixed
    captured = capsys.readouterr()
    assert "wrote 3 subjects" in captured.out and "(1 reused from an earlier run)" in captured.out
    assert "skipped 1 bad subject(s)" in captured.err and "of them" not in captured.err
    with h5io.open_checked(out) as f:
        assert list(f["subject_id"].asstr()[:]) == ["sub-01", "sub-02", "sub-03"]
        assert "skipped_unavailable" not in f.attrs and list(json.loads(f.attrs["skipped"])) == ["sub-bad"]
    assert not convert.parts_dir(out).exists()
    assert cli.main(args) == 0  # the garbage image is its own fault: skipped and up to date
    assert "is up to date" in capsys.readouterr().out


def test_a_full_disk_is_one_line_naming_the_output(cohort, tmp_path, monkeypatch, capsys):
    """A disk or quota full while a subject is staged: a traceback, and numpy's own write error carried no errno
    ("902629 requested and 550848 written"), so nothing could tell it was the disk."""
    import errno

    root = _make_bids(cohort, tmp_path / "bids")

    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full)
    out = tmp_path / "v.h5"
    assert cli.main(["nifti", "--bids", str(root), "--out", str(out), "--workers", "1", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("preprocess: error: No space left on device (writing ") and err.count("\n") == 1, err
    assert not out.exists() and not list(convert.parts_dir(out).glob(".*"))


def test_a_staged_part_write_that_does_not_fit_keeps_its_errno(tmp_path, monkeypatch):
    import errno

    written = []

    def short(self, data):
        written.append(len(data))
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(Path, "write_bytes", short)
    monkeypatch.setattr(convert, "_MASK", np.ones((2, 2, 2), bool))
    monkeypatch.setattr(nifti, "preprocess_file", lambda *a: np.zeros((2, 2, 2), np.float32))
    with pytest.raises(OSError) as exc:
        convert._stage(("sub-1", tmp_path / "x.nii", tmp_path / "p" / "sub-1.npy", 4, "float16", 512, None))
    assert exc.value.errno == errno.ENOSPC and written


def test_a_second_run_on_the_same_output_is_refused(cohort, tmp_path, capsys):
    """Two runs on one --out: the second removed the first's temporaries and staged parts as its own, and one of
    them ended in a traceback (FileNotFoundError on a part); now the second is refused while the first runs."""
    import fcntl

    root = _make_bids(cohort, tmp_path / "bids")
    out = tmp_path / "v.h5"
    with open(tmp_path / ".v.h5.lock", "w") as held:  # as the running one holds it
        fcntl.flock(held, fcntl.LOCK_EX)
        assert cli.main(["nifti", "--bids", str(root), "--out", str(out), "--workers", "1", "--quiet"]) == 2
    assert "another process is writing --out" in capsys.readouterr().err
    assert not out.exists() and not convert.parts_dir(out).exists()
    assert cli.main(["nifti", "--bids", str(root), "--out", str(out), "--workers", "1", "--quiet"]) == 0


def test_an_image_the_system_will_not_read_is_one_line_and_fixing_it_makes_the_output_out_of_date(
    cohort, tmp_path, capsys, monkeypatch
):
    """Tests run as root, whom chmod does not deny: open is made to raise PermissionError for one image (by hand,
    as nobody-like root without CAP_DAC_OVERRIDE, a chmod 000 image gave the same). It was 'unreadable or truncated
    image NAME: Could not read file: PATH', found only once preprocessed; with --skip-bad, a re-run after the chmod
    that fixed it found the output up to date and left the subject out."""
    root = _make_bids(cohort, tmp_path / "bids", ["sub-bad0\t70\tM\tB"])
    locked = _image(root, "sub-bad0")
    shutil.copy(cohort.bids / "sub-0003" / "anat" / "sub-0003_T1w.nii.gz", locked)  # not a copy of a good one
    real_open = open

    def fake_open(path, *args, **kwargs):
        if os.fspath(path) == os.fspath(locked):
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return real_open(path, *args, **kwargs)

    out = tmp_path / "out" / "v.h5"
    args = ["nifti", "--bids", str(root), "--out", str(out), "--workers", "1", "--quiet"]
    line = "\n  sub-bad0: sub-bad0/anat/sub-bad0_T1w.nii.gz cannot be read: Permission denied"
    with monkeypatch.context() as patch:
        patch.setattr("builtins.open", fake_open)
        assert cli.main(args) == 2
        err = capsys.readouterr().err
        assert err.endswith(f"for the re-run:{line}\n") and "nothing written" in err
        assert not out.exists() and not convert.skipped_report_path(out).exists() and _staged(out) == set(GOOD)
        assert cli.main([*args, "--skip-bad"]) == 0
        assert f"listed in {convert.skipped_report_path(out)}:{line}\n" in capsys.readouterr().err
        report = convert.skipped_report_path(out).read_text()
        assert (
            report
            == "participant_id\treason\nsub-bad0\tsub-bad0/anat/sub-bad0_T1w.nii.gz cannot be read: Permission denied\n"
        )
    assert cli.main([*args, "--skip-bad"]) == 0  # readable now: not up to date
    assert "wrote 3 subjects" in capsys.readouterr().out and not convert.skipped_report_path(out).exists()
    with h5io.open_checked(out) as f:
        assert sorted(f["subject_id"].asstr()[:]) == [*GOOD, "sub-bad0"]


def test_scans_without_ages_are_preprocessed_for_predict_and_refused_for_training(cohort, tmp_path, capsys):
    """`--ages-optional`: new scans with no age at hand are written with age n/a (NaN) and a note; without it they
    are bad input; the trainer's check of a volume file refuses such a file, pointing at predict."""
    from fedmpi.data import check_volumes
    from fedmpi.errors import DataError

    root = _make_bids(cohort, tmp_path / "bids", ages={GOOD[1]: "n/a"})
    out = tmp_path / "new.h5"
    assert cli.main(["nifti", "--bids", str(root), "--out", str(out), "--workers", "1", "--quiet"]) == 2
    assert f"{GOOD[1]}: missing age" in capsys.readouterr().err and not out.exists()
    args = ["nifti", "--bids", str(root), "--out", str(out), "--workers", "1", "--quiet", "--ages-optional"]
    assert cli.main(args) == 0
    err = capsys.readouterr().err
    assert err.startswith(f"note: 1 of the 2 subjects have no age ({GOOD[1]}), stored as n/a: the file is for ")
    with h5py.File(out) as f:
        ages = f["age"][:]
    assert ages[0] == 60.5 and np.isnan(ages[1])
    assert check_volumes(out, ages_required=False)["n"] == 2
    with pytest.raises(
        DataError, match=re.escape("unknown age (preprocess nifti --ages-optional) can be dated by fedmpi predict")
    ):
        check_volumes(out)
