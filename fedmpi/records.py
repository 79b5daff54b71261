"""A finished run's records as the report reads them: summary.json, metrics.jsonl, config.json and, when present,
test_predictions.csv and attack.json, each checked for what the tables read (its type, finite numbers) before any
table is made, so a damaged record is one error naming its file and field, never a traceback or a wrong table."""

from __future__ import annotations

import csv
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from preprocess.layout import TEST_FILE

from . import tables
from .algorithms import ALGORITHMS
from .errors import ReportError
from .runlog import RunLog, read_json, stopped_early

PREDICTION_COLUMNS = ("subject_id", "age", "predicted")
# What the tables and plots read as numbers: a record that holds something else is refused up front, naming it.
SUMMARY_COUNTS = ("total_bytes_up", "total_bytes_down")
SUMMARY_NUMBERS = (
    "baseline_mae",
    "final_mae",
    "final_r",
    "final_rmse",
    "final_sparsity",
    "rounds",
    "target_sparsity",
    "test_subjects",
    "train_subjects",
    "wall_seconds",
)
SUMMARY_TEXTS = ("algorithm", "distribution", "data_dir")
# config.json: the sections the report reads keys of, and per section the keys it reads as text or as numbers
CONFIG_SECTIONS = ("data", "model", "train", "federation", "run")
CONFIG_TEXTS = {"data": ("dir", "distribution"), "federation": ("algorithm",)}
CONFIG_NUMBERS = {"data": ("subjects",), "federation": ("target",)}
METRIC_COUNTS = ("round", "bytes_up", "bytes_down")
METRIC_NUMBERS = ("test_mae", "sparsity", "target_sparsity")
ATTACK_NUMBERS = ("sparsity", "train_mae", "test_mae", "members_eval", "nonmembers_eval")


@dataclass
class Run:
    """One run directory as load_run reads it: its records and the distribution its data was split by; `setting` is
    filled in once every run of the report is loaded."""

    name: str
    config: dict
    summary: dict
    metrics: list[dict]
    attack: dict | None
    distribution: str
    predictions: dict[str, tuple[float, float]] | None = None  # subject_id -> (age, predicted)
    setting: str = ""  # tables.setting_labels over the runs reported together

    @property
    def algorithm(self) -> str:
        """The run's algorithm: the summary's, else its config's ("" when neither says)."""
        return self.summary.get("algorithm") or self.config.get("federation", {}).get("algorithm", "")

    @property
    def target(self) -> float | None:
        """The sparsity the run aimed at; None for a dense or unknown algorithm, to which no target applies."""
        if self.algorithm not in ALGORITHMS or ALGORITHMS[self.algorithm].dense:
            return None
        return self.summary.get("target_sparsity", self.config.get("federation", {}).get("target"))

    @property
    def seed(self) -> int | None:
        """run.seed from the run's config (None when it records none)."""
        return self.config.get("run", {}).get("seed")

    @property
    def data_dir(self) -> Path | None:
        """The data directory the run trained on, from its summary (None when it records none)."""
        return Path(self.summary["data_dir"]) if self.summary.get("data_dir") else None


def _read_metrics(run_dir: Path) -> list[dict]:
    log = RunLog(run_dir)
    if not log.metrics_path.exists():
        raise ReportError(f"{log.metrics_path}: missing")
    rows = log.checked_rows()
    for line, row in enumerate(rows, start=1):
        check_record(row, METRIC_COUNTS, METRIC_NUMBERS, f"{log.metrics_path}: line {line}")
    return rows


def check_record(
    record, counts: tuple[str, ...], numbers: tuple[str, ...], where: str, texts: tuple[str, ...] = ()
) -> None:
    """ReportError unless `record` is an object whose `counts` are integers, and whose `numbers` are finite numbers
    and `texts` are strings or null where present (NaN and Infinity parse, but fedmpi never writes them)."""
    if not isinstance(record, dict):
        raise ReportError(f"{where}: not a JSON object")
    for key in texts:
        value = record.get(key)
        if value is not None and not isinstance(value, str):
            raise ReportError(f"{where}: {key} must be text, got {value!r}")
    for key in counts:
        value = record.get(key)
        if isinstance(value, bool) or not isinstance(value, int):
            raise ReportError(f"{where}: {key} must be an integer, got {value!r}")
    for key in numbers:
        value = record.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise ReportError(f"{where}: {key} must be a number, got {value!r}")
        if isinstance(value, float) and not math.isfinite(value):  # fedmpi writes null for a non-finite number
            raise ReportError(f"{where}: {key} must be a finite number or null, got {value!r}")


def check_config(config: dict, where: str) -> None:
    """ReportError unless config.json's sections are objects, run.seed is an integer (or null) and the keys the
    report groups and labels runs by have the type the trainer writes."""
    for section in CONFIG_SECTIONS:
        if section in config:
            check_record(
                config[section],
                (),
                CONFIG_NUMBERS.get(section, ()),
                f"{where}: {section}",
                CONFIG_TEXTS.get(section, ()),
            )
    seed = config.get("run", {}).get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise ReportError(f"{where}: run: seed must be an integer, got {seed!r}")


def check_attack(attack: dict, where: str) -> None:
    """ReportError unless attack.json holds what the tables read as numbers (or null): its top-level ATTACK_NUMBERS
    and, for every attack the tables list (tables.attack_results), each of tables.ATTACK_FIELDS."""
    check_record(attack, (), ATTACK_NUMBERS, where)
    found = attack.get("attacks")
    if found is not None and not isinstance(found, dict):
        raise ReportError(f"{where}: attacks must be an object of attack results, got {type(found).__name__}")
    subjects = attack.get("eval_subjects")
    if subjects is not None:
        _check_by_class(subjects, str, "text", f"{where}: eval_subjects")
    if found:
        for name, result in found.items():
            check_record(result, (), tables.ATTACK_FIELDS, f"{where}: attacks.{name}")
            _check_scores(result, subjects, f"{where}: attacks.{name}.eval_scores")
    for name in tables.LEGACY_ATTACKS:  # read only when "attacks" is empty, and only when they are objects
        if not found and isinstance(attack.get(name), dict):
            check_record(attack[name], (), tables.ATTACK_FIELDS, f"{where}: {name}")
            _check_scores(attack[name], subjects, f"{where}: {name}.eval_scores")


def _check_scores(result: dict, subjects: dict | None, where: str) -> None:
    """ReportError unless an attack's eval_scores, where present, are finite numbers by class, one per subject of
    eval_subjects: tables.eval_scores reads them from whichever records tables.attack_results lists."""
    scores = result.get("eval_scores")
    if scores is None:
        return
    _check_by_class(scores, (int, float), "finite numbers", where)
    if subjects is not None and any(len(scores[k]) != len(subjects[k]) for k in ("members", "nonmembers")):
        raise ReportError(
            f"{where}: {len(scores['members'])} + {len(scores['nonmembers'])} scores for "
            f"{len(subjects['members'])} + {len(subjects['nonmembers'])} subjects in eval_subjects"
        )


def _check_by_class(record, kind, what: str, where: str) -> None:
    """ReportError unless `record` is {"members": [...], "nonmembers": [...]} of `kind`, neither empty (per-subject
    values of an attack, which scores at least one subject of each class: the pairing of two runs reads them)."""
    if not isinstance(record, dict) or set(record) != {"members", "nonmembers"}:
        raise ReportError(f"{where}: must be an object of two lists, members and nonmembers")
    for key, values in record.items():
        if not isinstance(values, list) or not all(
            isinstance(v, kind) and not isinstance(v, bool) and (not isinstance(v, float) or math.isfinite(v))
            for v in values
        ):
            raise ReportError(f"{where}: {key} must be a list of {what}")
        if not values:
            raise ReportError(f"{where}: {key} is empty (an attack scores at least one subject of each class)")


def read_predictions(path: Path) -> dict[str, tuple[float, float]]:
    """test_predictions.csv as subject_id -> (age, predicted); a damaged file is an error naming its line."""
    try:
        with open(path, newline="") as fh:
            reader = csv.DictReader(fh)
            if tuple(reader.fieldnames or ()) != PREDICTION_COLUMNS:
                raise ReportError(
                    f"{path}: expected the columns {','.join(PREDICTION_COLUMNS)}, "
                    f"got {','.join(reader.fieldnames or ())}"
                )
            out: dict[str, tuple[float, float]] = {}
            for row in reader:
                if None in row:  # DictReader's key for the fields past the header's: the row does not parse
                    raise ReportError(
                        f"{path}: line {reader.line_num}: {len(PREDICTION_COLUMNS) + len(row[None])} fields, not the "
                        f"{len(PREDICTION_COLUMNS)} columns {','.join(PREDICTION_COLUMNS)}"
                    )
                if row["subject_id"] in out:
                    raise ReportError(f"{path}: line {reader.line_num}: subject {row['subject_id']} appears twice")
                age, predicted = float(row["age"]), float(row["predicted"])
                if not (np.isfinite(age) and np.isfinite(predicted)):
                    raise ValueError("not finite")
                out[row["subject_id"]] = (age, predicted)
    except UnicodeDecodeError:  # a ValueError too: it must be caught first
        raise ReportError(f"{path}: not a text file") from None
    except (TypeError, ValueError):
        raise ReportError(f"{path}: line {reader.line_num}: age and predicted must be finite numbers") from None
    return out


def _split_distribution(data_dir: Path | None) -> str:
    """The distribution recorded by `preprocess split` in test.h5, or "" when there is none."""
    if data_dir is None or not (data_dir / TEST_FILE).exists():
        return ""
    from preprocess.h5io import h5file

    try:
        with h5file(data_dir / TEST_FILE) as f:
            return json.loads(f.attrs.get("split", "{}")).get("distribution", "")
    except (OSError, ValueError):
        return ""


def load_run(path: Path) -> Run:
    """Everything the report needs from one run directory."""
    path = Path(path)
    summary = read_json(path / "summary.json", ReportError)
    check_record(summary, SUMMARY_COUNTS, SUMMARY_NUMBERS, str(path / "summary.json"), SUMMARY_TEXTS)
    config = read_json(path / "config.json", ReportError)
    check_config(config, str(path / "config.json"))
    attack_path, predictions_path = path / "attack.json", path / "test_predictions.csv"
    attack = read_json(attack_path, ReportError) if attack_path.exists() else None
    if attack is not None:
        check_attack(attack, str(attack_path))
    stale = tables.stale_attack(summary, attack) if attack is not None else None
    if stale:
        note(f"{attack_path}: {stale}; left out (attack it again: python -m fedmpi attack --run {path})")
        attack = None
    predictions = read_predictions(predictions_path) if predictions_path.exists() else None
    data = config.get("data", {})
    if tables.is_pooled(summary.get("algorithm") or config.get("federation", {}).get("algorithm", "")):
        distribution = tables.POOLED  # trained on one split's files, all of them at once
    elif summary.get("distribution"):
        distribution = summary["distribution"]
    elif not data.get("dir"):  # the synthetic cohort is split as data.distribution says
        distribution = data.get("distribution", "")
    else:
        distribution = _split_distribution(Path(summary["data_dir"]) if summary.get("data_dir") else None)
    return Run(path.name, config, summary, _read_metrics(path), attack, distribution, predictions)


def expand_run_dirs(paths: list[Path]) -> list[Path]:
    """Run directories from the arguments: a directory holding runs (runs/) stands for its finished runs;
    a run named itself is taken as it is, stopped early or not."""
    out = []
    for p in map(Path, paths):
        if not p.is_dir():
            raise ReportError(f"{p}: not a directory")
        if (p / "summary.json").exists() or (p / "metrics.jsonl").exists():
            out.append(p)
            continue
        children = sorted(c for c in p.iterdir() if (c / "summary.json").exists())
        stopped = [c for c in children if stopped_early(c)]
        for c in stopped:
            note(f"leaving out {c}: it stopped before its last round (resume it, or name it to report it as it is)")
        children = [c for c in children if c not in stopped]
        if not children:
            raise ReportError(f"{p}: neither a run directory (no summary.json) nor a directory of finished runs")
        out.extend(children)
    return out


def note(message: str) -> None:
    """A line of the report command on stderr: what it left out or passed over, and why."""
    print(f"fedmpi report: {message}", file=sys.stderr)
