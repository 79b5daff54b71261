"""The report: the results table, and the files and figures it writes (reading the records: test_records)."""

from __future__ import annotations

import argparse
import csv
import json
import re
import shutil

import numpy as np
import pytest
from runrecords import load_runs, write_run

from fedmpi import report, tables
from fedmpi.errors import EXIT_USAGE, MissingExtra, ReportError
from fedmpi.records import load_run
from fedmpi.report import write_report


def test_results_rows_values(runs):
    rows = report.results_rows([load_run(p) for p in runs])
    assert [r["run"] for r in rows] == ["avg", "glob"]  # fedavg sorts first
    avg, glob = rows
    assert avg["target"] is None and glob["target"] == 0.9  # fedavg has no target
    assert avg["total_bytes"] == 6000 and glob["total_bytes"] == 3500
    assert avg["bytes_ratio_vs_fedavg"] == 1.0 and glob["bytes_ratio_vs_fedavg"] == pytest.approx(3500 / 6000)
    assert avg["mia_auc"] == 0.7 and glob["mia_auc"] is None
    assert glob["final_mae"] == 6.5 and glob["final_rmse"] == 7.5 and glob["sparsity"] == 0.9
    assert glob["distribution"] == "uniform-iid" and glob["wall_seconds"] == 20.0


def test_fedavg_ratio_only_within_the_same_distribution(tmp_path):
    a = write_run(
        tmp_path, "avg-iid", algorithm="fedavg", target=0.95, mae=[5.0], sparsities=[0], bytes_per_round=[100]
    )
    b = write_run(
        tmp_path,
        "g-skew",
        algorithm="fedsparsify-local",
        target=0.99,
        mae=[5.0],
        sparsities=[0.99],
        bytes_per_round=[10],
        distribution="skewed-noniid",
    )
    rows = {r["run"]: r for r in report.results_rows([load_run(a), load_run(b)])}
    assert rows["g-skew"]["bytes_ratio_vs_fedavg"] is None and rows["avg-iid"]["bytes_ratio_vs_fedavg"] == 1.0


def test_csv_and_markdown_blank_missing_values():
    row = dict.fromkeys(report.COLUMNS)
    row.update(run="r", algorithm="fedavg", total_bytes=2_500_000, final_mae=6.123456789, final_r=0.51234)
    text = report.to_csv([row])
    parsed = list(csv.DictReader(text.splitlines()))
    assert tuple(parsed[0]) == report.COLUMNS
    assert parsed[0]["final_mae"] == "6.12346" and parsed[0]["mia_auc"] == "" and parsed[0]["total_bytes"] == "2500000"
    md = report.to_markdown([row]).splitlines()
    assert md[0] == "| " + " | ".join(report.COLUMNS) + " |" and len(md) == 3
    assert "| 6.12 |" in md[2] and "2.5 MB" in md[2] and "| 0.512 |" in md[2]
    # the text columns are left-aligned, every number right-aligned
    assert md[1] == "|---|---|---|" + "---:|" * (len(report.COLUMNS) - 3)


TABLES = {"results.csv", "results.md", "accuracy.csv", "accuracy_paired.csv", "accuracy.md", "numbers.json"}
CURVES = {"mae_vs_round.png", "sparsity_vs_round.png", "mae_vs_bytes.png"}


def test_report_command_writes_every_file(runs, tmp_path, capsys):
    parser = argparse.ArgumentParser()
    report.add_arguments(parser)
    assert parser.parse_args(["r"]).out == "report"  # the default output folder
    out = tmp_path / "out"
    assert report.run(parser.parse_args([str(runs[0].parent), "--out", str(out)])) == 0  # a directory of runs
    names = (
        TABLES
        | CURVES
        | {
            "privacy.csv",
            "privacy_paired.csv",
            "privacy.md",
            "mia_auc_vs_sparsity.png",
            "mia_auc_vs_gap.png",
            "volume_slices.png",
        }
    )
    assert {p.name for p in out.iterdir()} == names  # no temporary files left behind
    for name in {n for n in names if n.endswith(".png")}:
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = list(csv.DictReader((out / "results.csv").read_text().splitlines()))
    assert [r["run"] for r in table] == ["avg", "glob"] and table[0]["mia_auc"] == "0.7"
    assert table[1]["bytes_ratio_vs_fedavg"] == "0.583333"
    assert "| avg | fedavg |" in (out / "results.md").read_text()
    accuracy = list(csv.DictReader((out / "accuracy.csv").read_text().splitlines()))
    assert tuple(accuracy[0]) == tables.ACCURACY_COLUMNS
    assert [(r["run"], r["train_subjects"], r["test_subjects"]) for r in accuracy] == [
        ("avg", "6", "4"),
        ("glob", "6", "4"),
    ]
    paired = list(csv.DictReader((out / "accuracy_paired.csv").read_text().splitlines()))
    assert [(r["algorithm"], r["mean_diff"], r["diff_low"], r["diff_high"], r["verdict"]) for r in paired] == [
        ("fedsparsify-global", "1", "1", "1", "inferior")
    ]
    privacy = list(csv.DictReader((out / "privacy.csv").read_text().splitlines()))
    assert [(r["run"], r["attack"], r["auc"]) for r in privacy] == [
        ("avg", "black_box", "0.65"),
        ("avg", "white_box", "0.7"),
    ]
    numbers = json.loads((out / "numbers.json").read_text())
    methods = numbers["accuracy"][0]["methods"]
    assert [m["label"] for m in methods] == ["fedavg", "fedsparsify-global 0.9"]
    assert methods[0]["clearly_learns"] is True and methods[1]["paired"]["verdict"] == "inferior"
    assert numbers["margin_years"] == tables.MARGIN_YEARS == 0.5
    assert "wrote" in capsys.readouterr().out


def test_a_run_without_predictions_or_attack_still_reports(tmp_path, capsys):
    run = write_run(tmp_path, "g", algorithm="oneshot", target=0.95, mae=[5.0], sparsities=[0.95], bytes_per_round=[10])
    _, written = report.write_report([run], tmp_path / "out")
    assert {p.name for p in written} == TABLES | CURVES
    err = capsys.readouterr().err
    assert "skipping privacy.csv, privacy.md, mia_auc_vs_sparsity.png and mia_auc_vs_gap.png" in err
    assert "oneshot 0.95 on uniform-iid: no fedavg run of the same setting and distribution; not paired" in err
    accuracy = list(csv.DictReader((tmp_path / "out" / "accuracy.csv").read_text().splitlines()))
    assert accuracy[0]["test_subjects"] == "" and accuracy[0]["train_subjects"] == ""
    assert accuracy[0]["final_mae"] == "5" and accuracy[0]["mae_ratio"] == "0.5"
    assert (tmp_path / "out" / "accuracy_paired.csv").read_text() == ",".join(tables.PAIRED_COLUMNS) + "\n"


def test_an_unfinished_run_is_refused_before_anything_is_written(tmp_path, capsys):
    run = write_run(tmp_path, "g", algorithm="oneshot", target=0.95, mae=[5.0], sparsities=[0.95], bytes_per_round=[10])
    (run / "summary.json").unlink()
    parser = argparse.ArgumentParser()
    report.add_arguments(parser)
    assert report.run(parser.parse_args([str(run), "--out", str(tmp_path / "out2")])) == EXIT_USAGE
    assert "summary.json: missing" in capsys.readouterr().err
    assert not (tmp_path / "out2").exists()


def test_a_bad_test_file_stops_the_report_before_anything_is_written(runs, tmp_path, capsys):
    (tmp_path / "split" / "test.h5").write_bytes(b"not hdf5")
    parser = argparse.ArgumentParser()
    report.add_arguments(parser)
    assert report.run(parser.parse_args([str(p) for p in runs] + ["--out", str(tmp_path / "out")])) == EXIT_USAGE
    assert "test.h5" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_damaged_metrics_fail_the_report_and_a_cut_last_line_is_reported(runs, tmp_path, capsys):

    run = tmp_path / "damaged"
    shutil.copytree(runs[0], run)
    metrics = run / "metrics.jsonl"
    lines = metrics.read_text().splitlines()
    metrics.write_text("\n".join(lines) + '\n{"round": 99, "cut')
    assert load_run(run).metrics == [json.loads(x) for x in lines]
    assert "is cut short" in capsys.readouterr().err
    metrics.write_text("\n".join(["{oops", *lines]) + "\n")
    with pytest.raises(ReportError, match=r"1 damaged line\(s\) before the last \(1 of"):
        load_run(run)


@pytest.mark.parametrize(
    "row, message",
    [
        ({"x": 1}, r"line 3: round must be an integer, got None"),
        ({"round": 3, "bytes_up": 1, "bytes_down": 1, "test_mae": "4.2"}, r"line 3: test_mae must be a number"),
        ({"round": True, "bytes_up": 1, "bytes_down": 1}, r"line 3: round must be an integer, got True"),
        (
            {"round": 3, "bytes_up": 1, "bytes_down": 1, "test_mae": True},
            r"line 3: test_mae must be a number, got True",
        ),
        ([3, 1, 1], r"line 3: not a JSON object"),
    ],
)
def test_a_metrics_row_without_what_the_report_reads_leaves_the_output_as_it_was(runs, tmp_path, capsys, row, message):

    run = tmp_path / "odd"
    shutil.copytree(runs[0], run)
    lines = (run / "metrics.jsonl").read_text().splitlines()[:2]
    (run / "metrics.jsonl").write_text("\n".join([*lines, json.dumps(row)]) + "\n")
    out = tmp_path / "out"
    out.mkdir()
    (out / "results.md").write_text("old")
    parser = argparse.ArgumentParser()
    report.add_arguments(parser)
    assert report.run(parser.parse_args([str(run), "--out", str(out)])) == EXIT_USAGE
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "metrics.jsonl" in err
    assert re.search(message, err)
    assert [p.name for p in out.iterdir()] == ["results.md"] and (out / "results.md").read_text() == "old"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]  # no staging left beside it


def test_a_failure_while_plotting_leaves_the_output_as_it_was(runs, tmp_path, monkeypatch):
    """The tables are rendered before the plots: they must not reach --out when a plot fails."""

    def broken(*args, **kwargs):
        raise RuntimeError("plot failed")

    monkeypatch.setattr(report, "plot_slices", broken)
    with pytest.raises(RuntimeError, match="plot failed"):
        write_report(runs, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def test_an_out_that_cannot_be_a_directory_is_one_clear_error(runs, tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    parser = argparse.ArgumentParser()
    report.add_arguments(parser)
    out_under = tmp_path / "file" / "r"
    for out, message in (
        (tmp_path / "file", f"--out {tmp_path / 'file'} exists and is not a directory"),
        (tmp_path / "file" / "r", f"cannot write --out {out_under}: {tmp_path / 'file'} is a file, not a directory"),
    ):
        assert report.run(parser.parse_args([str(runs[0]), "--out", str(out)])) == EXIT_USAGE
        assert capsys.readouterr().err == f"fedmpi report: error: {message}\n"


def test_report_without_matplotlib_names_the_extra(runs, tmp_path, monkeypatch):
    import builtins

    real = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name.startswith("matplotlib"):
            raise ModuleNotFoundError(f"No module named {name!r}")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    with pytest.raises(MissingExtra, match=r"pip install -e '\.\[report\]'"):
        write_report(list(runs), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_report_into_an_existing_folder_keeps_its_other_files(runs, tmp_path):
    """--out may be a results folder that already holds other files (or an earlier report): it is written
    into, not refused, and what else is there stays."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    (out / "results.md").write_text("old")
    _, written = write_report(list(runs), out)
    assert (out / "notes.txt").read_text() == "mine" and (out / "results.md").read_text() != "old"
    assert {p.name for p in out.iterdir()} == {p.name for p in written} | {"notes.txt"}


def test_a_report_without_attacks_removes_an_earlier_reports_privacy_files(runs, tmp_path, capsys):
    """A report of attacked runs, then one of runs without attack.json into the same --out: privacy.csv and its
    plots described the first report's runs beside the second's tables; now they go, and the note says so."""
    out = tmp_path / "out"
    write_report(list(runs), out)
    privacy = {"privacy.csv", "privacy_paired.csv", "privacy.md", "mia_auc_vs_sparsity.png", "mia_auc_vs_gap.png"}
    assert privacy <= {p.name for p in out.iterdir()}
    plain = write_run(
        tmp_path, "g", algorithm="oneshot", target=0.95, mae=[5.0], sparsities=[0.95], bytes_per_round=[10]
    )
    capsys.readouterr()
    write_report([plain], out)
    assert not privacy & {p.name for p in out.iterdir()}
    assert "an earlier report's" in capsys.readouterr().err


def test_two_runs_of_one_name_are_refused_before_anything_is_written(tmp_path):
    """The tables key runs by directory name: two runs named alike (from two folders) would be confused."""
    common = dict(algorithm="fedavg", target=0.0, mae=[5.0], sparsities=[0.0], bytes_per_round=[10])
    a = write_run(tmp_path / "a", "r", **common)
    b = write_run(tmp_path / "b", "r", **common, seed=1)
    with pytest.raises(ReportError, match=r"run names must be unique, got \['r'\]"):
        write_report([a, b], tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_volume_slices_come_from_the_first_run_whose_test_file_still_exists(runs, tmp_path):
    """A run whose split was deleted since is passed over for the slices, not an error."""
    gone = write_run(
        tmp_path / "other",
        "gone",
        algorithm="fedavg",
        target=0.0,
        mae=[5.0],
        sparsities=[0.0],
        bytes_per_round=[10],
        data_dir=str(tmp_path / "deleted"),
        seed=5,
    )
    _, written = write_report([gone, *runs], tmp_path / "out")
    assert "volume_slices.png" in {p.name for p in written}


def test_an_empty_test_file_is_refused_before_anything_is_written(runs, tmp_path):
    import h5py

    (tmp_path / "split" / "test.h5").unlink()
    with h5py.File(tmp_path / "split" / "test.h5", "w") as f:
        f.create_dataset("images", shape=(0, 10, 12, 10), dtype=np.float16)
        f.create_dataset("age", data=np.zeros(0, np.float32))
        for key in ("subject_id", "sex", "site"):
            f.create_dataset(key, data=np.array([], dtype=h5py.string_dtype()))
        f.attrs["voxel_size"] = 4.0
    with pytest.raises(ReportError, match=r"test\.h5: no volumes"):
        write_report(list(runs), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_the_mae_axis_stops_at_one_and_a_half_times_the_largest_first_value(runs, monkeypatch, tmp_path):
    """One diverging run (random pruning can cut the output bias) must not flatten every other curve."""
    import matplotlib

    matplotlib.use("Agg")
    seen = []

    def save(fig, path):
        import matplotlib.pyplot as plt

        seen.append([ax.get_ylim() for ax in fig.axes if ax.get_visible()])
        plt.close(fig)
        return path

    monkeypatch.setattr(report, "_save", save)
    diverging = write_run(
        tmp_path / "other",
        "div",
        algorithm="fedsparsify-global",
        target=0.99,
        mae=[9.2, 500.0, 900.0],
        sparsities=[0.5, 0.9, 0.99],
        bytes_per_round=[10, 10, 10],
    )
    loaded = load_runs(*runs, diverging)
    report.plot_curves(loaded, tmp_path / "p.png", "test_mae", "MAE", clip=1.5)
    assert seen == [[(0.0, 1.5 * 9.5)]]  # first values 9.0, 9.5 and 9.2


def test_the_records_the_report_reads_can_be_committed():
    """docs/results/runs/<run>/ holds the small records every committed table regenerates from; an ignore
    rule meant for the top-level runs/ must not hide them."""
    import subprocess
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    if not (root / ".git").exists() or shutil.which("git") is None:
        pytest.skip("not a git checkout")
    for name in ("metrics.jsonl", "summary.json", "config.json", "attack.json", "test_predictions.csv"):
        for folder in ("docs/results/runs/r", "docs/results/pilot/runs/r"):
            ignored = subprocess.run(["git", "check-ignore", "-q", f"{folder}/{name}"], cwd=root)
            assert ignored.returncode == 1, f"{folder}/{name} is ignored by git"
    assert subprocess.run(["git", "check-ignore", "-q", "runs/r/model.npz"], cwd=root).returncode == 0


@pytest.mark.parametrize("results", ["docs/results", "docs/results/pilot"])
def test_the_committed_tables_are_what_the_report_makes_of_the_committed_runs(results, tmp_path):
    """Every committed table and numbers.json regenerates byte for byte from the committed run records: a change
    to the report's wording or statistics shows here instead of leaving the committed results stale."""
    from pathlib import Path

    pytest.importorskip("matplotlib")
    folder = Path(__file__).resolve().parents[1] / results
    _, written = report.write_report([folder / "runs"], tmp_path / "out")
    texts = sorted(p.name for p in written if p.suffix in (".md", ".csv", ".json"))
    assert texts == sorted(p.name for p in folder.iterdir() if p.suffix in (".md", ".csv", ".json"))
    for name in texts:
        assert (tmp_path / "out" / name).read_bytes() == (folder / name).read_bytes(), f"{results}/{name} is stale"


def assert_refused(runs, tmp_path, capsys, message):
    """The report over `runs` ends with exit 2 and one line matching `message`, and writes nothing."""
    parser = argparse.ArgumentParser()
    report.add_arguments(parser)
    assert report.run(parser.parse_args([*map(str, runs), "--out", str(tmp_path / "out")])) == EXIT_USAGE
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and re.search(message, err), err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "change, message",
    [
        ({"attacks": [1, 2]}, r"attack.json: attacks must be an object of attack results, got list"),
        ({"attacks": {"white_box": "x"}}, r"attack.json: attacks.white_box: not a JSON object"),
        ({"attacks": {"white_box": {"auc": "0.5"}}}, r"attack.json: attacks.white_box: auc must be a number"),
        ({"attacks": {"black_box": {"auc": 0.6, "auc_low": "x"}}}, r"attacks.black_box: auc_low must be a number"),
        ({"train_mae": "3"}, r"attack.json: train_mae must be a number, got '3'"),
        ({"sparsity": "0.9"}, r"attack.json: sparsity must be a number, got '0.9'"),
        ({"attacks": None, "white_box": {"auc": "0.7"}}, r"attack.json: white_box: auc must be a number"),
        ({"eval_subjects": ["a"]}, r"attack.json: eval_subjects: must be an object of two lists"),
        ({"eval_subjects": {"members": [1], "nonmembers": []}}, r"eval_subjects: members must be a list of text"),
        (
            {"attacks": {"black_box": {"auc": 0.6, "eval_scores": {"members": ["x"], "nonmembers": []}}}},
            r"attacks.black_box.eval_scores: members must be a list of finite numbers",
        ),
        (
            {"attacks": {"black_box": {"auc": 0.6, "eval_scores": {"members": [1.0], "nonmembers": [True]}}}},
            r"attacks.black_box.eval_scores: nonmembers must be a list of finite numbers",
        ),
        (
            {
                "eval_subjects": {"members": ["a", "b"], "nonmembers": ["c"]},
                "attacks": {"black_box": {"auc": 0.6, "eval_scores": {"members": [1.0], "nonmembers": [0.0]}}},
            },
            r"attacks.black_box.eval_scores: 1 \+ 1 scores for 2 \+ 1 subjects in eval_subjects",
        ),
        # an attack scores at least one subject of each class: an empty one reached the paired bootstrap
        ({"eval_subjects": {"members": [], "nonmembers": ["c"]}}, r"attack.json: eval_subjects: members is empty"),
        (
            {"attacks": {"black_box": {"auc": 0.6, "eval_scores": {"members": [1.0], "nonmembers": []}}}},
            r"attacks.black_box.eval_scores: nonmembers is empty",
        ),
        # the top-level attacks of a file without "attacks" are what the tables read, their scores too
        (
            {"attacks": None, "white_box": {"auc": 0.7, "eval_scores": [1.0]}},
            r"attack.json: white_box.eval_scores: must be an object of two lists",
        ),
        (
            {
                "attacks": None,
                "eval_subjects": {"members": ["a", "b"], "nonmembers": ["c"]},
                "white_box": {"auc": 0.7, "eval_scores": {"members": [1.0], "nonmembers": [0.0]}},
            },
            r"attack.json: white_box.eval_scores: 1 \+ 1 scores for 2 \+ 1 subjects in eval_subjects",
        ),
    ],
)
def test_an_attack_record_the_tables_cannot_read_is_one_clear_error(runs, tmp_path, capsys, change, message):
    """attack.json's numbers reach means, differences and format specs: a damaged one is one line and exit 2,
    not a traceback from numpy or str.format."""
    attacked = next(p for p in runs if (p / "attack.json").exists())
    attack = json.loads((attacked / "attack.json").read_text())
    attack.update(change)
    (attacked / "attack.json").write_text(json.dumps(attack))
    assert_refused(runs, tmp_path, capsys, message)


@pytest.mark.parametrize(
    "record, change, message",
    [
        ("summary.json", {"algorithm": 3}, r"summary.json: algorithm must be text, got 3"),
        ("summary.json", {"distribution": ["a"]}, r"summary.json: distribution must be text, got \['a'\]"),
        ("summary.json", {"data_dir": 3}, r"summary.json: data_dir must be text, got 3"),
        ("config.json", {"federation": [1]}, r"config.json: federation: not a JSON object"),
        ("config.json", {"data": "x"}, r"config.json: data: not a JSON object"),
        ("config.json", {"run": {"seed": "0"}}, r"config.json: run: seed must be an integer, got '0'"),
        ("config.json", {"run": {"seed": True}}, r"config.json: run: seed must be an integer, got True"),
        ("config.json", {"federation": {"algorithm": 3}}, r"config.json: federation: algorithm must be text"),
        ("config.json", {"federation": {"target": "0.9"}}, r"config.json: federation: target must be a number"),
    ],
)
def test_a_run_record_of_the_wrong_type_is_one_clear_error(runs, tmp_path, capsys, record, change, message):
    """What the report groups, sorts and labels runs by (algorithm, distribution, data_dir, seed, target, the
    config's sections) must have the trainer's types: otherwise one line and exit 2, not a TypeError."""
    path = runs[1] / record
    value = json.loads(path.read_text())
    value.update(change)
    path.write_text(json.dumps(value))
    assert_refused(runs, tmp_path, capsys, message)


@pytest.mark.parametrize(
    "record, text, message",
    [
        ("summary.json", ('"final_mae": 6.5', '"final_mae": NaN'), r"summary.json: final_mae must be a finite number"),
        ("attack.json", ('"auc": 0.7', '"auc": Infinity'), r"attack.json: white_box: auc must be a finite number"),
        ("metrics.jsonl", ('"test_mae": 7.0', '"test_mae": NaN'), r"metrics.jsonl: line 2: test_mae must be a finite"),
    ],
)
def test_a_non_finite_number_in_a_record_is_one_clear_error(runs, tmp_path, capsys, record, text, message):
    """fedmpi records a non-finite value as null; a NaN or Infinity (which Python's json accepts) would otherwise
    reach the tables as "nan" and poison every mean over seeds and rounds."""
    glob = runs[1] if (runs[1] / record).exists() and text[0] in (runs[1] / record).read_text() else runs[0]
    path = glob / record
    assert text[0] in path.read_text()
    path.write_text(path.read_text().replace(text[0], text[1], 1))
    assert_refused(runs, tmp_path, capsys, message)
