"""The server's validation of learner payloads, with a stand-in wire (no MPI)."""

import threading
import time

import numpy as np
import pytest

from fedmpi import encoding, pruning
from fedmpi.algorithms import round_seed
from fedmpi.config import Config
from fedmpi.errors import PayloadError
from fedmpi.messages import REPORT
from fedmpi.recorder import State
from fedmpi.server import Server, report_problems

N = 50
INITIAL = np.linspace(-1, 1, N).astype(np.float32) + 0.01  # the model before training: no zeros
COUNTS = (10.0, 30.0)  # the two learners' samples, as their preflight announced them


class FakeWire:
    """Plays two learners: every call returns what the test put in."""

    learners = 2
    deadline = None

    def __init__(self, reports, payloads=None, summed=None, importance=None, received=()):
        self.reports, self.payloads = reports, payloads
        self.reduced = [summed, importance]  # the values' sum, then (PruneFL) the squared gradients'
        self.received, self.sent = list(received), []

    def reset_counters(self):
        return 0, 0

    def send_model(self, *args):
        self.deadline_at_send = self.deadline

    def collect_reports(self, width):
        return np.asarray(self.reports, dtype=np.float64)

    def gatherv(self, buf, what="", expected=None):
        self.expected = expected
        return self.payloads

    def reduce_sum(self, buf, what=""):
        return self.reduced.pop(0)

    def send(self, buf, dest, what=""):
        self.sent.append(buf)

    def recv(self, buf, source, what=""):
        buf[:] = self.received.pop(0)
        return buf


def _round(server, state, t, mask_changed):
    """One whole round as Server.run drives it (no previous round to record in between)."""
    return server.collect(state, t, server.send(state, t, mask_changed))


def _server(algorithm, wire, **federation):
    cfg = Config()
    cfg.federation.algorithm = algorithm
    cfg.federation.rounds = 4
    for key, value in federation.items():
        setattr(cfg.federation, key, value)
    return Server(cfg, wire, recorder=None, sample_counts=np.array(COUNTS), initial=INITIAL)


def _state():
    rng = np.random.default_rng(0)
    mask = np.ones(N, bool)
    mask[:10] = False
    return State(0, np.where(mask, rng.standard_normal(N), 0).astype(np.float32), mask)


def _report(nbytes, finite=1.0, loss=1.0, samples=10):
    return [loss, samples, 0.1, nbytes, finite, 0.01, 0.02]


def _reports(*nbytes):
    """The two learners' honest reports of these payload sizes."""
    return [_report(b, samples=n) for b, n in zip(nbytes, COUNTS)]


def test_report_layout_is_what_learners_send():
    assert REPORT.names == (
        "loss",
        "samples",
        "seconds_train",
        "payload_nbytes",
        "finite",
        "seconds_setup",
        "seconds_encode",
    )


def _bad(k, **fields):
    """The two learners' honest reports of 160 bytes, learner k's with `fields` changed."""
    reports = _reports(160, 160)
    for name, value in fields.items():
        reports[k - 1][REPORT.names.index(name)] = value
    return reports


NOT_WRITTEN = "sent a report no learner writes ("


def test_a_sample_count_refusal_names_the_announced_count_in_full():
    """A count of 1234567 was printed as 1.23457e+06 (:g), not the number the learner's file holds."""
    report = np.array(_report(160, samples=1234566), np.float64)
    assert report_problems(report, 1234567.0) == ["samples is not the 1234567 its preflight announced"]


@pytest.mark.parametrize(
    "reports,message,problem",
    [
        (_reports(160, 156), "learner 2 (rank 2) would send 156 bytes, expected 160", ""),
        (_bad(1, finite=0.0), "learner 1 (rank 1) reports non-finite", ""),
        (_bad(2, loss=float("nan")), "learner 2 (rank 2) reports non-finite", ""),
        (_bad(2, samples=0), f"learner 2 (rank 2) {NOT_WRITTEN}", "samples is not the 30 its preflight announced"),
        (_bad(1, samples=-4), f"learner 1 (rank 1) {NOT_WRITTEN}", "samples is not the 10 its preflight announced"),
        (_bad(2, samples=10), f"learner 2 (rank 2) {NOT_WRITTEN}", "samples is not the 30 its preflight announced"),
        (_bad(1, samples=11), f"learner 1 (rank 1) {NOT_WRITTEN}", "samples is not the 10 its preflight announced"),
        (_bad(2, seconds_train=float("nan")), f"learner 2 (rank 2) {NOT_WRITTEN}", "seconds_train is not finite"),
        (_bad(1, seconds_encode=float("inf")), f"learner 1 (rank 1) {NOT_WRITTEN}", "seconds_encode is not finite"),
        (
            _bad(2, payload_nbytes=160.5),
            f"learner 2 (rank 2) {NOT_WRITTEN}",
            "payload_nbytes is not a whole number of bytes",
        ),
        (_bad(1, seconds_train=-0.1), f"learner 1 (rank 1) {NOT_WRITTEN}", "seconds_train is negative"),
        (_bad(2, seconds_setup=-1.0), f"learner 2 (rank 2) {NOT_WRITTEN}", "seconds_setup is negative"),
        (_bad(2, seconds_encode=-1e-3), f"learner 2 (rank 2) {NOT_WRITTEN}", "seconds_encode is negative"),
        (_bad(2, loss=-1.0), f"learner 2 (rank 2) {NOT_WRITTEN}", "loss is negative"),
        (_bad(2, finite=0.5), f"learner 2 (rank 2) {NOT_WRITTEN}", "finite is not 0 or 1"),
        (_bad(1, finite=2.0), f"learner 1 (rank 1) {NOT_WRITTEN}", "finite is not 0 or 1"),
    ],
)
def test_bad_reports_are_refused_before_the_reduce(reports, message, problem):
    """A report decides the round's payload sizes and its metrics row: one that no learner of ours writes is
    refused naming the learner and the field (negative seconds, a finite flag of 0.5 or 2, another count of
    samples than the learner's preflight announced all fed the metrics row unseen)."""
    state = _state()
    before = state.values.copy()
    server = _server("fedsparsify-global", FakeWire(reports, summed=np.zeros(40, np.float32)))
    with pytest.raises(PayloadError) as refused:
        _round(server, state, 1, True)
    said = str(refused.value)
    assert said.startswith(message) and said.endswith(f"): {problem}; round rejected" if problem else "")
    assert state.round == 0 and np.array_equal(state.values, before)


def test_the_round_deadline_runs_from_the_models_send_to_the_aggregate():
    """A learner stopped before it takes its model is named by the server's deadline: the send is in it."""
    wire = FakeWire(_reports(160, 160), summed=np.zeros(40, np.float32))
    server = _server("fedsparsify-global", wire)
    server.cfg.run.round_timeout = 20.0
    before = time.monotonic()
    _round(server, _state(), 1, True)
    assert before + 20.0 <= wire.deadline_at_send <= time.monotonic() + 20.0
    assert wire.deadline is None


def test_non_finite_aggregate_leaves_the_global_model_untouched():
    state = _state()
    before = state.values.copy()
    summed = np.zeros(40, np.float32)
    summed[3] = np.nan
    server = _server("fedsparsify-global", FakeWire(_reports(160, 160), summed=summed))
    with pytest.raises(PayloadError, match="not finite"):
        _round(server, state, 1, True)
    assert np.array_equal(state.values, before) and np.isfinite(state.values).all()


def _local_payloads(state, second):
    good = encoding.encode(state.values, state.mask)
    return [good, second]


@pytest.mark.parametrize(
    "make_bad,message",
    [
        (lambda s: np.frombuffer(b"garbage!" * 4, np.uint8), "learner 2 (rank 2) sent an invalid model"),
        (lambda s: encoding.encode(s.values[:-1], s.mask[:-1]), "learner 2 (rank 2) sent an invalid model"),
        (lambda s: encoding.encode(s.values.astype(np.float64), s.mask), "learner 2 (rank 2) sent 50 float64 values"),
        (lambda s: encoding.encode(np.where(s.mask, np.inf, 0).astype(np.float32), s.mask), "non-finite"),
        (lambda s: encoding.encode(np.ones(N, np.float32), np.ones(N, bool)), "revives 10 pruned weights"),
    ],
)
def test_bad_learner_models_are_refused_and_named(make_bad, message):
    state = _state()
    before = state.values.copy()
    payloads = _local_payloads(state, make_bad(state))
    sizes = [min(p.nbytes, encoding.encoded_nbytes(N, 40, np.float32)) for p in payloads]  # a size that passes
    server = _server("fedsparsify-local", FakeWire(_reports(*sizes), payloads=payloads))
    with pytest.raises(PayloadError, match=message.replace("(", r"\(").replace(")", r"\)")):
        _round(server, state, 2, True)
    assert state.round == 0 and np.array_equal(state.values, before)


@pytest.mark.parametrize("nbytes", [8, 40 * 10**9])
def test_a_local_model_size_no_model_can_have_is_refused_before_the_gather(nbytes):
    """A learner's own sparse model is at most the global mask's kept values, encoded: a larger announced size
    (it was allocated as asked: 40 GB, a MemoryError) or one below the header is refused, naming the learner."""
    state = _state()
    largest = encoding.encoded_nbytes(N, 40, np.float32)
    server = _server("fedsparsify-local", FakeWire(_reports(largest, nbytes), payloads=[]))
    with pytest.raises(PayloadError, match=rf"learner 2 \(rank 2\) would send {nbytes} bytes, but a model of 40"):
        _round(server, state, 2, True)


def test_good_local_round_with_vote_cap_merges_and_prunes_to_the_schedule():
    state = _state()
    payloads = _local_payloads(state, encoding.encode(state.values, state.mask))
    wire = FakeWire(_reports(*(p.nbytes for p in payloads)), payloads=payloads)
    server = _server("fedsparsify-local", wire, vote_cap=True)
    row, changed = _round(server, state, 4, True)
    assert wire.expected.tolist() == [p.nbytes for p in payloads]  # the wire refuses other sizes unallocated
    assert state.round == 4 and changed
    assert (state.values == 0).mean() == pytest.approx(0.95, abs=0.02)
    assert row["target_sparsity"] == pytest.approx(0.95)


def test_summary_scores_the_final_model_even_when_its_round_was_not_evaluated(tmp_path):
    """eval.every > 1 and a stop (preemption) after an unevaluated round: the summary must not
    report the metrics of an older model."""
    import json

    import torch
    from fedtools import SHAPE, write_volumes

    from fedmpi.data import VolumeDataset
    from fedmpi.model import build_model
    from fedmpi.recorder import Recorder, initial_state

    write_volumes(tmp_path / "test.h5", np.linspace(45, 80, 8), np.random.default_rng(0))
    cfg = Config()
    cfg.model.width, cfg.run.dir, cfg.run.checkpoint_every = 0.125, str(tmp_path / "runs"), 0
    torch.manual_seed(0)
    model = build_model(cfg, SHAPE)
    rec = Recorder(cfg, model, VolumeDataset(tmp_path / "test.h5"), torch.device("cpu"), 8.0, tmp_path, {}, 16)
    state = initial_state(model)
    row = {
        "bytes_up": 0,
        "bytes_down": 0,
        "dense_bytes_up": 0,
        "dense_bytes_down": 0,
        "seconds_train": 0.0,
        "seconds_comm": 0.0,
        "seconds_aggregate": 0.0,
    }
    state.round = 1
    rec.earlier_seconds = 100.0  # as if resumed from a session that ran 100 s
    rec.start_clock()
    first = rec.record(state, dict(row), evaluate_now=True)
    evaluated = first["test_mae"]
    state.round, state.values = 2, np.zeros_like(state.values)  # a different model, not evaluated
    second = rec.record(state, dict(row), evaluate_now=False)
    assert second["test_mae"] is None and second["layer_sparsity"]["output.bias"] == 1.0
    summary = rec.finish(state, preempted=True)
    assert 100.0 < first["wall_seconds"] <= second["wall_seconds"] <= summary["wall_seconds"] < 200.0
    assert (summary["train_subjects"], summary["test_subjects"]) == (16, 8)
    assert summary["final_mae"] != evaluated
    assert summary["final_mae"] == pytest.approx(np.mean(np.abs(np.linspace(45, 80, 8))), rel=1e-3)
    assert json.loads((tmp_path / "runs" / "demo" / "summary.json").read_text())["rounds"] == 2


def _local_round(vote_cap: bool):
    """One FedSparsify-Local round where two learners keep disjoint halves of the global mask: the vote
    (quorum max(1, 2 // 2) = 1) keeps their union, which is denser than the schedule's s_t."""
    state = _state()
    kept = np.flatnonzero(state.mask)
    masks = [state.mask.copy(), state.mask.copy()]
    masks[0][kept[::2]] = False
    masks[1][kept[1::2]] = False
    payloads = [encoding.encode(np.where(m, state.values, 0).astype(np.float32), m) for m in masks]
    server = _server(
        "fedsparsify-local",
        FakeWire(_reports(*(p.nbytes for p in payloads)), payloads=payloads),
        vote_cap=vote_cap,
        target=0.9,
    )
    row, _ = _round(server, state, 4, True)
    return state, row


def test_local_global_model_is_the_vote_by_default():
    state, row = _local_round(vote_cap=False)
    assert row["target_sparsity"] == 0.9
    assert np.array_equal(state.mask, _state().mask)  # the union of the two halves: nothing more pruned
    assert 1 - state.mask.mean() == pytest.approx(0.2) and row["target_sparsity"] > 0.2
    # the reference rule divides by both learners' weight (10 + 30): a position only learner 1 kept gets 1/4
    # of its value, one only learner 2 kept 3/4
    kept = np.flatnonzero(_state().mask)
    share = np.zeros(N)
    share[kept[1::2]], share[kept[::2]] = 0.25, 0.75
    assert np.allclose(state.values, _state().values * share)


def test_local_vote_cap_prunes_the_vote_to_the_schedule():
    state, _ = _local_round(vote_cap=True)
    assert 1 - state.mask.mean() == pytest.approx(0.9)
    assert not (state.mask & ~_state().mask).any()


def _prunefl_round(importance, t=2, payload_nbytes=None, fraction=0.3):
    """A PruneFL round on _state() (positions 0..9 of 50 pruned, target 0.2) reconfiguring every 2 rounds;
    the learners' summed values make the kept positions 10..49 worth 1..40."""
    state = _state()
    nbytes = 4 * 40 + 4 * N if payload_nbytes is None else payload_nbytes
    summed = np.arange(1, 41, dtype=np.float32)
    wire = FakeWire(_reports(nbytes, nbytes), summed=summed, importance=importance)
    server = _server("prunefl", wire, target=0.2, reconfigure_every=2, reconfigure_fraction=fraction)
    row, changed = _round(server, state, t, False)
    return state, row, changed, wire


def _positions(*ranges):
    mask = np.zeros(N, bool)
    for a, b in ranges:
        mask[a:b] = True
    return mask


@pytest.mark.parametrize(
    "fraction, kept",
    [
        (1.0, _positions((0, 40))),  # the top 40 importances alone: the largest weights, 40..49, go
        (0.3, _positions((0, 12), (22, 50))),  # the 28 largest weights (22..49) stay; 12 slots go by importance
    ],
)
def test_prunefl_reconfiguration_regrows_the_most_important_positions_at_their_initial_values(fraction, kept):
    importance = np.linspace(2, 1, N).astype(np.float32)  # falls with the index: pruned positions matter most
    state, row, changed, wire = _prunefl_round(importance, fraction=fraction)
    assert np.array_equal(state.mask, kept) and changed and not wire.reduced
    assert row["regrown"] == 10 and row["pruned"] == 10 and state.mask.sum() == 40
    assert np.array_equal(state.values[:10], INITIAL[:10])  # regrown positions restart from the initial model ...
    averaged = encoding.scatter_values(np.arange(1, 41, dtype=np.float32), _state().mask, np.float32)
    assert np.array_equal(state.values[kept][10:], averaged[kept][10:])  # ... the others keep the FedAvg values
    assert not state.values[~kept].any()
    assert np.array_equal(state.mask, pruning.reconfigure_mask(importance, averaged, _state().mask, 0.2, fraction))


def test_prunefl_round_without_reconfiguration_keeps_the_mask():
    state, row, changed, wire = _prunefl_round(None, t=1, payload_nbytes=4 * 40)
    assert np.array_equal(state.mask, _state().mask) and not changed
    assert (row["regrown"], row["pruned"]) == (0, 0)
    assert wire.reduced == [None]  # no second sum was asked for


def test_prunefl_reconfiguration_refuses_reports_without_the_squared_gradients():
    with pytest.raises(PayloadError, match=f"would send 160 bytes, expected {160 + 4 * N}"):
        _prunefl_round(np.ones(N, np.float32), payload_nbytes=160)


def test_prunefl_reconfiguration_refuses_non_finite_squared_gradients():
    importance = np.ones(N, np.float32)
    importance[7] = np.inf
    state = _state()
    with pytest.raises(PayloadError, match="squared gradients are not finite"):
        wire = FakeWire(_reports(360, 360), summed=np.ones(40, np.float32), importance=importance)
        _round(_server("prunefl", wire, target=0.2, reconfigure_every=2), state, 2, False)
    assert state.round == 0 and np.array_equal(state.mask, _state().mask)


def test_a_server_mask_that_revives_positions_is_refused_for_algorithms_that_never_regrow(monkeypatch):
    import fedmpi.server

    monkeypatch.setattr(fedmpi.server, "prune", lambda values, mask, *args: np.ones(N, bool))
    state = _state()
    server = _server("fedsparsify-global", FakeWire(_reports(160, 160), summed=np.ones(40, np.float32)))
    with pytest.raises(RuntimeError, match="10 pruned positions would come back under fedsparsify-global"):
        _round(server, state, 4, False)
    assert state.round == 0


def _initial():
    return np.random.default_rng(1).standard_normal(N).astype(np.float32)


@pytest.mark.parametrize("algorithm", ["snip", "grasp", "prunefl"])
def test_start_mask_sets_the_global_model_and_counts_in_the_first_round(algorithm):
    mask = np.ones(N, bool)
    mask[::2] = False  # 25 of 50 pruned: the target 0.5
    trained = np.arange(25, dtype=np.float32) + 1
    received = [encoding.pack_mask(mask), trained]
    wire = FakeWire(_reports(100, 100), summed=np.ones(25, np.float32), received=received)
    server = _server(algorithm, wire, target=0.5)
    state = State(0, _initial(), np.ones(N, bool))
    server.receive_start_mask(state)
    assert np.array_equal(wire.sent[0], _initial())  # learner 1 scores the server's initial model
    assert np.array_equal(state.mask, mask)
    start = trained if server.algo.start_trains else _initial()[mask]
    assert np.array_equal(state.values[mask], start) and not state.values[~mask].any()
    assert wire.received == ([] if server.algo.start_trains else [trained])  # values only for a rule that trains
    row, _ = _round(server, state, 1, True)
    assert row["pruned"] == 25 and row["regrown"] == 0


def test_start_mask_at_the_wrong_sparsity_is_refused():
    wire = FakeWire([], received=[encoding.pack_mask(np.ones(N, bool))])
    server = _server("grasp", wire, target=0.5)
    with pytest.raises(PayloadError, match="pruning 0 of 50 positions, expected 25"):
        server.receive_start_mask(State(0, _initial(), np.ones(N, bool)))


def test_round_bytes_are_the_rounds_own_plus_the_start_masks_once():
    # (down, up) per reset: each exchange opens with one (discarded) and closes with one (counted)
    counts = [(0, 0), (5, 7), (0, 0), (100, 200), (0, 0), (300, 400)]  # start mask, round 1, round 2

    class CountingWire(FakeWire):
        def reset_counters(self):
            return counts.pop(0)

    mask = np.ones(N, bool)
    mask[::2] = False
    wire = CountingWire(_reports(100, 100), summed=np.ones(25, np.float32), received=[encoding.pack_mask(mask)])
    server = _server("grasp", wire, target=0.5)
    state = State(0, _initial(), np.ones(N, bool))
    server.receive_start_mask(state)
    first, _ = _round(server, state, 1, True)
    assert (first["bytes_down"], first["bytes_up"]) == (105, 207)
    wire.reduced = [np.ones(25, np.float32), None]
    second, _ = _round(server, state, 2, False)
    assert (second["bytes_down"], second["bytes_up"]) == (300, 400) and second["pruned"] == 0


def test_bytes_sent_after_the_last_rounds_row_are_counted_apart_from_the_rows():
    """The STOP header goes out after the last round's row is written: it is counted, as closing traffic, and
    the rows (whose sums are the summary's totals) hold every byte before it."""
    from fedmpi.wire import FLAG_STOP, HEADER

    class Rec:
        batches = 0
        longest_eval = 0.0

        def evaluates_at_finish(self, round_):
            return False  # the last round was evaluated: the final save does not evaluate again

        def __init__(self):
            self.rows = []

        def record(self, snapshot, row, evaluate_now):
            self.rows.append(row)

    class CountingWire(FakeWire):
        down = 0

        def send_model(self, round_, payload, nnz, flags, patience=0.0):
            self.sent.append(flags)
            self.down += (8 * HEADER + payload.nbytes) * self.learners

        def reset_counters(self):
            counts, self.down = (self.down, 0), 0
            return counts

    wire = CountingWire(_reports(160, 160), summed=np.ones(40, np.float32))
    server = _server("fedavg", wire)
    server.cfg.federation.rounds = 2
    server.rec = Rec()
    wire.reduced = [np.ones(40, np.float32), np.ones(40, np.float32)]
    state = _state()
    kept = int(state.mask.sum())
    server.run(state)
    assert wire.sent[-1] == FLAG_STOP and len(wire.sent) == 3
    assert server.closing_bytes == 8 * HEADER * wire.learners
    assert server.rec.rows[1]["bytes_down"] == (8 * HEADER + 4 * kept) * wire.learners  # the kept values alone


@pytest.mark.parametrize("evaluated, allowance", [(2, 0.0), (1, 300.0)])
def test_the_stop_header_gives_the_learners_time_for_a_final_save_that_evaluates(evaluated, allowance):
    """After the STOP header the learners wait for the server's final save (Wire.end_server), which evaluates the
    last round when a stop came before its evaluation was due: their patience allows three of the longest."""
    from fedmpi.wire import FLAG_STOP

    class Rec:
        batches = 0
        longest_eval = 100.0

        def evaluates_at_finish(self, round_):
            return round_ != evaluated

        def record(self, snapshot, row, evaluate_now):
            pass

    class HeaderLog(FakeWire):
        def send_model(self, round_, payload, nnz, flags, patience=0.0):
            self.sent.append((flags, patience))

    wire = HeaderLog(_reports(160, 160))
    server = _server("fedavg", wire)
    server.cfg.federation.rounds = 2
    server.rec = Rec()
    wire.reduced = [np.ones(40, np.float32), np.ones(40, np.float32)]
    server.run(_state())
    flags, patience = wire.sent[-1]
    assert flags == FLAG_STOP and patience == pytest.approx(server.learner_patience() + allowance)


def test_row_describes_the_model_sent_and_weights_the_loss_by_samples():
    reports = [[1.0, 10, 0.1, 160, 1.0, 0.01, 0.02], [4.0, 30, 0.1, 160, 1.0, 0.01, 0.02]]
    state = _state()  # 10 of 50 pruned: sparsity 0.2 sent
    server = _server("fedsparsify-global", FakeWire(reports, summed=np.ones(40, np.float32)))
    row, changed = _round(server, state, 4, False)  # round 4 prunes to the target: the mask changes
    assert changed and 1 - state.mask.mean() > 0.5
    assert row["sparsity_sent"] == pytest.approx(0.2)
    assert row["mask_sent"] is False  # sent values only, whatever the next round sends
    assert row["train_loss"] == pytest.approx((1.0 * 10 + 4.0 * 30) / 40)
    assert row["dense_bytes_down"] == row["dense_bytes_up"] == 4 * N * 2


def test_server_prunes_with_the_rounds_seed(monkeypatch):
    import fedmpi.server

    seeds = []
    monkeypatch.setattr(
        fedmpi.server, "prune", lambda values, mask, s, selector, seed: seeds.append(seed) or mask.copy()
    )
    server = _server("random", FakeWire(_reports(160, 160), summed=np.ones(40, np.float32)))
    server.cfg.run.seed = 7
    _round(server, _state(), 3, False)
    assert seeds == [round_seed(7, 3, 0)]


@pytest.mark.parametrize("every,evaluated", [(3, [False, False, True, True]), (1, [True] * 4)])
def test_record_evaluates_every_k_rounds_and_always_the_last(every, evaluated):
    calls: list[bool] = []

    class Rec:
        def record(self, snapshot, row, evaluate_now):
            calls.append(evaluate_now)

    server = _server("fedavg", FakeWire([]))
    server.rec, server.cfg.eval.every = Rec(), every
    for t in range(1, 5):
        server.record(State(t, _state().values, _state().mask), {})
    assert calls == evaluated


def test_an_error_in_a_round_is_not_held_up_by_the_record_in_flight():
    """Round 2's reports are refused while round 1's record (its evaluation) is still running: the error must
    reach the caller (which aborts the job) without waiting for that record."""
    release, recorded = threading.Event(), []

    class SlowRec:
        batches = 0  # evaluation batches taken, as the Recorder counts them

        def record(self, snapshot, row, evaluate_now):
            release.wait(30)
            recorded.append(snapshot.round)

    class FailsInRoundTwo(FakeWire):
        sent_models = 0

        def collect_reports(self, width):
            if self.sent_models == 2:
                raise PayloadError("learner 2 (rank 2) reports non-finite model values; round rejected")
            return super().collect_reports(width)

        def send_model(self, *args):
            self.sent_models += 1

    state = _state()
    wire = FailsInRoundTwo(_reports(160, 160), summed=np.ones(40, np.float32))
    server = _server("fedavg", wire)
    server.rec = SlowRec()
    try:
        with pytest.raises(PayloadError, match="rank 2"):
            server.run(state)
        assert recorded == []  # round 1's record was still running when the error came through
    finally:
        release.set()


def test_a_failed_record_ends_the_next_rounds_wait_at_once():
    """Round 1's record fails (a full disk) while the learners train round 2: the wire's wait for their reports
    runs the server's watch and ends with that error, instead of after the reports (a round later)."""

    class FailingRec:
        batches = 0  # evaluation batches taken, as the Recorder counts them

        def record(self, snapshot, row, evaluate_now):
            raise OSError(28, "No space left on device")

    class PollingWire(FakeWire):
        """collect_reports waits as Wire._poll does, running the watch, for round 2's reports."""

        sent_models = 0

        def send_model(self, *args):
            self.sent_models += 1

        def collect_reports(self, width):
            if self.sent_models == 2:
                began = time.monotonic()
                while time.monotonic() - began < 10:
                    if self.watch is not None:
                        self.watch()
                    time.sleep(0.01)
                raise AssertionError("the wait outlived the failed record")
            return super().collect_reports(width)

    wire = PollingWire(_reports(160, 160), summed=np.ones(40, np.float32))
    wire.watch = None
    server = _server("fedavg", wire)
    server.rec = FailingRec()
    with pytest.raises(OSError, match="No space left on device"):
        server.run(_state())
    assert wire.sent_models == 2


def test_learners_are_told_to_wait_while_a_long_evaluation_advances_and_not_while_a_record_hangs():
    """The learners' patience for the next model runs from the server's last word, and an evaluation nobody has
    timed yet (the first, the last round's) may outlast it: they aborted a healthy run as 'the server is silent'.
    While the evaluation advances the server repeats its word (FLAG_WAIT) each half patience; a record that does
    not advance (a write that hangs) gets none, so the learners' patience still ends a stuck job."""
    from concurrent.futures import ThreadPoolExecutor

    from fedmpi.wire import FLAG_WAIT

    class Rec:
        batches = 0

    class SendLog(FakeWire):
        def send_model(self, *args):
            self.sent.append(args)

    for advancing in (True, False):
        wire = SendLog([])
        server = _server("fedavg", wire)
        server.rec = Rec()

        def evaluate(rec=server.rec, advancing=advancing):
            for _ in range(12):
                time.sleep(0.1)
                rec.batches += advancing

        server.told = (time.monotonic(), 0.2)  # the last model told the learners to wait 0.2 s
        with ThreadPoolExecutor(1) as pool:
            server.await_record(pool.submit(evaluate), 3)
        if advancing:
            assert len(wire.sent) >= 5
            assert all(args[:4] == (3, args[1], 0, FLAG_WAIT) and args[1].size == 0 for args in wire.sent)
            assert all(args[4] == 0.2 for args in wire.sent)
        else:
            assert wire.sent == []
