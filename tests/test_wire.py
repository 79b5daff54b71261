"""The transport under mpirun: `mpirun -n 3 python -m pytest --with-mpi -m mpi tests/test_wire.py`."""

import time

import numpy as np
import pytest

pytestmark = pytest.mark.mpi(min_size=3)


@pytest.fixture
def wire():
    from mpi4py import MPI

    from fedmpi.wire import Wire

    w = Wire(MPI.COMM_WORLD)
    yield w
    w.comm.Barrier()


def test_bcast_counts_one_copy_per_learner(wire):
    buf = np.arange(10, dtype=np.float32) if wire.is_server else np.zeros(10, np.float32)
    out = wire.bcast(buf)
    assert np.array_equal(out, np.arange(10, dtype=np.float32))
    down, up = wire.reset_counters()
    assert down == (40 * wire.learners if wire.is_server else 0)
    assert up == 0


def test_reduce_sum_is_the_sum_of_learner_buffers(wire):
    mine = np.full(5, wire.rank, np.float32)
    out = wire.reduce_sum(mine)
    if wire.is_server:
        assert np.array_equal(out, np.full(5, sum(range(1, wire.size)), np.float32))
        assert wire.bytes_up == 20 * wire.learners
    else:
        assert out is None and wire.bytes_up == 20


def test_gatherv_delivers_each_learners_bytes(wire):
    mine = None if wire.is_server else np.full(wire.rank * 3, wire.rank, np.uint8)
    out = wire.gatherv(mine)
    if wire.is_server:
        assert [len(b) for b in out] == [3 * k for k in range(1, wire.size)]
        assert all((b == k).all() for k, b in enumerate(out, start=1))
        assert wire.bytes_up == 8 * wire.learners + sum(3 * k for k in range(1, wire.size))
    else:
        assert wire.bytes_up == 8 + 3 * wire.rank


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


def test_model_frame_round_trip(wire):
    payload = np.arange(7, dtype=np.uint8)
    if wire.is_server:
        wire.send_model(3, payload, 5, 1)
        wire.collect_reports(1)
        assert not wire._acks, "every acknowledgement was collected"
    else:
        assert wire.recv_model()[:3] == (3, 1, 5)
        wire.report(np.zeros(1))


def test_late_learner_is_named_by_the_deadline(wire):
    from fedmpi.wire import TAG_REPORT, RoundTimeout

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


def test_a_vanished_peer_on_this_host_is_named(wire):
    import subprocess
    import sys

    from fedmpi.wire import PeerLost

    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    wire.peers = {7: gone.pid}
    wire._next_check = 0.0
    with pytest.raises(PeerLost, match=rf"rank 7 \(learner 7, pid {gone.pid}\) is gone while waiting for x"):
        wire._check("x", None)
    wire.peers = {}


def test_a_silent_rank_is_named_by_the_gather_deadline(wire):
    """Start-up exchanges are point to point, so the server names who sent nothing; a learner waiting on
    the server names the server."""
    from fedmpi.wire import TAG_GATHER, RoundTimeout

    wire.patience = 0.5
    if wire.is_server:
        out = np.zeros((wire.size, 2))
        with pytest.raises(
            RoundTimeout, match=r"within 0 s while waiting for the table; nothing from learner 2 \(rank 2\)$"
        ):
            wire.gather(np.full(2, 0.0), out, "the table")
        assert out[1].tolist() == [1.0, 1.0]
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
    wire.patience = None


def test_one_wait_can_be_given_its_own_patience(wire):
    """The cohort wait allows minutes where start-up allows seconds, without changing the Wire's patience."""
    wire.patience = 0.3
    if wire.is_server:
        time.sleep(1.0)  # longer than the Wire's patience
    buf = wire.bcast(np.full(1, 7.0) if wire.is_server else np.zeros(1), "the cohort", patience=10.0)
    assert buf[0] == 7.0 and wire.patience == 0.3
    wire.patience = None
