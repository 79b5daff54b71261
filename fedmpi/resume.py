"""Whether and where a run continues: the settings a checkpoint must agree with (the resume key), the data it
must have been trained on (file digests), a finished run told from an unfinished one, and the checkpoint a
--resume starts from. The recorder writes what these read; the preflight, the centralized baseline, the
attack and the sweep ask them."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from .algorithms import algorithm
from .checkpoint import Checkpoints
from .config import RUNTIME_KEYS, SYNTHETIC_KEYS, setting_changes
from .errors import CheckpointError, ConfigError, ReportError
from .runlog import RunLog, read_json

if TYPE_CHECKING:
    from .config import Config


def resume_key(cfg: Config) -> dict:
    """The settings a checkpoint must agree with to be resumed: not eval, run's bookkeeping or hardware choices,
    nor federation options the algorithm never reads; run.seed is kept (it draws the data order, dropout, random
    pruning and PruneFL's regrown values). The synthetic cohort's options count only when it is the data
    (data.dir empty); where a split lives is compared by resume_point only as split or synthetic."""
    d = cfg.to_dict()
    d["run"] = {"seed": d["run"]["seed"]}
    d.pop("eval")
    for key in RUNTIME_KEYS:
        section, name = key.split(".")
        d[section].pop(name)
    if d["data"]["dir"]:
        for name in SYNTHETIC_KEYS:
            d["data"].pop(name)
    for name in algorithm(cfg).unused_options(cfg.federation.schedule):
        d["federation"].pop(name)
    return d


def recorded_key(recorded: dict) -> dict:
    """A checkpoint's resume key as this version reads it: options added since it was written take their
    defaults, so that a newer fedmpi resumes an older run unless a setting really differs."""
    from .config import config_from_dict

    try:
        return resume_key(config_from_dict(recorded))
    except (ConfigError, TypeError, AttributeError):
        return recorded  # unreadable as a config: compared as it is, so every difference is named


def arithmetic(cfg: Config) -> dict:
    """The runtime choices that change the order of floating-point operations, not what is computed: a resume
    that changes them continues the same run, but not bit for bit."""
    return {"threads": torch.get_num_threads(), "channels_last": cfg.train.channels_last}


def changed_files(recorded: dict | None, split: dict[str, str]) -> list[str]:
    """The files of a split (name -> digest) whose digest differs from the one a run recorded; none when the
    run recorded no digests (made before fedmpi recorded them)."""
    if not recorded:
        return []
    return sorted(name for name in set(recorded) | set(split) if recorded.get(name) != split.get(name))


def split_problems(recorded: dict | None, split: dict[str, str]) -> list[str]:
    """A resumed run must continue on the data it was trained on: name the files whose digest changed."""
    changed = changed_files(recorded, split)
    if not changed:
        return []
    return [
        f"the data differ from what the checkpoint was trained on ({', '.join(changed)} changed since); "
        f"resume on the same split, or start afresh with --overwrite"
    ]


def finished(cfg: Config) -> bool:
    """True when run_dir holds a run that completed all its rounds."""
    return completed_rounds(cfg) == cfg.federation.rounds


def completed_rounds(cfg: Config) -> int | None:
    """The rounds of the run that run_dir holds, if it completed them all (not stopped early), else None."""
    try:
        summary = read_json(cfg.run_dir / "summary.json", ValueError)
    except ValueError:
        return None
    return None if summary.get("preempted") else summary.get("rounds")


def _finished_with_other_settings(cfg: Config) -> list[str]:
    """How the finished run in run_dir was set up otherwise than cfg (setting_changes); none when it was set up
    alike, or when its config.json cannot be read (nothing to tell it from this run by)."""
    try:
        recorded = read_json(cfg.run_dir / "config.json", ValueError)
    except ValueError:
        return []
    changes = setting_changes(recorded_key(recorded), resume_key(cfg))
    # options one of the two algorithms has no use for (a schedule against FedAvg) follow from those that differ
    applying = [c for c in changes if not c.endswith(" -> None") and ": None -> " not in c]
    return applying or changes


def resume_point(cfg: Config, resume: bool, overwrite: bool):
    """The checkpoint to continue from (or None), refusing to silently replace an unfinished run or a finished one
    made with other settings, or to resume one made with other settings."""
    checkpoints = Checkpoints(cfg.run_dir / "checkpoints")
    if not resume:
        # rows alone are a run too: one with run.checkpoint_every=0, or stopped before its first checkpoint
        rows, damaged = RunLog(cfg.run_dir).read()
        begun = checkpoints.paths() or rows or damaged
        if not begun or overwrite:
            return None
        done = completed_rounds(cfg)
        if done == cfg.federation.rounds:  # finished
            changes = _finished_with_other_settings(cfg)
            if changes:  # a re-run of the same command replaces its run; another experiment's is not lost to it
                raise ConfigError(
                    f"{cfg.run_dir} holds a finished run with other settings ({'; '.join(changes[:3])}"
                    f"{'; ...' if len(changes) > 3 else ''}): choose another run.name, or --overwrite to replace it"
                )
            return None
        if done is not None:  # finished, under another federation.rounds: --resume would refuse it
            raise ConfigError(
                f"{cfg.run_dir} holds a finished run of {done} rounds; a run of {cfg.federation.rounds} is "
                "another run (its schedule depends on the rounds): choose another run.name, or --overwrite"
            )
        raise ConfigError(
            f"{cfg.run_dir} holds an unfinished run; pass --resume to continue it or --overwrite "
            f"to replace it (or choose another run.name)"
        )
    log = RunLog(cfg.run_dir)
    try:  # damage before the last line would hide recorded rounds: the resume would start afresh over them
        rows = log.checked_rows()
        for line, row in enumerate(rows, start=1):  # JSON, yet not a round's row (a hand edit): no round to go by
            if not isinstance(row, dict) or type(row.get("round")) is not int:
                raise ReportError(f"{log.metrics_path}: line {line} is not a round's row (no integer round)")
    except ReportError as e:
        raise CheckpointError(
            f"{e}: --resume cannot tell which rounds were recorded; mend or remove the damaged lines (one round's "
            "JSON each) and resume, or start afresh with --overwrite"
        ) from None
    # no row yet: a checkpoint there is of a round whose row a crash cut off (round 1's), not one to go on from
    found = checkpoints.latest(at_most=rows[-1]["round"] if rows else 0)
    if found is None:
        print(f"fedmpi: no usable checkpoint in {checkpoints.dir}; starting fresh", flush=True)
        return None
    _values, _mask, meta = found
    recorded = meta.get("config") or {}
    if not isinstance(recorded, dict):  # the checksum covers the arrays, not the metadata
        raise CheckpointError(
            f"{checkpoints.dir}: the latest checkpoint's settings are not a JSON object; it cannot be resumed "
            f"(start afresh with --overwrite)"
        )
    ours, theirs = resume_key(cfg), recorded_key(recorded)
    if "seed" not in (recorded.get("run") or {}):  # written before run.seed was kept: not known, not compared
        theirs["run"] = ours["run"]
    if ours["data"]["dir"] and isinstance(theirs.get("data"), dict) and theirs["data"].get("dir"):
        # a job may stage the split to another path (node-local disk) and resume there: the files' digests
        # (split_problems) say whether the data are the same
        theirs["data"]["dir"] = ours["data"]["dir"]
    changed = setting_changes(theirs, ours)
    if changed:
        raise ConfigError(
            f"{checkpoints.dir} was written with other settings ({'; '.join(changed)}); resume with "
            f"the same config (only eval.*, run.* but run.seed, data.dir, devices and data loading may change)"
        )
    now = arithmetic(cfg)
    differ = [f"{name} {meta[name]} -> {now[name]}" for name in now if name in meta and meta[name] != now[name]]
    if differ:
        print(
            f"fedmpi: note: resuming with {', '.join(differ)} (the server's; learners likewise): the order of the "
            "arithmetic changes, so the final model may differ in its last bits from an uninterrupted run's",
            flush=True,
        )
    return found
