"""The federation server (rank 0).

Each round: send the global model (values, plus the mask when it changed) -> learners train ->
aggregate (FedAvg by MPI Reduce of pre-weighted values, or majority vote over the learners'
own sparse models) -> prune to s_t where the algorithm says so -> evaluate -> record.
"""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from . import encoding, pruning
from .aggregation import MajorityVote
from .algorithms import algorithm, prune, round_seed, schedule
from .checkpoint import Checkpoints, save_model
from .config import Config
from .model import BrainAgeCNN, flat_parameters, layer_sparsity, load_flat_parameters
from .metrics import regression_metrics
from .runlog import RunLog, atomic_write
from .training import predict
from .wire import FLAG_MASK, FLAG_PREEMPTED, FLAG_STOP, Wire

if TYPE_CHECKING:
    from .data import VolumeDataset

# A learner's end-of-round report: mean train loss, samples, seconds of local training,
# bytes it is about to hand to MPI for its model, and whether its values are all finite.
REPORT = ("loss", "samples", "seconds_train", "payload_nbytes", "finite")
EXIT_PREEMPTED = 75  # EX_TEMPFAIL: stopped at a checkpoint on request; resume with --resume


class PayloadError(RuntimeError):
    """A learner sent a model the server refuses; the global model is left untouched."""


@dataclass
class State:
    round: int  # last completed round
    values: np.ndarray  # flat float32 global model
    mask: np.ndarray  # flat bool global mask (True = kept)


def build_model(cfg: Config, shape, mean_age: float = 62.68) -> BrainAgeCNN:
    m = cfg.model
    return BrainAgeCNN(input_shape=tuple(shape), width=m.width, pools=m.pools or None, dropout=m.dropout,
                       mean_age=mean_age, init=m.init, norm_eps=m.norm_eps)


def initial_state(cfg: Config, model: BrainAgeCNN) -> State:
    values = flat_parameters(model)
    return State(0, values, np.ones(values.size, dtype=bool))


class Recorder:
    """Evaluation, metrics.jsonl, checkpoints and the per-round progress line, shared by the
    federated server and the centralized baseline."""

    def __init__(self, cfg: Config, model: BrainAgeCNN, test: VolumeDataset, device, baseline_mae: float,
                 data_dir):
        self.cfg = cfg
        self.test = test
        self.data_dir = str(data_dir)
        self.model = model
        self.device = device
        self.loader = torch.utils.data.DataLoader(test, batch_size=cfg.eval.batch_size, shuffle=False,
                                                  num_workers=cfg.data.workers)
        self.baseline_mae = baseline_mae
        self.log = RunLog(cfg.run_dir)
        self.checkpoints = Checkpoints(cfg.run_dir / "checkpoints", keep=cfg.run.keep_checkpoints)
        self.last_eval: dict = {}
        self.last_eval_round = -1
        self.last_predictions = np.zeros(0, np.float32)

    def evaluate(self, state: State) -> dict:
        """Test metrics of the model loaded from state (remembered, with its predictions, for the summary)."""
        load_flat_parameters(self.model, state.values)
        self.last_predictions, ages = predict(self.model, self.loader, self.device)
        self.last_eval = dict(regression_metrics(self.last_predictions, ages), n=int(ages.size))
        self.last_eval_round = state.round
        return self.last_eval

    def write_predictions(self) -> None:
        """The final model's prediction for every test subject: paired comparisons between runs need them."""
        lines = ["subject_id,age,predicted\n"]
        lines += [f"{sid},{age:.2f},{pred:.4f}\n"
                  for sid, age, pred in zip(self.test.subject_ids, self.test.ages, self.last_predictions)]
        atomic_write(self.cfg.run_dir / "test_predictions.csv", "".join(lines).encode())

    def record(self, state: State, row: dict, evaluate_now: bool) -> dict:
        t0 = time.perf_counter()
        if evaluate_now:
            scores = self.evaluate(state)
        else:
            scores = {}
            load_flat_parameters(self.model, state.values)
        row["seconds_eval"] = time.perf_counter() - t0
        row.update(round=state.round, sparsity=pruning.sparsity(state.values),
                   layer_sparsity=layer_sparsity(self.model),
                   test_mae=scores.get("mae"), test_rmse=scores.get("rmse"), test_r=scores.get("r"))
        self.log.append(row)
        every = self.cfg.run.checkpoint_every
        if every and (state.round % every == 0 or state.round == self.cfg.federation.rounds):
            self.checkpoint(state)
        self.progress(row)
        return row

    def checkpoint(self, state: State) -> None:
        self.checkpoints.save(state.round, state.values, state.mask, {"config": resume_key(self.cfg)})

    def progress(self, row: dict) -> None:
        mae = "" if row["test_mae"] is None else f" MAE {row['test_mae']:.2f} (mean baseline {self.baseline_mae:.2f})"
        print(f"round {row['round']:3d}/{self.cfg.federation.rounds} sparsity {row['sparsity']:.3f}{mae}"
              f" | up {row['bytes_up'] / 1e6:.2f} MB down {row['bytes_down'] / 1e6:.2f} MB"
              f" | train {row['seconds_train']:.1f}s comm {row['seconds_comm']:.1f}s"
              f" agg {row['seconds_aggregate']:.2f}s eval {row['seconds_eval']:.1f}s", flush=True)

    def finish(self, state: State, seconds: float, preempted: bool = False) -> dict:
        model_path = self.cfg.run_dir / "model.npz"
        model_bytes = save_model(model_path, state.values, state.mask, {
            "input_shape": list(self.model.input_shape), "config": self.cfg.to_dict(), "round": state.round})
        # A preempted run may stop after a round that was not evaluated (eval.every > 1): evaluate it now.
        scores = self.last_eval if self.last_eval_round == state.round else self.evaluate(state)
        self.write_predictions()
        rows = self.log.rows()
        total = {k: sum(r[k] for r in rows) for k in ("bytes_down", "bytes_up", "dense_bytes_down", "dense_bytes_up")}
        summary = {
            "algorithm": self.cfg.federation.algorithm, "rounds": state.round, "preempted": preempted,
            "data_dir": self.data_dir,
            "final_mae": scores["mae"], "final_rmse": scores["rmse"], "final_r": scores["r"],
            "baseline_mae": self.baseline_mae, "final_sparsity": pruning.sparsity(state.values),
            "target_sparsity": self.cfg.federation.target, "parameters": int(state.values.size),
            "model_file": str(model_path), "model_bytes_on_disk": model_bytes,
            "dense_model_bytes": int(state.values.size * 4), "wall_seconds": seconds,
            **{f"total_{k}": v for k, v in total.items()},
        }
        self.log.write_summary(summary)
        return summary


def resume_key(cfg: Config) -> dict:
    """The settings a checkpoint must agree with to be resumed (not run/eval or hardware choices)."""
    d = cfg.to_dict()
    d.pop("run")
    d.pop("eval")
    for k in ("device", "threads"):
        d["train"].pop(k)
    for k in ("workers", "cache", "cache_dir"):
        d["data"].pop(k)
    return d


class Server:
    def __init__(self, cfg: Config, wire: Wire, recorder: Recorder, sample_counts: np.ndarray):
        self.cfg = cfg
        self.wire = wire
        self.rec = recorder
        self.algo = algorithm(cfg)
        self.schedule = schedule(cfg)
        self.weights = sample_counts / sample_counts.sum()

    def receive_snip_mask(self, state: State) -> None:
        """SNIP: learner 1 scores the initial model on one batch; its mask is then fixed."""
        self.wire.send(state.values, dest=1, what="initial model for SNIP")
        packed = self.wire.recv(np.empty((state.values.size + 7) // 8, np.uint8), source=1, what="SNIP mask")
        state.mask = encoding.unpack_mask(packed, state.values.size)
        state.values = pruning.apply_mask(state.values, state.mask)

    def run(self, state: State, should_stop=lambda: False) -> tuple[State, bool]:
        """Rounds state.round+1 .. rounds; returns the final state and whether it was preempted."""
        f = self.cfg.federation
        mask_changed = True  # learners hold no mask yet (first round, or a resumed run)
        preempted = False
        for t in range(state.round + 1, f.rounds + 1):
            row, mask_changed = self.round(state, t, mask_changed)
            self.rec.record(state, row, evaluate_now=t % self.cfg.eval.every == 0 or t == f.rounds)
            if should_stop() and t < f.rounds:
                self.rec.checkpoint(state)
                preempted = True
                break
        self.wire.send_model(state.round, np.zeros(0, np.uint8), 0, FLAG_STOP | (FLAG_PREEMPTED if preempted else 0))
        return state, preempted

    def round(self, state: State, t: int, mask_changed: bool) -> tuple[dict, bool]:
        wire, n, f = self.wire, state.values.size, self.cfg.federation
        wire.reset_counters()
        wire.deadline = time.monotonic() + self.cfg.run.round_timeout
        t0 = time.perf_counter()
        nnz = int(state.mask.sum())
        if mask_changed:
            wire.send_model(t, encoding.encode(state.values, state.mask), nnz, FLAG_MASK)
        else:
            wire.send_model(t, encoding.gather_values(state.values, state.mask).astype(np.float32), nnz, 0)
        reports = wire.collect_reports(len(REPORT))
        self.check_reports(reports, nnz, n)
        if self.algo.prune_at == "learner":
            payloads = wire.gatherv(None, what="learner models")
            t1 = time.perf_counter()
            values, mask = self.majority_vote(payloads, state.mask)
        else:
            summed = wire.reduce_sum(np.zeros(nnz, np.float32), what="weighted values")
            t1 = time.perf_counter()
            if not np.isfinite(summed).all():
                raise PayloadError(f"round {t}: the aggregated values are not finite; global model left as it was")
            values, mask = encoding.scatter_values(summed, state.mask, np.float32), state.mask
        wire.deadline = None
        s_t = self.schedule(t)
        # Local's global model is the vote's (the authors' merge) unless vote_cap also prunes it to s_t.
        if s_t > 0 and (self.algo.prune_at == "server" or (self.algo.prune_at == "learner" and f.vote_cap)):
            mask = prune(values, mask, s_t, self.algo.selector, round_seed(self.cfg.run.seed, t, 0))
            values = pruning.apply_mask(values, mask)
        t2 = time.perf_counter()
        new_mask_changed = not np.array_equal(mask, state.mask)
        state.round, state.values, state.mask = t, values, mask
        down, up = wire.reset_counters()
        seconds_train = float(reports[:, 2].max())
        dense = 4 * n * wire.learners
        row = {
            "target_sparsity": s_t, "sparsity_sent": 1.0 - nnz / n, "train_loss": float(np.average(reports[:, 0], weights=reports[:, 1])),
            "bytes_down": down, "bytes_up": up, "dense_bytes_down": dense, "dense_bytes_up": dense,
            "mask_sent": bool(mask_changed), "seconds_train": seconds_train,
            "seconds_comm": max(0.0, t1 - t0 - seconds_train), "seconds_aggregate": t2 - t1,
        }
        return row, new_mask_changed

    def check_reports(self, reports: np.ndarray, nnz: int, n: int) -> None:
        for k, (loss, samples, _, nbytes, finite) in enumerate(reports, start=1):
            if not finite or not np.isfinite(loss):
                raise PayloadError(f"learner {k} (rank {k}) reports non-finite model values; round rejected")
            if self.algo.prune_at != "learner" and int(nbytes) != 4 * nnz:
                raise PayloadError(f"learner {k} (rank {k}) would send {int(nbytes)} bytes, expected {4 * nnz}")

    def majority_vote(self, payloads: list[np.ndarray], global_mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        vote = MajorityVote(global_mask.size, rule=self.cfg.federation.merge)
        for k, buf in enumerate(payloads, start=1):
            try:
                values, mask = encoding.decode(buf, expected_n=global_mask.size)
            except encoding.EncodingError as e:
                raise PayloadError(f"learner {k} (rank {k}) sent an invalid model: {e}") from None
            if values.dtype != np.float32:  # decode(expected_n=...) already refused a wrong length
                raise PayloadError(f"learner {k} (rank {k}) sent {values.size} {values.dtype} values, "
                                   f"expected {global_mask.size} float32")
            if not np.isfinite(values).all():
                raise PayloadError(f"learner {k} (rank {k}) sent non-finite values")
            if (mask & ~global_mask).any():
                raise PayloadError(f"learner {k} (rank {k}) sent a mask that revives "
                                   f"{int((mask & ~global_mask).sum())} pruned weights")
            vote.add(values, mask, self.weights[k - 1])
        return vote.result()


def print_summary(summary: dict, file=sys.stdout) -> None:
    print(f"done: {summary['rounds']} rounds, test MAE {summary['final_mae']:.2f} years "
          f"(predict-the-mean baseline {summary['baseline_mae']:.2f}), sparsity {summary['final_sparsity']:.3f}, "
          f"bytes up {summary['total_bytes_up'] / 1e6:.1f} MB / dense {summary['total_dense_bytes_up'] / 1e6:.1f} MB, "
          f"model {summary['model_bytes_on_disk'] / 1e3:.0f} kB on disk ({summary['model_file']})", file=file, flush=True)
