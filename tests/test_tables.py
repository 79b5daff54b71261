"""The study's tables (fedmpi.tables) on hand-written runs: accuracy rows and sections, the paired comparison
with FedAvg on the same subjects, the privacy rows and sections, and the mean curves."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from runrecords import attack_record, load_runs, predictions_rows, two_runs, write_run

from fedmpi import stats, tables
from fedmpi.runlog import dumps


def test_cumulative_bytes():
    rows = [{"bytes_up": 1, "bytes_down": 2}, {"bytes_up": 3, "bytes_down": 4}]
    assert tables.cumulative_bytes(rows).tolist() == [3, 10]


def _pair(tmp_path, name, algorithm, errors, *, target=0.95, seed=0, distribution="uniform-iid", **kwargs):
    """A one-round run whose test predictions miss by `errors`."""
    return write_run(
        tmp_path,
        name,
        algorithm=algorithm,
        target=target,
        mae=[float(np.mean(np.abs(errors)))],
        sparsities=[0.0 if algorithm == "fedavg" else target],
        bytes_per_round=[100],
        seed=seed,
        distribution=distribution,
        predictions=predictions_rows(errors),
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
    rows = {r["run"]: r for r in tables.accuracy_rows(load_runs(avg, real, counted))}
    assert rows["avg"]["train_subjects"] == 6 and rows["avg"]["test_subjects"] == 4  # 10 synthetic subjects
    assert rows["avg"]["mae_ratio"] == 0.25 and rows["avg"]["seed"] == 0 and rows["avg"]["target"] is None
    assert rows["real"]["train_subjects"] is None and rows["real"]["test_subjects"] == 4  # a real cohort: unknown
    assert (rows["counted"]["train_subjects"], rows["counted"]["test_subjects"]) == (1000, 200)
    assert rows["real"]["bytes_ratio_vs_fedavg"] == 1.0 and rows["real"]["rounds"] == 1
    assert [r["run"] for r in tables.accuracy_rows(load_runs(avg, real, counted))] == ["avg", "real", "counted"]


def test_paired_difference_averages_over_the_seeds_both_have(tmp_path):
    runs = load_runs(
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


def test_each_seed_gets_its_own_interval_and_verdict(tmp_path):
    """The pooled interval averages the seeds' differences per subject; each seed's own interval over the same
    subjects (the same bootstrap as the pooled one) says whether the verdict holds in that seed alone."""
    ages = [40.0 + i for i in range(20)]
    rng = np.random.default_rng(3)
    base = rng.uniform(1.0, 5.0, size=(2, 20))
    shift = [rng.normal(-0.5, 0.3, 20), rng.normal(0.9, 0.3, 20)]  # seed 0 better, seed 1 clearly past the margin

    def run(name, algorithm, seed, errors):
        return write_run(
            tmp_path,
            name,
            algorithm=algorithm,
            target=0.9 if algorithm != "fedavg" else 0.0,
            mae=[1.0],
            sparsities=[0.0],
            bytes_per_round=[10],
            seed=seed,
            predictions=[(f"s{i}", a, a + e) for i, (a, e) in enumerate(zip(ages, errors))],
        )

    runs = load_runs(
        *(run(f"a{s}", "fedavg", s, base[s]) for s in (0, 1)),
        *(run(f"g{s}", "fedsparsify-global", s, base[s] + shift[s]) for s in (0, 1)),
    )
    (row,) = tables.paired_rows(runs)[0]
    # the written predictions keep 4 decimals: the reference takes the errors as the records hold them
    errors = {n: np.abs(np.round(ages + e, 4) - ages) for n, e in (("a", base), ("g", base + np.array(shift)))}
    order = sorted(range(20), key=lambda i: f"s{i}")  # the subjects as the pairing sorts them, by name
    for s in (0, 1):
        d = (errors["g"][s] - errors["a"][s])[order]
        assert row["seed_diffs"][s] == pytest.approx(d.mean())
        assert (row["seed_low"][s], row["seed_high"][s]) == stats.bootstrap_mean_interval(d, tables.LEVEL)
    assert row["seed_high"][0] < 0 and row["seed_low"][1] > tables.MARGIN_YEARS
    assert row["seed_verdicts"] == {0: "non-inferior", 1: "inferior"}
    assert row["verdict"] == "non-inferior"  # the average of the two hides seed 1
    md = tables.accuracy_markdown(tables.accuracy_sections(runs, [row]))
    cell = "; ".join(
        f"{row['seed_diffs'][s]:+.2f} [{row['seed_low'][s]:+.2f}, {row['seed_high'][s]:+.2f}]" for s in (0, 1)
    )
    assert f"| {cell} | non-inferior | non-inferior, inferior | {row['vs_zero']} |" in md
    header, line = tables.to_csv([row], tables.PAIRED_COLUMNS).splitlines()
    assert "seed_verdicts" in header.split(",") and "0:non-inferior; 1:inferior" in line


def test_paired_verdict_at_the_margin(tmp_path):
    avg = _pair(tmp_path, "avg", "fedavg", [1.0, 2.0, 3.0, 4.0])
    at = _pair(tmp_path, "at", "fedsparsify-global", [1.5, 2.5, 3.5, 4.5], target=0.9)  # exactly 0.5 worse
    worse = _pair(tmp_path, "worse", "fedsparsify-global", [1.75, 2.75, 3.75, 4.75], target=0.99)
    better = _pair(tmp_path, "better", "fedsparsify-global", [0.5, 1.5, 2.5, 3.5], target=0.95)
    rows = {r["target"]: r for r in tables.paired_rows(load_runs(avg, at, worse, better))[0]}
    assert (rows[0.9]["diff_low"], rows[0.9]["diff_high"], rows[0.9]["verdict"]) == (0.5, 0.5, "inconclusive")
    assert (rows[0.99]["diff_low"], rows[0.99]["verdict"], rows[0.99]["vs_zero"]) == (0.75, "inferior", "worse")
    assert (rows[0.95]["diff_high"], rows[0.95]["verdict"], rows[0.95]["vs_zero"]) == (-0.5, "non-inferior", "better")


def test_paired_interval_spanning_zero_below_the_margin(tmp_path):
    ages = [40.0 + i for i in range(40)]
    avg = write_run(
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
    g = write_run(
        tmp_path,
        "g",
        algorithm="fedsparsify-global",
        target=0.9,
        mae=[2.0],
        sparsities=[0.9],
        bytes_per_round=[10],
        predictions=[(f"s{i}", a, a + 2.0 + (0.25 if i % 2 else -0.25)) for i, a in enumerate(ages)],
    )
    (row,), _ = tables.paired_rows(load_runs(avg, g))
    assert row["mean_diff"] == pytest.approx(0.0) and row["n_subjects"] == 40
    assert -0.11 < row["diff_low"] < -0.05 and 0.05 < row["diff_high"] < 0.11
    assert (row["verdict"], row["vs_zero"]) == ("non-inferior", "no difference")


def test_a_pooled_run_is_compared_with_every_distribution(tmp_path):
    runs = load_runs(
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
    runs = load_runs(
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
    runs = load_runs(_pair(tmp_path, "b", "fedavg", [1.0] * 4), _pair(tmp_path, "a", "fedavg", [2.0] * 4))
    assert [r.name for r in tables.lines(runs)[tables.LineKey("", "uniform-iid", "fedavg", None)]] == ["a"]
    assert tables.duplicate_seeds(runs) == [
        "b repeats the setting, distribution, algorithm, target and seed of "
        "another run; the summaries use the first by name"
    ]


def test_runs_of_more_than_one_fedmpi_source_are_noted(tmp_path):
    def run(name, source):
        summary = {"software": {"source_sha256": source}} if source else None
        return write_run(
            tmp_path,
            name,
            algorithm="fedavg",
            target=0.0,
            mae=[4.0],
            sparsities=[0.0],
            bytes_per_round=[10],
            summary=summary,
        )

    same = load_runs(run("a", "1" * 64), run("b", "1" * 64), run("old", None))
    assert tables.software_mix(same) == []  # one known source: nothing to tell
    mixed = same + load_runs(run("c", "2" * 64))
    assert tables.software_mix(mixed) == [
        "the runs come from 2 fedmpi sources (source_sha256 111111111111: a, b; 222222222222: c; no record: old)"
    ]


def test_baseline_clearly_learns_only_below_the_fraction(tmp_path):
    runs = load_runs(
        _pair(tmp_path, "a", "fedavg", [7.0] * 4, seed=0), _pair(tmp_path, "b", "fedavg", [7.5] * 4, seed=1)
    )
    (fedavg,) = tables.accuracy_sections(runs, [])[0]["methods"]  # predict-the-mean MAE 10: 7.0 learns, 7.5 not
    assert (fedavg["clearly_learns"], fedavg["seeds_learning"]) == (False, "1/2")
    assert (fedavg["mae_mean"], fedavg["mae_min"], fedavg["mae_max"]) == (7.25, 7.0, 7.5)
    md = tables.accuracy_markdown(tables.accuracy_sections(runs, []))
    row = (
        "| fedavg | 2 | 7.25 [7.00, 7.50] | 7.25 (0.00) | 0.72 | 1.000 |  |  | does not clearly learn (1/2 seeds) |  |"
    )
    assert row in md


def test_accuracy_markdown_shows_the_paired_difference(tmp_path):
    loaded = load_runs(*two_runs(tmp_path))
    md = tables.accuracy_markdown(tables.accuracy_sections(loaded, tables.paired_rows(loaded)[0]))
    assert (  # its MAE 9.5, 7.5, 6.5: the last rounds' mean 7.83, their swing 3.00
        "| fedsparsify-global 0.9 | 1 | 6.50 | 7.83 (3.00) | 0.65 | 0.583 | +1.00 [+1.00, +1.00] (4 subjects) | "
        "+1.00 [+1.00, +1.00] | inferior | inferior | worse |" in md
    )
    assert "margin of 0.5 years" in md and "## uniform-iid" in md


def test_last_rounds_are_the_final_evaluated_ones_each_round_once():
    rows = [{"round": t, "test_mae": float(t)} for t in range(1, 9)]
    rows.insert(5, {"round": 5, "test_mae": 50.0})  # a resumed run wrote round 5 again: the later row counts
    rows.append({"round": 9})  # not evaluated
    assert tables.LAST_ROUNDS == 5 and tables.last_evaluations(rows) == {4: 4.0, 5: 50.0, 6: 6.0, 7: 7.0, 8: 8.0}
    assert tables.last_evaluations([{"round": 1}]) == {}


def test_the_last_rounds_column_names_its_rounds_when_evaluations_are_spaced(tmp_path):
    every = write_run(
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
        (section,) = tables.accuracy_sections(load_runs(run), [])
        cells.append(tables.accuracy_markdown([section]).splitlines()[-1].split(" | ")[3])
    assert cells == ["6.00 (4.00)", "6.00 (4.00), rounds 10-30"]
    assert "last 5 evaluated rounds (swing)" in tables.accuracy_markdown([section])


def test_privacy_rows_one_per_attack_and_old_attack_files(tmp_path):
    full = _pair(
        tmp_path,
        "full",
        "fedsparsify-global",
        [1.0] * 4,
        attack=attack_record(
            {"white_box_mlp": 0.9, "black_box": 0.7, "loss_threshold": 0.6, "white_box": 0.8},
            sparsity=0.93,
            train_mae=1.5,
            test_mae=4.0,
        ),
        summary={"final_sparsity": 0.93},
    )
    old = write_run(
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
    rows = tables.privacy_rows(load_runs(full, old, none))
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
    kept = _pair(
        tmp_path, "kept", "fedsparsify-global", [1.0] * 4, attack=attack_record({"white_box": 0.8}, sparsity=0.95)
    )
    retrained = _pair(tmp_path, "retrained", "fedsparsify-global", [1.0] * 4, attack=attack_record({"white_box": 0.8}))
    digests = {"model_sha256": "a" * 64}
    same = _pair(
        tmp_path, "same", "fedavg", [1.0] * 4, attack={**attack_record({"white_box": 0.8}), **digests}, summary=digests
    )
    other = _pair(
        tmp_path,
        "other",
        "fedavg",
        [1.0] * 4,
        attack={**attack_record({"white_box": 0.8}), **digests},
        summary={"model_sha256": "b" * 64},
    )
    runs = {r.name: r for r in load_runs(kept, retrained, same, other)}
    assert runs["kept"].attack and runs["same"].attack
    assert runs["retrained"].attack is None and runs["other"].attack is None
    err = capsys.readouterr().err
    stale = f"{retrained / 'attack.json'}: it attacked a model with sparsity 0.0, the run's is 0.95; left out"
    assert f"fedmpi report: {stale}" in err
    assert "model_sha256 differs" in err and err.count("left out") == 2
    assert tables.stale_attack({"rounds": 40}, {"rounds": 39}) == "it attacked a model with rounds 39, the run's is 40"
    assert tables.stale_attack({"rounds": 40, "final_sparsity": 0.5}, {"rounds": 40, "sparsity": 0.5}) is None
    assert tables.stale_attack({}, {"sparsity": 0.5}) is None  # nothing to compare with


def test_attack_order_is_the_attack_module_s():
    from fedmpi import attack

    assert tables.ATTACK_ORDER == attack.ATTACKS and tables.LEGACY_ATTACKS == attack.KINDS


def test_privacy_sections_mean_auc_and_spearman(tmp_path):
    runs = load_runs(
        _pair(tmp_path, "a0", "fedavg", [1.0] * 4, seed=0, attack=attack_record({"white_box": 0.9}, 0.0, 1.0, 4.0)),
        _pair(tmp_path, "a1", "fedavg", [1.0] * 4, seed=1, attack=attack_record({"white_box": 0.8}, 0.0, 1.2, 4.0)),
        _pair(
            tmp_path,
            "g0",
            "fedsparsify-global",
            [1.0] * 4,
            target=0.9,
            attack=attack_record({"white_box": 0.6}, 0.9, 3.0, 4.0),
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


def test_privacy_paired_rows_pair_each_seed_with_fedavgs_on_the_same_subjects(tmp_path):
    def attacked(name, algorithm, seed, members, nonmembers, target=0.9, **kwargs):
        record = attack_record({"white_box": 0.5}, target, scores={"white_box": (members, nonmembers)}, **kwargs)
        return _pair(tmp_path, name, algorithm, [1.0] * 4, target=target, seed=seed, attack=record)

    runs = load_runs(
        attacked("a0", "fedavg", 0, [2.0, 3.0], [1.0, 0.0], target=0.0),  # AUC 1
        attacked("a1", "fedavg", 1, [2.0, 0.0], [1.0, -1.0], target=0.0),  # AUC 3/4
        attacked("g0", "fedsparsify-global", 0, [0.5, 3.0], [1.0, 0.0]),  # AUC 3/4: -1/4
        attacked("g1", "fedsparsify-global", 1, [2.0, 0.0], [1.0, -1.0]),  # the same scores: 0
        # attacked on other subjects than its FedAvg: named, not paired
        attacked(
            "h0",
            "fedsparsify-global",
            0,
            [1.0, 2.0],
            [0.0, 3.0],
            target=0.99,
            subjects={"members": ["m9", "m1"], "nonmembers": ["n0", "n1"]},
        ),
        # an attack.json from before per-subject scores: nothing to pair, nothing said
        _pair(
            tmp_path, "o0", "fedsparsify-global", [1.0] * 4, target=0.8, attack=attack_record({"white_box": 0.7}, 0.8)
        ),
    )
    rows, notes = tables.privacy_paired_rows(runs)
    (row,) = rows
    assert (row["algorithm"], row["target"], row["reference"], row["attack"]) == (
        "fedsparsify-global",
        0.9,
        "fedavg",
        "white_box",
    )
    assert row["seeds"] == [0, 1] and row["n_seeds"] == 2 and (row["members_eval"], row["nonmembers_eval"]) == (2, 2)
    assert row["seed_diffs"] == {0: -0.25, 1: 0.0} and row["mean_diff"] == pytest.approx(-0.125)
    assert row["auc"] == pytest.approx(0.75) and row["reference_auc"] == pytest.approx(0.875)
    assert row["diff_low"] <= row["mean_diff"] <= row["diff_high"] <= 0.0
    assert row["leakage"] == ("less" if row["diff_high"] < 0 else "no difference")
    assert notes == ["h0 and a0: white_box attacked other subjects than their pair's; not paired"]
    md = tables.privacy_markdown(tables.privacy_sections(runs), rows)
    assert "AUC minus fedavg's on the same attacked subjects" in md
    assert (
        f"| fedsparsify-global 0.9 | 0, 1 | 2 + 2 | **-0.125** [{row['diff_low']:+.3f}, {row['diff_high']:+.3f}]" in md
    )
    seed0 = stats.paired_auc_difference([([0.5, 3.0], [1.0, 0.0])], [([2.0, 3.0], [1.0, 0.0])], tables.LEVEL)
    assert (row["seed_low"][0], row["seed_high"][0]) == seed0[1:] and seed0[0] == -0.25
    assert (row["seed_low"][1], row["seed_high"][1]) == (0.0, 0.0)  # the same scores: no difference in any draw
    assert row["seed_leakage"] == {0: "less" if row["seed_high"][0] < 0 else "no difference", 1: "no difference"}
    assert f"(seeds: -0.250 {row['seed_leakage'][0]}; +0.000 no difference) |" in md
    assert tables.numbers([], [], rows)["privacy_paired"] == [
        {**row, **{k: {str(s): v for s, v in row[k].items()} for k in tables.PER_SEED if k in row}}
    ]
    assert tables.numbers([], [], rows)["privacy_paired"][0]["seed_diffs"] == {"0": -0.25, "1": 0.0}
    header, line = tables.to_csv(rows, tables.PRIVACY_PAIRED_COLUMNS).splitlines()
    assert (
        header.split(",") == list(tables.PRIVACY_PAIRED_COLUMNS) and ",white_box,0 1,2,2,2,0.75,0.875,-0.125," in line
    )
    assert f",0:{row['seed_leakage'][0]}; 1:no difference," in line  # a reading may hold a space: "; " parts seeds


def test_a_seed_attacked_on_other_subjects_than_the_first_is_named_as_such(tmp_path):
    """Seed 1's runs agree with each other but not with seed 0's subjects: every resample draws one set of subjects
    for all seeds, so seed 1 is left out, and the note says whose subjects it lacks (not that it lacks its pair's)."""
    other = {"members": ["m7", "m8"], "nonmembers": ["n0", "n1"]}
    runs = load_runs(
        *(
            _pair(tmp_path, f"{name}{seed}", algorithm, [1.0] * 4, target=target, seed=seed, attack=record)
            for name, algorithm, target in (("a", "fedavg", 0.0), ("g", "fedsparsify-global", 0.9))
            for seed in (0, 1)
            for record in [
                attack_record(
                    {"white_box": 1.0},
                    target,
                    scores={"white_box": ([2.0, 3.0], [1.0, 0.0])},
                    subjects=other if seed else None,
                )
            ]
        )
    )
    rows, notes = tables.privacy_paired_rows(runs)
    assert [r["seeds"] for r in rows] == [[0]]
    assert [list(rows[0][k]) for k in ("seed_diffs", "seed_low", "seed_high", "seed_leakage")] == [[0]] * 4
    assert notes == [
        "g1 and a1: white_box attacked other subjects than g0 and a0 (seed 0), whose subjects every seed's "
        "pair must share; not paired"
    ]


def test_a_pooled_method_is_labelled_pooled_in_the_paired_privacy_table(tmp_path):
    """A centralized run pairs with the FedAvg of each distribution, and its paired row shows in that distribution's
    section: labelled "(pooled)", as in the accuracy tables, not as if it were a federated line of it."""
    record = attack_record({"white_box": 1.0}, 0.0, scores={"white_box": ([2.0, 3.0], [1.0, 0.0])})
    runs = load_runs(
        _pair(tmp_path, "a", "fedavg", [1.0] * 4, target=None, attack=record),
        _pair(tmp_path, "c", "centralized", [1.0] * 4, target=None, attack=record),
    )
    rows, _ = tables.privacy_paired_rows(runs)
    assert [(r["algorithm"], r["distribution"]) for r in rows] == [("centralized", "uniform-iid")]
    md = tables.privacy_markdown(tables.privacy_sections(runs), rows)
    assert "| centralized (pooled) | 0 | 2 + 2 |" in md and "| centralized | 0 |" not in md


def test_privacy_paired_numbers_take_a_run_without_a_seed(tmp_path):
    """A line may hold a run without run.seed beside a seeded one: numbers.json's keys are sorted, and None and 0
    do not compare, so each seed's difference is keyed by text there, as in the accuracy sections."""
    scores = {"white_box": ([2.0, 3.0], [1.0, 0.0])}
    runs = load_runs(
        *(
            _pair(tmp_path, f"{name}{seed}", algorithm, [1.0] * 4, target=target, seed=seed, attack=record)
            for name, algorithm, target in (("a", "fedavg", 0.0), ("g", "fedsparsify-global", 0.9))
            for seed in (None, 0)
            for record in [attack_record({"white_box": 1.0}, target, scores=scores)]
        )
    )
    rows, _ = tables.privacy_paired_rows(runs)
    assert [r["seeds"] for r in rows] == [[0, None]]
    numbers = json.loads(dumps(tables.numbers([], [], rows)))
    assert numbers["privacy_paired"][0]["seed_diffs"] == {"0": 0.0, "None": 0.0}
    line = tables.to_csv(rows, tables.PRIVACY_PAIRED_COLUMNS).splitlines()[1]
    assert ",0 None,2," in line and ",0:0; None:0," in line  # in a cell the seedless run is named, not left blank


def test_mean_curve_over_seeds(tmp_path):
    a = write_run(
        tmp_path,
        "a",
        algorithm="fedavg",
        target=0.0,
        mae=[None, 8.0, 6.0],
        sparsities=[0, 0, 0],
        bytes_per_round=[10, 10, 10],
        seed=0,
    )
    b = write_run(
        tmp_path,
        "b",
        algorithm="fedavg",
        target=0.0,
        mae=[None, 10.0, 4.0],
        sparsities=[0, 0, 0],
        bytes_per_round=[20, 20, 20],
        seed=1,
    )
    runs = load_runs(a, b)
    x, mean, low, high = tables.mean_curve(runs, "test_mae")
    assert (x.tolist(), mean.tolist(), low.tolist(), high.tolist()) == ([2, 3], [9, 5], [8, 4], [10, 6])
    x, mean, _, _ = tables.mean_curve(runs, "test_mae", by_bytes=True)
    assert x.tolist() == [60, 90] and mean.tolist() == [9, 5]  # mean cumulative up + down: (40 + 80) / 2, ...


def test_runtime_options_neither_split_a_setting_nor_block_a_resume():
    """One list of hardware and I/O options: the report pairs runs that differ only in them, and a checkpoint
    resumes across them; any other option does both."""
    from fedmpi.config import RUNTIME_KEYS, load_config
    from fedmpi.resume import resume_key

    base = load_config()
    changed = {
        "train.device": "cpu",
        "train.threads": 3,
        "train.channels_last": True,
        "train.cudnn_benchmark": False,
        "train.deterministic": True,
        "data.workers": 2,
        "data.cache": "off",
        "data.cache_dir": "/elsewhere",
    }
    assert set(changed) == set(RUNTIME_KEYS)
    for key, value in changed.items():
        override = f"{key}={json.dumps(value) if not isinstance(value, str) else value}"
        other = load_config(overrides=[override, "data.cache=off"] if key == "data.workers" else [override])
        assert tables.setting_items(other.to_dict()) == tables.setting_items(base.to_dict()), key
        assert resume_key(other) == resume_key(base), key
    lr = load_config(overrides=["train.lr=0.123"])
    assert tables.setting_items(lr.to_dict()) != tables.setting_items(base.to_dict())
    assert resume_key(lr) != resume_key(base)


def _run_on(tmp_path, name, algorithm, subjects, error, *, seed=0, target=0.95):
    """A one-round run whose prediction misses the subjects (id, age) by `error` (one for all, or one each)."""
    errors = np.broadcast_to(np.asarray(error, float), (len(subjects),))
    return write_run(
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
    runs = load_runs(
        write_run(tmp_path, "a0", algorithm="fedavg", target=0.0, bytes_per_round=[100], seed=0, **common),
        write_run(tmp_path, "a1", algorithm="fedavg", target=0.0, bytes_per_round=[200], seed=1, **common),
        write_run(tmp_path, "g1", algorithm="fedsparsify-global", target=0.9, bytes_per_round=[50], seed=1, **common),
    )
    assert {r["run"]: r for r in tables.accuracy_rows(runs)}["g1"]["bytes_ratio_vs_fedavg"] == 0.25


def test_a_curve_against_bytes_has_no_points_before_any_byte_moved(tmp_path):
    run = write_run(
        tmp_path, "c", algorithm="fedavg", target=0.0, mae=[3.0, 2.0], sparsities=[0, 0], bytes_per_round=[0, 0]
    )
    x, mean, _, _ = tables.mean_curve(load_runs(run), "test_mae", by_bytes=True)
    assert x.tolist() == [] and mean.tolist() == []


def test_paired_subjects_are_those_every_seed_tested(tmp_path):
    """Seed 0 tested s0..s3, seed 1 s0, s1, s2 and s9: the pair is over s0, s1, s2, each Global's error
    1 year above FedAvg's."""
    seed0 = [("s0", 50.0), ("s1", 60.0), ("s2", 70.0), ("s3", 55.0)]
    seed1 = [("s0", 50.0), ("s1", 60.0), ("s2", 70.0), ("s9", 56.0)]
    runs = load_runs(
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
    runs = load_runs(
        _run_on(tmp_path, "avg", "fedavg", fedavg, 1.0),
        _run_on(tmp_path, "g", "fedsparsify-global", method_subjects, 1.0),
    )
    assert tables.paired_rows(runs) == ([], ["g and avg were tested on different subjects; not paired"])


def test_a_seed_left_out_of_the_pairing_leaves_no_per_seed_figure(tmp_path):
    """Seed 1's runs were tested on other subjects: every per-seed figure is keyed by the seeds paired (0 and 2), each
    holding its own seed's difference and interval, and the markdown lists just those, in that order."""
    subjects = [("s0", 50.0), ("s1", 60.0), ("s2", 70.0), ("s3", 55.0)]
    d = {0: np.array([0.2, 0.3, 0.2, 0.1]), 2: np.array([2.0, 1.0, 3.0, 1.0])}  # fedavg misses each by 1 year
    runs = load_runs(
        *(_run_on(tmp_path, f"avg{s}", "fedavg", subjects, 1.0, seed=s) for s in (0, 1, 2)),
        _run_on(tmp_path, "g1", "fedsparsify-global", [("s0", 51.0), *subjects[1:]], 9.0, seed=1),
        *(_run_on(tmp_path, f"g{s}", "fedsparsify-global", subjects, 1.0 + d[s], seed=s) for s in (0, 2)),
    )
    (row,), notes = tables.paired_rows(runs)
    assert notes == ["g1 and avg1 were tested on different subjects; not paired"] and row["seeds"] == [0, 2]
    assert {k: list(row[k]) for k in tables.PER_SEED if k in row} == {k: [0, 2] for k in tables.PER_SEED[:4]}
    intervals = {s: stats.bootstrap_mean_interval(d[s], tables.LEVEL) for s in (0, 2)}
    assert row["seed_diffs"] == {s: pytest.approx(d[s].mean()) for s in (0, 2)}
    assert [(row["seed_low"][s], row["seed_high"][s]) for s in (0, 2)] == [pytest.approx(intervals[s]) for s in (0, 2)]
    assert row["seed_verdicts"] == {0: "non-inferior", 2: "inferior"}
    md = tables.accuracy_markdown(tables.accuracy_sections(runs, [row]))
    cells = [f"{row['seed_diffs'][s]:+.2f} [{row['seed_low'][s]:+.2f}, {row['seed_high'][s]:+.2f}]" for s in (0, 2)]
    assert f"| {'; '.join(cells)} | inferior | non-inferior, inferior |" in md


def test_the_paired_interval_is_the_95_percent_bootstrap_of_the_differences(tmp_path):
    subjects = [(f"s{i}", 40.0 + i) for i in range(40)]
    differences = np.array([0.25 if i % 2 else -0.25 for i in range(40)])
    runs = load_runs(
        _run_on(tmp_path, "avg", "fedavg", subjects, 2.0),
        _run_on(tmp_path, "g", "fedsparsify-global", subjects, 2.0 + differences),
    )
    (row,), _ = tables.paired_rows(runs)
    assert (row["diff_low"], row["diff_high"]) == pytest.approx(
        stats.bootstrap_mean_interval(differences, 0.95), abs=1e-12
    )


def test_per_run_ratios_are_blank_without_a_denominator():
    assert tables.total_bytes({"total_bytes_up": 3, "total_bytes_down": 4}) == 7
    assert tables.total_bytes({"total_bytes_up": 3}) is None
    assert tables.mae_ratio({"final_mae": 2.0, "baseline_mae": 8.0}) == 0.25
    assert tables.mae_ratio({"final_mae": 2.0, "baseline_mae": 0.0}) is None
    assert tables.learns({"final_mae": 2.0, "baseline_mae": 0.0}) is None  # not recorded, not "does not learn"
    assert tables.learns({"final_mae": 2.0}) is None


def test_bytes_ratio_is_blank_when_the_fedavg_run_sent_nothing(tmp_path):
    common = dict(mae=[1.0], sparsities=[0.0])
    runs = load_runs(
        write_run(tmp_path, "a", algorithm="fedavg", target=0.0, bytes_per_round=[0], **common),
        write_run(tmp_path, "g", algorithm="fedsparsify-global", target=0.9, bytes_per_round=[50], **common),
    )
    assert {r["run"]: r for r in tables.accuracy_rows(runs)}["g"]["bytes_ratio_vs_fedavg"] is None


def test_mean_curve_is_the_mean_not_the_median(tmp_path):
    """Three seeds (two cannot tell a mean from a median): MAE 1, 2 and 6 in round 1."""
    runs = load_runs(
        *(
            write_run(
                tmp_path,
                f"r{seed}",
                algorithm="fedavg",
                target=0.0,
                mae=[m],
                sparsities=[0],
                bytes_per_round=[1],
                seed=seed,
            )
            for seed, m in enumerate([1.0, 2.0, 6.0])
        )
    )
    x, mean, low, high = tables.mean_curve(runs, "test_mae")
    assert (x.tolist(), mean.tolist(), low.tolist(), high.tolist()) == ([1], [3.0], [1.0], [6.0])


def test_an_attack_one_weight_sparser_than_the_run_is_stale():
    """One weight of the paper's 2,948,801 moves the sparsity by 3.4e-7: a tolerance must stay below that."""
    one_weight = 1 / 2_948_801
    assert tables.stale_attack({"final_sparsity": 0.95}, {"sparsity": 0.95 + one_weight})
    assert tables.stale_attack({"final_sparsity": 0.95}, {"sparsity": 0.95}) is None


def test_the_attacked_sparsity_falls_back_to_the_runs_final_one_when_the_attack_has_none():
    from fedmpi.records import Run

    def run(attack):
        return Run("r", {}, {"final_sparsity": 0.95}, [], attack, "uniform-iid")

    assert tables.attacked_sparsity(run({"sparsity": 0.9})) == 0.9
    assert tables.attacked_sparsity(run({"sparsity": 0.0})) == 0.0  # dense is a sparsity, not a missing one
    for attack in (None, {}, {"sparsity": None}):
        assert tables.attacked_sparsity(run(attack)) == 0.95
