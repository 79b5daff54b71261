"""The study's tables: accuracy per run, the paired comparison with the dense baseline on the same test
subjects, the membership attacks per run and per sparsity, and the numbers the README quotes.

Pure functions of loaded runs (fedmpi.records.Run): no I/O and no plotting, so every value is tested on
hand-written runs. Runs are grouped by *setting*: the config values that change what is trained, other
than the distribution, algorithm, target and seed. A study's accuracy runs and its privacy runs (other
epochs, another test fraction) are then never averaged or compared with each other.
"""

from __future__ import annotations

import csv
import io
import json
from collections import defaultdict
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np

from . import stats
from .algorithms import ALGORITHMS, BASELINE
from .config import RUNTIME_KEYS

if TYPE_CHECKING:
    from .records import Run

POOLED = "pooled"  # the distribution column of a centralized run: it trains on every learner's data at once
MARGIN_YEARS = 0.5  # the study's non-inferiority margin for the paired MAE difference
LAST_ROUNDS = 5  # the final evaluated rounds whose MAE shows how far a single round's verdict can move
LEARNS_FRACTION = 0.7  # the baseline "clearly learns" when its MAE is at most this x the predict-the-mean MAE
LEVEL = 0.95
AGE_TOLERANCE = 0.005  # test_predictions.csv writes ages with 2 decimals
# The attacks fedmpi.attack runs, kept here because the report reads them without torch.
ATTACK_ORDER = ("loss_threshold", "black_box", "white_box", "white_box_mlp")
LEGACY_ATTACKS = ("black_box", "white_box")  # attack.json's only, top-level, attacks before it held "attacks"
ATTACK_FIELDS = ("auc", "auc_low", "auc_high", "tpr_at_1pct_fpr", "tpr_at_0.1pct_fpr", "accuracy")
# Config keys a comparison must ignore: those that change nothing learnt, the distribution (its own column),
# and data.dir (a split's folder, another one for each distribution of the same cohort).
NOT_SETTING = frozenset({*RUNTIME_KEYS, "data.distribution", "data.dir"})
SETTING_SECTIONS = ("data", "model", "train")
SETTING_FEDERATION = ("learners", "rounds")  # the federation's shape; its other keys describe the pruning

ACCURACY_COLUMNS = (
    "run",
    "distribution",
    "algorithm",
    "target",
    "seed",
    "train_subjects",
    "test_subjects",
    "rounds",
    "final_mae",
    "baseline_mae",
    "mae_ratio",
    "final_rmse",
    "final_r",
    "final_sparsity",
    "total_bytes",
    "bytes_ratio_vs_fedavg",
    "setting",
)
# A paired comparison's difference: the mean over seeds with its interval, then each seed's with its own.
DIFFERENCE = ("mean_diff", "diff_low", "diff_high", "seed_diffs", "seed_low", "seed_high")
PAIRED_COLUMNS = (
    "setting",
    "distribution",
    "algorithm",
    "target",
    "reference",
    "seeds",
    "n_seeds",
    "n_subjects",
    "mae",
    "reference_mae",
    *DIFFERENCE,
    "seed_verdicts",
    "margin",
    "verdict",
    "vs_zero",
)
PRIVACY_COLUMNS = (
    "run",
    "algorithm",
    "target",
    "seed",
    "final_sparsity",
    "train_mae",
    "test_mae",
    "mae_gap",
    "attack",
    "members_eval",
    "nonmembers_eval",
    *ATTACK_FIELDS,
    "distribution",
    "setting",
)
PRIVACY_PAIRED_COLUMNS = (
    "setting",
    "distribution",
    "algorithm",
    "target",
    "reference",
    "attack",
    "seeds",
    "n_seeds",
    "members_eval",
    "nonmembers_eval",
    "auc",
    "reference_auc",
    *DIFFERENCE,
    "seed_leakage",
    "leakage",
)
LEAKAGE = {"better": "less", "worse": "more", "no difference": "no difference"}  # a lower AUC leaks less
PER_SEED = ("seed_diffs", "seed_low", "seed_high", "seed_verdicts", "seed_leakage")  # dicts keyed by seed


class LineKey(NamedTuple):
    """One line of the plots and one row of the summaries: a method in one setting and distribution."""

    setting: str
    distribution: str
    algorithm: str
    target: float | None


# ---------------------------------------------------------------- grouping


def algorithm_rank(algorithm: str) -> tuple:
    """Sort key of algorithms: the table's order (ALGORITHMS), unknown ones after it by name."""
    order = tuple(ALGORITHMS)
    return (order.index(algorithm) if algorithm in order else len(order), algorithm)


def is_pooled(algorithm: str) -> bool:
    """A centralized algorithm: it trains on every learner's data at once (POOLED in the distribution column)."""
    return algorithm in ALGORITHMS and ALGORITHMS[algorithm].trains_centrally


def line_key(run: Run) -> LineKey:
    """The line (plot line, summary row) a run belongs to."""
    return LineKey(run.setting, run.distribution, run.algorithm, run.target)


def line_order(key: LineKey) -> tuple:
    """Report order of lines: by setting, federated distributions before pooled, then algorithm (algorithm_rank),
    dense before targets, targets ascending."""
    return (
        key.setting,
        key.distribution == POOLED,
        key.distribution,
        algorithm_rank(key.algorithm),
        key.target is not None,
        key.target or 0.0,
    )


def line_label(key: LineKey) -> str:
    """A line's name in legends and tables: the algorithm, its target, and "(pooled)" for a centralized line."""
    pooled = f" ({POOLED})" if key.distribution == POOLED else ""
    return key.algorithm + ("" if key.target is None else f" {key.target:g}") + pooled


def seed_order(run: Run) -> tuple:
    """Order of runs within a line: by seed (runs without one last), then by name."""
    return (run.seed is None, run.seed or 0, run.name)


def run_order(run: Run) -> tuple:
    """Report order of runs: by line (line_order), then by seed (seed_order)."""
    return (*line_order(line_key(run)), *seed_order(run))


def _flat(prefix: str, d: dict, out: dict) -> dict:
    for k, v in d.items():
        if isinstance(v, dict):
            _flat(f"{prefix}{k}.", v, out)
        else:
            out[f"{prefix}{k}"] = v
    return out


def setting_items(config: dict) -> dict[str, str]:
    """The config values that define a run's setting, as "section.key" -> printed value."""
    items: dict = {}
    for section in SETTING_SECTIONS:
        _flat(f"{section}.", config.get(section, {}), items)
    federation = config.get("federation", {})
    items.update({f"federation.{k}": federation[k] for k in SETTING_FEDERATION if k in federation})
    return {k: v if isinstance(v, str) else json.dumps(v) for k, v in items.items() if k not in NOT_SETTING}


def setting_labels(configs: dict[str, dict]) -> dict[str, str]:
    """Per run name, the setting values that differ between the runs ("train.lr=0.005, ..."); "" when all agree.

    Only keys every run records are compared: a key that a later version added to the config is absent from
    older runs, which were trained with its default.
    """
    items = {name: setting_items(cfg) for name, cfg in configs.items()}
    if not items:
        return {}
    shared = set.intersection(*(set(i) for i in items.values()))
    varying = sorted(k for k in shared if len({i[k] for i in items.values()}) > 1)
    return {name: ", ".join(f"{k}={i[k]}" for k in varying) for name, i in items.items()}


def lines(runs: list[Run]) -> dict[LineKey, list[Run]]:
    """Runs grouped by line, in report order, each line's runs by seed; of two runs with the same seed only
    the first by name is kept (duplicate_seeds names the others)."""
    grouped: dict[LineKey, list[Run]] = defaultdict(list)
    for run in sorted(runs, key=seed_order):
        group = grouped[line_key(run)]
        if all(r.seed != run.seed for r in group):
            group.append(run)
    return {k: grouped[k] for k in sorted(grouped, key=line_order)}


def duplicate_seeds(runs: list[Run]) -> list[str]:
    """One note per run left out of the summaries because an earlier run (by name) has its line and seed."""
    kept = {id(r) for group in lines(runs).values() for r in group}
    return [
        f"{r.name} repeats the setting, distribution, algorithm, target and seed of another run; the "
        f"summaries use the first by name"
        for r in sorted(runs, key=lambda r: r.name)
        if id(r) not in kept
    ]


def software_mix(runs: list[Run]) -> list[str]:
    """One note when the runs come from more than one fedmpi source (summary.json's software.source_sha256): the
    same seed gives the same model only on the same code, so a difference between such runs may be the code's.
    Runs recorded before fedmpi kept the digest are counted apart, as unknown."""
    by_source: dict[str, list[str]] = {}
    for r in sorted(runs, key=lambda r: r.name):
        software = r.summary.get("software")
        source = software.get("source_sha256") if isinstance(software, dict) else None
        by_source.setdefault(source if isinstance(source, str) and source else "", []).append(r.name)
    known = {k: v for k, v in by_source.items() if k}
    if len(known) < 2:
        return []
    groups = "; ".join(f"{k[:12]}: {', '.join(v)}" for k, v in sorted(known.items(), key=lambda kv: kv[1][0]))
    unknown = f"; no record: {', '.join(by_source[''])}" if "" in by_source else ""
    return [f"the runs come from {len(known)} fedmpi sources (source_sha256 {groups}{unknown})"]


def panels(keys) -> list[tuple[str, str]]:
    """(setting, distribution) of each table section or plot panel; a pooled line has none of its own
    unless its setting has no other distribution."""
    federated = {(k.setting, k.distribution) for k in keys if k.distribution != POOLED}
    settings = {s for s, _ in federated}
    pooled = {(k.setting, POOLED) for k in keys if k.distribution == POOLED and k.setting not in settings}
    return sorted(federated | pooled, key=lambda p: (p[0], p[1] == POOLED, p[1]))


def panel_lines(keys, panel: tuple[str, str]) -> list[LineKey]:
    """The lines shown in a panel: its own and the pooled lines of its setting (the test set is the same
    for every distribution of one cohort, so a centralized run compares with each)."""
    setting, distribution = panel
    return sorted(
        (k for k in keys if k.setting == setting and k.distribution in (distribution, POOLED)), key=line_order
    )


def references(key: LineKey, keys) -> list[LineKey]:
    """The baseline lines a line is compared with: the same setting and distribution, or for a pooled line
    every distribution of its setting."""
    if key.algorithm == BASELINE:
        return []
    return [
        k
        for k in keys
        if k.algorithm == BASELINE and k.setting == key.setting and key.distribution in (k.distribution, POOLED)
    ]


# ---------------------------------------------------------------- per-run values


def total_bytes(summary: dict) -> int | None:
    """Bytes up + down over the whole run, or None when the summary lacks the counters."""
    if "total_bytes_up" not in summary or "total_bytes_down" not in summary:
        return None
    return int(summary["total_bytes_up"]) + int(summary["total_bytes_down"])


def cumulative_bytes(metrics: list[dict]) -> np.ndarray:
    """Bytes up + down sent by the end of each round."""
    return np.cumsum([int(r["bytes_up"]) + int(r["bytes_down"]) for r in metrics])


def reference_run(run: Run, grouped: dict[LineKey, list[Run]]) -> Run | None:
    """The baseline run of the same setting and distribution, with the same seed if there is one."""
    candidates = grouped.get(LineKey(run.setting, run.distribution, BASELINE, None), [])
    pool = [r for r in candidates if r.seed == run.seed] or candidates
    return pool[0] if pool else None


def bytes_ratio(run: Run, grouped: dict[LineKey, list[Run]]) -> float | None:
    """The run's total bytes over its baseline run's (reference_run); None without both totals, or when the
    baseline's is 0."""
    ref = reference_run(run, grouped)
    b, rb = total_bytes(run.summary), total_bytes(ref.summary) if ref else None
    return b / rb if b is not None and rb else None


def subject_counts(run: Run) -> tuple[int | None, int | None]:
    """(training, test) subjects: summary.json's counts when recorded; otherwise the test set is the rows of
    test_predictions.csv, and the synthetic cohort (data.dir empty) trains on every other subject."""
    s = run.summary
    if "train_subjects" in s or "test_subjects" in s:
        return s.get("train_subjects"), s.get("test_subjects")
    if run.predictions is None:
        return None, None
    test = len(run.predictions)
    data = run.config.get("data", {})
    synthetic = not data.get("dir") and data.get("subjects") is not None
    return (int(data["subjects"]) - test if synthetic else None), test


def mae_ratio(summary: dict) -> float | None:
    """Final MAE over the MAE of predicting the training mean age (below 1: better than the mean)."""
    mae, mean_mae = summary.get("final_mae"), summary.get("baseline_mae")
    return mae / mean_mae if mae is not None and mean_mae else None


def accuracy_rows(runs: list[Run]) -> list[dict]:
    """One dict per run with ACCURACY_COLUMNS as keys (None = blank), in report order."""
    grouped = lines(runs)
    rows = []
    for run in sorted(runs, key=run_order):
        s = run.summary
        train, test = subject_counts(run)
        rows.append(
            {
                "run": run.name,
                "distribution": run.distribution,
                "algorithm": run.algorithm,
                "target": run.target,
                "seed": run.seed,
                "train_subjects": train,
                "test_subjects": test,
                "rounds": s.get("rounds", len(run.metrics)),
                "final_mae": s.get("final_mae"),
                "baseline_mae": s.get("baseline_mae"),
                "mae_ratio": mae_ratio(s),
                "final_rmse": s.get("final_rmse"),
                "final_r": s.get("final_r"),
                "final_sparsity": s.get("final_sparsity"),
                "total_bytes": total_bytes(s),
                "bytes_ratio_vs_fedavg": bytes_ratio(run, grouped),
                "setting": run.setting,
            }
        )
    return rows


# ---------------------------------------------------------------- paired comparison


def _errors(predictions: dict[str, tuple[float, float]], subjects: list[str]) -> np.ndarray:
    return np.array([abs(predictions[s][1] - predictions[s][0]) for s in subjects])


def _same_subjects(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(abs(a[s][0] - b[s][0]) <= AGE_TOLERANCE for s in a)


def _seed_intervals(seeds: list, intervals: list, key: str, reading) -> dict:
    """Each seed's interval (seed_low, seed_high) and what it reads as (under key), keyed by seed."""
    return {
        "seed_low": {s: lo for s, (lo, _) in zip(seeds, intervals)},
        "seed_high": {s: hi for s, (_, hi) in zip(seeds, intervals)},
        key: {s: reading(lo, hi) for s, (lo, hi) in zip(seeds, intervals)},
    }


def paired_difference(runs: list[Run], reference: list[Run]) -> tuple[dict | None, list[str]]:
    """The paired MAE difference of a method's runs to the reference's on the same test subjects.

    d_i = |error of the method| - |error of the reference| for subject i, averaged over the seeds both have
    (run i of one seed paired with the reference's run of that seed); the mean over subjects comes with a
    bootstrap interval over subjects. That interval holds the subjects' variation only; the per-seed means
    show how far training randomness moves the difference, each with its own interval over subjects and verdict
    (a claim that holds in every seed does not rest on the average). Returns (None, notes) when nothing pairs.
    """
    ours = {r.seed: (r.name, r.predictions) for r in runs if r.predictions}
    theirs = {r.seed: (r.name, r.predictions) for r in reference if r.predictions}
    notes, kept = [], []
    for s in sorted(set(ours) & set(theirs), key=lambda s: (s is None, s or 0)):
        if _same_subjects(ours[s][1], theirs[s][1]):
            kept.append(s)
        else:
            notes.append(f"{ours[s][0]} and {theirs[s][0]} were tested on different subjects; not paired")
    if not kept:
        return None, notes
    subjects = sorted(set.intersection(*(set(ours[s][1]) for s in kept)))
    if not subjects:
        return None, [*notes, f"{ours[kept[0]][0]}: no test subject common to every seed; not paired"]
    mine = np.stack([_errors(ours[s][1], subjects) for s in kept])
    base = np.stack([_errors(theirs[s][1], subjects) for s in kept])
    per_subject = (mine - base).mean(axis=0)
    low, high = stats.bootstrap_mean_interval(per_subject, LEVEL)
    intervals = [stats.bootstrap_mean_interval(d, LEVEL) for d in mine - base]  # each seed's, over the same subjects
    return {
        "seeds": kept,
        "n_seeds": len(kept),
        "n_subjects": len(subjects),
        "mae": float(mine.mean()),
        "reference_mae": float(base.mean()),
        "mean_diff": float(per_subject.mean()),
        "diff_low": low,
        "diff_high": high,
        "seed_diffs": {s: float(d) for s, d in zip(kept, (mine - base).mean(axis=1))},
        **_seed_intervals(kept, intervals, "seed_verdicts", lambda lo, hi: stats.noninferiority(lo, hi, MARGIN_YEARS)),
        "margin": MARGIN_YEARS,
        "verdict": stats.noninferiority(low, high, MARGIN_YEARS),
        "vs_zero": stats.versus_zero(low, high),
    }, notes


def per_seed(row: dict) -> dict:
    """A paired row's per-seed figures (PER_SEED) keyed by the seed as text, as JSON keys are."""
    return {k: {str(s): v for s, v in row[k].items()} for k in PER_SEED if k in row}


def _paired_row(key: LineKey, ref: LineKey, result: dict) -> dict:
    """A paired comparison's row: the method's line, the reference's distribution, then the comparison."""
    return {
        "setting": key.setting,
        "distribution": ref.distribution,
        "algorithm": key.algorithm,
        "target": key.target,
        "reference": BASELINE,
        **result,
    }


def _paired_order(row: dict) -> tuple:
    return line_order(LineKey(row["setting"], row["distribution"], row["algorithm"], row["target"]))


def paired_rows(runs: list[Run]) -> tuple[list[dict], list[str]]:
    """One dict per (method, reference distribution) with PAIRED_COLUMNS as keys, and notes on runs that
    could not be paired. A pooled method gets one row per distribution of its setting."""
    grouped = lines(runs)
    rows, notes = [], []
    for key, group in grouped.items():
        where = f"{line_label(key)} on {key.distribution or 'an unknown distribution'}"
        refs = references(key, grouped)
        if key.algorithm != BASELINE and not refs:
            notes.append(f"{where}: no {BASELINE} run of the same setting and distribution; not paired")
        for ref in refs:
            result, found = paired_difference(group, grouped[ref])
            notes += found
            if result is None and not found:
                notes.append(
                    f"{where}: no seed with test_predictions.csv in both it and {BASELINE} on "
                    f"{ref.distribution}; not paired"
                )
            if result is not None:
                rows.append(_paired_row(key, ref, result))
    rows.sort(key=_paired_order)
    return rows, notes


# ---------------------------------------------------------------- summaries over seeds


def _mean(values) -> float | None:
    values = [v for v in values if v is not None]
    return float(np.mean(values)) if values else None


def last_evaluations(metrics: list[dict]) -> dict[int, float]:
    """Round -> test MAE of the final LAST_ROUNDS evaluated rounds (a resumed run's repeated round counted
    once)."""
    by_round = {r["round"]: r["test_mae"] for r in metrics if r.get("test_mae") is not None and "round" in r}
    return {t: by_round[t] for t in sorted(by_round)[-LAST_ROUNDS:]}


def learns(summary: dict) -> bool | None:
    """Clearly learns: final MAE at most LEARNS_FRACTION x the predict-the-mean MAE (None: not recorded)."""
    mae, mean_mae = summary.get("final_mae"), summary.get("baseline_mae")
    if mae is None or not mean_mae:
        return None
    return mae <= LEARNS_FRACTION * mean_mae


def accuracy_sections(runs: list[Run], paired: list[dict]) -> list[dict]:
    """Per setting and distribution, one entry per method: its seeds, final MAE mean and range, MAE over the
    predict-the-mean MAE, bytes over the baseline's, the paired comparison, and (baseline only) how many
    seeds clearly learn. Pooled methods appear in every distribution of their setting."""
    grouped = lines(runs)
    by_key = {(r["setting"], r["distribution"], r["algorithm"], r["target"]): r for r in paired}
    sections = []
    for setting, distribution in panels(grouped):
        methods = []
        for key in panel_lines(grouped, (setting, distribution)):
            group = grouped[key]
            maes = [r.summary["final_mae"] for r in group if r.summary.get("final_mae") is not None]
            evaluations = [e for e in (last_evaluations(r.metrics) for r in group) if e]
            lasts = [list(e.values()) for e in evaluations]
            verdicts = [v for v in (learns(r.summary) for r in group) if v is not None]
            comparison = by_key.get((setting, distribution, key.algorithm, key.target))
            methods.append(
                {
                    "label": line_label(key),
                    "algorithm": key.algorithm,
                    "target": key.target,
                    "seeds": [r.seed for r in group],
                    "mae_mean": _mean(maes),
                    "mae_min": min(maes) if maes else None,
                    "mae_max": max(maes) if maes else None,
                    "last_rounds_mae": _mean(float(np.mean(m)) for m in lasts),
                    "last_rounds_swing": max((max(m) - min(m) for m in lasts), default=None),
                    "last_rounds": sorted({t for e in evaluations for t in e}),
                    "predict_mean_mae": _mean(r.summary.get("baseline_mae") for r in group),
                    "mae_over_predict_mean": _mean(mae_ratio(r.summary) for r in group),
                    "bytes_ratio": _mean(bytes_ratio(r, grouped) for r in group),
                    "clearly_learns": (all(verdicts) if verdicts else None) if key.algorithm == BASELINE else None,
                    "seeds_learning": f"{sum(verdicts)}/{len(verdicts)}" if key.algorithm == BASELINE else None,
                    "paired": None
                    if comparison is None
                    else {
                        **{
                            k: comparison[k]
                            for k in (
                                "mean_diff",
                                "diff_low",
                                "diff_high",
                                "n_seeds",
                                "n_subjects",
                                "verdict",
                                "vs_zero",
                            )
                        },
                        **per_seed(comparison),
                    },
                }
            )
        sections.append({"setting": setting, "distribution": distribution, "methods": methods})
    return sections


def attack_results(attack: dict) -> dict[str, dict]:
    """Attack name -> its scores, in ATTACK_ORDER (unknown names after, alphabetically). An attack.json
    from before the four attacks holds only the logistic ones, at its top level."""
    found = attack.get("attacks") or {k: attack[k] for k in LEGACY_ATTACKS if isinstance(attack.get(k), dict)}
    rank = {name: i for i, name in enumerate(ATTACK_ORDER)}
    return {k: found[k] for k in sorted(found, key=lambda k: (rank.get(k, len(rank)), k))}


def attack_of(run: Run) -> dict:
    """The run's attack.json, or {} for a run nobody attacked."""
    return run.attack or {}


def attacked_sparsity(run: Run) -> float | None:
    """The sparsity of the model the attack saw (recorded by the attack), else (absent or null) the run's final one."""
    sparsity = attack_of(run).get("sparsity")
    return run.summary.get("final_sparsity") if sparsity is None else sparsity


def stale_attack(summary: dict, attack: dict) -> str | None:
    """Why an attack.json is not of the model the run's summary describes (the run was trained again after
    the attack), or None. Records from before model digests were kept are matched by rounds and sparsity."""
    if summary.get("model_sha256") and attack.get("model_sha256"):
        if summary["model_sha256"] != attack["model_sha256"]:
            return "it attacked another model than the run's (model_sha256 differs)"
        return None
    for key, theirs in (("rounds", "rounds"), ("final_sparsity", "sparsity")):
        ours, attacked = summary.get(key), attack.get(theirs)
        if isinstance(ours, (int, float)) and isinstance(attacked, (int, float)) and abs(ours - attacked) > 1e-9:
            return f"it attacked a model with {theirs} {attacked}, the run's is {ours}"
    return None


def mae_gap(attack: dict) -> float | None:
    """The attacked model's MAE on non-members minus members: what a membership attack feeds on."""
    train, test = attack.get("train_mae"), attack.get("test_mae")
    return test - train if train is not None and test is not None else None


def privacy_rows(runs: list[Run]) -> list[dict]:
    """One dict per (attacked run, attack) with PRIVACY_COLUMNS as keys, in report order."""
    rows = []
    for run in sorted((r for r in runs if r.attack), key=run_order):
        a = attack_of(run)
        for name, result in attack_results(a).items():
            rows.append(
                {
                    "run": run.name,
                    "algorithm": run.algorithm,
                    "target": run.target,
                    "seed": run.seed,
                    "final_sparsity": attacked_sparsity(run),
                    "train_mae": a.get("train_mae"),
                    "test_mae": a.get("test_mae"),
                    "mae_gap": mae_gap(a),
                    "attack": name,
                    "members_eval": a.get("members_eval"),
                    "nonmembers_eval": a.get("nonmembers_eval"),
                    **{f: result.get(f) for f in ATTACK_FIELDS},
                    "distribution": run.distribution,
                    "setting": run.setting,
                }
            )
    return rows


def eval_scores(run: Run, name: str) -> tuple[dict, tuple[list, list]] | None:
    """Attack `name`'s attacker-eval subjects and (member scores, non-member scores) in the run's attack.json, or
    None when it has no per-subject scores (an attack.json from before they were kept)."""
    attack = attack_of(run)
    subjects, scores = attack.get("eval_subjects"), attack_results(attack).get(name, {}).get("eval_scores")
    if not subjects or not scores:
        return None
    return subjects, (scores["members"], scores["nonmembers"])


def paired_attack(runs: list[Run], reference: list[Run], name: str) -> tuple[dict | None, list[str]]:
    """Attack `name`'s paired AUC difference of a method's runs to the reference's on the same attacked subjects.

    Run and reference of one seed pair when both kept attacker-eval's scores for the same subjects; every pair
    must score the subjects of the first, so that a bootstrap resample (stats.paired_auc_difference) draws
    subjects, not positions. Returns (None, notes) when nothing pairs.
    """
    ours = {r.seed: (r.name, eval_scores(r, name)) for r in runs}
    theirs = {r.seed: (r.name, eval_scores(r, name)) for r in reference}
    notes: list[str] = []
    kept, pairs, refs = [], [], []
    subjects: dict | None = None
    first = ""  # the first pair's runs: their subjects are every pair's
    for s in sorted(set(ours) & set(theirs), key=lambda s: (s is None, s or 0)):
        (mine, a), (base, b) = ours[s], theirs[s]
        if a is None or b is None:
            continue  # attacked before per-subject scores were kept: nothing to pair, and nothing wrong
        if a[0] != b[0]:
            notes.append(f"{mine} and {base}: {name} attacked other subjects than their pair's; not paired")
            continue
        if subjects is not None and a[0] != subjects:
            notes.append(
                f"{mine} and {base}: {name} attacked other subjects than {first}, whose subjects every seed's pair "
                "must share; not paired"
            )
            continue
        if subjects is None:
            subjects, first = a[0], f"{mine} and {base} (seed {s})"
        kept.append(s)
        pairs.append(a[1])
        refs.append(b[1])
    if not kept:
        return None, notes
    mean, low, high = stats.paired_auc_difference(pairs, refs, LEVEL)
    intervals = [stats.paired_auc_difference([p], [r], LEVEL)[1:] for p, r in zip(pairs, refs)]  # each seed's
    auc = [float(stats.win_matrix(*p).mean()) for p in pairs]
    ref_auc = [float(stats.win_matrix(*p).mean()) for p in refs]
    return {
        "attack": name,
        "seeds": kept,
        "n_seeds": len(kept),
        "members_eval": len(pairs[0][0]),
        "nonmembers_eval": len(pairs[0][1]),
        "auc": float(np.mean(auc)),
        "reference_auc": float(np.mean(ref_auc)),
        "mean_diff": mean,
        "diff_low": low,
        "diff_high": high,
        "seed_diffs": {s: a - b for s, a, b in zip(kept, auc, ref_auc)},
        **_seed_intervals(kept, intervals, "seed_leakage", lambda lo, hi: LEAKAGE[stats.versus_zero(lo, hi)]),
        "leakage": LEAKAGE[stats.versus_zero(low, high)],
    }, notes


def privacy_paired_rows(runs: list[Run]) -> tuple[list[dict], list[str]]:
    """One dict per (attacked method, reference distribution, attack) with PRIVACY_PAIRED_COLUMNS as keys, and
    notes on runs that could not be paired. Only runs whose attack.json kept per-subject scores take part."""
    grouped = lines([r for r in runs if r.attack])
    rows, notes = [], []
    for key, group in grouped.items():
        for ref in references(key, grouped):
            names = dict.fromkeys(n for r in [*group, *grouped[ref]] for n in attack_results(attack_of(r)))
            for name in names:
                result, found = paired_attack(group, grouped[ref], name)
                notes += found
                if result is not None:
                    rows.append(_paired_row(key, ref, result))
    rank = {name: i for i, name in enumerate(ATTACK_ORDER)}
    rows.sort(key=lambda r: (*_paired_order(r), rank.get(r["attack"], len(rank)), r["attack"]))
    return rows, notes


def privacy_sections(runs: list[Run]) -> list[dict]:
    """Per setting and distribution of the attacked runs: per method (sorted by sparsity) the mean sparsity,
    member and non-member MAE, and each attack's mean AUC with every seed's interval; and per attack the
    Spearman correlation of AUC with the MAE gap and with sparsity across runs."""
    grouped = lines([r for r in runs if r.attack])
    sections = []
    for setting, distribution in sorted({(k.setting, k.distribution) for k in grouped}):
        keys = [k for k in grouped if (k.setting, k.distribution) == (setting, distribution)]
        methods: list[dict[str, Any]] = []
        for key in keys:
            group = grouped[key]
            results = [attack_results(attack_of(r)) for r in group]
            names = dict.fromkeys(n for x in results for n in x)
            methods.append(
                {
                    "label": line_label(key),
                    "algorithm": key.algorithm,
                    "target": key.target,
                    "seeds": [r.seed for r in group],
                    "sparsity": _mean(attacked_sparsity(r) for r in group),
                    "train_mae": _mean(attack_of(r).get("train_mae") for r in group),
                    "test_mae": _mean(attack_of(r).get("test_mae") for r in group),
                    "mae_gap": _mean(mae_gap(attack_of(r)) for r in group),
                    "attacks": {
                        name: {
                            "auc_mean": _mean(x[name].get("auc") for x in results if name in x),
                            "tpr_at_1pct_fpr": _mean(x[name].get("tpr_at_1pct_fpr") for x in results if name in x),
                            "accuracy": _mean(x[name].get("accuracy") for x in results if name in x),
                            "runs": [
                                {
                                    "seed": r.seed,
                                    "sparsity": attacked_sparsity(r),
                                    "mae_gap": mae_gap(attack_of(r)),
                                    **{f: x[name].get(f) for f in ("auc", "auc_low", "auc_high")},
                                }
                                for r, x in zip(group, results)
                                if name in x
                            ],
                        }
                        for name in names
                    },
                }
            )
        methods.sort(key=lambda m: (m["sparsity"] is None, m["sparsity"] or 0.0))
        points = [r for k in keys for r in grouped[k]]
        correlations: dict[str, dict] = {}
        for name in dict.fromkeys(n for m in methods for n in m["attacks"]):
            scored = [(r, attack_results(attack_of(r)).get(name, {}).get("auc")) for r in points]
            scored = [(r, auc) for r, auc in scored if auc is not None]
            with_gap = [(mae_gap(attack_of(r)), auc) for r, auc in scored if mae_gap(attack_of(r)) is not None]
            with_sparsity = [(attacked_sparsity(r), auc) for r, auc in scored if attacked_sparsity(r) is not None]
            correlations[name] = {
                "spearman_auc_vs_gap": stats.spearman(*zip(*with_gap)) if with_gap else None,
                "spearman_auc_vs_sparsity": stats.spearman(*zip(*with_sparsity)) if with_sparsity else None,
                "runs": len(scored),
            }
        sections.append(
            {"setting": setting, "distribution": distribution, "methods": methods, "correlations": correlations}
        )
    return sections


def numbers(accuracy: list[dict], privacy: list[dict], privacy_paired: Sequence[dict] = ()) -> dict:
    """The numbers the README's verdicts quote, so each regenerates from the committed run records: per
    distribution the baseline's MAE and each method's paired difference and verdict; per attack the AUC
    at the lowest and the highest sparsity, how AUC follows the MAE gap across runs, and each method's
    paired AUC difference to the baseline."""
    return {
        "margin_years": MARGIN_YEARS,
        "learns_fraction": LEARNS_FRACTION,
        "level": LEVEL,
        "bootstrap_resamples": stats.BOOTSTRAP_RESAMPLES,
        "accuracy": accuracy,
        "privacy": [
            {
                "setting": s["setting"],
                "distribution": s["distribution"],
                "lowest_sparsity": s["methods"][0],
                "highest_sparsity": s["methods"][-1],
                "correlations": s["correlations"],
            }
            for s in privacy
            if s["methods"]
        ],
        "privacy_paired": [{**r, **per_seed(r)} for r in privacy_paired],
    }


# ---------------------------------------------------------------- text


def csv_cell(v) -> str:
    """A value as CSV text: None blank, floats to 6 significant digits, lists space-separated, dicts as key:value
    pairs separated by "; " (a value may hold a space: "no difference"). Inside a list or dict None is "None" (a
    run without run.seed), as numbers.json keys it, not a blank that would leave "0 " or ":0.125"."""
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.6g}"
    if isinstance(v, list):
        return " ".join(map(_part, v))
    if isinstance(v, dict):
        return "; ".join(f"{_part(k)}:{_part(x)}" for k, x in v.items())
    return str(v)


def _part(v) -> str:
    return "None" if v is None else csv_cell(v)


def to_csv(rows: list[dict], columns: tuple[str, ...]) -> str:
    """CSV text of `rows`: `columns` as the header and the order of every row's cells (csv_cell)."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(columns)
    for r in rows:
        w.writerow([csv_cell(r[c]) for c in columns])
    return buf.getvalue()


def _f(v, spec: str = ".2f") -> str:
    return "" if v is None else format(v, spec)


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return [
        "| " + " | ".join(header) + " |",
        "|" + "|".join("---" for _ in header) + "|",
        *("| " + " | ".join(r) + " |" for r in rows),
    ]


def _section_title(section: dict) -> str:
    setting = f" ({section['setting']})" if section["setting"] else ""
    return f"## {section['distribution'] or '(distribution unknown)'}{setting}"


def _last_rounds_cell(m: dict) -> str:
    """Mean (swing), and which rounds those are when they are not the final LAST_ROUNDS in a row (a run
    evaluated every few rounds)."""
    if not m["last_rounds_mae"]:
        return ""
    cell = f"{m['last_rounds_mae']:.2f} ({m['last_rounds_swing']:.2f})"
    first, last = m["last_rounds"][0], m["last_rounds"][-1]
    return cell if last - first < LAST_ROUNDS else f"{cell}, rounds {first}-{last}"


def _mae_cell(m: dict) -> str:
    if m["mae_mean"] is None:
        return ""
    if len(m["seeds"]) < 2:
        return _f(m["mae_mean"])
    return f"{m['mae_mean']:.2f} [{m['mae_min']:.2f}, {m['mae_max']:.2f}]"


def _verdict_cell(m: dict) -> str:
    if m["algorithm"] == BASELINE:
        if m["clearly_learns"] is None:
            return "predict-the-mean MAE not recorded"
        return (
            "clearly learns" if m["clearly_learns"] else "does not clearly learn"
        ) + f" ({m['seeds_learning']} seeds)"
    return m["paired"]["verdict"] if m["paired"] else ""


def _seed_diffs_cell(p: dict) -> str:
    low, high = p["seed_low"], p["seed_high"]
    return "; ".join(f"{d:+.2f} [{low[s]:+.2f}, {high[s]:+.2f}]" for s, d in p["seed_diffs"].items())


def accuracy_markdown(sections: list[dict]) -> str:
    """accuracy.md: how to read it, then one table per setting and distribution (accuracy_sections)."""
    out = [
        "# Accuracy",
        "",
        f"Final test MAE (years), mean over seeds with [min, max]. *Last {LAST_ROUNDS} evaluated rounds*: the test MAE "
        f"averaged over the final {LAST_ROUNDS} evaluated rounds and the seeds, and (in brackets) the largest "
        f"swing between those rounds in one seed: the verdicts below compare final models, and a swing wider "
        f"than the margin says a single round's verdict could have come out otherwise. "
        f"*vs mean*: MAE over the MAE of predicting the "
        f"training mean age. *Δ MAE*: paired difference to dense {BASELINE} on the same test subjects, per subject "
        f"|error| − |{BASELINE}'s error| averaged over the seeds both have, then over subjects, with a "
        f"{LEVEL:.0%} bootstrap interval over subjects ({stats.BOOTSTRAP_RESAMPLES:,} resamples). The interval "
        f"does not include seed-to-seed variation; the per-seed Δ show it, each with its own interval over "
        f"subjects and (*verdict per seed*) its own verdict. *Verdict* against the non-inferiority "
        f"margin of {MARGIN_YEARS} years: non-inferior if the interval's upper end is below it, "
        f"inferior if its lower end is above it, else inconclusive. *vs 0*: whether the interval excludes 0. "
        f"{BASELINE} clearly learns when its MAE is at most {LEARNS_FRACTION} × the predict-the-mean MAE. A "
        f"{POOLED} (centralized) run is compared with {BASELINE} of each distribution: the test set is the same.",
    ]
    for section in sections:
        rows = []
        for m in section["methods"]:
            p = m["paired"]
            rows.append(
                [
                    m["label"],
                    str(len(m["seeds"])),
                    _mae_cell(m),
                    _last_rounds_cell(m),
                    _f(m["mae_over_predict_mean"]),
                    _f(m["bytes_ratio"], ".3f"),
                    f"{p['mean_diff']:+.2f} [{p['diff_low']:+.2f}, {p['diff_high']:+.2f}] ({p['n_subjects']} subjects)"
                    if p
                    else "",
                    _seed_diffs_cell(p) if p else "",
                    _verdict_cell(m),
                    ", ".join(p["seed_verdicts"][s] for s in p["seed_diffs"]) if p else "",
                    p["vs_zero"] if p else "",
                ]
            )
        out += [
            "",
            _section_title(section),
            "",
            *_table(
                [
                    "method",
                    "seeds",
                    "MAE",
                    f"last {LAST_ROUNDS} evaluated rounds (swing)",
                    "vs mean",
                    f"bytes vs {BASELINE}",
                    "Δ MAE [95% CI]",
                    "Δ per seed [95% CI]",
                    "verdict",
                    "verdict per seed",
                    "vs 0",
                ],
                rows,
            ),
        ]
    return "\n".join(out) + "\n"


def _auc_cell(a: dict) -> str:
    seeds = "; ".join(
        f"{r['auc']:.3f} [{_f(r['auc_low'], '.3f')}, {_f(r['auc_high'], '.3f')}]"
        if r["auc_low"] is not None
        else _f(r["auc"], ".3f")
        for r in a["runs"]
        if r["auc"] is not None
    )
    return f"**{a['auc_mean']:.3f}**: {seeds}" if a["auc_mean"] is not None else ""


def _correlation_cell(c: dict) -> str:
    return (
        f"{_f(c['spearman_auc_vs_gap'], '+.2f') or '–'} / {_f(c['spearman_auc_vs_sparsity'], '+.2f') or '–'}"
        f" ({c['runs']} runs)"
    )


def _paired_auc_cell(row: dict) -> str:
    seeds = "; ".join(f"{d:+.3f} {row['seed_leakage'][s]}" for s, d in row["seed_diffs"].items())
    return (
        f"**{row['mean_diff']:+.3f}** [{row['diff_low']:+.3f}, {row['diff_high']:+.3f}] {row['leakage']} "
        f"(seeds: {seeds})"
    )


def _paired_privacy_table(section: dict, paired: Sequence[dict]) -> list[str]:
    """The section's paired AUC differences (privacy_paired_rows): one row per method, one column per attack."""
    mine = [r for r in paired if (r["setting"], r["distribution"]) == (section["setting"], section["distribution"])]
    if not mine:
        return []
    methods = list(dict.fromkeys((r["algorithm"], r["target"]) for r in mine))
    names = list(dict.fromkeys(r["attack"] for r in mine))
    cells = {(r["algorithm"], r["target"], r["attack"]): r for r in mine}
    rows = []
    for algorithm, target in methods:
        first = next(r for r in mine if (r["algorithm"], r["target"]) == (algorithm, target))
        distribution = POOLED if is_pooled(algorithm) else first["distribution"]  # a row has its reference's
        rows.append(
            [
                line_label(LineKey(first["setting"], distribution, algorithm, target)),
                ", ".join(str(s) for s in first["seeds"]),
                f"{first['members_eval']} + {first['nonmembers_eval']}",
                *(
                    _paired_auc_cell(cells[algorithm, target, n]) if (algorithm, target, n) in cells else ""
                    for n in names
                ),
            ]
        )
    return [
        "",
        f"AUC minus {BASELINE}'s on the same attacked subjects, mean over the seeds both have, with its "
        f"{LEVEL:.0%} paired bootstrap interval (the subjects drawn once for both models) and whether the "
        "method leaks less, more or no differently; then each seed's difference, and whether that seed's own "
        "paired interval says less, more or no difference.",
        "",
        *_table(["method", "seeds", "subjects", *names], rows),
    ]


def privacy_markdown(sections: list[dict], paired: Sequence[dict] = ()) -> str:
    """privacy.md: one table per setting and distribution (privacy_sections), each ending with the Spearman ρ row
    and followed by the paired AUC differences to the baseline where the attacks kept per-subject scores."""
    out = [
        "# Membership inference",
        "",
        "Per method, sorted by the attacked model's sparsity (mean over seeds): the model's MAE on the attacked "
        "members (train) and non-members (test), their gap, and per attack the ROC AUC, mean over seeds in bold, "
        f"then each seed's AUC with its {LEVEL:.0%} bootstrap interval; 0.5 is chance. Spearman's ρ is taken "
        "across runs.",
    ]
    for section in sections:
        methods = section["methods"]
        names = list(dict.fromkeys(n for m in methods for n in m["attacks"]))
        rows = [
            [
                m["label"],
                str(len(m["seeds"])),
                _f(m["sparsity"], ".3f"),
                _f(m["train_mae"]),
                _f(m["test_mae"]),
                _f(m["mae_gap"], "+.2f"),
                *(_auc_cell(m["attacks"][n]) if n in m["attacks"] else "" for n in names),
            ]
            for m in methods
        ]
        rows.append(
            [
                "Spearman ρ: AUC vs gap / vs sparsity",
                "",
                "",
                "",
                "",
                "",
                *(_correlation_cell(section["correlations"][n]) for n in names),
            ]
        )
        out += [
            "",
            _section_title(section),
            "",
            *_table(["method", "seeds", "sparsity", "train MAE", "test MAE", "gap", *names], rows),
            *_paired_privacy_table(section, paired),
        ]
    return "\n".join(out) + "\n"


def mean_curve(runs: list[Run], key: str, by_bytes: bool = False) -> tuple[np.ndarray, ...]:
    """metrics[key] over a line's runs at each round any of them recorded it: (x, mean, min, max). x is the
    round, or with by_bytes the mean cumulative bytes sent by then; rounds that sent nothing (a centralized
    run) are left out, as a log axis cannot show them."""
    values: dict[int, list[float]] = defaultdict(list)
    sent: dict[int, list[float]] = defaultdict(list)
    for run in runs:
        cumulative = cumulative_bytes(run.metrics) if by_bytes else np.zeros(len(run.metrics))
        for row, b in zip(run.metrics, cumulative):
            if row.get(key) is not None:
                values[row["round"]].append(float(row[key]))
                sent[row["round"]].append(float(b))
    rounds = sorted(values)
    x = np.array([np.mean(sent[t]) for t in rounds] if by_bytes else rounds, dtype=np.float64)
    keep = x > 0 if by_bytes else np.ones(len(rounds), bool)
    curves = [np.array([f(values[t]) for t in rounds], dtype=np.float64) for f in (np.mean, np.min, np.max)]
    return x[keep], *(c[keep] for c in curves)
