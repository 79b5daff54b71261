"""The report: table values from hand-written run directories, and the files it writes."""

from __future__ import annotations

import argparse
import csv
import json
import re
import shutil

import numpy as np
import pytest

from fedmpi import report, stats, tables
from fedmpi.errors import ReportError
from fedmpi.report import load_run, write_report


def _write_run(
    root,
    name,
    *,
    algorithm,
    target,
    mae,
    sparsities,
    bytes_per_round,
    attack_auc=None,
    data_dir="",
    distribution="uniform-iid",
    wall=10.0,
    seed=0,
    predictions=None,
    attack=None,
    config=None,
    summary=None,
):
    """A finished run directory. predictions: (subject_id, age, predicted) rows of test_predictions.csv;
    attack: attack.json as written (attack_auc writes the old two-attack format instead); config and
    summary: values merged into config.json's sections and into summary.json."""
    run = root / name
    run.mkdir(parents=True)
    cfg = {
        "data": {"dir": "", "distribution": distribution, "subjects": 10, "seed": 0},
        "federation": {"algorithm": algorithm, "target": target, "learners": 2, "rounds": len(mae)},
        "train": {"epochs": 1, "lr": 0.01, "device": "cpu"},
        "run": {"seed": seed, "name": name, "dir": str(root)},
    }
    for section, values in (config or {}).items():
        cfg.setdefault(section, {}).update(values)
    (run / "config.json").write_text(json.dumps(cfg))
    rows = [
        {"round": t + 1, "sparsity": s, "target_sparsity": s, "test_mae": m, "bytes_up": b, "bytes_down": b}
        for t, (s, m, b) in enumerate(zip(sparsities, mae, bytes_per_round))
    ]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    total = int(sum(bytes_per_round))
    (run / "summary.json").write_text(
        json.dumps(
            {
                "algorithm": algorithm,
                "target_sparsity": target,
                "final_mae": mae[-1],
                "final_rmse": mae[-1] + 1,
                "final_r": 0.5,
                "final_sparsity": sparsities[-1],
                "total_bytes_up": total,
                "total_bytes_down": total,
                "wall_seconds": wall,
                "data_dir": data_dir,
                "baseline_mae": 10.0,
                "rounds": len(mae),
                **(summary or {}),
            }
        )
    )
    if predictions is not None:
        (run / "test_predictions.csv").write_text(
            "subject_id,age,predicted\n" + "".join(f"{i},{a:.2f},{p:.4f}\n" for i, a, p in predictions)
        )
    if attack_auc is not None:
        (run / "attack.json").write_text(
            json.dumps(
                {"sparsity": sparsities[-1], "white_box": {"auc": attack_auc}, "black_box": {"auc": attack_auc - 0.05}}
            )
        )
    if attack is not None:
        (run / "attack.json").write_text(json.dumps(attack))
    return run


def _predictions(errors, ages=(50.0, 60.0, 70.0, 55.0)):
    """test_predictions.csv rows for subjects s0, s1, ... whose prediction misses their age by `errors`."""
    return [(f"s{i}", a, a + e) for i, (a, e) in enumerate(zip(ages, errors))]


def _attack(aucs, sparsity=0.0, train_mae=1.0, test_mae=4.0):
    """attack.json in the current format: every attack in `aucs` (name -> AUC) with an interval of +-0.05."""
    attacks = {
        name: {
            "auc": auc,
            "auc_low": auc - 0.05,
            "auc_high": auc + 0.05,
            "auc_se": 0.02,
            "accuracy": auc - 0.1,
            "tpr_at_1pct_fpr": 0.02,
            "tpr_at_0.1pct_fpr": 0.01,
            "n_train": 20,
            "n_eval": 20,
        }
        for name, auc in aucs.items()
    }
    return {
        "attacks": attacks,
        **{k: attacks[k] for k in ("black_box", "white_box") if k in attacks},
        "sparsity": sparsity,
        "train_mae": train_mae,
        "test_mae": test_mae,
        "members_eval": 10,
        "nonmembers_eval": 10,
    }


def _load(*paths):
    """Runs as write_report sees them: loaded, with their setting labels."""
    runs = [load_run(p) for p in paths]
    labels = tables.setting_labels({r.name: r.config for r in runs})
    for r in runs:
        r.setting = labels[r.name]
    return runs


def _write_test_h5(directory):
    from fedtools import write_volumes

    directory.mkdir()
    write_volumes(directory / "test.h5", np.array([50.0, 60, 70, 55, 65]), np.random.default_rng(0), (10, 12, 10))
    return directory


@pytest.fixture
def runs(tmp_path):
    data = _write_test_h5(tmp_path / "split")
    a = _write_run(
        tmp_path / "runs",
        "avg",
        algorithm="fedavg",
        target=0.95,
        mae=[9.0, 7.0, 6.0],
        sparsities=[0, 0, 0],
        bytes_per_round=[1000, 1000, 1000],
        attack_auc=0.7,
        data_dir=str(data),
        predictions=_predictions([1.0, -2.0, 3.0, 4.0]),
    )
    b = _write_run(
        tmp_path / "runs",
        "glob",
        algorithm="fedsparsify-global",
        target=0.9,
        mae=[9.5, 7.5, 6.5],
        sparsities=[0.5, 0.8, 0.9],
        bytes_per_round=[1000, 500, 250],
        data_dir=str(data),
        wall=20.0,
        predictions=_predictions([2.0, -3.0, 4.0, 5.0]),
    )
    return a, b


def test_results_rows_values(runs):
    rows = report.results_rows([report.load_run(p) for p in runs])
    assert [r["run"] for r in rows] == ["avg", "glob"]  # fedavg sorts first
    avg, glob = rows
    assert avg["target"] is None and glob["target"] == 0.9  # fedavg has no target
    assert avg["total_bytes"] == 6000 and glob["total_bytes"] == 3500
    assert avg["bytes_ratio_vs_fedavg"] == 1.0 and glob["bytes_ratio_vs_fedavg"] == pytest.approx(3500 / 6000)
    assert avg["mia_auc"] == 0.7 and glob["mia_auc"] is None
    assert glob["final_mae"] == 6.5 and glob["final_rmse"] == 7.5 and glob["sparsity"] == 0.9
    assert glob["distribution"] == "uniform-iid" and glob["wall_seconds"] == 20.0


def test_fedavg_ratio_only_within_the_same_distribution(tmp_path):
    a = _write_run(
        tmp_path, "avg-iid", algorithm="fedavg", target=0.95, mae=[5.0], sparsities=[0], bytes_per_round=[100]
    )
    b = _write_run(
        tmp_path,
        "g-skew",
        algorithm="fedsparsify-local",
        target=0.99,
        mae=[5.0],
        sparsities=[0.99],
        bytes_per_round=[10],
        distribution="skewed-noniid",
    )
    rows = {r["run"]: r for r in report.results_rows([report.load_run(a), report.load_run(b)])}
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


def test_cumulative_bytes():
    rows = [{"bytes_up": 1, "bytes_down": 2}, {"bytes_up": 3, "bytes_down": 4}]
    assert tables.cumulative_bytes(rows).tolist() == [3, 10]


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
        | {"privacy.csv", "privacy.md", "mia_auc_vs_sparsity.png", "mia_auc_vs_gap.png", "volume_slices.png"}
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
    run = _write_run(
        tmp_path, "g", algorithm="oneshot", target=0.95, mae=[5.0], sparsities=[0.95], bytes_per_round=[10]
    )
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
    run = _write_run(
        tmp_path, "g", algorithm="oneshot", target=0.95, mae=[5.0], sparsities=[0.95], bytes_per_round=[10]
    )
    (run / "summary.json").unlink()
    parser = argparse.ArgumentParser()
    report.add_arguments(parser)
    assert report.run(parser.parse_args([str(run), "--out", str(tmp_path / "out2")])) == 1
    assert "summary.json: missing" in capsys.readouterr().err
    assert not (tmp_path / "out2").exists()


def test_a_bad_test_file_stops_the_report_before_anything_is_written(runs, tmp_path, capsys):
    (tmp_path / "split" / "test.h5").write_bytes(b"not hdf5")
    parser = argparse.ArgumentParser()
    report.add_arguments(parser)
    assert report.run(parser.parse_args([str(p) for p in runs] + ["--out", str(tmp_path / "out")])) == 1
    assert "test.h5" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_damaged_metrics_fail_the_report_and_a_cut_last_line_is_reported(runs, tmp_path, capsys):
    import shutil

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
    import shutil

    run = tmp_path / "odd"
    shutil.copytree(runs[0], run)
    lines = (run / "metrics.jsonl").read_text().splitlines()[:2]
    (run / "metrics.jsonl").write_text("\n".join([*lines, json.dumps(row)]) + "\n")
    out = tmp_path / "out"
    out.mkdir()
    (out / "results.md").write_text("old")
    parser = argparse.ArgumentParser()
    report.add_arguments(parser)
    assert report.run(parser.parse_args([str(run), "--out", str(out)])) == 1
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
        assert report.run(parser.parse_args([str(runs[0]), "--out", str(out)])) == 1
        assert capsys.readouterr().err == f"fedmpi report: error: {message}\n"


def test_report_without_matplotlib_names_the_extra(runs, tmp_path, monkeypatch):
    import builtins

    real = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name.startswith("matplotlib"):
            raise ModuleNotFoundError(f"No module named {name!r}")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    with pytest.raises(ReportError, match=r"pip install -e '\.\[report\]'"):
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


def test_two_runs_of_one_name_are_refused_before_anything_is_written(tmp_path):
    """The tables key runs by directory name: two runs named alike (from two folders) would be confused."""
    common = dict(algorithm="fedavg", target=0.0, mae=[5.0], sparsities=[0.0], bytes_per_round=[10])
    a = _write_run(tmp_path / "a", "r", **common)
    b = _write_run(tmp_path / "b", "r", **common, seed=1)
    with pytest.raises(ReportError, match=r"run names must be unique, got \['r'\]"):
        write_report([a, b], tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_an_argument_that_is_not_a_directory_is_one_clear_error(tmp_path):
    (tmp_path / "summary.json").write_text("{}")
    for path in (tmp_path / "summary.json", tmp_path / "nowhere"):
        with pytest.raises(ReportError, match="not a directory"):
            report.expand_run_dirs([path])


def test_a_run_without_metrics_is_refused(runs):
    """A run whose metrics.jsonl is gone would report with empty curves; it is an error naming the file."""
    (runs[0] / "metrics.jsonl").unlink()
    with pytest.raises(ReportError, match=r"metrics.jsonl: missing"):
        load_run(runs[0])


@pytest.mark.parametrize(
    "key", ["final_mae", "final_rmse", "final_r", "final_sparsity", "baseline_mae", "wall_seconds", "target_sparsity"]
)
def test_a_summary_value_the_tables_read_as_a_number_must_be_one(tmp_path, key):
    run = _write_run(tmp_path, "g", algorithm="oneshot", target=0.9, mae=[5.0], sparsities=[0.9], bytes_per_round=[10])
    summary = json.loads((run / "summary.json").read_text())
    summary[key] = "5.0"
    (run / "summary.json").write_text(json.dumps(summary))
    with pytest.raises(ReportError, match=f"summary.json: {key} must be a number, got '5.0'"):
        load_run(run)


def test_a_summary_without_its_target_takes_it_from_the_config(tmp_path):
    """Summaries written before fedmpi recorded target_sparsity still report their method's target."""
    run = _write_run(
        tmp_path, "g", algorithm="fedsparsify-global", target=0.9, mae=[5.0], sparsities=[0.9], bytes_per_round=[10]
    )
    summary = json.loads((run / "summary.json").read_text())
    del summary["target_sparsity"]
    (run / "summary.json").write_text(json.dumps(summary))
    assert load_run(run).target == 0.9


def test_a_real_split_s_distribution_comes_from_its_test_file(tmp_path):
    """A run on a split from `preprocess split` whose summary does not name its distribution: test.h5 does."""
    import h5py

    data = _write_test_h5(tmp_path / "split")
    with h5py.File(data / "test.h5", "a") as f:
        f.attrs["split"] = json.dumps({"distribution": "skewed-noniid", "learners": 2})
    run = _write_run(
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


def test_volume_slices_come_from_the_first_run_whose_test_file_still_exists(runs, tmp_path):
    """A run whose split was deleted since is passed over for the slices, not an error."""
    gone = _write_run(
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
    diverging = _write_run(
        tmp_path / "other",
        "div",
        algorithm="fedsparsify-global",
        target=0.99,
        mae=[9.2, 500.0, 900.0],
        sparsities=[0.5, 0.9, 0.99],
        bytes_per_round=[10, 10, 10],
    )
    loaded = _load(*runs, diverging)
    report.plot_curves(loaded, tmp_path / "p.png", "test_mae", "MAE", clip=1.5)
    assert seen == [[(0.0, 1.5 * 9.5)]]  # first values 9.0, 9.5 and 9.2


# ---------------------------------------------------------------- accuracy tables (pure)


def _pair(tmp_path, name, algorithm, errors, *, target=0.95, seed=0, distribution="uniform-iid", **kwargs):
    """A one-round run whose test predictions miss by `errors`."""
    return _write_run(
        tmp_path,
        name,
        algorithm=algorithm,
        target=target,
        mae=[float(np.mean(np.abs(errors)))],
        sparsities=[0.0 if algorithm == "fedavg" else target],
        bytes_per_round=[100],
        seed=seed,
        distribution=distribution,
        predictions=_predictions(errors),
        **kwargs,
    )


def test_accuracy_rows_values(tmp_path):
    avg = _pair(tmp_path, "avg", "fedavg", [1.0, -2.0, 3.0, 4.0])  # MAE 2.5, predict-the-mean MAE 10
    real = _pair(
        tmp_path,
        "real",
        "fedsparsify-global",
        [1.0, 1.0, 1.0, 1.0],
        config={"data": {"dir": "/data/x"}},
        summary={"distribution": "uniform-iid"},
    )
    counted = _pair(
        tmp_path,
        "counted",
        "fedsparsify-local",
        [1.0, 1.0, 1.0, 1.0],
        summary={"train_subjects": 1000, "test_subjects": 200},
    )
    rows = {r["run"]: r for r in tables.accuracy_rows(_load(avg, real, counted))}
    assert rows["avg"]["train_subjects"] == 6 and rows["avg"]["test_subjects"] == 4  # 10 synthetic subjects
    assert rows["avg"]["mae_ratio"] == 0.25 and rows["avg"]["seed"] == 0 and rows["avg"]["target"] is None
    assert rows["real"]["train_subjects"] is None and rows["real"]["test_subjects"] == 4  # a real cohort: unknown
    assert (rows["counted"]["train_subjects"], rows["counted"]["test_subjects"]) == (1000, 200)
    assert rows["real"]["bytes_ratio_vs_fedavg"] == 1.0 and rows["real"]["rounds"] == 1
    assert [r["run"] for r in tables.accuracy_rows(_load(avg, real, counted))] == ["avg", "real", "counted"]


def test_paired_difference_averages_over_the_seeds_both_have(tmp_path):
    runs = _load(
        _pair(tmp_path, "avg0", "fedavg", [1.0, -2.0, 3.0, 4.0], seed=0),
        _pair(tmp_path, "avg1", "fedavg", [2.0, 2.0, -2.0, 2.0], seed=1),
        _pair(tmp_path, "g0", "fedsparsify-global", [1.0, 2.0, -3.0, 4.0], seed=0),  # |d| = 0 everywhere
        _pair(tmp_path, "g1", "fedsparsify-global", [2.5, 2.5, 2.5, -2.5], seed=1),  # |d| = 0.5 everywhere
        _pair(tmp_path, "g2", "fedsparsify-global", [9.0, 9.0, 9.0, 9.0], seed=2),  # no fedavg seed 2: left out
    )
    rows, notes = tables.paired_rows(runs)
    assert notes == [] and len(rows) == 1
    row = rows[0]
    assert row["seeds"] == [0, 1] and row["n_seeds"] == 2 and row["n_subjects"] == 4
    assert row["seed_diffs"] == {0: 0.0, 1: 0.5}
    assert row["mean_diff"] == 0.25 and (row["diff_low"], row["diff_high"]) == (0.25, 0.25)
    assert row["mae"] == pytest.approx((2.5 + 2.5) / 2) and row["reference_mae"] == pytest.approx((2.5 + 2.0) / 2)
    assert (row["verdict"], row["vs_zero"], row["reference"]) == ("non-inferior", "worse", "fedavg")


def test_paired_verdict_at_the_margin(tmp_path):
    avg = _pair(tmp_path, "avg", "fedavg", [1.0, 2.0, 3.0, 4.0])
    at = _pair(tmp_path, "at", "fedsparsify-global", [1.5, 2.5, 3.5, 4.5], target=0.9)  # exactly 0.5 worse
    worse = _pair(tmp_path, "worse", "fedsparsify-global", [1.75, 2.75, 3.75, 4.75], target=0.99)
    better = _pair(tmp_path, "better", "fedsparsify-global", [0.5, 1.5, 2.5, 3.5], target=0.95)
    rows = {r["target"]: r for r in tables.paired_rows(_load(avg, at, worse, better))[0]}
    assert (rows[0.9]["diff_low"], rows[0.9]["diff_high"], rows[0.9]["verdict"]) == (0.5, 0.5, "inconclusive")
    assert (rows[0.99]["diff_low"], rows[0.99]["verdict"], rows[0.99]["vs_zero"]) == (0.75, "inferior", "worse")
    assert (rows[0.95]["diff_high"], rows[0.95]["verdict"], rows[0.95]["vs_zero"]) == (-0.5, "non-inferior", "better")


def test_paired_interval_spanning_zero_below_the_margin(tmp_path):
    ages = [40.0 + i for i in range(40)]
    avg = _write_run(
        tmp_path,
        "avg",
        algorithm="fedavg",
        target=0.0,
        mae=[2.0],
        sparsities=[0.0],
        bytes_per_round=[10],
        predictions=[(f"s{i}", a, a + 2.0) for i, a in enumerate(ages)],
    )
    # Differences alternate -0.25, +0.25: mean 0, bootstrap half-width about 1.96 x 0.25 / sqrt(40) = 0.08.
    g = _write_run(
        tmp_path,
        "g",
        algorithm="fedsparsify-global",
        target=0.9,
        mae=[2.0],
        sparsities=[0.9],
        bytes_per_round=[10],
        predictions=[(f"s{i}", a, a + 2.0 + (0.25 if i % 2 else -0.25)) for i, a in enumerate(ages)],
    )
    (row,), _ = tables.paired_rows(_load(avg, g))
    assert row["mean_diff"] == pytest.approx(0.0) and row["n_subjects"] == 40
    assert -0.11 < row["diff_low"] < -0.05 and 0.05 < row["diff_high"] < 0.11
    assert (row["verdict"], row["vs_zero"]) == ("non-inferior", "no difference")


def test_a_pooled_run_is_compared_with_every_distribution(tmp_path):
    runs = _load(
        _pair(tmp_path, "avg-iid", "fedavg", [1.0, 1.0, 1.0, 1.0]),
        _pair(tmp_path, "avg-skew", "fedavg", [3.0, 3.0, 3.0, 3.0], distribution="skewed-noniid"),
        _pair(
            tmp_path,
            "central",
            "centralized",
            [2.0, 2.0, 2.0, 2.0],
            distribution="skewed-noniid",
            summary={"total_bytes_up": 0, "total_bytes_down": 0},
        ),
    )
    central = next(r for r in runs if r.name == "central")
    assert central.distribution == tables.POOLED and central.target is None
    rows, _ = tables.paired_rows(runs)
    assert [(r["algorithm"], r["distribution"], r["mean_diff"]) for r in rows] == [
        ("centralized", "skewed-noniid", -1.0),
        ("centralized", "uniform-iid", 1.0),
    ]
    accuracy = {r["run"]: r for r in tables.accuracy_rows(runs)}
    assert accuracy["central"]["distribution"] == "pooled" and accuracy["central"]["bytes_ratio_vs_fedavg"] is None
    sections = tables.accuracy_sections(runs, rows)
    assert [(s["distribution"], [m["label"] for m in s["methods"]]) for s in sections] == [
        ("skewed-noniid", ["fedavg", "centralized (pooled)"]),
        ("uniform-iid", ["fedavg", "centralized (pooled)"]),
    ]
    assert [s["methods"][1]["paired"]["verdict"] for s in sections] == ["non-inferior", "inferior"]


def test_settings_keep_a_study_s_groups_apart(tmp_path):
    runs = _load(
        _pair(tmp_path, "acc-avg", "fedavg", [1.0, 1.0, 1.0, 1.0], config={"train": {"device": "auto"}}),
        _pair(tmp_path, "priv-avg", "fedavg", [3.0, 3.0, 3.0, 3.0], config={"train": {"epochs": 5}}),
        _pair(tmp_path, "priv-g", "fedsparsify-global", [2.0, 2.0, 2.0, 2.0], config={"train": {"epochs": 5}}),
        _pair(tmp_path, "acc-g", "fedsparsify-global", [1.0, 1.0, 1.0, 1.0], config={"model": {"new_key": 1}}),
    )
    # train.device and run.* do not make a setting; a key only some runs record (a later version's) is ignored.
    assert {r.name: r.setting for r in runs} == {
        "acc-avg": "train.epochs=1",
        "priv-avg": "train.epochs=5",
        "priv-g": "train.epochs=5",
        "acc-g": "train.epochs=1",
    }
    rows, _ = tables.paired_rows(runs)
    assert [(r["setting"], r["mean_diff"], r["reference_mae"]) for r in rows] == [
        ("train.epochs=1", 0.0, 1.0),
        ("train.epochs=5", -1.0, 3.0),
    ]
    assert tables.setting_labels({"a": {"train": {"lr": 0.1}}, "b": {"train": {"lr": 0.1}}}) == {"a": "", "b": ""}


def test_duplicate_seeds_keep_the_first_by_name(tmp_path):
    runs = _load(_pair(tmp_path, "b", "fedavg", [1.0] * 4), _pair(tmp_path, "a", "fedavg", [2.0] * 4))
    assert [r.name for r in tables.lines(runs)[tables.LineKey("", "uniform-iid", "fedavg", None)]] == ["a"]
    assert tables.duplicate_seeds(runs) == [
        "b repeats the setting, distribution, algorithm, target and seed of "
        "another run; the summaries use the first by name"
    ]


def test_baseline_clearly_learns_only_below_the_fraction(tmp_path):
    runs = _load(_pair(tmp_path, "a", "fedavg", [7.0] * 4, seed=0), _pair(tmp_path, "b", "fedavg", [7.5] * 4, seed=1))
    (fedavg,) = tables.accuracy_sections(runs, [])[0]["methods"]  # predict-the-mean MAE 10: 7.0 learns, 7.5 not
    assert (fedavg["clearly_learns"], fedavg["seeds_learning"]) == (False, "1/2")
    assert (fedavg["mae_mean"], fedavg["mae_min"], fedavg["mae_max"]) == (7.25, 7.0, 7.5)
    md = tables.accuracy_markdown(tables.accuracy_sections(runs, []))
    row = (
        "| fedavg | 2 | 7.25 [7.00, 7.50] | 7.25 (0.00) | 0.72 | 1.000 |  |  | does not clearly learn (1/2 seeds) |  |"
    )
    assert row in md


def test_accuracy_markdown_shows_the_paired_difference(runs):
    loaded = _load(*runs)
    md = tables.accuracy_markdown(tables.accuracy_sections(loaded, tables.paired_rows(loaded)[0]))
    assert (  # its MAE 9.5, 7.5, 6.5: the last rounds' mean 7.83, their swing 3.00
        "| fedsparsify-global 0.9 | 1 | 6.50 | 7.83 (3.00) | 0.65 | 0.583 | +1.00 [+1.00, +1.00] (4 subjects) | "
        "+1.00 | inferior | worse |" in md
    )
    assert "margin of 0.5 years" in md and "## uniform-iid" in md


def test_last_rounds_are_the_final_evaluated_ones_each_round_once():
    rows = [{"round": t, "test_mae": float(t)} for t in range(1, 9)]
    rows.insert(5, {"round": 5, "test_mae": 50.0})  # a resumed run wrote round 5 again: the later row counts
    rows.append({"round": 9})  # not evaluated
    assert tables.LAST_ROUNDS == 5 and tables.last_evaluations(rows) == {4: 4.0, 5: 50.0, 6: 6.0, 7: 7.0, 8: 8.0}
    assert tables.last_evaluations([{"round": 1}]) == {}


def test_the_last_rounds_column_names_its_rounds_when_evaluations_are_spaced(tmp_path):
    every = _write_run(
        tmp_path,
        "every",
        algorithm="fedavg",
        target=0.0,
        mae=[9.0, 8, 7, 6, 5, 4],
        sparsities=[0] * 6,
        bytes_per_round=[1] * 6,
    )
    spaced = tmp_path / "spaced"
    shutil.copytree(every, spaced)
    rows = [{"round": 5 * t, "test_mae": float(10 - t), "bytes_up": 1, "bytes_down": 1} for t in range(1, 7)]
    (spaced / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cells = []
    for run in (every, spaced):
        (section,) = tables.accuracy_sections(_load(run), [])
        cells.append(tables.accuracy_markdown([section]).splitlines()[-1].split(" | ")[3])
    assert cells == ["6.00 (4.00)", "6.00 (4.00), rounds 10-30"]
    assert "last 5 evaluated rounds (swing)" in tables.accuracy_markdown([section])


# ---------------------------------------------------------------- privacy tables (pure)


def test_privacy_rows_one_per_attack_and_old_attack_files(tmp_path):
    full = _pair(
        tmp_path,
        "full",
        "fedsparsify-global",
        [1.0] * 4,
        attack=_attack(
            {"white_box_mlp": 0.9, "black_box": 0.7, "loss_threshold": 0.6, "white_box": 0.8},
            sparsity=0.93,
            train_mae=1.5,
            test_mae=4.0,
        ),
        summary={"final_sparsity": 0.93},
    )
    old = _write_run(
        tmp_path,
        "old",
        algorithm="fedavg",
        target=0.0,
        mae=[5.0],
        sparsities=[0.0],
        bytes_per_round=[10],
        attack_auc=0.7,
    )
    none = _pair(tmp_path, "none", "fedavg", [1.0] * 4, seed=3)
    rows = tables.privacy_rows(_load(full, old, none))
    assert [(r["run"], r["attack"]) for r in rows] == [
        ("old", "black_box"),
        ("old", "white_box"),
        ("full", "loss_threshold"),
        ("full", "black_box"),
        ("full", "white_box"),
        ("full", "white_box_mlp"),
    ]
    mlp = rows[-1]
    assert (mlp["auc"], mlp["auc_low"], mlp["auc_high"]) == pytest.approx((0.9, 0.85, 0.95))
    assert mlp["final_sparsity"] == 0.93  # the attacked model's, from attack.json
    assert (mlp["train_mae"], mlp["test_mae"], mlp["mae_gap"], mlp["members_eval"]) == (1.5, 4.0, 2.5, 10)
    assert rows[0]["mae_gap"] is None and rows[0]["auc"] == pytest.approx(0.65) and rows[0]["final_sparsity"] == 0.0
    assert set(rows[0]) == set(tables.PRIVACY_COLUMNS)


def test_an_attack_of_another_model_is_left_out_with_a_line(tmp_path, capsys):
    kept = _pair(tmp_path, "kept", "fedsparsify-global", [1.0] * 4, attack=_attack({"white_box": 0.8}, sparsity=0.95))
    retrained = _pair(tmp_path, "retrained", "fedsparsify-global", [1.0] * 4, attack=_attack({"white_box": 0.8}))
    digests = {"model_sha256": "a" * 64}
    same = _pair(
        tmp_path, "same", "fedavg", [1.0] * 4, attack={**_attack({"white_box": 0.8}), **digests}, summary=digests
    )
    other = _pair(
        tmp_path,
        "other",
        "fedavg",
        [1.0] * 4,
        attack={**_attack({"white_box": 0.8}), **digests},
        summary={"model_sha256": "b" * 64},
    )
    runs = {r.name: r for r in _load(kept, retrained, same, other)}
    assert runs["kept"].attack and runs["same"].attack
    assert runs["retrained"].attack is None and runs["other"].attack is None
    err = capsys.readouterr().err
    assert f"{retrained / 'attack.json'}: it attacked a model with sparsity 0.0, the run's is 0.95; left out" in err
    assert "model_sha256 differs" in err and err.count("left out") == 2
    assert tables.stale_attack({"rounds": 40}, {"rounds": 39}) == "it attacked a model with rounds 39, the run's is 40"
    assert tables.stale_attack({"rounds": 40, "final_sparsity": 0.5}, {"rounds": 40, "sparsity": 0.5}) is None
    assert tables.stale_attack({}, {"sparsity": 0.5}) is None  # nothing to compare with


def test_attack_order_is_the_attack_module_s():
    from fedmpi import attack

    assert tables.ATTACK_ORDER == attack.ATTACKS and tables.LEGACY_ATTACKS == attack.KINDS


def test_privacy_sections_mean_auc_and_spearman(tmp_path):
    runs = _load(
        _pair(tmp_path, "a0", "fedavg", [1.0] * 4, seed=0, attack=_attack({"white_box": 0.9}, 0.0, 1.0, 4.0)),
        _pair(tmp_path, "a1", "fedavg", [1.0] * 4, seed=1, attack=_attack({"white_box": 0.8}, 0.0, 1.2, 4.0)),
        _pair(
            tmp_path,
            "g0",
            "fedsparsify-global",
            [1.0] * 4,
            target=0.9,
            attack=_attack({"white_box": 0.6}, 0.9, 3.0, 4.0),
        ),
    )
    (section,) = tables.privacy_sections(runs)
    dense, sparse = section["methods"]
    assert dense["label"] == "fedavg" and dense["attacks"]["white_box"]["auc_mean"] == pytest.approx(0.85)
    assert dense["mae_gap"] == pytest.approx(2.9) and sparse["sparsity"] == 0.9
    assert [p["auc_low"] for p in dense["attacks"]["white_box"]["runs"]] == pytest.approx([0.85, 0.75])
    c = section["correlations"]["white_box"]
    # gaps 3, 2.8, 1 and AUCs 0.9, 0.8, 0.6 rank alike; sparsity ranks 1.5, 1.5, 3 against AUC ranks 3, 2, 1.
    assert c["spearman_auc_vs_gap"] == pytest.approx(1.0)
    assert c["spearman_auc_vs_sparsity"] == pytest.approx(-np.sqrt(3) / 2) and c["runs"] == 3
    numbers = tables.numbers([], [section])
    assert numbers["privacy"][0]["lowest_sparsity"]["label"] == "fedavg"
    assert numbers["privacy"][0]["highest_sparsity"]["attacks"]["white_box"]["auc_mean"] == 0.6
    md = tables.privacy_markdown([section])
    assert "| fedavg | 2 | 0.000 | 1.10 | 4.00 | +2.90 | **0.850**: 0.900 [0.850, 0.950]; 0.800 [0.750, 0.850] |" in md
    assert "+1.00 / -0.87 (3 runs)" in md


# ---------------------------------------------------------------- inputs and curves


@pytest.mark.parametrize(
    "text,message",
    [
        ("id,age,predicted\ns0,50,51\n", "expected the columns subject_id,age,predicted"),
        ("subject_id,age,predicted\ns0,50,51\ns1,fifty,51\n", "line 3: age and predicted must be finite numbers"),
        ("subject_id,age,predicted\ns0,50,nan\n", "line 2: age and predicted must be finite numbers"),
        ("subject_id,age,predicted\ns0,inf,51\n", "line 2: age and predicted must be finite numbers"),
        ("subject_id,age,predicted\ns0,50,51\ns0,50,52\n", "line 3: subject s0 appears twice"),
    ],
)
def test_damaged_predictions_are_refused_naming_the_line(tmp_path, text, message):
    path = tmp_path / "test_predictions.csv"
    path.write_text(text)
    with pytest.raises(ReportError, match=message):
        report.read_predictions(path)


@pytest.mark.parametrize("data", [b"\xff\xfe\x00\x01x", b"subject_id,age,predicted\ns0,50,5\xff\n"])
def test_predictions_that_are_not_text_are_named_so(tmp_path, data):
    path = tmp_path / "test_predictions.csv"
    path.write_bytes(data)
    with pytest.raises(ReportError, match="not a text file"):
        report.read_predictions(path)


def test_read_predictions(tmp_path):
    path = tmp_path / "test_predictions.csv"
    path.write_text("subject_id,age,predicted\nsub-1,64.50,64.2140\nsub-2,46.30,56.6278\n")
    assert report.read_predictions(path) == {"sub-1": (64.5, 64.214), "sub-2": (46.3, 56.6278)}


def test_mean_curve_over_seeds(tmp_path):
    a = _write_run(
        tmp_path,
        "a",
        algorithm="fedavg",
        target=0.0,
        mae=[None, 8.0, 6.0],
        sparsities=[0, 0, 0],
        bytes_per_round=[10, 10, 10],
        seed=0,
    )
    b = _write_run(
        tmp_path,
        "b",
        algorithm="fedavg",
        target=0.0,
        mae=[None, 10.0, 4.0],
        sparsities=[0, 0, 0],
        bytes_per_round=[20, 20, 20],
        seed=1,
    )
    runs = _load(a, b)
    x, mean, low, high = tables.mean_curve(runs, "test_mae")
    assert (x.tolist(), mean.tolist(), low.tolist(), high.tolist()) == ([2, 3], [9, 5], [8, 4], [10, 6])
    x, mean, _, _ = tables.mean_curve(runs, "test_mae", by_bytes=True)
    assert x.tolist() == [60, 90] and mean.tolist() == [9, 5]  # mean cumulative up + down: (40 + 80) / 2, ...


def test_runtime_options_neither_split_a_setting_nor_block_a_resume():
    """One list of hardware and I/O options: the report pairs runs that differ only in them, and a checkpoint
    resumes across them; any other option does both."""
    from fedmpi.config import RUNTIME_KEYS, load_config
    from fedmpi.recorder import resume_key

    base = load_config()
    changed = {
        "train.device": "cpu",
        "train.threads": 3,
        "train.channels_last": True,
        "train.cudnn_benchmark": False,
        "data.workers": 2,
        "data.cache": "off",
        "data.cache_dir": "/elsewhere",
    }
    assert set(changed) == set(RUNTIME_KEYS)
    for key, value in changed.items():
        other = load_config(overrides=[f"{key}={json.dumps(value) if not isinstance(value, str) else value}"])
        assert tables.setting_items(other.to_dict()) == tables.setting_items(base.to_dict()), key
        assert resume_key(other) == resume_key(base), key
    lr = load_config(overrides=["train.lr=0.123"])
    assert tables.setting_items(lr.to_dict()) != tables.setting_items(base.to_dict())
    assert resume_key(lr) != resume_key(base)


def test_the_records_the_report_reads_can_be_committed():
    """docs/results/runs/<run>/ holds the small records every committed table regenerates from; an ignore
    rule meant for the top-level runs/ must not hide them."""
    import shutil
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


def test_a_directory_of_runs_stands_for_its_finished_runs_only(tmp_path, capsys):
    """A run stopped early (preempted) has a summary, but its model is not the run's: in a directory of runs
    it is left out, with a note naming it; named itself, it is reported as it is."""
    common = dict(algorithm="fedavg", target=0.0, mae=[6.0, 5.0], sparsities=[0.0, 0.0], bytes_per_round=[10, 10])
    _write_run(tmp_path / "runs", "done", **common)
    stopped = _write_run(tmp_path / "runs", "stopped", **common, summary={"preempted": True})
    assert [p.name for p in report.expand_run_dirs([tmp_path / "runs"])] == ["done"]
    assert f"leaving out {stopped}: it stopped before its last round" in capsys.readouterr().err
    assert report.expand_run_dirs([stopped]) == [stopped]
    (tmp_path / "runs" / "done" / "summary.json").write_text(json.dumps({"preempted": True}))
    with pytest.raises(ReportError, match="nor a directory of finished runs"):
        report.expand_run_dirs([tmp_path / "runs"])


def test_a_directory_of_runs_passes_over_a_run_still_in_progress(tmp_path):
    """A run still training has metrics but no summary yet: in a directory of runs it is not a finished run."""
    common = dict(algorithm="fedavg", target=0.0, mae=[6.0, 5.0], sparsities=[0.0, 0.0], bytes_per_round=[10, 10])
    _write_run(tmp_path / "runs", "done", **common)
    running = _write_run(tmp_path / "runs", "running", **common)
    (running / "summary.json").unlink()
    assert [p.name for p in report.expand_run_dirs([tmp_path / "runs"])] == ["done"]


def _run_on(tmp_path, name, algorithm, subjects, error, *, seed=0, target=0.95):
    """A one-round run whose prediction misses the subjects (id, age) by `error` (one for all, or one each)."""
    errors = np.broadcast_to(np.asarray(error, float), (len(subjects),))
    return _write_run(
        tmp_path,
        name,
        algorithm=algorithm,
        target=0.0 if algorithm == "fedavg" else target,
        mae=[float(np.mean(np.abs(errors)))],
        sparsities=[0.0 if algorithm == "fedavg" else target],
        bytes_per_round=[100],
        seed=seed,
        predictions=[(sid, age, age + e) for (sid, age), e in zip(subjects, errors)],
    )


def test_bytes_ratio_divides_by_the_fedavg_run_of_the_same_seed(tmp_path):
    common = dict(mae=[1.0], sparsities=[0.0])
    runs = _load(
        _write_run(tmp_path, "a0", algorithm="fedavg", target=0.0, bytes_per_round=[100], seed=0, **common),
        _write_run(tmp_path, "a1", algorithm="fedavg", target=0.0, bytes_per_round=[200], seed=1, **common),
        _write_run(tmp_path, "g1", algorithm="fedsparsify-global", target=0.9, bytes_per_round=[50], seed=1, **common),
    )
    assert {r["run"]: r for r in tables.accuracy_rows(runs)}["g1"]["bytes_ratio_vs_fedavg"] == 0.25


def test_a_curve_against_bytes_has_no_points_before_any_byte_moved(tmp_path):
    run = _write_run(
        tmp_path, "c", algorithm="fedavg", target=0.0, mae=[3.0, 2.0], sparsities=[0, 0], bytes_per_round=[0, 0]
    )
    x, mean, _, _ = tables.mean_curve(_load(run), "test_mae", by_bytes=True)
    assert x.tolist() == [] and mean.tolist() == []


def test_paired_subjects_are_those_every_seed_tested(tmp_path):
    """Seed 0 tested s0..s3, seed 1 s0, s1, s2 and s9: the pair is over s0, s1, s2, each Global's error
    1 year above FedAvg's."""
    seed0 = [("s0", 50.0), ("s1", 60.0), ("s2", 70.0), ("s3", 55.0)]
    seed1 = [("s0", 50.0), ("s1", 60.0), ("s2", 70.0), ("s9", 56.0)]
    runs = _load(
        _run_on(tmp_path, "avg0", "fedavg", seed0, 1.0, seed=0),
        _run_on(tmp_path, "avg1", "fedavg", seed1, 1.0, seed=1),
        _run_on(tmp_path, "g0", "fedsparsify-global", seed0, 2.0, seed=0),
        _run_on(tmp_path, "g1", "fedsparsify-global", seed1, 2.0, seed=1),
    )
    (row,), notes = tables.paired_rows(runs)
    assert notes == [] and row["n_subjects"] == 3 and row["mean_diff"] == 1.0


@pytest.mark.parametrize(
    "method_subjects",
    [
        [("s0", 51.0), ("s1", 60.0), ("s2", 70.0), ("s3", 55.0)],  # one age differs by a year
        [("s0", 50.0), ("s1", 60.0), ("s2", 70.0), ("s3", 55.01)],  # by 0.01 year
        [("s0", 50.0), ("s1", 60.0), ("s2", 70.0)],  # FedAvg also tested s3
    ],
)
def test_runs_tested_on_other_subjects_are_not_paired(tmp_path, method_subjects):
    fedavg = [("s0", 50.0), ("s1", 60.0), ("s2", 70.0), ("s3", 55.0)]
    runs = _load(
        _run_on(tmp_path, "avg", "fedavg", fedavg, 1.0),
        _run_on(tmp_path, "g", "fedsparsify-global", method_subjects, 1.0),
    )
    assert tables.paired_rows(runs) == ([], ["g and avg were tested on different subjects; not paired"])


def test_the_paired_interval_is_the_95_percent_bootstrap_of_the_differences(tmp_path):
    subjects = [(f"s{i}", 40.0 + i) for i in range(40)]
    differences = np.array([0.25 if i % 2 else -0.25 for i in range(40)])
    runs = _load(
        _run_on(tmp_path, "avg", "fedavg", subjects, 2.0),
        _run_on(tmp_path, "g", "fedsparsify-global", subjects, 2.0 + differences),
    )
    (row,), _ = tables.paired_rows(runs)
    assert (row["diff_low"], row["diff_high"]) == pytest.approx(
        stats.bootstrap_mean_interval(differences, 0.95), abs=1e-12
    )
