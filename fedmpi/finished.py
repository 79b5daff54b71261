"""A finished run's model, for the commands that use one (attack, predict): the network rebuilt from model.npz's
parameters and the configuration and input shape recorded beside them. Each command names its own error class
and what it would do with the model, so that a refusal reads as that command's."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .checkpoint import load_model, model_digest
from .config import config_from_dict
from .errors import ConfigError, UserError
from .model import build_model, load_flat_parameters
from .runlog import read_json

# what the trainer writes into a run directory, beside checkpoints/: no output of another command may replace them
RUN_RECORDS = (
    "model.npz",
    "summary.json",
    "config.json",
    "metrics.jsonl",
    "test_predictions.csv",
    "ranks.json",
    ".lock",
)


def existing_run(run_dir, error: type[UserError]) -> Path:
    """`run_dir` as a Path, or `error` saying what is there instead of a run directory."""
    run_dir = Path(run_dir)
    if run_dir.is_file():
        raise error(f"{run_dir} is a file, not a run directory")
    if not run_dir.is_dir():
        raise error(f"{run_dir}: no such run directory")
    return run_dir


def run_summary(run_dir: Path, error: type[UserError]) -> dict:
    """summary.json, its data_dir, model_sha256 and split (file name -> digest) of the types the trainer writes when
    there; `error` when it is missing (a run not finished) or damaged."""
    summary = read_json(run_dir / "summary.json", error)
    for key, kind, name in (
        ("data_dir", str, "a string"),
        ("model_sha256", str, "a string"),
        ("split", dict, "an object"),
    ):
        if summary.get(key) is not None and not isinstance(summary[key], kind):
            raise error(
                f"{run_dir / 'summary.json'}: {key} is {type(summary[key]).__name__}, not {name} as the trainer "
                "writes it (a damaged or hand-edited record)"
            )
    if not all(isinstance(d, str) for d in (summary.get("split") or {}).values()):
        raise error(
            f"{run_dir / 'summary.json'}: split holds a digest that is not a string (a damaged or hand-edited record)"
        )
    return summary


def check_recorded_model(summary: dict, run_dir: Path, digest: str, error: type[UserError], use: str) -> None:
    """`error` unless model.npz (of digest `digest`) is the model summary.json records; `use` ("attack it") says
    what to do once the run has finished."""
    recorded = summary.get("model_sha256")
    if recorded and recorded != digest:
        # the recorder saves model.npz before summary.json: a resumed run still finishing, or one that failed in
        # between, leaves a newer model beside the summary of an earlier stop (its rounds, stopped_early)
        raise error(
            f"{run_dir / 'model.npz'} is not the model {run_dir / 'summary.json'} records (model_sha256 differs): "
            f"the run is being resumed or trained again, or failed before recording its end; {use} once it "
            "has finished (resume it if it stopped)"
        )


def is_run_record(out: Path, run_dir: Path, names: tuple[str, ...] = RUN_RECORDS) -> bool:
    """Whether writing `out` replaces one of `names` in `run_dir` or a checkpoint, also through a link to either:
    outputs are renamed onto their path."""
    target = Path(out).resolve()
    return target.parent == (run_dir / "checkpoints").resolve() or target in {(run_dir / n).resolve() for n in names}


def load_run_model(run_dir: Path, error: type[UserError], use: str):
    """(model with the saved global parameters, config, final sparsity, model_digest) of a finished run; `error`
    when model.npz lacks what rebuilds the network or holds parameters that are not finite; `use` names the
    command in those messages."""
    path = run_dir / "model.npz"
    values, _mask, meta = load_model(path)
    config, shape = meta.get("config"), meta.get("input_shape")
    if not isinstance(config, dict) or not (
        isinstance(shape, list) and len(shape) == 3 and all(type(n) is int and n > 0 for n in shape)
    ):
        raise error(
            f"{path}: its metadata lacks the config and input_shape the trainer records (a model saved by other "
            f"means): {use} rebuilds the network from them"
        )
    try:
        cfg = config_from_dict(config)
        model = build_model(cfg, shape)
        load_flat_parameters(model, values)
    except (ConfigError, ValueError) as e:  # a config or shape that does not describe these parameters
        raise error(f"{path}: {e}") from None
    not_finite = int(sum((~torch.isfinite(p)).sum() for p in model.parameters()))
    if not_finite:
        total = sum(p.numel() for p in model.parameters())
        raise error(
            f"{path}: {not_finite} of its {total} parameters are not finite (the training diverged): {use} has no "
            "model to use"
        )
    return model, cfg, float(np.mean(values == 0)), model_digest(values)
