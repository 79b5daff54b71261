"""Hand-written run directories (config.json, metrics.jsonl, summary.json, test_predictions.csv, attack.json)
as a finished `fedmpi train` and `fedmpi attack` leave them: what the report and the tables read."""

from __future__ import annotations

import json

import numpy as np
from fedtools import write_volumes

from fedmpi import tables
from fedmpi.records import load_run


def write_run(
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


def predictions_rows(errors, ages=(50.0, 60.0, 70.0, 55.0)):
    """test_predictions.csv rows for subjects s0, s1, ... whose prediction misses their age by `errors`."""
    return [(f"s{i}", a, a + e) for i, (a, e) in enumerate(zip(ages, errors))]


def attack_record(aucs, sparsity=0.0, train_mae=1.0, test_mae=4.0, scores=None, subjects=None):
    """attack.json in the current format: every attack in `aucs` (name -> AUC) with an interval of +-0.05;
    with `scores` (name -> (member scores, non-member scores)) each of those attacks' eval_scores, and the
    eval_subjects (`subjects`, default m0, m1, ... and n0, n1, ...)."""
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
    record = {
        "attacks": attacks,
        **{k: dict(attacks[k]) for k in ("black_box", "white_box") if k in attacks},
        "sparsity": sparsity,
        "train_mae": train_mae,
        "test_mae": test_mae,
        "members_eval": 10,
        "nonmembers_eval": 10,
    }
    for name, (members, nonmembers) in (scores or {}).items():
        attacks[name]["eval_scores"] = {"members": list(members), "nonmembers": list(nonmembers)}
        record["eval_subjects"] = subjects or {
            "members": [f"m{i}" for i in range(len(members))],
            "nonmembers": [f"n{i}" for i in range(len(nonmembers))],
        }
    return record


def load_runs(*paths):
    """Runs as write_report sees them: loaded, with their setting labels."""
    runs = [load_run(p) for p in paths]
    labels = tables.setting_labels({r.name: r.config for r in runs})
    for r in runs:
        r.setting = labels[r.name]
    return runs


def write_test_h5(directory):
    directory.mkdir()
    write_volumes(directory / "test.h5", np.array([50.0, 60, 70, 55, 65]), np.random.default_rng(0), (10, 12, 10))
    return directory


def two_runs(tmp_path):
    """A FedAvg run and a Global run of 3 rounds on one test file, each with predictions; FedAvg's attacked."""
    data = write_test_h5(tmp_path / "split")
    a = write_run(
        tmp_path / "runs",
        "avg",
        algorithm="fedavg",
        target=0.95,
        mae=[9.0, 7.0, 6.0],
        sparsities=[0, 0, 0],
        bytes_per_round=[1000, 1000, 1000],
        attack_auc=0.7,
        data_dir=str(data),
        predictions=predictions_rows([1.0, -2.0, 3.0, 4.0]),
    )
    b = write_run(
        tmp_path / "runs",
        "glob",
        algorithm="fedsparsify-global",
        target=0.9,
        mae=[9.5, 7.5, 6.5],
        sparsities=[0.5, 0.8, 0.9],
        bytes_per_round=[1000, 500, 250],
        data_dir=str(data),
        wall=20.0,
        predictions=predictions_rows([2.0, -3.0, 4.0, 5.0]),
    )
    return a, b
