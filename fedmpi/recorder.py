"""Run records shared by the federation server and the centralized baseline: the training state,
evaluation, metrics.jsonl, checkpoints, the summary, and the state a run starts from (fresh or resumed;
whether it may resume is fedmpi.resume's).
"""

from __future__ import annotations

import contextlib
import csv
import io
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from . import pruning
from .algorithms import target_sparsity
from .checkpoint import Checkpoints, model_digest, save_model
from .data import loader_options
from .device import AUTOCAST
from .errors import EXIT_PREEMPTED, ConfigError
from .files import atomic_write
from .metrics import regression_metrics
from .model import BrainAgeCNN, flat_parameters, layer_sparsity, load_flat_parameters
from .provenance import software
from .resume import arithmetic, resume_key
from .runlog import RunLog
from .training import predict

if TYPE_CHECKING:
    from collections.abc import Iterator

    from .config import Config
    from .data import VolumeDataset


@dataclass
class State:
    """The global model after a round: what a checkpoint saves and a resume starts from."""

    round: int  # last completed round
    values: np.ndarray  # flat float32 global model
    mask: np.ndarray  # flat bool global mask (True = kept)


def initial_state(model: BrainAgeCNN) -> State:
    """A fresh run's state: round 0, the model's initial values, every position kept."""
    values = flat_parameters(model)
    return State(0, values, np.ones(values.size, dtype=bool))


def evaluation_due(cfg: Config, t: int) -> bool:
    """Round t's model is evaluated: every eval.every rounds, and always the last round's."""
    return t % cfg.eval.every == 0 or t == cfg.federation.rounds


class Recorder:
    """Evaluation, metrics.jsonl, checkpoints and the per-round progress line, shared by the
    federated server and the centralized baseline."""

    def __init__(
        self,
        cfg: Config,
        model: BrainAgeCNN,
        test: VolumeDataset,
        device,
        baseline_mae: float,
        data_dir,
        split: dict[str, str],
        train_subjects: int,
    ):
        self.cfg = cfg
        self.test = test
        self.data_dir = str(Path(data_dir).resolve())
        self.train_subjects = train_subjects
        self.split = split  # file name -> data.file_digest of the files this run trains and tests on
        self.model = model
        self.device = device
        self.loader = torch.utils.data.DataLoader(
            test, batch_size=cfg.eval.batch_size, shuffle=False, **loader_options(cfg, device)
        )
        self.baseline_mae = baseline_mae
        self.log = RunLog(cfg.run_dir)
        self.checkpoints = Checkpoints(cfg.run_dir / "checkpoints", keep=cfg.run.keep_checkpoints)
        self.last_eval: dict = {}
        self.last_eval_round = -1
        self.last_predictions = np.zeros(0, np.float32)
        self.batches = 0  # evaluation batches taken so far: the server's sign that a long evaluation advances
        self.longest_eval = 0.0  # seconds: the longest evaluation of this session, for the learners' last patience
        self.earlier_seconds = 0.0  # wall time of the sessions before this one (a resumed run), from its rows
        self.began = time.perf_counter()
        self.startup_seconds: float | None = None  # this session's, from the processes' start to every rank ready

    def start_clock(self) -> None:
        """Start this session's clock: rounds from here on count towards the run's wall_seconds."""
        self.began = time.perf_counter()

    def wall_seconds(self) -> float:
        """The run's wall time so far: this session's plus that of the sessions it resumed."""
        return self.earlier_seconds + time.perf_counter() - self.began

    def evaluate(self, state: State) -> dict:
        """Test metrics of the model loaded from state (remembered, with its predictions, for the summary)."""
        began = time.perf_counter()
        load_flat_parameters(self.model, state.values)
        t = self.cfg.train
        self.last_predictions, ages = predict(
            self.model, self._counted(self.loader), self.device, AUTOCAST[t.amp], t.channels_last
        )
        self.longest_eval = max(self.longest_eval, time.perf_counter() - began)
        self.last_eval = dict(regression_metrics(self.last_predictions, ages), n=int(ages.size))
        self.last_eval_round = state.round
        return self.last_eval

    def evaluates_at_finish(self, round_: int) -> bool:
        """Whether finish() evaluates round_'s model: a run stopped after a round not evaluated (eval.every > 1)."""
        return self.last_eval_round != round_

    def _counted(self, loader) -> Iterator:
        for batch in loader:
            self.batches += 1
            yield batch

    def write_predictions(self) -> None:
        """The final model's prediction for every test subject: paired comparisons between runs need them."""
        text = io.StringIO()
        rows = csv.writer(text, lineterminator="\n")  # quotes an id holding a comma or a quote, as report reads it
        rows.writerow(["subject_id", "age", "predicted"])
        rows.writerows(
            [sid, f"{age:.2f}", f"{pred:.4f}"]
            for sid, age, pred in zip(self.test.subject_ids, self.test.ages, self.last_predictions)
        )
        atomic_write(self.cfg.run_dir / "test_predictions.csv", text.getvalue().encode())

    def record(self, state: State, row: dict, evaluate_now: bool) -> dict:
        """Round state.round's records: its evaluation (when due), its checkpoint (run.checkpoint_every), the completed
        row in metrics.jsonl and the progress line; returns the row."""
        t0 = time.perf_counter()
        if evaluate_now:
            scores = self.evaluate(state)
        else:
            scores = {}
            load_flat_parameters(self.model, state.values)
        row["seconds_eval"] = time.perf_counter() - t0
        row.update(
            round=state.round,
            sparsity=pruning.sparsity(state.values),
            layer_sparsity=layer_sparsity(self.model),
            test_mae=scores.get("mae"),
            test_rmse=scores.get("rmse"),
            test_r=scores.get("r"),
        )
        t1 = time.perf_counter()
        every = self.cfg.run.checkpoint_every
        saved = every and (state.round % every == 0 or state.round == self.cfg.federation.rounds)
        if saved:
            self.checkpoint(state)  # before the row: a row never refers to a checkpoint that failed to write
        row["seconds_checkpoint"] = time.perf_counter() - t1
        row["wall_seconds"] = self.wall_seconds()
        self.log.append(row)
        if saved:
            self.checkpoints.prune()  # after the row: until then the previous checkpoint is the one to resume
        self.progress(row)
        return row

    def checkpoint(self, state: State) -> None:
        """Save `state` as a checkpoint, with what a resume checks: the resume key, the split's digests and
        the arithmetic choices (resume.arithmetic)."""
        self.checkpoints.save(
            state.round,
            state.values,
            state.mask,
            {"config": resume_key(self.cfg), "split": self.split, **arithmetic(self.cfg)},
        )

    def stop_here(self, state: State) -> None:
        """A stop was asked after this round, whose row is written: checkpoint it whatever checkpoint_every
        says, so that --resume continues from here (older checkpoints may go)."""
        self.checkpoint(state)
        self.checkpoints.prune()

    def end(self, state: State, preempted: bool, closing_bytes: int = 0) -> int:
        """Finish the run, say how it ended and return the exit code (EXIT_PREEMPTED asks to be requeued)."""
        print_summary(self.finish(state, preempted, closing_bytes))
        if preempted:
            print(f"fedmpi: stopped at round {state.round} on request; continue with --resume", flush=True)
            return EXIT_PREEMPTED
        return 0

    def progress(self, row: dict) -> None:
        """The round's line on stdout: sparsity, test MAE against the predict-the-mean baseline, bytes and seconds."""
        mae = "" if row["test_mae"] is None else f" MAE {row['test_mae']:.2f} (mean baseline {self.baseline_mae:.2f})"
        print(
            f"round {row['round']:3d}/{self.cfg.federation.rounds} sparsity {row['sparsity']:.3f}{mae}"
            f" | up {row['bytes_up'] / 1e6:.2f} MB down {row['bytes_down'] / 1e6:.2f} MB"
            f" | train {row['seconds_train']:.1f}s comm {row['seconds_comm']:.1f}s"
            f" agg {row['seconds_aggregate']:.2f}s eval {row['seconds_eval']:.1f}s",
            flush=True,
        )

    def finish(self, state: State, preempted: bool = False, closing_bytes: int = 0) -> dict:
        """Save model.npz, evaluate the final model if its round was not, and write test_predictions.csv and
        summary.json; returns the summary. `closing_bytes`: what went over the wire after the last round's row
        (this session's STOP headers, wait headers and farewells), counted apart so the totals stay the rows' sums."""
        model_path = self.cfg.run_dir / "model.npz"
        model_bytes = save_model(
            model_path,
            state.values,
            state.mask,
            {"input_shape": list(self.model.input_shape), "config": self.cfg.to_dict(), "round": state.round},
        )
        # A preempted run may stop after a round that was not evaluated (eval.every > 1): evaluate it now.
        scores = self.evaluate(state) if self.evaluates_at_finish(state.round) else self.last_eval
        self.write_predictions()
        rows = self.log.rows()
        total = {k: sum(r[k] for r in rows) for k in ("bytes_down", "bytes_up", "dense_bytes_down", "dense_bytes_up")}
        summary = {
            "algorithm": self.cfg.federation.algorithm,
            "rounds": state.round,
            "preempted": preempted,
            "data_dir": self.data_dir,
            "split": self.split,
            "train_subjects": self.train_subjects,
            "test_subjects": len(self.test),
            "final_mae": scores["mae"],
            "final_rmse": scores["rmse"],
            "final_r": scores["r"],
            "baseline_mae": self.baseline_mae,
            "final_sparsity": pruning.sparsity(state.values),
            "target_sparsity": target_sparsity(self.cfg),
            "parameters": int(state.values.size),
            "model_file": str(model_path),
            "model_sha256": model_digest(state.values),
            "model_bytes_on_disk": model_bytes,
            "dense_model_bytes": int(state.values.size * 4),
            "wall_seconds": self.wall_seconds(),
            "startup_seconds": self.startup_seconds,
            **{f"total_{k}": v for k, v in total.items()},
            "closing_bytes": closing_bytes,
            "software": software(),
        }
        self.log.write_summary(summary)
        return summary


def start_state(cfg: Config, resume, rec: Recorder, model) -> State:
    """The state to start from: the resume point, or a fresh model (clearing an old run's files)."""
    if resume is not None:
        values, mask, meta = resume
        if values.size != sum(p.numel() for p in model.parameters()):
            raise ConfigError(f"{rec.checkpoints.dir}: checkpoint does not fit the model")
        rows = rec.log.keep_through(int(meta["round"]))
        rec.checkpoints.drop_after(int(meta["round"]))  # past the rows (a crash before its row) or corrupt
        # The run's clock goes on from the resumed round's row (rows written before fedmpi kept it: from 0).
        rec.earlier_seconds = float(rows[-1].get("wall_seconds") or 0.0) if rows else 0.0
        print(f"fedmpi: resuming {cfg.run_dir} after round {meta['round']}", flush=True)
        return State(int(meta["round"]), values, mask)
    rec.log.reset()
    for p in [*rec.checkpoints.paths(), cfg.run_dir / "model.npz", cfg.run_dir / "test_predictions.csv"]:
        p.unlink(missing_ok=True)
    return initial_state(model)


def print_summary(summary: dict) -> None:
    """The run's last line; "done" only for a run that finished (a log grep for it must not find a stopped one)."""
    print(
        f"{'stopped' if summary['preempted'] else 'done'}: {summary['rounds']} rounds, "
        f"test MAE {summary['final_mae']:.2f} years "
        f"(predict-the-mean baseline {summary['baseline_mae']:.2f}), sparsity {summary['final_sparsity']:.3f}, "
        f"bytes up {summary['total_bytes_up'] / 1e6:.1f} MB / dense {summary['total_dense_bytes_up'] / 1e6:.1f} MB, "
        f"model {summary['model_bytes_on_disk'] / 1e3:.0f} kB on disk ({summary['model_file']})",
        flush=True,
    )


RECORDER_NICENESS = 10  # the recorder thread yields the cores to training learners


@contextlib.contextmanager
def background_thread() -> Iterator[ThreadPoolExecutor]:
    """One thread for a round's records (evaluation, checkpoint, metrics row) while the next round trains,
    at a lower priority, so that on cores shared with the learners it takes the gaps they leave.

    Left normally, it waits for the last record. Left by an exception, it does not: the job is about to be
    aborted, and an evaluation in flight (minutes for a large test set on a CPU) must not hold that up. The
    record's files are written atomically, so one cut short leaves the previous checkpoint to resume from."""
    pool = ThreadPoolExecutor(1, thread_name_prefix="recorder", initializer=_lower_priority)
    try:
        yield pool
    except BaseException:
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    pool.shutdown()


def _lower_priority() -> None:
    """Run the calling thread RECORDER_NICENESS lower than the process (Linux schedules threads separately;
    elsewhere a no-op). Nice orders threads within one scheduling group: where each rank is a group of its
    own (autogroups: hydra's mpirun starts every rank in a new session), it yields only to the server's
    own thread, and competes with each learner as an equal."""
    with contextlib.suppress(AttributeError, OSError):
        tid = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + RECORDER_NICENESS))
