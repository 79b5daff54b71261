"""Reading a finished run's records: which directories are runs, and every record checked before a table reads it."""

from __future__ import annotations

import json

import pytest
from runrecords import write_run, write_test_h5

from fedmpi.errors import ReportError
from fedmpi.records import expand_run_dirs, load_run, read_predictions


def test_an_argument_that_is_not_a_directory_is_one_clear_error(tmp_path):
    (tmp_path / "summary.json").write_text("{}")
    for path in (tmp_path / "summary.json", tmp_path / "nowhere"):
        with pytest.raises(ReportError, match="not a directory"):
            expand_run_dirs([path])


def test_a_run_without_metrics_is_refused(runs):
    """A run whose metrics.jsonl is gone would report with empty curves; it is an error naming the file."""
    (runs[0] / "metrics.jsonl").unlink()
    with pytest.raises(ReportError, match=r"metrics.jsonl: missing"):
        load_run(runs[0])


@pytest.mark.parametrize(
    "key", ["final_mae", "final_rmse", "final_r", "final_sparsity", "baseline_mae", "wall_seconds", "target_sparsity"]
)
def test_a_summary_value_the_tables_read_as_a_number_must_be_one(tmp_path, key):
    run = write_run(tmp_path, "g", algorithm="oneshot", target=0.9, mae=[5.0], sparsities=[0.9], bytes_per_round=[10])
    summary = json.loads((run / "summary.json").read_text())
    summary[key] = "5.0"
    (run / "summary.json").write_text(json.dumps(summary))
    with pytest.raises(ReportError, match=f"summary.json: {key} must be a number, got '5.0'"):
        load_run(run)


def test_a_summary_without_its_target_takes_it_from_the_config(tmp_path):
    """Summaries written before fedmpi recorded target_sparsity still report their method's target."""
    run = write_run(
        tmp_path, "g", algorithm="fedsparsify-global", target=0.9, mae=[5.0], sparsities=[0.9], bytes_per_round=[10]
    )
    summary = json.loads((run / "summary.json").read_text())
    del summary["target_sparsity"]
    (run / "summary.json").write_text(json.dumps(summary))
    assert load_run(run).target == 0.9


def test_a_real_split_s_distribution_comes_from_its_test_file(tmp_path):
    """A run on a split from `preprocess split` whose summary does not name its distribution: test.h5 does."""
    import h5py

    data = write_test_h5(tmp_path / "split")
    with h5py.File(data / "test.h5", "a") as f:
        f.attrs["split"] = json.dumps({"distribution": "skewed-noniid", "learners": 2})
    run = write_run(
        tmp_path / "runs",
        "g",
        algorithm="fedavg",
        target=0.0,
        mae=[5.0],
        sparsities=[0.0],
        bytes_per_round=[10],
        data_dir=str(data),
        config={"data": {"dir": str(data)}},
    )
    assert load_run(run).distribution == "skewed-noniid"
    (data / "test.h5").unlink()  # gone since: unknown, not an error
    assert load_run(run).distribution == ""


@pytest.mark.parametrize(
    "text,message",
    [
        ("id,age,predicted\ns0,50,51\n", "expected the columns subject_id,age,predicted"),
        ("subject_id,age,predicted\ns0,50,51\ns1,fifty,51\n", "line 3: age and predicted must be finite numbers"),
        ("subject_id,age,predicted\ns0,50,nan\n", "line 2: age and predicted must be finite numbers"),
        ("subject_id,age,predicted\ns0,inf,51\n", "line 2: age and predicted must be finite numbers"),
        ("subject_id,age,predicted\ns0,50,51\ns0,50,52\n", "line 3: subject s0 appears twice"),
        # a subject id with a comma in it shifts the row: its age would be read from the id's tail
        ("subject_id,age,predicted\nsub-1,2,50.00,51.0000\n", "line 2: 4 fields, not the 3 columns"),
    ],
)
def test_damaged_predictions_are_refused_naming_the_line(tmp_path, text, message):
    path = tmp_path / "test_predictions.csv"
    path.write_text(text)
    with pytest.raises(ReportError, match=message):
        read_predictions(path)


@pytest.mark.parametrize("data", [b"\xff\xfe\x00\x01x", b"subject_id,age,predicted\ns0,50,5\xff\n"])
def test_predictions_that_are_not_text_are_named_so(tmp_path, data):
    path = tmp_path / "test_predictions.csv"
    path.write_bytes(data)
    with pytest.raises(ReportError, match="not a text file"):
        read_predictions(path)


def test_read_predictions(tmp_path):
    path = tmp_path / "test_predictions.csv"
    path.write_text("subject_id,age,predicted\nsub-1,64.50,64.2140\nsub-2,46.30,56.6278\n")
    assert read_predictions(path) == {"sub-1": (64.5, 64.214), "sub-2": (46.3, 56.6278)}


def test_a_directory_of_runs_stands_for_its_finished_runs_only(tmp_path, capsys):
    """A run stopped early (preempted) has a summary, but its model is not the run's: in a directory of runs
    it is left out, with a note naming it; named itself, it is reported as it is."""
    common = dict(algorithm="fedavg", target=0.0, mae=[6.0, 5.0], sparsities=[0.0, 0.0], bytes_per_round=[10, 10])
    write_run(tmp_path / "runs", "done", **common)
    stopped = write_run(tmp_path / "runs", "stopped", **common, summary={"preempted": True})
    assert [p.name for p in expand_run_dirs([tmp_path / "runs"])] == ["done"]
    assert f"leaving out {stopped}: it stopped before its last round" in capsys.readouterr().err
    assert expand_run_dirs([stopped]) == [stopped]
    (tmp_path / "runs" / "done" / "summary.json").write_text(json.dumps({"preempted": True}))
    with pytest.raises(ReportError, match="nor a directory of finished runs"):
        expand_run_dirs([tmp_path / "runs"])


def test_a_directory_of_runs_passes_over_a_run_still_in_progress(tmp_path):
    """A run still training has metrics but no summary yet: in a directory of runs it is not a finished run."""
    common = dict(algorithm="fedavg", target=0.0, mae=[6.0, 5.0], sparsities=[0.0, 0.0], bytes_per_round=[10, 10])
    write_run(tmp_path / "runs", "done", **common)
    running = write_run(tmp_path / "runs", "running", **common)
    (running / "summary.json").unlink()
    assert [p.name for p in expand_run_dirs([tmp_path / "runs"])] == ["done"]
