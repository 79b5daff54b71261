"""The federation server (rank 0).

Each round: send the global model (values, plus the mask when it changed) -> learners train ->
aggregate (FedAvg by the sum of pre-weighted values, or majority vote over the learners'
own sparse models) -> prune to s_t where the algorithm says so, or, in PruneFL's reconfiguration
rounds, choose the mask afresh from the learners' summed squared gradients -> evaluate -> record.
"""

from __future__ import annotations

import math
import time
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from typing import TYPE_CHECKING, NamedTuple, TypeVar

import numpy as np

from . import encoding, pruning
from .aggregation import MajorityVote
from .algorithms import algorithm, prune, reconfigures, round_seed, schedule
from .errors import EncodingError, PayloadError
from .messages import REPORT, fields_of, records, shown, width
from .recorder import State, background_thread, evaluation_due
from .wire import FLAG_MASK, FLAG_STOP, FLAG_WAIT

if TYPE_CHECKING:
    from .config import Config
    from .recorder import Recorder
    from .wire import Transport


class Sending(NamedTuple):
    """A round's model on its way out: when sending began and ended (perf_counter), when it began by the
    wall clock (the metrics row's "started"), and whether the mask went with it."""

    began: float
    ended: float
    wall: float
    with_mask: bool


class Server:
    """Rank 0's side of the rounds: sends the global model, merges and prunes what the learners send back, and
    has each round recorded."""

    def __init__(
        self, cfg: Config, wire: Transport, recorder: Recorder, sample_counts: np.ndarray, initial: np.ndarray
    ):
        """`initial` is the model before any training (rebuilt from run.seed on every start, resumes included):
        PruneFL's regrown positions restart from it."""
        self.cfg = cfg
        self.initial = initial
        self.wire = wire
        self.rec = recorder
        self.algo = algorithm(cfg)
        self.schedule = schedule(cfg)
        self.counts = sample_counts  # each learner's, as its preflight announced them: its reports must say the same
        self.weights = sample_counts / sample_counts.sum()
        self.turnaround = 0.0  # slowest time so far from the learners' last payload to the next model
        self.carried = {"bytes_down": 0, "bytes_up": 0, "pruned": 0}  # the start mask's, added to the next round
        self.closing_bytes = 0  # after the last round: the STOP header and any wait headers (Wire adds the farewells)
        self.told = (time.monotonic(), 0.0)  # when the learners last heard from the server, and their patience

    def learner_patience(self) -> float:
        """How long learners wait for the next model before they declare the server silent: the round's
        deadline for the slowest learner, plus the server's own aggregation, evaluation and checkpoint
        (three times the slowest seen, and at least another round's deadline), so that a slow evaluation
        is not mistaken for a dead server."""
        timeout = self.cfg.run.round_timeout
        return timeout + max(timeout, 3 * self.turnaround)

    def receive_start_mask(self, state: State) -> None:
        """Pruning at initialisation (SNIP, GraSP; PruneFL's initial pruning): learner 1 chooses the mask from
        the initial model and its data (with start_trains, its trained kept values follow). The exchange's
        bytes and the positions it prunes are counted in the first round's metrics."""
        n = state.values.size
        self.wire.reset_counters()
        self.wire.deadline = time.monotonic() + self.cfg.run.round_timeout
        self.wire.send(state.values, dest=1, what="initial model for the start mask")
        packed = self.wire.recv(
            np.empty(encoding.bitmask_nbytes(n), np.uint8), source=1, what="the start mask from learner 1 (rank 1)"
        )
        try:
            mask = encoding.unpack_mask(packed, n)
        except EncodingError as e:
            raise PayloadError(f"learner 1 (rank 1) sent an invalid start mask: {e}") from None
        pruned = n - int(mask.sum())
        if pruned != pruning.n_pruned(n, self.cfg.federation.target):
            raise PayloadError(
                f"learner 1 (rank 1) sent a start mask pruning {pruned} of {n} positions, expected "
                f"{pruning.n_pruned(n, self.cfg.federation.target)}"
            )
        if self.algo.start_trains:
            kept = self.wire.recv(np.empty(n - pruned, np.float32), source=1, what="the start values from learner 1")
            if not np.isfinite(kept).all():
                raise PayloadError("learner 1 (rank 1) sent non-finite start values")
            state.values = encoding.scatter_values(kept, mask, np.float32)
        else:
            state.values = pruning.apply_mask(state.values, mask)
        state.mask = mask
        self.wire.deadline = None
        down, up = self.wire.reset_counters()
        self.carried = {"bytes_down": down, "bytes_up": up, "pruned": pruned}

    def run(self, state: State, should_stop=lambda: False) -> tuple[State, bool]:
        """Rounds state.round+1 .. rounds; returns the final state and whether it was preempted.

        Round t's evaluation, checkpoint and metrics row are done by a recorder thread while the learners
        train round t+1: on a GPU node the server is idle then, and on CPUs shared with the learners the
        thread runs at a lower priority, in the gaps the learners leave. The row still describes round t.
        """
        f = self.cfg.federation
        mask_changed = True  # learners hold no mask yet (first round, or a resumed run)
        preempted = False
        recording: Future | None = None  # the last round's record, running while the next round trains
        with background_thread() as recorder:
            for t in range(state.round + 1, f.rounds + 1):
                sending = self.send(state, t, mask_changed)
                row, mask_changed = self.collect(state, t, sending)
                collected = time.perf_counter()
                if recording is not None:
                    self.await_record(recording, t)  # the previous round's record (its errors surface here)
                self.turnaround = max(self.turnaround, row["seconds_aggregate"] + time.perf_counter() - collected)
                recording = recorder.submit(self.record, State(state.round, state.values, state.mask), row)
                self.wire.watch = failure_of(recording)
                if should_stop() and t < f.rounds:
                    self.await_record(recording, t)
                    self.rec.stop_here(state)
                    preempted = True
                    break
            if recording is not None:
                self.await_record(recording, state.round)
        self.wire.watch = None
        # the learners wait this long for the final STOP header, which follows the final save (Wire.end_server); that
        # save evaluates the last round when a stop came before its evaluation was due: allow three of the longest
        patience = self.learner_patience()
        if self.rec.evaluates_at_finish(state.round):
            patience += 3 * self.rec.longest_eval
        self.wire.send_model(state.round, np.zeros(0, np.uint8), 0, FLAG_STOP, patience)
        down, up = self.wire.reset_counters()
        self.closing_bytes = down + up + self.carried["bytes_down"] + self.carried["bytes_up"]
        return state, preempted

    def await_record(self, recording: Future, t: int) -> None:
        """Wait for a round's record while the learners wait for the next model. Their patience runs from the server's
        last word, and an evaluation can outlast it (the first one, or one of the last round, was never timed): so
        each time half of it has passed while the evaluation still advances, the learners are told to wait again
        (a header without a model, FLAG_WAIT). A record that stops advancing (a write that hangs) earns no such
        word: the learners' patience ends the job, as for a silent server."""
        seen = self.rec.batches
        said, patience = self.told
        due = said + patience / 2
        while True:
            try:
                recording.result(timeout=max(0.0, due - time.monotonic()))
                return
            except FutureTimeout:
                pass
            now = self.rec.batches
            if now == seen:
                due = time.monotonic() + min(1.0, patience / 10)  # nothing new to vouch for: look again soon
                continue
            seen = now
            self.wire.send_model(t, np.zeros(0, np.uint8), 0, FLAG_WAIT, patience)
            self.told = (time.monotonic(), patience)
            due = self.told[0] + patience / 2
            down, up = self.wire.reset_counters()  # counted with the next round's traffic
            self.carried["bytes_down"] += down
            self.carried["bytes_up"] += up

    def record(self, snapshot: State, row: dict) -> None:
        """Evaluate (when due), checkpoint and log a finished round."""
        self.rec.record(snapshot, row, evaluate_now=evaluation_due(self.cfg, snapshot.round))

    def send(self, state: State, t: int, mask_changed: bool) -> Sending:
        """Round t's model to every learner: the values, with the mask when it changed. The round's deadline
        starts here: a learner that does not take its model (stopped, hung) is named by it, before the
        learners that took theirs give up on the server."""
        self.wire.reset_counters()
        self.wire.deadline = time.monotonic() + self.cfg.run.round_timeout
        started, wall = time.perf_counter(), time.time()
        nnz = int(state.mask.sum())
        patience = self.learner_patience()
        self.told = (time.monotonic(), patience)
        if mask_changed:
            self.wire.send_model(t, encoding.encode(state.values, state.mask), nnz, FLAG_MASK, patience)
        else:
            values = encoding.gather_values(state.values, state.mask).astype(np.float32)
            self.wire.send_model(t, values, nnz, 0, patience)
        return Sending(started, time.perf_counter(), wall, mask_changed)

    def collect(self, state: State, t: int, sending: Sending) -> tuple[dict, bool]:
        """The learners' reports and models for round t (sent out as `sending` says), aggregated and pruned
        into the new global state."""
        wire, n = self.wire, state.values.size
        nnz = int(state.mask.sum())
        reconfigure = reconfigures(self.cfg, t)
        reports = records(wire.collect_reports(width(REPORT)), REPORT)
        reported = time.perf_counter()
        self.check_reports(reports, nnz, n, extra_nbytes=4 * n if reconfigure else 0)
        importance = None
        if not self.algo.shared_mask:
            sizes = reports["payload_nbytes"].astype(np.int64)
            payloads = received(wire.gatherv(None, what="learner models", expected=sizes))
            t1 = time.perf_counter()
            values, mask = self.majority_vote(payloads, state.mask)
        else:
            summed = received(wire.reduce_sum(np.zeros(nnz, np.float32), what="weighted values"))
            if reconfigure:
                importance = received(wire.reduce_sum(np.zeros(n, np.float32), what="squared gradients"))
            t1 = time.perf_counter()
            values, mask = self.summed_model(t, summed, importance, state.mask), state.mask
        wire.deadline = None
        s_t = self.schedule(t)
        values, mask = self.prune_merged(t, s_t, values, mask, state.mask, importance)
        t2 = time.perf_counter()
        regrown = int((mask & ~state.mask).sum())
        if regrown and not self.algo.regrows:  # the table's promise, checked where the global mask changes
            raise RuntimeError(
                f"round {t}: {regrown} pruned positions would come back under "
                f"{self.cfg.federation.algorithm}, which never regrows; global model left as it was"
            )
        new_mask_changed = not np.array_equal(mask, state.mask)
        pruned = int((state.mask & ~mask).sum()) + self.carried["pruned"]
        state.round, state.values, state.mask = t, values, mask
        down, up = wire.reset_counters()
        down, up = down + self.carried["bytes_down"], up + self.carried["bytes_up"]
        self.carried = {"bytes_down": 0, "bytes_up": 0, "pruned": 0}
        seconds_train = float(reports["seconds_train"].max())
        dense = 4 * n * wire.learners
        row = {
            "target_sparsity": s_t,
            "sparsity_sent": 1.0 - nnz / n,
            "train_loss": float(np.average(reports["loss"], weights=reports["samples"])),
            "bytes_down": down,
            "bytes_up": up,
            "dense_bytes_down": dense,
            "dense_bytes_up": dense,
            "mask_sent": sending.with_mask,
            "pruned": pruned,
            "regrown": regrown,
            "seconds_train": seconds_train,
            # the round's time outside training: transfer, learner set-up and encoding, waiting for the slowest
            "seconds_comm": max(0.0, (t1 - sending.began) - seconds_train),
            "seconds_aggregate": t2 - t1,
            "seconds_send": sending.ended - sending.began,
            "seconds_collect": t1 - reported,
            "seconds_setup": float(reports["seconds_setup"].max()),
            "seconds_encode": float(reports["seconds_encode"].max()),
            "started": sending.wall,
        }
        return row, new_mask_changed

    def prune_merged(
        self, t: int, s_t: float, values: np.ndarray, mask: np.ndarray, held: np.ndarray, importance: np.ndarray | None
    ) -> tuple[np.ndarray, np.ndarray]:
        """The merged model of round t at its target s_t: in PruneFL's reconfiguration rounds (`importance`, the
        learners' summed squared gradients) the mask chosen afresh, regrown positions restarting from their
        initial values (`held`: the mask the learners trained in); otherwise pruned where the table says the
        server prunes."""
        f = self.cfg.federation
        if importance is not None:  # PruneFL: small kept weights give way to more important positions
            mask = pruning.reconfigure_mask(importance, values, mask, s_t, f.reconfigure_fraction)
            values = np.where(mask & ~held, self.initial, pruning.apply_mask(values, mask)).astype(np.float32)
        elif s_t > 0 and self.algo.server_prunes(f.vote_cap):
            mask = prune(values, mask, s_t, self.algo.selector, round_seed(self.cfg.run.seed, t, 0))
            values = pruning.apply_mask(values, mask)
        return values, mask

    def check_reports(self, reports: np.ndarray, nnz: int, n: int, extra_nbytes: int = 0) -> None:
        """Refuse a round before any reduce or gather: non-finite values; a report that no learner of ours writes
        (report_problems); a payload length that does not match the mask (plus `extra_nbytes`, the squared
        gradients of a reconfiguration round), or for a learner's own sparse model, more than the global mask's
        kept values can encode to."""
        largest = None if self.algo.shared_mask else encoding.encoded_nbytes(n, nnz, np.float32)
        for k, r in enumerate(reports, start=1):
            if not r["finite"] or not np.isfinite(r["loss"]):
                raise PayloadError(f"learner {k} (rank {k}) reports non-finite model values; round rejected")
            if bad := report_problems(r, float(self.counts[k - 1])):
                quoted = f"({shown(fields_of(r, REPORT))}): {'; '.join(bad)}"
                raise PayloadError(f"learner {k} (rank {k}) sent a report no learner writes {quoted}; round rejected")
            nbytes = int(r["payload_nbytes"])
            if self.algo.shared_mask and nbytes != 4 * nnz + extra_nbytes:
                raise PayloadError(
                    f"learner {k} (rank {k}) would send {nbytes} bytes, expected {4 * nnz + extra_nbytes}"
                )
            if largest is not None and not encoding.HEADER_NBYTES <= nbytes <= largest:
                raise PayloadError(
                    f"learner {k} (rank {k}) would send {nbytes} bytes, but a model of {nnz} kept values encodes to "
                    f"{encoding.HEADER_NBYTES}-{largest}"
                )

    def summed_model(
        self, t: int, summed: np.ndarray, importance: np.ndarray | None, global_mask: np.ndarray
    ) -> np.ndarray:
        """The shared-mask merge: the learners' pre-weighted kept values as the wire summed them (FedAvg's
        weighted mean), scattered into the global mask; a sum that is not finite, or PruneFL's summed squared
        gradients (`importance`) that are not, is refused."""
        if not np.isfinite(summed).all():
            raise PayloadError(f"round {t}: the aggregated values are not finite; global model left as it was")
        if importance is not None and not np.isfinite(importance).all():
            raise PayloadError(f"round {t}: the summed squared gradients are not finite; global model left as it was")
        return encoding.scatter_values(summed, global_mask, np.float32)

    def majority_vote(self, payloads: list[np.ndarray], global_mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """FedSparsify-Local's merge (federation.merge's rule) of the learners' encoded models; a model that does not
        decode, is not finite or revives a pruned position is refused, naming its learner."""
        vote = MajorityVote(global_mask.size, rule=self.cfg.federation.merge)
        for k, buf in enumerate(payloads, start=1):
            try:
                values, mask = encoding.decode(buf, expected_n=global_mask.size)
            except EncodingError as e:
                raise PayloadError(f"learner {k} (rank {k}) sent an invalid model: {e}") from None
            if values.dtype != np.float32:  # decode(expected_n=...) already refused a wrong length
                raise PayloadError(
                    f"learner {k} (rank {k}) sent {values.size} {values.dtype} values, "
                    f"expected {global_mask.size} float32"
                )
            if not np.isfinite(values).all():
                raise PayloadError(f"learner {k} (rank {k}) sent non-finite values")
            if (mask & ~global_mask).any():
                raise PayloadError(
                    f"learner {k} (rank {k}) sent a mask that revives {int((mask & ~global_mask).sum())} pruned weights"
                )
            vote.add(values, mask, self.weights[k - 1])
        return vote.result()


T = TypeVar("T")


def report_problems(report: np.ndarray, announced: float) -> list[str]:
    """The fields of a learner's REPORT that no learner of ours writes, each with the rule it breaks: every field
    finite, the loss (a mean squared error) and the seconds not negative, the samples those its preflight
    `announced` (a round trains every sample once per epoch), the payload a whole number of bytes, `finite` a flag."""
    fields = fields_of(report, REPORT)
    out = [f"{name} is not finite" for name, v in fields.items() if not math.isfinite(v)]
    if out:
        return out
    out += [
        f"{name} is negative" for name, v in fields.items() if v < 0 and (name == "loss" or name.startswith("seconds_"))
    ]
    if fields["samples"] != announced:
        out.append(f"samples is not the {announced:.0f} its preflight announced")
    if not (fields["payload_nbytes"].is_integer() and fields["payload_nbytes"] >= 0):
        out.append("payload_nbytes is not a whole number of bytes")
    if fields["finite"] not in (0.0, 1.0):
        out.append("finite is not 0 or 1")
    return out


def failure_of(recording: Future):
    """A check for the wire to run while it waits: raise the recording's error as soon as it has one (a full
    disk, a failed evaluation), instead of after the next round's reports."""

    def check() -> None:
        if recording.done() and recording.exception() is not None:
            recording.result()

    return check


def received(value: T | None) -> T:
    """What a collective delivered at the server (it is None only on learners)."""
    if value is None:
        raise RuntimeError("a collective delivered nothing at the server")
    return value
