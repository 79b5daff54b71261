"""`python -m fedmpi predict`: a finished run's model applied to a preprocessed file, without mpirun (the run
directory is written as the trainer writes it)."""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from fedtools import SHAPE, write_split, write_volumes

from fedmpi import predict
from fedmpi.checkpoint import save_model
from fedmpi.config import Config
from fedmpi.data import file_digest
from fedmpi.model import BrainAgeCNN, flat_parameters
from preprocess import h5io, outputs


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A run directory with model.npz and summary.json recording its split, and the split."""
    root = tmp_path_factory.mktemp("predict")
    data = write_split(root / "split", learners=2, per_learner=6, test=10)
    cfg = Config()
    cfg.model.width, cfg.federation.learners, cfg.eval.batch_size = 0.125, 2, 4
    torch.manual_seed(0)
    values = flat_parameters(BrainAgeCNN(SHAPE, width=0.125, dropout=0.0))
    run = root / "runs" / "r"
    save_model(run / "model.npz", values, values != 0, {"input_shape": list(SHAPE), "config": cfg.to_dict()})
    split = {p.name: file_digest(p) for p in sorted(data.glob("*.h5"))}
    (run / "summary.json").write_text(json.dumps({"data_dir": str(data), "split": split}))
    return run, data, values


def _run(*argv):
    parser = argparse.ArgumentParser()
    predict.add_arguments(parser)
    return predict.run(parser.parse_args(list(argv)))


def test_each_subject_gets_the_models_prediction_and_its_gap(finished, tmp_path, capsys, monkeypatch):
    run, data, values = finished
    monkeypatch.chdir(tmp_path)
    assert _run("--run", str(run), "--data", str(data / "test.h5")) == 0
    with open(tmp_path / "test_brain_age.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["subject_id", "sex", "site", "age", "predicted", "gap"] and len(rows) == 10
    assert {(r["sex"], r["site"]) for r in rows} == {("F", "site-0")}  # as fedtools writes them
    model = BrainAgeCNN(SHAPE, width=0.125, dropout=0.0)
    from fedmpi.data import VolumeDataset
    from fedmpi.model import load_flat_parameters

    load_flat_parameters(model, values)
    model.eval()
    ds = VolumeDataset(data / "test.h5")
    with torch.no_grad():
        expected = model(torch.stack([ds[i][0] for i in range(len(ds))])).numpy().reshape(-1)
    assert [r["subject_id"] for r in rows] == ds.subject_ids
    np.testing.assert_allclose([float(r["predicted"]) for r in rows], expected, atol=1e-4)
    for r in rows:
        assert float(r["gap"]) == pytest.approx(float(r["predicted"]) - float(r["age"]), abs=2e-4)
    out = capsys.readouterr()
    assert out.out.startswith("10 subjects: MAE ") and "brain-age gap mean" in out.out and out.err == ""


def test_a_file_the_run_trained_on_is_named(finished, tmp_path, capsys):
    run, data, _ = finished
    out = tmp_path / "p.csv"
    assert _run("--run", str(run), "--data", str(data / "learner_2.h5"), "--out", str(out)) == 0
    assert "the run's own training file learner_2.h5: its brain-age gaps are optimistic" in capsys.readouterr().err
    assert out.exists()


def test_a_file_of_another_grid_is_refused_in_one_line_and_nothing_is_written(finished, tmp_path, capsys):
    run, _, _ = finished
    other = tmp_path / "other.h5"
    write_volumes(other, np.array([50.0, 60.0]), np.random.default_rng(0), shape=(20, 20, 20))
    out = tmp_path / "p.csv"
    assert _run("--run", str(run), "--data", str(other), "--out", str(out)) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "volumes are (20, 20, 20), the model takes (16, 20, 16)" in err
    assert not out.exists()


@pytest.mark.parametrize("problem", ["no run", "out is a directory", "out is the data", "no data"])
def test_what_cannot_give_predictions_is_one_line_and_exit_2(finished, tmp_path, capsys, problem):
    run, data, _ = finished
    args = {"--run": str(run), "--data": str(data / "test.h5"), "--out": str(tmp_path / "p.csv")}
    if problem == "no run":
        args["--run"] = str(tmp_path / "absent")
    elif problem == "out is a directory":
        args["--out"] = str(tmp_path)
    elif problem == "out is the data":
        args["--out"] = args["--data"]
    else:
        args["--data"] = str(tmp_path / "absent.h5")
    assert _run(*[x for kv in args.items() for x in kv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fedmpi predict: error: ") and err.count("\n") == 1
    assert file_digest(data / "test.h5")  # the volume file is left as it was


def test_a_diverged_model_gives_no_predictions(finished, tmp_path, capsys):
    _, data, values = finished
    bad = tmp_path / "bad"
    cfg = Config()
    cfg.model.width = 0.125
    broken = values.copy()
    broken[:3] = np.nan
    save_model(bad / "model.npz", broken, broken != 0, {"input_shape": list(SHAPE), "config": cfg.to_dict()})
    (bad / "summary.json").write_text("{}")
    assert _run("--run", str(bad), "--data", str(data / "test.h5"), "--out", str(tmp_path / "p.csv")) == 2
    assert "3 of its" in capsys.readouterr().err and not (tmp_path / "p.csv").exists()


@pytest.mark.parametrize(
    "record", ["model.npz", "summary.json", "ranks.json", "attack.json", "checkpoints/round-000003.npz"]
)
@pytest.mark.parametrize("via", ["path", "symlinked directory"])
def test_an_out_that_is_one_of_the_runs_records_is_refused_and_the_record_kept(
    finished, tmp_path, capsys, monkeypatch, record, via
):
    """--out is renamed onto its path: the run's model or summary given there (directly or through a link to the
    run directory) would be replaced by the CSV. The refusal comes before --out's directory is probed with a file
    of its own, so nothing is created in the run directory, even for a moment."""
    run, data, _ = finished
    probed = []
    monkeypatch.setattr(outputs, "probe_directory", lambda d: probed.append(Path(d).resolve()))
    (run / "ranks.json").write_text("{}")
    (run / "attack.json").write_text("{}")
    (run / "checkpoints").mkdir(exist_ok=True)
    (run / "checkpoints" / "round-000003.npz").write_bytes(b"checkpoint")
    before = (run / record).read_bytes()
    link = tmp_path / "link"
    link.symlink_to(run)
    out = (run if via == "path" else link) / record
    assert _run("--run", str(run), "--data", str(data / "test.h5"), "--out", str(out)) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is a record of the run" in err
    assert (run / record).read_bytes() == before and probed == []


@pytest.mark.parametrize("age", [float("inf"), float("-inf"), 700.0, -3.0])
def test_an_age_that_is_not_finite_or_not_plausible_is_refused(finished, tmp_path, capsys, age):
    """The gap is predicted minus chronological age: an infinite age gave an infinite MAE and gap, written as if
    results. (A NaN age is an unknown one: test_scans_without_an_age_get_their_predicted_age_and_no_gap.)"""
    run, _, _ = finished
    odd = tmp_path / "odd.h5"
    write_volumes(odd, np.array([50.0, age, 60.0]), np.random.default_rng(0))
    out = tmp_path / "p.csv"
    assert _run("--run", str(run), "--data", str(odd), "--out", str(out)) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "1 age(s) not in (0, 120] years: #1" in err
    assert not out.exists()


@pytest.mark.parametrize(
    "summary, said",
    [
        (None, "summary.json: missing (is the run finished?)"),
        ("{not json", "summary.json: not valid JSON"),
        ("[1, 2]", "summary.json: not a fedmpi record (JSON list, not an object)"),
        ('{"split": ["learner_1.h5"]}', "summary.json: split is list, not an object as the trainer writes it"),
        ('{"split": {"learner_1.h5": 5}}', "summary.json: split holds a digest that is not a string"),
        ('{"model_sha256": "0123"}', "is not the model"),
    ],
)
def test_a_summary_that_cannot_say_what_the_model_is_is_refused(finished, tmp_path, capsys, summary, said):
    """summary.json says which files the run trained on (their gaps are optimistic) and which model it finished
    with: one that is missing or damaged silently skipped the first check, and a model.npz of a run being resumed
    gave predictions of a model no summary records."""
    run, data, _ = finished
    copy = tmp_path / "run"
    copy.mkdir()
    (copy / "model.npz").write_bytes((run / "model.npz").read_bytes())
    if summary is not None:
        (copy / "summary.json").write_text(summary)
    out = tmp_path / "p.csv"
    assert _run("--run", str(copy), "--data", str(data / "learner_1.h5"), "--out", str(out)) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and said in err
    assert not out.exists()


def test_a_run_stopped_early_is_noted_and_one_without_digests_predicts(finished, tmp_path, capsys):
    run, data, _ = finished
    copy = tmp_path / "run"
    copy.mkdir()
    (copy / "model.npz").write_bytes((run / "model.npz").read_bytes())
    (copy / "summary.json").write_text(json.dumps({"rounds": 3, "preempted": True}))
    assert _run("--run", str(copy), "--data", str(data / "test.h5"), "--out", str(tmp_path / "p.csv")) == 0
    assert "stopped at round 3 (preempted)" in capsys.readouterr().err
    (copy / "summary.json").write_text(json.dumps({"split": None}))  # as a run made before digests were kept
    assert _run("--run", str(copy), "--data", str(data / "test.h5"), "--out", str(tmp_path / "p.csv")) == 0


def _with_ids(path, ids):
    write_volumes(path, np.linspace(50.0, 70.0, len(ids)), np.random.default_rng(0))
    with h5py.File(path, "r+") as f:
        del f["subject_id"]
        f.create_dataset("subject_id", data=np.array(ids, dtype=object), dtype=h5py.string_dtype())


def test_ids_with_commas_and_quotes_come_back_whole(finished, tmp_path):
    run, _, _ = finished
    ids = ["sub,01", 'sub"02', "süb-03"]
    _with_ids(tmp_path / "ids.h5", ids)
    out = tmp_path / "p.csv"
    assert _run("--run", str(run), "--data", str(tmp_path / "ids.h5"), "--out", str(out)) == 0
    with open(out, newline="") as f:
        assert [r["subject_id"] for r in csv.DictReader(f)] == ids


@pytest.mark.parametrize("bad", ["sub\r02", "sub\n02", "sub\t02"])
def test_an_id_holding_a_control_character_is_refused(finished, tmp_path, capsys, bad):
    """A carriage return was written unquoted and split its row in two; no preprocessed id holds a control
    character, so a file that does is damaged."""
    run, _, _ = finished
    _with_ids(tmp_path / "ids.h5", ["sub01", bad, "sub03"])
    out = tmp_path / "p.csv"
    assert _run("--run", str(run), "--data", str(tmp_path / "ids.h5"), "--out", str(out)) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"subject_id #1 {bad!r} holds a control character" in err
    assert not out.exists()


def test_the_summary_line_of_one_subject_claims_no_spread_nor_correlation(finished, tmp_path, capsys):
    run, _, _ = finished
    one = tmp_path / "one.h5"
    write_volumes(one, np.array([61.0]), np.random.default_rng(1))
    assert _run("--run", str(run), "--data", str(one), "--out", str(tmp_path / "p.csv")) == 0
    line = capsys.readouterr().out.splitlines()[0]
    assert line.startswith("1 subject: MAE ") and "r undefined (one age)" in line and "(one subject)" in line


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_calibrated_gaps_are_the_gaps_less_the_trend_fitted_on_the_held_out_file(finished, tmp_path, capsys):
    run, data, _ = finished
    new = tmp_path / "new.h5"
    with h5py.File(data / "test.h5") as f:
        low, high = f["age"][:].min(), f["age"][:].max()
    write_volumes(new, np.linspace(low + 0.1, high - 0.1, 7), np.random.default_rng(5))
    with h5py.File(new, "r+") as f:  # subjects of their own: fedtools numbers every file's from sub-0000
        f["subject_id"][:] = [f"new-{i}" for i in range(7)]
    assert _run("--run", str(run), "--data", str(data / "test.h5"), "--out", str(tmp_path / "held.csv")) == 0
    held = _rows(tmp_path / "held.csv")
    slope, intercept = np.polyfit([float(r["age"]) for r in held], [float(r["gap"]) for r in held], 1)
    capsys.readouterr()
    out = tmp_path / "p.csv"
    assert _run("--run", str(run), "--data", str(new), "--calibrate", str(data / "test.h5"), "--out", str(out)) == 0
    rows = _rows(out)
    assert (
        list(rows[0])
        == ["subject_id", "sex", "site", "age", "predicted", "gap", "predicted_corrected", "gap_corrected"]
        and len(rows) == 7
    )
    for r in rows:
        age, gap = float(r["age"]), float(r["gap"])
        assert float(r["gap_corrected"]) == pytest.approx(gap - (slope * age + intercept), abs=1e-3)
        assert float(r["predicted_corrected"]) == pytest.approx(age + float(r["gap_corrected"]), abs=2e-4)
    said = capsys.readouterr()
    assert said.err == ""  # held out, and the new ages lie within the held-out file's
    line = said.out.splitlines()[1]
    assert line.startswith(f"age bias from {data / 'test.h5'} (10 subjects, ages ") and "its r with age" in line
    assert f"gap = {slope:+.3f} (se " in line


def test_calibrating_on_the_file_it_corrects_is_noted_and_leaves_no_trend(finished, tmp_path, capsys):
    run, data, _ = finished
    test = str(data / "test.h5")
    assert _run("--run", str(run), "--data", test, "--calibrate", test, "--out", str(tmp_path / "p.csv")) == 0
    said = capsys.readouterr()
    assert "fitted on the file it corrects" in said.err and said.err.count("\n") == 1
    assert "its r with age 0.000 (uncorrected" in said.out
    rows = _rows(tmp_path / "p.csv")
    assert abs(np.mean([float(r["gap_corrected"]) for r in rows])) < 1e-3


@pytest.mark.parametrize(
    "ages, said", [([60.0, 95.0, 99.0], "2 subjects lie outside"), ([60.0, 99.0], "1 subject lies outside")]
)
def test_subjects_outside_the_calibration_ages_are_noted(finished, tmp_path, capsys, ages, said):
    run, data, _ = finished
    old = tmp_path / "old.h5"
    write_volumes(old, np.array(ages), np.random.default_rng(6))
    test, out = str(data / "test.h5"), str(tmp_path / "p.csv")
    assert _run("--run", str(run), "--data", str(old), "--calibrate", test, "--out", out) == 0
    assert said in capsys.readouterr().err


@pytest.mark.parametrize("problem", ["a training file", "two subjects", "out is the calibration file"])
def test_a_calibration_that_cannot_give_a_bias_is_refused_and_nothing_is_written(finished, tmp_path, capsys, problem):
    run, data, _ = finished
    calibrate, out = data / "learner_1.h5", tmp_path / "p.csv"
    if problem == "two subjects":
        calibrate = tmp_path / "two.h5"
        write_volumes(calibrate, np.array([50.0, 70.0]), np.random.default_rng(7))
    elif problem == "out is the calibration file":
        calibrate = out = tmp_path / "held.h5"
        write_volumes(calibrate, np.array([50.0, 60.0, 70.0]), np.random.default_rng(7))
    before = calibrate.read_bytes()
    assert (
        _run("--run", str(run), "--data", str(data / "test.h5"), "--calibrate", str(calibrate), "--out", str(out)) == 2
    )
    err = capsys.readouterr().err
    said = {
        "a training file": "is the run's own training file learner_1.h5: its gaps are optimistic",
        "two subjects": "an age bias needs at least 3 subjects of more than one age, not 2 of 2",
        "out is the calibration file": "is the volume file --calibrate names",
    }[problem]
    assert err.count("\n") == 1 and said in err
    assert calibrate.read_bytes() == before and (problem == "out is the calibration file" or not out.exists())


def test_an_empty_calibrate_is_refused_not_ignored(finished, tmp_path, capsys):
    """`--calibrate "$HELD"` with HELD unset asked for corrected gaps: writing the uncorrected ones would hide that."""
    run, data, _ = finished
    out = tmp_path / "p.csv"
    assert _run("--run", str(run), "--data", str(data / "test.h5"), "--calibrate", "", "--out", str(out)) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--calibrate is empty" in err and not out.exists()


def test_a_calibration_sharing_subjects_with_the_data_is_noted(finished, tmp_path, capsys):
    """A held-out file carved from --data (or --data from it) fits the bias partly on the subjects it corrects."""
    run, data, _ = finished
    part = tmp_path / "part.h5"
    h5io.copy_rows(data / "test.h5", part, range(6), {})
    test, out = str(data / "test.h5"), str(tmp_path / "p.csv")
    assert _run("--run", str(run), "--data", test, "--calibrate", str(part), "--out", out) == 0
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{test} and {part} share 6 subjects (by subject_id; 10 in {test})" in err


def test_scans_without_an_age_get_their_predicted_age_and_no_gap(finished, tmp_path, capsys):
    """New scans to date (preprocess nifti --ages-optional stores an unknown age as NaN): predict refused the whole
    file, as for a damaged age. Now such a subject gets its predicted age and n/a for its age and gap, the
    summary's MAE and gap are over the subjects with an age, and a calibration file still needs every age."""
    run, data, _ = finished
    some = tmp_path / "some.h5"
    write_volumes(some, np.array([50.0, np.nan, 60.0, 55.0]), np.random.default_rng(3))
    out = tmp_path / "p.csv"
    assert _run("--run", str(run), "--data", str(some), "--out", str(out), "--calibrate", str(data / "test.h5")) == 0
    rows = _rows(out)
    assert [r["age"] for r in rows] == ["50.0000", "n/a", "60.0000", "55.0000"]
    assert [r["gap"] == "n/a" for r in rows] == [False, True, False, False]
    assert rows[1]["predicted_corrected"] == rows[1]["gap_corrected"] == "n/a" and float(rows[1]["predicted"]) > 0
    for r in (rows[0], rows[2], rows[3]):
        assert float(r["gap"]) == pytest.approx(float(r["predicted"]) - float(r["age"]), abs=2e-4)
    said = capsys.readouterr().out
    assert said.startswith("4 subjects (1 without an age: no gap; over the 3 with one): MAE ")
    assert "nan" not in said.lower()

    none = tmp_path / "none.h5"
    write_volumes(none, np.full(3, np.nan), np.random.default_rng(4))
    assert _run("--run", str(run), "--data", str(none), "--out", str(tmp_path / "q.csv")) == 0
    assert {r["gap"] for r in _rows(tmp_path / "q.csv")} == {"n/a"}
    assert capsys.readouterr().out.startswith("3 subjects, none with an age: predicted age mean ")

    assert _run("--run", str(run), "--data", str(data / "test.h5"), "--calibrate", str(some), "--out", str(out)) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "1 age(s) not in (0, 120] years: #1 (nan)" in err
    assert (
        "unknown age (preprocess nifti --ages-optional) can be dated by fedmpi predict, not trained, split or "
        "calibrated on" in err
    )


def test_a_calibrated_file_of_which_no_subject_has_an_age_says_so_without_warnings(finished, tmp_path, capsys):
    """Review of c32b539: numpy's empty-mean warnings and a corrected gap mean of nan were printed."""
    import warnings

    run, data, _ = finished
    none = tmp_path / "none.h5"
    write_volumes(none, np.full(3, np.nan), np.random.default_rng(4))
    out = tmp_path / "p.csv"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert (
            _run("--run", str(run), "--data", str(none), "--calibrate", str(data / "test.h5"), "--out", str(out)) == 0
        )
    said = capsys.readouterr()
    assert "nan" not in said.out.lower() and said.err == ""
    assert f"no subject of {none} has an age to correct" in said.out
    assert {r["gap_corrected"] for r in _rows(out)} == {"n/a"}
