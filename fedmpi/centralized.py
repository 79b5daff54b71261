"""The centralized upper bound: one process trains on every learner's data pooled, with the
same model, optimiser, rounds (a round = train.epochs epochs) and metrics as a federation."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from preprocess.layout import TEST_FILE, learner_files

from .algorithms import round_seed
from .data import check_volumes, open_volumes
from .device import prepare_model
from .errors import EXIT_USAGE, ConfigError, DataError, DivergedError, UserError
from .metrics import mean_predictor_mae
from .model import build_model, flat_parameters, load_flat_parameters
from .preflight import RankCheck, cache_place, cache_refusal, check_rank, say, volume_bytes, volume_shape
from .recorder import Recorder, evaluation_due, start_state
from .resume import split_problems
from .startup import StartClock, say_ready
from .training import SeededLoader, train_round, warm_up_round


def run_centralized(
    cfg, data_dir: Path, resume: bool, overwrite: bool, should_stop=lambda: False, clock: StartClock | None = None
) -> int:
    """Check what it will use as a federation's preflight does (one line and exit 2 for a problem), then
    train; `should_stop()` true after a round (SLURM's warning, SIGTERM) checkpoints it and ends the run
    for --resume, as the server does. `clock`: the process's start-up phases (fedmpi.startup)."""
    clock = clock or StartClock()
    checked: RankCheck | None = None
    try:
        files = list(learner_files(Path(data_dir)).values())
        if not files:
            raise DataError(f"{data_dir}: no learner_<k>.h5 files")
        checked = check_rank(cfg, 0, Path(data_dir), 0, resume, overwrite)  # test.h5, device, run dir, resume
        split = {TEST_FILE: checked.digest}
        volumes = int(checked.info["samples"][0])
        for p in files:
            head = check_volumes(p)
            if tuple(head["shape"]) != volume_shape(checked.info[0]):
                raise DataError(f"{p}: volume shape {tuple(head['shape'])} differs from {TEST_FILE}'s")
            split[p.name] = head["digest"]
            volumes += head["n"]
        place, room = cache_place(cfg.data.cache, checked.device)
        need = volumes * volume_bytes(checked.info[0])
        if place and 0 <= room < need:
            whose = f"{volumes} volumes of {len(files)} learner files and {TEST_FILE}"
            raise ConfigError(cache_refusal(cfg.data.cache, place, need, room, whose))
        problems = split_problems(checked.resume[2].get("split") if checked.resume else None, split)
        if problems:
            raise DataError(problems[0])
    except UserError as e:
        if checked is not None and checked.lock is not None:
            checked.lock.abandon()
        say(0, str(e))
        return EXIT_USAGE
    assert checked.lock is not None
    clock.mark("preflight")
    try:
        return _train(cfg, data_dir, files, split, checked, should_stop, clock)
    finally:
        checked.lock.release()


def _train(cfg, data_dir: Path, files: list[Path], split: dict, checked: RankCheck, should_stop, clock) -> int:
    device = checked.device
    parts = [open_volumes(p, cfg, device).warm() for p in files]  # filled once here, not in each epoch's workers
    pooled: torch.utils.data.ConcatDataset = torch.utils.data.ConcatDataset(parts)
    loader = SeededLoader(cfg, pooled, device)
    ages = np.concatenate([p.ages for p in parts])
    test = open_volumes(Path(data_dir) / TEST_FILE, cfg, device)
    clock.mark("volumes")
    torch.manual_seed(cfg.run.seed)
    model = prepare_model(build_model(cfg, test.shape, float(ages.mean())), device, cfg.train)
    rec = Recorder(cfg, model, test, device, mean_predictor_mae(test.ages, ages.mean()), data_dir, split, len(pooled))
    state = start_state(cfg, checked.resume, rec, model)
    rec.log.write_config(cfg.to_json())
    clock.mark("model")
    warm_up_round(cfg, model, test.shape, len(pooled), device)  # kernels set up before round 1 is timed, as on learners
    clock.mark("warm_up")
    _, rec.startup_seconds = say_ready(clock.record().reshape(1, -1), ["the centralized baseline"])
    rec.start_clock()
    for t in range(state.round + 1, cfg.federation.rounds + 1):
        load_flat_parameters(model, state.values)
        stats, seconds = train_round(cfg, model, loader, round_seed(cfg.run.seed, t, 0), device)
        values = flat_parameters(model)
        if not np.isfinite(values).all():  # as a federation refuses a learner's or an aggregate's non-finite values
            raise DivergedError(
                f"round {t}: training left {int((~np.isfinite(values)).sum())} non-finite model values (the training "
                f"diverged: a lower train.lr?); the run stops, its records end at round {state.round}"
            )
        state.values, state.round = values, t
        row = {
            "target_sparsity": 0.0,
            "train_loss": stats["loss"],
            "bytes_down": 0,
            "bytes_up": 0,
            "dense_bytes_down": 0,
            "dense_bytes_up": 0,
            "mask_sent": False,
            "pruned": 0,
            "regrown": 0,
            "seconds_train": seconds,
            "seconds_comm": 0.0,
            "seconds_aggregate": 0.0,
        }
        rec.record(state, row, evaluate_now=evaluation_due(cfg, t))
        if should_stop() and t < cfg.federation.rounds:
            rec.stop_here(state)
            return rec.end(state, preempted=True)
    return rec.end(state, preempted=False)
