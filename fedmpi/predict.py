"""`python -m fedmpi predict`: a finished run's model applied to a preprocessed volume file, one row per subject
with the brain-age gap (predicted minus chronological age), the figure brain-age studies analyse. The file must
be preprocessed as the run's data were (the same grid: `python -m preprocess nifti` with the same options); a file
the run trained on is named, as its gaps are optimistic."""

from __future__ import annotations

import argparse
import csv
import io
import sys
from pathlib import Path
from typing import NamedTuple

import numpy as np
from torch.utils.data import DataLoader

from preprocess import h5io, outputs
from preprocess.layout import is_learner_file

from .config import DEVICES
from .data import VolumeDataset, check_volumes
from .device import select_device
from .errors import EXIT_USAGE, PredictError, is_user_error
from .files import write_output
from .finished import (
    RUN_RECORDS,
    check_recorded_model,
    existing_run,
    is_run_record,
    load_run_model,
    run_summary,
)
from .metrics import regression_metrics
from .training import predict

COLUMNS = ("subject_id", "sex", "site", "age", "predicted", "gap")


class Predictions(NamedTuple):
    """One entry per subject of a volume file, in file order; `own`: the run's training file it is, or None."""

    ids: list[str]
    sex: list[str]
    site: list[str]
    ages: np.ndarray
    predicted: np.ndarray
    own: str | None


def predictions(run_dir: Path, summary: dict, data: Path, device: str = "auto") -> Predictions:
    """The predictions for `data`'s subjects under the model summary.json records, with the subjects' sex and site
    (brain-age analyses adjust the gap for both). The file passes the trainer's checks of a volume file first
    (check_volumes): an age that is not finite or not in the file's range would make its gap, and the MAE,
    meaningless."""
    model, cfg, _sparsity, model_sha = load_run_model(run_dir, PredictError, "predict")
    check_recorded_model(summary, run_dir, model_sha, PredictError, "predict with it")
    digest = check_volumes(data)["digest"]
    ds = VolumeDataset(data, cache=False)
    if tuple(ds.shape) != tuple(model.input_shape):
        raise PredictError(
            f"{data}: volumes are {tuple(ds.shape)}, the model takes {tuple(model.input_shape)}: preprocess the scans "
            "as the run's data were (the same voxel size and grid)"
        )
    with h5io.open_checked(data) as f:
        ids, sex, site = (list(f[key].asstr()[:]) for key in ("subject_id", "sex", "site"))
    loader = DataLoader(ds, batch_size=cfg.eval.batch_size, shuffle=False, num_workers=0)
    predicted, ages = predict(model, loader, select_device(device))
    return Predictions(ids, sex, site, ages, predicted, trained_on(summary.get("split") or {}, digest))


def trained_on(split: dict, digest: str) -> str | None:
    """The name of the run's training file whose digest is `digest` in the split summary.json records, or None."""
    return next((name for name, d in sorted(split.items()) if d == digest and is_learner_file(name)), None)


def to_csv(p: Predictions) -> str:
    """The predictions as CSV, a value holding a comma or a quote quoted."""
    text = io.StringIO()
    rows = csv.writer(text, lineterminator="\n")
    rows.writerow(COLUMNS)
    rows.writerows(
        [sid, sex, site, f"{age:.4f}", f"{pred:.4f}", f"{pred - age:.4f}"]
        for sid, sex, site, age, pred in zip(p.ids, p.sex, p.site, p.ages, p.predicted)
    )
    return text.getvalue()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of `python -m fedmpi predict` (fedmpi.cli makes the subcommand)."""
    parser.add_argument("--run", required=True, help="run directory (runs/<name>) with model.npz")
    parser.add_argument("--data", required=True, metavar="FILE.h5", help="preprocessed volumes (preprocess nifti)")
    parser.add_argument("--out", help="output CSV (default: <FILE>_brain_age.csv in the current directory)")
    parser.add_argument("--device", default="auto", choices=DEVICES, help="where the model runs")


def run(args) -> int:
    """`python -m fedmpi predict`: write the CSV and print its summary; an error the user can fix is one line on
    stderr and exit 2, not a traceback, and nothing is written."""
    data = Path(args.data)
    out = Path(args.out) if args.out else Path(f"{data.stem}_brain_age.csv")
    try:
        run_dir = existing_run(args.run, PredictError)
        outputs.check_file(out, "--out")
        if out.resolve() == data.resolve():
            raise PredictError(f"--out {out} is the volume file itself")
        if is_run_record(out, run_dir, (*RUN_RECORDS, "attack.json")):
            raise PredictError(
                f"--out {out} is a record of the run {run_dir}: predict would replace it; give another name"
            )
        summary = run_summary(run_dir, PredictError)
        result = predictions(run_dir, summary, data, args.device)
        write_output(out, to_csv(result).encode(), PredictError)
    except Exception as e:
        if is_user_error(e):
            print(f"fedmpi predict: error: {e}", file=sys.stderr)
            return EXIT_USAGE
        raise
    ages = result.ages
    scores = regression_metrics(result.predicted, ages)
    gap = result.predicted - ages
    if summary.get("preempted") is True:
        print(
            f"fedmpi predict: note: {run_dir} stopped at round {summary.get('rounds')} (preempted), so these are its "
            "model's predictions from then, not its final one's; resume the run for those",
            file=sys.stderr,
        )
    if result.own:
        print(
            f"fedmpi predict: note: {data} is the run's own training file {result.own}: its brain-age gaps are "
            "optimistic",
            file=sys.stderr,
        )
    n = len(result.ids)
    spread = f"sd {gap.std(ddof=1):.2f}" if n > 1 else "one subject"  # the sample's SD, as brain-age studies report
    r = f"r {scores['r']:.3f}" if n > 1 and np.ptp(ages) > 0 else "r undefined (one age)"
    print(
        f"{n} subject{'s' if n != 1 else ''}: MAE {scores['mae']:.2f} years, {r}, "
        f"brain-age gap mean {gap.mean():+.2f} ({spread}) years"
    )
    print(f"wrote {out}")
    return 0
