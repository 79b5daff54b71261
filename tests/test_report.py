"""The report: table values from hand-written run directories, and the files it writes."""
from __future__ import annotations

import argparse
import csv
import json

import numpy as np
import pytest

from fedmpi import report
from fedmpi.errors import ReportError
from fedmpi.report import load_run, write_report


def _write_run(root, name, *, algorithm, target, mae, sparsities, bytes_per_round, attack_auc=None,
               data_dir="", distribution="uniform-iid", wall=10.0):
    run = root / name
    run.mkdir(parents=True)
    cfg = {"data": {"dir": "", "distribution": distribution}, "federation": {"algorithm": algorithm, "target": target}}
    (run / "config.json").write_text(json.dumps(cfg))
    rows = [{"round": t + 1, "sparsity": s, "target_sparsity": s, "test_mae": m, "bytes_up": b, "bytes_down": b}
            for t, (s, m, b) in enumerate(zip(sparsities, mae, bytes_per_round))]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    total = int(sum(bytes_per_round))
    (run / "summary.json").write_text(json.dumps({
        "algorithm": algorithm, "target_sparsity": target, "final_mae": mae[-1], "final_rmse": mae[-1] + 1,
        "final_r": 0.5, "final_sparsity": sparsities[-1], "total_bytes_up": total, "total_bytes_down": total,
        "wall_seconds": wall, "data_dir": data_dir}))
    if attack_auc is not None:
        (run / "attack.json").write_text(json.dumps({
            "sparsity": sparsities[-1], "white_box": {"auc": attack_auc}, "black_box": {"auc": attack_auc - 0.05}}))
    return run


def _write_test_h5(directory):
    from fedtools import write_volumes

    directory.mkdir()
    write_volumes(directory / "test.h5", np.array([50.0, 60, 70, 55, 65]), np.random.default_rng(0), (10, 12, 10))
    return directory


@pytest.fixture
def runs(tmp_path):
    data = _write_test_h5(tmp_path / "split")
    a = _write_run(tmp_path / "runs", "avg", algorithm="fedavg", target=0.95, mae=[9.0, 7.0, 6.0],
                   sparsities=[0, 0, 0], bytes_per_round=[1000, 1000, 1000], attack_auc=0.7, data_dir=str(data))
    b = _write_run(tmp_path / "runs", "glob", algorithm="fedsparsify-global", target=0.9, mae=[9.5, 7.5, 6.5],
                   sparsities=[0.5, 0.8, 0.9], bytes_per_round=[1000, 500, 250], data_dir=str(data), wall=20.0)
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
    a = _write_run(tmp_path, "avg-iid", algorithm="fedavg", target=0.95, mae=[5.0], sparsities=[0],
                   bytes_per_round=[100])
    b = _write_run(tmp_path, "g-skew", algorithm="fedsparsify-local", target=0.99, mae=[5.0], sparsities=[0.99],
                   bytes_per_round=[10], distribution="skewed-noniid")
    rows = {r["run"]: r for r in report.results_rows([report.load_run(a), report.load_run(b)])}
    assert rows["g-skew"]["bytes_ratio_vs_fedavg"] is None and rows["avg-iid"]["bytes_ratio_vs_fedavg"] == 1.0


def test_csv_and_markdown_blank_missing_values():
    row = dict.fromkeys(report.COLUMNS)
    row.update(run="r", algorithm="fedavg", total_bytes=2_500_000, final_mae=6.123456789)
    text = report.to_csv([row])
    parsed = list(csv.DictReader(text.splitlines()))
    assert tuple(parsed[0]) == report.COLUMNS
    assert parsed[0]["final_mae"] == "6.12346" and parsed[0]["mia_auc"] == "" and parsed[0]["total_bytes"] == "2500000"
    md = report.to_markdown([row]).splitlines()
    assert md[0] == "| " + " | ".join(report.COLUMNS) + " |" and len(md) == 3
    assert "| 6.12 |" in md[2] and "2.5 MB" in md[2]


def test_cumulative_bytes():
    rows = [{"bytes_up": 1, "bytes_down": 2}, {"bytes_up": 3, "bytes_down": 4}]
    assert report.cumulative_bytes(rows).tolist() == [3, 10]


def test_report_command_writes_every_file(runs, tmp_path, capsys):
    parser = argparse.ArgumentParser()
    report.add_arguments(parser)
    out = tmp_path / "out"
    assert report.run(parser.parse_args([str(runs[0].parent), "--out", str(out)])) == 0  # a directory of runs
    names = {"results.csv", "results.md", "mae_vs_round.png", "sparsity_vs_round.png", "mae_vs_bytes.png",
             "mia_auc_vs_sparsity.png", "volume_slices.png"}
    assert {p.name for p in out.iterdir()} == names  # no temporary files left behind
    for name in names - {"results.csv", "results.md"}:
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = list(csv.DictReader((out / "results.csv").read_text().splitlines()))
    assert [r["run"] for r in table] == ["avg", "glob"] and table[0]["mia_auc"] == "0.7"
    assert table[1]["bytes_ratio_vs_fedavg"] == "0.583333"
    assert "| avg | fedavg |" in (out / "results.md").read_text()
    assert "wrote" in capsys.readouterr().out


def test_report_skips_mia_plot_without_attacks_and_rejects_unfinished_runs(tmp_path, capsys):
    run = _write_run(tmp_path, "g", algorithm="oneshot", target=0.95, mae=[5.0], sparsities=[0.95],
                     bytes_per_round=[10])
    rows, written = report.write_report([run], tmp_path / "out")
    assert {p.name for p in written} == {"results.csv", "results.md", "mae_vs_round.png", "sparsity_vs_round.png",
                                         "mae_vs_bytes.png"}
    assert "skipping mia_auc_vs_sparsity.png" in capsys.readouterr().err
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
