"""The transport: the polling rule (plain tests), and the wire itself under mpirun
(`mpirun -n 3 python -m pytest --with-mpi -m mpi tests/test_wire.py`)."""

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from mpi4py import MPI

from fedmpi.errors import PayloadError, RoundTimeout
from fedmpi.wire import (
    AHEAD_PAUSE,
    AHEAD_SHARE,
    EXPECT_SHARE,
    LATE_SHARE,
    LEARNER_GRACE,
    MAX_PAUSE,
    MAX_SLEEP,
    QUICK_SLEEP,
    QUICK_SPAN,
    TAG_DIRECT,
    Wire,
    next_pause,
    process_state,
)

mpi = pytest.mark.mpi(min_size=3)


def wakeups(horizon: float, quick: bool = False, expected: float | None = None) -> np.ndarray:
    """The times a wait tests for its answer, over `horizon` seconds (sleeps taken exactly)."""
    times, now, pause = [], 0.0, 0.0
    while now < horizon:
        now += pause
        times.append(now)
        pause = next_pause(pause, now, MAX_SLEEP, quick, expected)
    return np.array(times)


def lateness(times: np.ndarray, answers: np.ndarray) -> np.ndarray:
    """How long after each answer time the wait notices it (its next test)."""
    return times[np.searchsorted(times, answers)] - answers


def test_a_long_wait_tests_seldom_and_answers_late_by_a_small_share():
    times = wakeups(3.0)
    assert np.diff(times).max() <= MAX_PAUSE + 1e-12
    assert 250 < len(times) < 800  # 2 ms sleeps for 0.5 s, then 0.4% of the time waited
    answers = np.linspace(0.01, 2.9, 300)
    assert (lateness(times, answers) <= np.maximum(MAX_SLEEP, LATE_SHARE * answers) + 1e-9).all()


def test_a_quick_wait_tests_often_while_short_then_as_usual():
    times = wakeups(0.5, quick=True)
    early = times[times < QUICK_SPAN]
    assert (np.diff(early) <= np.maximum(QUICK_SLEEP, LATE_SHARE * early[:-1]) + 1e-12).all()
    assert np.diff(times).max() <= MAX_SLEEP + 1e-12
    answers = np.linspace(0.001, QUICK_SPAN / 2, 50)
    assert lateness(times, answers).max() <= QUICK_SLEEP + 1e-12
    later = times[(times > 2 * QUICK_SPAN) & (times < 0.3)]
    assert np.diff(later).max() >= MAX_SLEEP - 1e-9  # past QUICK_SPAN it sleeps as a long wait does


def test_an_expected_wait_sleeps_until_the_answer_is_due():
    """The server's wait for reports due after about 2.7 s: a few dozen tests until 90% of that instead of
    hundreds, each sleep at most AHEAD_PAUSE and a quarter of the time still to go, then 2 ms sleeps."""
    expected = 2.7
    due = EXPECT_SHARE * expected
    times = wakeups(3.0, expected=expected)
    before = times[times < due]
    assert len(before) < 60
    assert len(wakeups(due)) > 5 * len(before)  # the same stretch without the expectation
    assert np.diff(times).max() <= AHEAD_PAUSE + 1e-12
    assert (np.diff(before) <= np.maximum(MAX_SLEEP, AHEAD_SHARE * (due - before[:-1])) + 1e-9).all()
    assert lateness(times, np.linspace(due, 2.99, 100)).max() <= MAX_SLEEP + 1e-9
    assert lateness(times, np.linspace(0.1, due, 100)).max() <= AHEAD_PAUSE + 1e-9  # reports that come early
    # a straggler: long past due the wait slows down as one begun at the due time would (it kept testing every
    # 2.2 ms: nine times as often)
    late = wakeups(due + 20.0, expected=expected)
    late = late[late > due + 5.0]
    plain = wakeups(20.0)
    assert len(late) <= 1.1 * len(plain[plain > 5.0]) and np.diff(late).max() == pytest.approx(MAX_PAUSE)


@pytest.fixture
def wire():
    w = Wire(MPI.COMM_WORLD)
    yield w
    w.comm.Barrier()


def test_a_stopped_rank_on_this_host_is_named_when_the_wait_gives_up():
    """A stopped process passes every liveness check yet answers nothing, even from inside a collective where
    no request says who is missing: the timeout names it from its /proc state."""
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        assert process_state(os.getpid()) == "R"
        os.kill(child.pid, signal.SIGSTOP)
        began = time.monotonic()
        while process_state(child.pid) != "T" and time.monotonic() - began < 10:
            time.sleep(0.01)
        wire = Wire(MPI.COMM_SELF, patience=0.05)
        wire.peers = {1: os.getpid(), 2: child.pid}  # learner 1 runs, learner 2 is stopped
        with pytest.raises(
            RoundTimeout,
            match=rf"waiting for the sum; learner 2 \(rank 2\) is stopped on this host \(pid {child.pid}\)$",
        ):
            wire._poll(lambda: False, "the sum")
    finally:
        child.kill()
        child.wait()
    assert process_state(child.pid) == ""  # gone: nothing to read


@mpi
def test_bcast_counts_one_copy_per_learner(wire):
    buf = np.arange(10, dtype=np.float32) if wire.is_server else np.zeros(10, np.float32)
    out = wire.bcast(buf)
    assert np.array_equal(out, np.arange(10, dtype=np.float32))
    down, up = wire.reset_counters()
    assert down == (40 * wire.learners if wire.is_server else 0)
    assert up == 0


@mpi
def test_reduce_sum_is_the_sum_of_learner_buffers(wire):
    mine = np.full(5, wire.rank, np.float32)
    out = wire.reduce_sum(mine)
    if wire.is_server:
        assert np.array_equal(out, np.full(5, sum(range(1, wire.size)), np.float32))
        assert wire.bytes_up == 20 * wire.learners
    else:
        assert out is None and wire.bytes_up == 20


@mpi
def test_gatherv_delivers_each_learners_bytes(wire):
    mine = None if wire.is_server else np.full(wire.rank * 3, wire.rank, np.uint8)
    out = wire.gatherv(mine)
    if wire.is_server:
        assert [len(b) for b in out] == [3 * k for k in range(1, wire.size)]
        assert all((b == k).all() for k, b in enumerate(out, start=1))
        assert wire.bytes_up == 8 * wire.learners + sum(3 * k for k in range(1, wire.size))
    else:
        assert wire.bytes_up == 8 + 3 * wire.rank


@mpi
def test_gatherv_takes_a_strided_array_as_its_values(wire):
    """A view with a step is sent as the values it shows (made contiguous before it is seen as bytes)."""
    mine = None if wire.is_server else (np.arange(8, dtype=np.float32) + wire.rank)[::2]
    out = wire.gatherv(mine)
    if wire.is_server:
        for k, got in enumerate(out, start=1):
            assert np.array_equal(got.view(np.float32), np.array([0, 2, 4, 6], np.float32) + k)


@mpi
def test_direct_messages_count_at_the_server_both_ways(wire):
    """The start mask's exchange: the server counts what it sends as downlink and what it receives as uplink."""
    if wire.is_server:
        wire.send(np.arange(6, dtype=np.float32), dest=1)
        assert np.array_equal(wire.recv(np.zeros(3, np.uint8), source=1), [1, 2, 3])
        assert wire.reset_counters() == (24, 3)
    elif wire.rank == 1:
        assert np.array_equal(wire.recv(np.zeros(6, np.float32), source=0), np.arange(6))
        wire.send(np.array([1, 2, 3], np.uint8), dest=0)
        assert wire.reset_counters() == (0, 3)


@mpi
def test_model_frame_round_trip(wire):
    from fedmpi.wire import FLAG_STOP, HEADER

    values = np.arange(7, dtype=np.float32) / 3  # a float32 model goes out as its bytes
    if wire.is_server:
        wire.reset_counters()
        wire.send_model(3, values, 5, 1)
        assert wire.reset_counters()[0] == (8 * HEADER + values.nbytes) * wire.learners
        wire.collect_reports(1)
        assert not wire._acks, "every acknowledgement was collected"
        assert np.array_equal(wire.reduce_sum(np.zeros(2, np.float32)), [wire.learners] * 2)
        wire.send_model(3, np.zeros(0, np.uint8), 0, FLAG_STOP)
    else:
        round_, flags, nnz, payload = wire.recv_model(values.nbytes)
        assert (round_, flags, nnz) == (3, 1, 5) and np.array_equal(payload.view(np.float32), values)
        wire.report(np.zeros(1))
        wire.reduce_sum(np.ones(2, np.float32))  # takes the server's go
        assert wire.recv_model(0)[:3] == (3, FLAG_STOP, 0)


class WaitLog(Wire):
    """The wire, recording each wait's name and whether it was a quick one."""

    def __init__(self, comm):
        super().__init__(comm)
        self.waits: list[tuple[str, bool]] = []

    def _wait(self, request, what, patience=None, quick=False):
        self.waits.append((what, quick))
        super()._wait(request, what, patience, quick)


@mpi
def test_after_its_report_a_learner_waits_for_the_go_then_sums_as_a_quick_wait():
    """Learners cannot see when the last of them has joined the sum: the server's go, sent once every report
    is in, turns a learner's wait from a long one (the others may still train) into a quick one."""
    from fedmpi.wire import TAG_GO

    wire = WaitLog(MPI.COMM_WORLD)
    if wire.is_server:
        wire.reduce_sum(np.zeros(3, np.float32))  # a sum with no reports before it (start-up, a second sum)
        wire.collect_reports(1)
        summed = wire.reduce_sum(np.zeros(3, np.float32))
        assert np.array_equal(summed, np.full(3, sum(range(1, wire.size)), np.float32))
        assert wire.reset_counters() == (0, 4 * 3 * wire.learners * 2 + 8 * wire.learners)  # the go is empty
    else:
        wire.reduce_sum(np.zeros(3, np.float32))
        if wire.rank == 1:
            time.sleep(0.3)  # the last to report: the other learner waits for it as for a long answer
        wire.report(np.zeros(1))
        wire.reduce_sum(np.full(3, wire.rank, np.float32))
        assert wire.waits == [
            ("reduce", False),
            ("report", True),
            ("reduce (the other learners' reports)", False),
            ("reduce", True),
        ]
        assert not wire.comm.Iprobe(source=0, tag=TAG_GO), "one go a round, taken"
    wire.comm.Barrier()


@mpi
def test_a_learner_that_does_not_take_its_model_is_named_by_the_round_deadline(wire):
    """The model's send is inside the round deadline (Server.send): the learner that acknowledged nothing is
    named, before the learners that took their model give up on a silent server."""
    from fedmpi.wire import TAG_ACK

    payload = np.arange(200_000, dtype=np.uint32).view(np.uint8)  # past eager size: the send waits for the receiver
    if wire.is_server:
        wire.deadline = time.monotonic() + 0.5
        with pytest.raises(
            RoundTimeout,
            match=r"round deadline passed while waiting for the model; no acknowledgement of the model from "
            r"learner 2 \(rank 2\)$",
        ):
            wire.send_model(1, payload, 0, 0)
        wire.deadline = None
        assert wire.abandoned  # the sends stay alive (and their buffers with them) until the job ends
        wire.comm.Recv(np.zeros(1, np.int64), source=2, tag=TAG_ACK)  # drain the late acknowledgement
        MPI.Request.Waitall(wire.abandoned)  # learner 2 took the model late: the sends are complete
        wire.abandoned.clear()
    else:
        if wire.rank == 2:
            time.sleep(1.5)
        round_, _flags, _nnz, got = wire.recv_model(payload.nbytes)
        assert round_ == 1 and np.array_equal(got, payload)


@mpi
def test_late_learner_is_named_by_the_deadline(wire):
    from fedmpi.wire import TAG_REPORT

    if wire.is_server:
        wire.deadline = time.monotonic() + 0.5
        with pytest.raises(RoundTimeout, match=r"no report from learner 2 \(rank 2\)"):
            wire.collect_reports(2)
        wire.deadline = None
        wire.comm.Recv(np.zeros(2), source=2, tag=TAG_REPORT)  # drain the late report
    elif wire.rank == 2:
        time.sleep(1.5)
        wire.report(np.ones(2))
    else:
        wire.report(np.ones(2))


@mpi
def test_a_vanished_peer_on_this_host_is_named(wire):
    import subprocess
    import sys

    from fedmpi.wire import PeerLost

    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    wire.peers = {7: gone.pid}
    wire._next_check = 0.0
    began = time.monotonic()
    with pytest.raises(PeerLost, match=rf"rank 7 \(learner 7, pid {gone.pid}\) is gone while waiting for x"):
        wire._check("x", None)
    waited = time.monotonic() - began
    assert waited < 1.0 if wire.is_server else waited >= LEARNER_GRACE  # learners leave the word to the server
    wire.peers = {}


@mpi
def test_a_silent_rank_is_named_by_the_gather_deadline(wire):
    """Start-up exchanges are point to point, so the server names who sent nothing; a learner waiting on
    the server names the server."""
    from fedmpi.wire import TAG_GATHER

    wire.patience = 0.5
    if wire.is_server:
        out = np.zeros((wire.size, 2))
        with pytest.raises(
            RoundTimeout, match=r"within 0 s while waiting for the table; nothing from learner 2 \(rank 2\)$"
        ):
            wire.gather(np.full(2, 0.0), out, "the table")
        assert out[1].tolist() == [1.0, 1.0]
        assert wire.abandoned == []  # the receive from learner 2 was cancelled when it was named
        wire.comm.Recv(np.zeros(2), source=2, tag=TAG_GATHER)  # drain the late row
    elif wire.rank == 2:
        time.sleep(1.5)
        wire.gather(np.full(2, 2.0), None, "the table")
    else:
        wire.gather(np.full(2, 1.0), None, "the table")
    wire.comm.Barrier()
    if wire.rank == 1:
        with pytest.raises(RoundTimeout, match=r"while waiting for the verdict: the server \(rank 0\) is silent"):
            wire.recv(np.zeros(1), source=0, what="the verdict")
    wire.comm.Barrier()
    if wire.is_server:  # satisfy the receive the learner gave up on
        wire.comm.Send(np.zeros(1), dest=1, tag=12)
    if wire.rank == 1:
        assert len(wire.abandoned) == 1  # the receive it gave up on, still able to take the late message
        MPI.Request.Waitall(wire.abandoned)
        wire.abandoned.clear()
    wire.patience = None


@mpi
def test_a_gathers_own_patience_replaces_the_wires(wire):
    """The start-up times wait for the learners' decoding and warm-up with run.round_timeout, longer than the
    start-up's patience: a learner slower than the Wire's patience but within the gather's is waited for."""
    wire.patience = 0.5
    out = np.zeros((wire.size, 1)) if wire.is_server else None
    if wire.rank == 1:
        time.sleep(1.5)
    wire.gather(np.full(1, float(wire.rank)), out, "the start-up times", patience=10.0)
    if wire.is_server:
        assert out is not None and out[:, 0].tolist() == list(range(wire.size))
    wire.patience = None


def test_a_failed_wait_leaves_its_request_to_the_wire_not_to_the_garbage_collector():
    """MPI may still write into a receive's buffer after its wait gave up: the request (which holds the
    buffer) is kept, and a late message still lands in it."""
    wire = Wire(MPI.COMM_SELF, patience=0.05)
    buf = np.zeros(3)
    with pytest.raises(RoundTimeout):
        wire.recv(buf, source=0, what="a message sent late")
    assert len(wire.abandoned) == 1
    wire.comm.Send(np.arange(3.0), dest=0, tag=TAG_DIRECT)
    MPI.Request.Waitall(wire.abandoned)
    assert buf.tolist() == [0.0, 1.0, 2.0]


def test_a_timeout_names_the_patience_that_wait_used():
    """The cohort wait has its own patience (a round's time): its timeout must say that, not the Wire's."""
    for own in (100.0, None):
        wire = Wire(MPI.COMM_SELF, patience=own)
        with pytest.raises(RoundTimeout, match=r"^no answer within 1 s while waiting for the cohort"):
            wire._poll(lambda: False, "the cohort", patience=0.6)


@mpi
def test_one_wait_can_be_given_its_own_patience(wire):
    """The cohort wait allows minutes where start-up allows seconds, without changing the Wire's patience."""
    wire.patience = 0.3
    if wire.is_server:
        time.sleep(1.0)  # longer than the Wire's patience
    buf = wire.bcast(np.full(1, 7.0) if wire.is_server else np.zeros(1), "the cohort", patience=10.0)
    assert buf[0] == 7.0 and wire.patience == 0.3
    wire.patience = None


def test_a_wait_of_minutes_never_sleeps_longer_than_max_pause():
    """LATE_SHARE of a long wait outgrows MAX_PAUSE after 5 s: the cap keeps the answer's lateness bounded."""
    times = wakeups(12.0)
    assert np.diff(times).max() <= MAX_PAUSE + 1e-12
    assert lateness(times, np.linspace(6.0, 11.9, 50)).max() <= MAX_PAUSE + 1e-9


def test_reset_counters_starts_both_counts_afresh():
    """The server resets the counters at the start of every round: a count that is not reset leaks into the next
    round's metrics."""
    wire = Wire(MPI.COMM_SELF)
    wire.bytes_down, wire.bytes_up = 5, 7
    assert wire.reset_counters() == (5, 7)
    assert wire.reset_counters() == (0, 0)


def test_the_wire_carries_numpy_arrays_only_and_sends_them_contiguous():
    """A list would travel as whatever dtype numpy guesses; a strided view must go out as its values."""
    wire = Wire(MPI.COMM_SELF)
    with pytest.raises(TypeError, match="numpy arrays only"):
        wire.bcast([1.0, 2.0])
    out = wire.bcast(np.arange(10.0)[::2])
    assert out.tolist() == [0.0, 2.0, 4.0, 6.0, 8.0]


def test_a_completed_wait_still_notices_a_vanished_peer():
    """A collective may complete around a rank that died: the end of every wait checks the peers, even when the
    last once-a-second check was just now."""
    from fedmpi.errors import PeerLost

    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    wire = Wire(MPI.COMM_SELF)  # rank 0: the server names the lost rank at once
    wire.peers = {2: gone.pid}
    wire._next_check = time.monotonic() + 100.0  # as if a check had just found every peer alive
    with pytest.raises(PeerLost, match=rf"rank 2 \(learner 2, pid {gone.pid}\) is gone while waiting for the sum"):
        wire.bcast(np.zeros(1), "the sum")


def test_the_round_deadline_replaces_the_wires_patience():
    """The server keeps its start-up patience as the Wire's; within a round only the round deadline counts, even
    when it lies beyond that patience."""
    wire = Wire(MPI.COMM_SELF, patience=0.05)
    wire.deadline = time.monotonic() + 30.0
    began = time.monotonic()
    wire._poll(lambda: time.monotonic() - began > 0.3, "the reports")  # longer than the patience: no timeout


def test_a_learner_waits_for_its_first_model_as_long_as_next_patience_says():
    """Start-up sets next_patience for the first model (a round's time on top of the start-up patience); the
    header wait must use it, not the shorter patience the Wire had during start-up."""

    class FirstWait(Wire):
        def _wait(self, request, what, patience=None, quick=False, expect=None):
            request.Cancel()  # nothing will come: note the patience this wait would use and stop
            request.Wait()
            raise LookupError(what, self.patience if patience is None else patience)

    wire = FirstWait(MPI.COMM_SELF, patience=3.0)
    wire.rank = 1  # a learner
    wire.next_patience = 42.0
    with pytest.raises(LookupError) as stopped:
        wire.recv_model(0)
    assert stopped.value.args == ("the next round's model", 42.0)


@pytest.mark.parametrize("nbytes", [-5, 2**62, 101])
def test_a_header_announcing_a_payload_the_learners_model_cannot_take_is_refused_before_allocating(nbytes):
    """The learner bounds the header's payload size by the most its model encodes to (here 100): a negative one
    was a ValueError from numpy naming no field, a huge one a MemoryError."""
    from fedmpi.wire import TAG_HEADER

    wire = Wire(MPI.COMM_SELF, patience=5.0)
    wire.rank = 1  # a learner, whose server (rank 0 of COMM_SELF) is this process: the header is sent to itself
    sending = wire.comm.Isend(np.array([2, 0, nbytes, 3, 1000], np.int64), dest=0, tag=TAG_HEADER)
    with pytest.raises(
        PayloadError,
        match=rf"^the server's header for round 2 announces a payload of {nbytes} bytes: this learner's model "
        r"encodes to 0\.\.100$",
    ):
        wire.recv_model(100)
    sending.Wait()


def _header_to_self(header: list[int], largest: int | None = 100):
    """recv_model on a learner whose server (rank 0 of COMM_SELF) is this process: `header` is sent to itself."""
    from fedmpi.wire import TAG_HEADER

    wire = Wire(MPI.COMM_SELF, patience=5.0)
    wire.rank = 1
    sending = wire.comm.Isend(np.array(header, np.int64), dest=0, tag=TAG_HEADER)
    try:
        return wire, wire.recv_model(largest)
    finally:
        sending.Wait()


@pytest.mark.parametrize("flags", [8, 1 | 16, 4 | 2**40, -1])
def test_a_header_holding_a_flag_bit_no_learner_knows_is_refused_naming_it(flags):
    """Unknown bits were ignored: a header flagged 8 was a model, one flagged 4|16 a word to wait again."""
    with pytest.raises(PayloadError, match=rf"^the server's header for round 2 holds flags {flags}: bits "):
        _header_to_self([2, flags, 0, 3, 1000])


@pytest.mark.parametrize("flags, nbytes", [(2 | 4, 0), (2 | 1, 0), (4 | 1, 0), (2, 8), (4, 8)])
def test_a_stop_or_a_wait_with_another_flag_or_a_payload_is_refused(flags, nbytes):
    """The server sends a stop or a wait alone, without a payload: STOP|WAIT was taken as a wait, and a wait's
    payload, left unreceived, would have been taken as the next model's."""
    with pytest.raises(
        PayloadError,
        match=rf"^the server's header for round 2 holds flags {flags} and a payload of {nbytes} bytes: a stop ",
    ):
        _header_to_self([2, flags, nbytes, 0, 1000])


@pytest.mark.parametrize("flags, nbytes", [(0, 0), (1, 50)])
def test_a_round_header_after_the_last_round_is_named_as_such(flags, nbytes):
    """After its farewell a learner takes only the final STOP header: a model header there was refused by the
    payload bound, "this learner's model encodes to 0..0", which did not say what was wrong."""
    with pytest.raises(PayloadError, match=rf"^the server sent a round header \(flags {flags}\) after the last round$"):
        _header_to_self([26, flags, nbytes, 3, 1000], largest=None)
    _, (round_, flags, nnz, payload) = _header_to_self([26, 2, 0, 0, 0], largest=None)  # the final STOP header
    assert (round_, flags, nnz, payload.size) == (26, 2, 0, 0)


@mpi
def test_the_server_contributes_nothing_to_the_sum(wire):
    """The server hands reduce_sum a buffer of the sum's shape; only the learners' buffers are summed."""
    out = wire.reduce_sum(np.full(4, 100.0 + wire.rank, np.float32))
    if wire.is_server:
        assert np.array_equal(out, np.full(4, sum(100.0 + k for k in range(1, wire.size)), np.float32))


@mpi
def test_gather_puts_every_ranks_row_in_rank_order_and_counts_the_learners_rows_as_uplink(wire):
    """The rank table and the preflight records: the server's own row is row 0, and it counts only the rows the
    learners handed to MPI."""
    mine = np.array([10.0 * wire.rank, 10.0 * wire.rank + 1])
    out = np.zeros((wire.size, 2)) if wire.is_server else None
    got = wire.gather(mine, out, "the rows")
    if wire.is_server:
        assert got.tolist() == [[10.0 * k, 10.0 * k + 1] for k in range(wire.size)]
        assert wire.reset_counters() == (0, 16 * wire.learners)
    else:
        assert got is None and wire.reset_counters() == (0, 16)


@mpi
def test_reports_arrive_as_float64_rows_in_rank_order(wire):
    """Each learner's report lands in its own row, whatever the dtype the learner handed over; the learner counts
    the float64 bytes it sent."""
    if wire.is_server:
        rows = wire.collect_reports(2)
        assert rows.tolist() == [[k, 0.5 * k] for k in range(1, wire.size)]
        wire.reduce_sum(np.zeros(1, np.float32))
    else:
        wire.report(np.array([wire.rank, 0.5 * wire.rank], np.float32))
        wire.reduce_sum(np.zeros(1, np.float32))  # takes the go
        assert wire.reset_counters() == (0, 16 + 4)  # the report, the sum


@mpi
def test_after_its_report_a_learner_takes_the_go_in_gatherv():
    """PruneFL's and the local merges' models go up through gatherv: it too waits for the go after a report, once
    as a long wait, and the size and byte gathers that follow are quick ones."""
    from fedmpi.wire import TAG_GO

    wire = WaitLog(MPI.COMM_WORLD)
    if wire.is_server:
        wire.collect_reports(1)
        got = wire.gatherv(None, "models")
        assert [b.tolist() for b in got] == [[k] * k for k in range(1, wire.size)]
    else:
        wire.report(np.zeros(1))
        wire.gatherv(np.full(wire.rank, wire.rank, np.uint8), "models")
        assert wire.waits == [
            ("report", True),
            ("models (the other learners' reports)", False),
            ("models sizes", True),
            ("models", True),
        ]
        assert not wire.comm.Iprobe(source=0, tag=TAG_GO), "the go was taken"
    wire.comm.Barrier()


@mpi
def test_a_second_collective_after_one_report_does_not_wait_for_another_go(wire):
    """PruneFL's reconfiguration round sums the values and then the squared gradients after one report: the
    server sends one go a round, so the second sum must not wait for one (it would time out)."""
    wire.patience = 2.0
    if wire.is_server:
        wire.collect_reports(1)
        first = wire.reduce_sum(np.zeros(2, np.float32))
        second = wire.reduce_sum(np.zeros(3, np.float32))
        assert first.tolist() == [wire.learners] * 2 and second.tolist() == [2 * wire.learners] * 3
    else:
        wire.report(np.zeros(1))
        wire.reduce_sum(np.ones(2, np.float32))
        wire.reduce_sum(np.full(3, 2.0, np.float32))
    wire.patience = None


@mpi
def test_the_model_header_tells_the_learners_their_patience_and_each_acknowledgement_is_counted(wire):
    """The server sends the learners' patience in milliseconds; the learners wait that many seconds for the next
    header. Each learner acknowledges a model (8 bytes up, counted on both sides) but not the stop frame, and the
    stop frame's empty payload leaves no message behind."""
    from fedmpi.wire import FLAG_STOP, TAG_ACK, TAG_MODEL

    if wire.is_server:
        wire.reset_counters()
        wire.send_model(4, np.arange(3, dtype=np.float32), 3, 0, patience=2.5)
        up = wire.reset_counters()[1]
        wire.collect_reports(1)
        wire.reduce_sum(np.zeros(1, np.float32))
        wire.send_model(4, np.zeros(0, np.uint8), 0, FLAG_STOP)
        wire.comm.Barrier()
        assert not wire.comm.Iprobe(source=MPI.ANY_SOURCE, tag=TAG_ACK), "the stop frame is not acknowledged"
        assert up == 8 * wire.learners  # the acknowledgements' room
    else:
        round_, _flags, nnz, payload = wire.recv_model(12)
        patience = (wire.next_patience, wire.patience)
        wire.report(np.zeros(1))
        wire.reduce_sum(np.zeros(1, np.float32))
        stop = wire.recv_model(0)[:2]
        counts = wire.reset_counters()
        wire.comm.Barrier()
        assert not wire.comm.Iprobe(source=0, tag=TAG_MODEL), "an empty payload is not sent"
        assert (round_, nnz, payload.nbytes, stop) == (4, 3, 12, (4, FLAG_STOP))
        assert patience == (2.5, 2.5)
        assert counts == (0, 8 + 8 + 4)  # acknowledgement, report, sum


@mpi
def test_a_message_shorter_or_longer_than_its_buffer_is_refused_naming_it(wire):
    """MPI fills a posted buffer only as far as the message goes (the rest keeps what it held: garbage taken for
    values), and raises on a longer one with no word of whose it was."""
    if wire.is_server:
        with pytest.raises(PayloadError, match=r"^the values from learner 1: 32 bytes arrived, expected 64$"):
            wire.recv(np.zeros(8), source=1, what="the values from learner 1")
        with pytest.raises(PayloadError, match=r"^MPI failed while waiting for the mask from learner 1: "):
            wire.recv(np.zeros(2), source=1, what="the mask from learner 1")
    elif wire.rank == 1:
        wire.send(np.ones(4), dest=0)
        wire.send(np.ones(4), dest=0)


@mpi
def test_a_short_row_or_report_is_refused_naming_the_learner(wire):
    out = np.zeros((wire.size, 2)) if wire.is_server else None
    row = np.ones(1 if wire.rank == 2 else 2)
    if wire.is_server:
        with pytest.raises(PayloadError, match=r"^learner 2 \(rank 2\) sent 8 bytes for the rows, expected 16$"):
            wire.gather(row, out, "the rows")
        with pytest.raises(PayloadError, match=r"^learner 2 \(rank 2\) sent 8 bytes for a report, expected 16$"):
            wire.collect_reports(2)
        with pytest.raises(PayloadError, match=r"^learner 2 \(rank 2\) sent a report that MPI refused: "):
            wire.collect_reports(2)
    else:
        wire.gather(row, None, "the rows")
        wire.report(row)
        wire.report(np.ones(3) if wire.rank == 2 else row)


@mpi
def test_a_short_or_long_part_of_the_sum_is_refused_naming_the_learner(wire):
    """Each learner's part of the sum comes point to point, so its length is checked as a report's is (the last
    learner errs: the server has taken every other part when it refuses, so no part is left for a later test)."""
    last = wire.size - 1
    if wire.is_server:
        short = rf"^learner {last} \(rank {last}\) sent 4 bytes for a part of the values, expected 8$"
        with pytest.raises(PayloadError, match=short):
            wire.reduce_sum(np.zeros(2, np.float32), "values")
        with pytest.raises(PayloadError, match=rf"^learner {last} \(rank {last}\) sent a part of the values that MPI"):
            wire.reduce_sum(np.zeros(2, np.float32), "values")
    else:
        wire.reduce_sum(np.ones(1 if wire.rank == last else 2, np.float32), "values")
        wire.reduce_sum(np.ones(3 if wire.rank == last else 2, np.float32), "values")


@mpi
def test_the_sum_adds_the_learners_parts_in_rank_order(wire):
    """The sum is the same under any MPI: ((part 1 + part 2) + part 3) ..., in float32, whatever order MPI's
    reduction would have taken. The parts make the order show from 3 learners on: (1 + 1e8) - 1e8 is 0 in
    float32, where a tree's 1 + (1e8 - 1e8) would give 1."""
    parts = {1: 1.0, 2: 1e8, 3: -1e8}
    out = wire.reduce_sum(np.full(2, parts.get(wire.rank, 0.0), np.float32))
    if wire.is_server:
        expected = np.zeros(2, np.float32)
        for k in range(1, wire.size):
            expected += np.float32(parts.get(k, 0.0))
        assert np.array_equal(out, expected)
        if wire.size >= 4:
            assert out.tolist() == [0.0, 0.0]


@mpi
def test_the_server_reuses_its_receive_buffers_for_the_later_parts_of_a_sum(wire, monkeypatch):
    """At most SUM_WINDOW parts are received at once (memory O(model)); with a window of one, every part after the
    first lands in the buffer the one before it was added from."""
    import fedmpi.wire

    monkeypatch.setattr(fedmpi.wire, "SUM_WINDOW", 1)
    out = wire.reduce_sum(np.arange(3, dtype=np.float32) * wire.rank)
    if wire.is_server:
        assert out.tolist() == (np.arange(3, dtype=np.float32) * sum(range(1, wire.size))).tolist()


@mpi
def test_gatherv_refuses_a_size_other_than_the_announced_one_before_allocating(wire):
    comm = wire.comm
    mine = None if wire.is_server else np.full(3 * wire.rank, wire.rank, np.uint8)
    if wire.is_server:
        announced = np.array([3 * k if k != 2 else 7 for k in range(1, wire.size)])
        with pytest.raises(PayloadError, match=r"^learner 2 \(rank 2\) would send 6 bytes for models, 7 announced"):
            wire.gatherv(None, "models", expected=announced)
        counts = [3 * k for k in range(wire.size)]  # the learners are in the gather the server refused: drain it
        out = np.empty(sum(counts), np.uint8)
        spec = [out, counts, np.cumsum([0, *counts[:-1]]), MPI.BYTE]
        comm.Igatherv(np.zeros(0, np.uint8), spec, root=0).Wait()  # a nonblocking one matches only its kind
    else:
        wire.gatherv(mine, "models")


@mpi
def test_a_learner_that_sends_less_than_it_announced_leaves_zeros_not_the_servers_memory(wire):
    """MPI takes a shorter contribution to a gatherv without a word (a collective has no count to check): the rest
    of that learner's slot was whatever the server's heap held there (a freed buffer: earlier payloads), decoded as
    its model's values. The slot starts as zeros instead."""
    announced = 4096
    for _ in range(3):  # a freed buffer of the same size, full of 0xAB, is what an empty allocation would reuse
        if wire.is_server:
            stale = np.full(announced * wire.learners, 0xAB, np.uint8)
            del stale
            out = wire.gatherv(None, "models", expected=np.full(wire.learners, announced))
            assert (out[0] == 1).all()
            assert (out[1][: announced // 2] == 2).all() and not out[1][announced // 2 :].any()
        else:
            wire.comm.Igather(np.array([announced], np.int64), None, root=0).Wait()
            sent = np.full(announced if wire.rank != 2 else announced // 2, wire.rank, np.uint8)
            wire.comm.Igatherv([sent, MPI.BYTE], None, root=0).Wait()


def test_no_pickled_object_crosses_between_ranks_anywhere_in_the_repository():
    """mpi4py's lowercase calls pickle (slow, 2 GiB cap, code execution by a peer): only the buffer-based
    uppercase calls are used, in the product, its benchmarks, its jobs and its tests alike."""
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    lowercase = re.compile(
        r"(?:\bcomm\w*|COMM_WORLD|\bMPI\.\w+)\s*\.\s*"
        r"(?:bcast|send|ssend|isend|recv|irecv|sendrecv|gather|allgather|scatter|reduce|allreduce|alltoall|scan)\("
    )
    found = [
        f"{path.relative_to(root)}:{n}: {line.strip()}"
        for folder in ("fedmpi", "preprocess", "benchmarks", "jobs", "tests")
        for path in sorted((root / folder).rglob("*.py"))
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if lowercase.search(line) and path.name != "test_wire.py"
    ]
    assert found == []


@mpi
def test_a_header_that_says_wait_restarts_the_learners_wait_and_is_not_acknowledged(wire):
    """While a long evaluation runs the server repeats its word (FLAG_WAIT, no model): each restarts the learners'
    wait with the patience it carries, none is acknowledged, and the model that follows arrives as usual."""
    from fedmpi.wire import FLAG_WAIT, TAG_ACK

    if wire.is_server:
        for _ in range(2):
            wire.send_model(3, np.zeros(0, np.uint8), 0, FLAG_WAIT, patience=0.5)
            time.sleep(0.3)  # longer than the learners' patience before the first word
        assert not wire.comm.Iprobe(source=MPI.ANY_SOURCE, tag=TAG_ACK), "a wait header is not acknowledged"
        wire.send_model(4, np.arange(3, dtype=np.float32), 3, 0, patience=2.5)
        wire.collect_reports(1)
        wire.reduce_sum(np.zeros(1, np.float32))
    else:
        wire.next_patience = 0.4
        round_, flags, nnz, payload = wire.recv_model(12)
        wire.report(np.zeros(1))
        wire.reduce_sum(np.zeros(1, np.float32))
        assert (round_, flags, nnz, payload.view(np.float32).tolist()) == (4, 0, 3, [0.0, 1.0, 2.0])
        assert wire.next_patience == 2.5
    wire.patience = None
