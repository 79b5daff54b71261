"""`python -m fedmpi predict`: a finished run's model applied to a preprocessed volume file, one row per subject
with the brain-age gap (predicted minus chronological age), the figure brain-age studies analyse. The file must
be preprocessed as the run's data were (the same grid: `python -m preprocess nifti` with the same options); a file
the run trained on is named, as its gaps are optimistic. With --calibrate, the gap's linear age bias is fitted on a
held-out file's subjects and taken off (metrics.AgeBias), as brain-age studies report the gap. Scans whose age is
unknown (`preprocess nifti --ages-optional`) get their predicted age, with n/a for the age and the gap."""

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
from .metrics import AgeBias, fit_age_bias, regression_metrics
from .model import BrainAgeCNN
from .training import predict

COLUMNS = ("subject_id", "sex", "site", "age", "predicted", "gap")
CORRECTED = ("predicted_corrected", "gap_corrected")  # with --calibrate


class Predictions(NamedTuple):
    """One entry per subject of a volume file, in file order; `digest`: the file's (data.file_digest); `own`: the
    run's training file it is, or None."""

    ids: list[str]
    sex: list[str]
    site: list[str]
    ages: np.ndarray
    predicted: np.ndarray
    digest: str
    own: str | None


def run_model(run_dir: Path, summary: dict) -> tuple[BrainAgeCNN, int]:
    """The model summary.json records (not one of a run being resumed) and the run's evaluation batch size."""
    model, cfg, _sparsity, model_sha = load_run_model(run_dir, PredictError, "predict")
    check_recorded_model(summary, run_dir, model_sha, PredictError, "predict with it")
    return model, cfg.eval.batch_size


def predictions(
    model: BrainAgeCNN, batch_size: int, summary: dict, data: Path, device: str = "auto", ages_required: bool = True
) -> Predictions:
    """The predictions for `data`'s subjects, with the subjects' sex and site (brain-age analyses adjust the gap
    for both). The file passes the trainer's checks of a volume file first (check_volumes): an age that is not
    finite or not in the file's range would make its gap, and the MAE, meaningless. Without `ages_required` an
    unknown age (NaN: preprocess nifti --ages-optional) passes: that subject gets a prediction and no gap."""
    digest = check_volumes(data, ages_required)["digest"]
    ds = VolumeDataset(data, cache=False)
    if tuple(ds.shape) != tuple(model.input_shape):
        raise PredictError(
            f"{data}: volumes are {tuple(ds.shape)}, the model takes {tuple(model.input_shape)}: preprocess the scans "
            "as the run's data were (the same voxel size and grid)"
        )
    with h5io.open_checked(data) as f:
        ids, sex, site = (list(f[key].asstr()[:]) for key in ("subject_id", "sex", "site"))
    loader = DataLoader(ds, batch_size=batch_size, shuffle=False, num_workers=0)
    predicted, ages = predict(model, loader, select_device(device))
    return Predictions(ids, sex, site, ages, predicted, digest, trained_on(summary.get("split") or {}, digest))


def age_bias(held: Predictions, calibrate: Path) -> AgeBias:
    """The age bias fitted on the held-out file's predictions; a training file's are refused, since its gaps are
    optimistic and their trend is not that of new subjects."""
    if held.own:
        raise PredictError(
            f"--calibrate {calibrate} is the run's own training file {held.own}: its gaps are optimistic, so the "
            "age bias fitted there is not that of new subjects; calibrate on held-out subjects (the run's test.h5)"
        )
    try:
        return fit_age_bias(held.ages, held.predicted)
    except ValueError as e:
        raise PredictError(f"--calibrate {calibrate}: {e}") from None


def trained_on(split: dict, digest: str) -> str | None:
    """The name of the run's training file whose digest is `digest` in the split summary.json records, or None."""
    return next((name for name, d in sorted(split.items()) if d == digest and is_learner_file(name)), None)


def to_csv(p: Predictions, bias: AgeBias | None = None) -> str:
    """The predictions as CSV, a value holding a comma or a quote quoted; with `bias`, the corrected prediction and
    gap too."""
    text = io.StringIO()
    rows = csv.writer(text, lineterminator="\n")
    rows.writerow(COLUMNS + (CORRECTED if bias else ()))
    corrected = bias.corrected_gap(p.ages, p.predicted) if bias else None
    for i, (sid, sex, site, age, pred) in enumerate(zip(p.ids, p.sex, p.site, p.ages, p.predicted)):
        extra = [_cell(age + corrected[i]), _cell(corrected[i])] if corrected is not None else []
        rows.writerow([sid, sex, site, _cell(age), f"{pred:.4f}", _cell(pred - age), *extra])
    return text.getvalue()


def _cell(value: float) -> str:
    """A value of the CSV; n/a (BIDS's word for it) where the subject's age, and so the value, is unknown."""
    return "n/a" if np.isnan(value) else f"{value:.4f}"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of `python -m fedmpi predict` (fedmpi.cli makes the subcommand)."""
    parser.add_argument("--run", required=True, help="run directory (runs/<name>) with model.npz")
    parser.add_argument("--data", required=True, metavar="FILE.h5", help="preprocessed volumes (preprocess nifti)")
    parser.add_argument("--out", help="output CSV (default: <FILE>_brain_age.csv in the current directory)")
    parser.add_argument(
        "--calibrate",
        metavar="HELD_OUT.h5",
        help="fit the gap's linear age bias on this held-out file's subjects (the run's test.h5, or subjects of the "
        "new site's own) and add predicted_corrected and gap_corrected",
    )
    parser.add_argument("--device", default="auto", choices=DEVICES, help="where the model runs")


def run(args) -> int:
    """`python -m fedmpi predict`: write the CSV and print its summary; an error the user can fix is one line on
    stderr and exit 2, not a traceback, and nothing is written."""
    data = Path(args.data)
    out = Path(args.out) if args.out else Path(f"{data.stem}_brain_age.csv")
    try:
        if args.calibrate == "":  # an unset shell variable: the user asked for corrected gaps
            raise PredictError("--calibrate is empty: give the held-out volume file to fit the age bias on")
        run_dir = existing_run(args.run, PredictError)
        for given, volumes in (("--data", data), ("--calibrate", args.calibrate)):
            if volumes and out.resolve() == Path(volumes).resolve():
                raise PredictError(f"--out {out} is the volume file {given} names")
        if is_run_record(out, run_dir, (*RUN_RECORDS, "attack.json")):
            raise PredictError(
                f"--out {out} is a record of the run {run_dir}: predict would replace it; give another name"
            )
        outputs.check_file(out, "--out")  # after the refusals above: it creates a probe file in --out's directory
        summary = run_summary(run_dir, PredictError)
        model, batch_size = run_model(run_dir, summary)
        bias, held = None, None
        if args.calibrate:  # first: a calibration that gives no bias is refused before the long pass over --data
            held = predictions(model, batch_size, summary, Path(args.calibrate), args.device)
            bias = age_bias(held, Path(args.calibrate))
        result = predictions(model, batch_size, summary, data, args.device, ages_required=False)
        write_output(out, to_csv(result, bias).encode(), PredictError)
    except Exception as e:
        if is_user_error(e):
            print(f"fedmpi predict: error: {e}", file=sys.stderr)
            return EXIT_USAGE
        raise
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
    print(_summary_line(result))
    if bias is not None and held is not None:
        _say_bias(bias, held, result, Path(args.calibrate), data)
    print(f"wrote {out}")
    return 0


def _aged(p: Predictions) -> Predictions:
    """The subjects whose age is known: only they have a gap."""
    known = ~np.isnan(p.ages)
    if known.all():
        return p
    pick = np.flatnonzero(known)
    return p._replace(
        ids=[p.ids[i] for i in pick],
        sex=[p.sex[i] for i in pick],
        site=[p.site[i] for i in pick],
        ages=p.ages[pick],
        predicted=p.predicted[pick],
    )


def _summary_line(result: Predictions) -> str:
    """The MAE, the correlation and the gap over the subjects whose age is known; the predicted ages alone where
    none is."""
    total, aged = len(result.ids), _aged(result)
    n, ages = len(aged.ids), aged.ages
    subjects = f"{total} subject{'s' if total != 1 else ''}"
    if n == 0:
        spread = f" (sd {result.predicted.std(ddof=1):.2f})" if total > 1 else ""
        return f"{subjects}, none with an age: predicted age mean {result.predicted.mean():.2f}{spread} years"
    if n < total:
        subjects += f" ({total - n} without an age: no gap; over the {n} with one)"
    scores = regression_metrics(aged.predicted, ages)
    gap = aged.predicted - ages
    spread = f"sd {gap.std(ddof=1):.2f}" if n > 1 else "one subject"  # the sample's SD, as brain-age studies report
    r = f"r {scores['r']:.3f}" if n > 1 and np.ptp(ages) > 0 else "r undefined (one age)"
    return f"{subjects}: MAE {scores['mae']:.2f} years, {r}, brain-age gap mean {gap.mean():+.2f} ({spread}) years"


def _say_bias(bias: AgeBias, held: Predictions, result: Predictions, calibrate: Path, data: Path) -> None:
    """The fitted bias and what it does to the gap: its correlation with age before and after. Subjects --data
    shares with the calibration (one file carved from the other) get in-sample corrected gaps, so they are counted;
    matched by subject_id, which the note says, as another cohort may number its subjects alike."""
    total = len(result.ids)
    result = _aged(result)  # only subjects with an age have a gap to correct
    shared = len(set(result.ids) & set(held.ids))
    if held.digest == result.digest:
        print(
            f"fedmpi predict: note: the age bias is fitted on the file it corrects ({calibrate}), so its corrected "
            "gaps are uncorrelated with age by construction; fit it on other held-out subjects to see how well it "
            "carries over",
            file=sys.stderr,
        )
    elif shared:
        print(
            f"fedmpi predict: note: {data} and {calibrate} share {shared} subject{'s' if shared != 1 else ''} (by "
            f"subject_id; {total} in {data}): the age bias is fitted partly on them, so their corrected "
            "gaps are in-sample; calibrate on subjects --data does not hold",
            file=sys.stderr,
        )
    low, high = bias.ages
    if not result.ids:
        print(
            f"age bias from {calibrate} ({bias.n} subjects, ages {low:.1f}-{high:.1f}): gap = {bias.slope:+.3f} "
            f"(se {bias.slope_se:.3f}) x age {bias.intercept:+.2f}; no subject of {data} has an age to correct"
        )
        return
    outside = int(np.sum((result.ages < low) | (result.ages > high)))
    if outside:
        print(
            f"fedmpi predict: note: {outside} {'subjects lie' if outside != 1 else 'subject lies'} outside "
            f"{calibrate}'s ages {low:.1f}-{high:.1f}: the correction is extrapolated there",
            file=sys.stderr,
        )
    gap = result.predicted - result.ages
    corrected = bias.corrected_gap(result.ages, result.predicted)
    tail = ""
    if len(gap) > 1 and np.ptp(result.ages) > 0:
        # + 0.0: an r that rounds to zero from below reads 0.000, not -0.000
        before, after = (round(regression_metrics(g, result.ages)["r"], 3) + 0.0 for g in (gap, corrected))
        tail = f", its r with age {after:.3f} (uncorrected {before:.3f})"
    spread = f" (sd {corrected.std(ddof=1):.2f})" if len(gap) > 1 else ""
    print(
        f"age bias from {calibrate} ({bias.n} subjects, ages {low:.1f}-{high:.1f}): gap = {bias.slope:+.3f} "
        f"(se {bias.slope_se:.3f}) x age {bias.intercept:+.2f}; corrected gap mean {corrected.mean():+.2f}{spread} "
        f"years{tail}"
    )
