"""The transport: every byte between ranks passes through this module.

Only buffer-based (uppercase) mpi4py calls on contiguous numpy arrays are used, never pickled
objects. Calls are nonblocking and waited on by polling with a short sleep, so that ranks
oversubscribing a few cores do not spin, and so that the server can give up on a round that
exceeds its deadline and name the learners that did not report. How long to sleep is the trade
between answering late and taking the cores from ranks that are still training (next_pause):
a wait that may last seconds (a learner waiting for the others, the server waiting for the
reports) sleeps up to 2 ms, and longer the longer it lasts, up to 0.4% of the time already
waited; the server's wait for the reports, whose length the previous round tells, sleeps a
quarter of the time still to go until 90% of that length and 2 ms from there. A quick wait, a
transfer that every rank has joined (the model going out, the sum coming in after the reports),
sleeps 0.25 ms for its first 50 ms: MPI moves a large message in several hand-offs,
each of which waits for the other side's next test. A learner cannot see when the others have
joined the sum, so once every report is in the server tells the learners so (an empty message,
the "go"): until then a learner's wait in the sum is a long one, from then on a quick one.

What arrives is checked against what was expected before it is read: every point-to-point message's length
(MPI accepts a shorter message than the buffer posted for it and leaves the rest as it was), the sizes a
learner announces for its model before the server allocates for them, and a round header's flags (known ones
only) and payload size (before the learner allocates for it). An error MPI
raises while waiting becomes a PayloadError naming the wait (and, where one can tell, the learner). The sum
comes point to point for that reason too (reduce_sum). A collective cannot be checked so: a learner's
contribution to the gatherv is only known by the length it declared in its report (MPICH takes a shorter one,
and cuts a longer one, without a word); the gatherv's buffer starts as zeros, so that a short contribution
leaves zeros behind it, never what the server's memory held.

Byte counters follow one convention (see README, "Measured communication"): `bytes_down` is
what the server hands to MPI for the learners, counted once per receiving learner; `bytes_up`
is what learners hand to MPI for the server. The server computes both from the buffer sizes it
hands to or receives from MPI; each learner counts its own uplink.
"""

from __future__ import annotations

import os
import time
from collections import deque
from collections.abc import Callable
from typing import Protocol

import numpy as np
from mpi4py import MPI

from .errors import PayloadError, PeerLost, RoundTimeout
from .sentinel import role

SERVER = 0
TAG_REPORT = 11
TAG_DIRECT = 12
TAG_ACK = 13
TAG_GATHER = 14
TAG_HEADER = 15
TAG_MODEL = 16
TAG_GO = 17
TAG_FAREWELL = 18
TAG_SUM = 19
SUM_WINDOW = 4  # learners' parts of a sum the server receives at a time (memory: this many models)
MAX_SLEEP = 0.002  # a wait's longest sleep while it is short (the Wire's default)
LATE_SHARE = 0.004  # a wait's polling may add this fraction of its length (plus max_sleep) to it
MAX_PAUSE = 0.02
QUICK_SLEEP = 0.00025  # a quick wait's longest sleep while it is short ...
QUICK_SPAN = 0.05  # ... that is, for this long
AHEAD_SHARE = 0.25  # sleep this share of the time still to go until an expected answer is due ...
AHEAD_PAUSE = 0.1  # ... but no longer than this, in case it comes early
EXPECT_SHARE = 0.9  # an answer is due after this share of the last same wait's length
REPORT_WAITS = 3  # the server expects the reports after the shortest of this many last waits for them
LEARNER_GRACE = 3.0  # a learner that finds a rank on its host gone waits this long before saying so itself
STOPPED_STATES = ("T", "t")  # /proc states of a process stopped by a signal or by a tracer

# Round header sent ahead of each model: round, flags, payload bytes, kept values, and how many
# milliseconds the learners should wait for the next header before declaring the server silent.
HEADER = 5
FAREWELL_NBYTES = 8  # a learner's last message, as it leaves its loop on the STOP header (Wire.end_server)
FLAG_MASK = 1  # the payload is encoding.encode(values, mask): the mask changed
FLAG_STOP = 2  # no more rounds: learners leave their loop (and, sent again after the final save, the run)
FLAG_WAIT = 4  # no model yet: the server is still recording the last round; wait the header's patience again
FLAGS = FLAG_MASK | FLAG_STOP | FLAG_WAIT  # every flag a header may hold: a learner refuses any other bit


class Transport(Protocol):
    """What the server and learner loops need from the transport; `Wire` is the MPI one, and the tests
    drive the loops with in-process stand-ins of the same shape."""

    rank: int
    deadline: float | None
    watch: Callable[[], None] | None

    @property
    def learners(self) -> int: ...
    def reset_counters(self) -> tuple[int, int]: ...
    def send_model(self, round_: int, payload: np.ndarray, nnz: int, flags: int, patience: float = ...) -> None: ...
    def recv_model(self, largest: int) -> tuple[int, int, int, np.ndarray]: ...
    def report(self, values: np.ndarray) -> None: ...
    def collect_reports(self, width: int) -> np.ndarray: ...
    def reduce_sum(self, buf: np.ndarray, what: str = ...) -> np.ndarray | None: ...
    def gatherv(
        self, buf: np.ndarray | None, what: str = ..., expected: np.ndarray | None = ...
    ) -> list[np.ndarray] | None: ...
    def send(self, buf: np.ndarray, dest: int, what: str = ...) -> None: ...
    def recv(self, buf: np.ndarray, source: int, what: str = ...) -> np.ndarray: ...


class Wire:
    """Moves numpy buffers between the server (rank 0) and the learners (ranks 1..N)."""

    def __init__(self, comm: MPI.Comm | None = None, max_sleep: float = MAX_SLEEP, patience: float | None = None):
        self.comm = comm if comm is not None else MPI.COMM_WORLD
        self.rank = self.comm.Get_rank()
        self.size = self.comm.Get_size()
        self.max_sleep = max_sleep
        self.deadline: float | None = None  # the server's round deadline (absolute, time.monotonic)
        self.patience = patience  # seconds any other wait may last (None: no limit)
        self.watch: Callable[[], None] | None = None  # called while waiting: raises to end the wait (and the job)
        self.next_patience = patience  # learner: how long to wait for the next round header
        self.bytes_down = 0
        self.bytes_up = 0
        self._acks: dict[int, MPI.Request] = {}  # server: learners yet to acknowledge this round's model
        # Requests a failed wait left active: MPI may still read or write their buffers, which these objects keep
        # alive until the job ends (it aborts next); a test that lets the late peer match them completes them.
        self.abandoned: list[MPI.Request] = []
        self.peers: dict[int, int] = {}  # rank -> pid of the other ranks on this host, checked while waiting
        self.table: list[dict] = []  # rank, role, pid and host of every rank (launch.announce_ranks)
        self._next_check = 0.0
        self._ack_rows = np.zeros((self.size, 1), np.int64)
        self._report_waits: deque[float] = deque(maxlen=REPORT_WAITS)  # server: seconds the last reports took
        self._go_due = False  # learner: reported this round, the server's go not yet taken

    @property
    def learners(self) -> int:
        """How many learners: every rank but the server."""
        return self.size - 1

    @property
    def is_server(self) -> bool:
        """Whether this rank is the server (rank 0)."""
        return self.rank == SERVER

    def reset_counters(self) -> tuple[int, int]:
        """Return (down, up) bytes since the last reset and start counting afresh."""
        counts = (self.bytes_down, self.bytes_up)
        self.bytes_down = self.bytes_up = 0
        return counts

    def _wait(
        self, request: MPI.Request, what: str, patience: float | None = None, quick=False, expect: int | None = None
    ) -> None:
        """Wait for one request; `expect`: the bytes a receive must have brought."""
        status = MPI.Status()
        self._poll(lambda: request.Test(status), what, patience=patience, quick=quick, requests=[request])
        self._check(what, None, force=True)  # a collective may complete around a rank that died: never trust it
        if expect is not None:
            _check_count(status, expect, what)

    def _poll(
        self, done, what: str, late=None, patience: float | None = None, quick=False, expected=None, requests=()
    ) -> None:
        """Sleep-poll until done(), sleeping as next_pause says. Past the round deadline, or past `patience`
        seconds (this wait's, else the Wire's) when no round deadline is set, raise RoundTimeout; `late()`
        names who is missing (a learner waits only on the server). If the wait fails, the `requests` still
        held (a collection that late() may have cancelled and emptied) go to `abandoned`."""
        if late is None:
            late = (lambda: "") if self.is_server else (lambda: ": the server (rank 0) is silent")
        began = time.monotonic()
        limit = self.deadline
        patience = self.patience if patience is None else patience
        if limit is None and patience is not None:
            limit = began + patience
        pause = 0.0
        try:
            while not done():
                self._check(what, limit, late=late, patience=patience)
                time.sleep(pause)
                pause = next_pause(pause, time.monotonic() - began, self.max_sleep, quick, expected)
        except MPI.Exception as e:  # a truncated message, a count that does not fit: say which wait
            self.abandoned.extend(requests)
            raise PayloadError(f"MPI failed while waiting for {what}: {e.Get_error_string()}") from None
        except BaseException:  # a timeout, a lost peer, an interrupt: the job ends, the buffers stay MPI's
            self.abandoned.extend(requests)
            raise

    def _check(
        self, what: str, limit: float | None, force: bool = False, late=lambda: "", patience: float | None = None
    ) -> None:
        """While waiting: the deadline, and (once a second, or when forced) that the ranks on this host still
        exist. Launchers normally end the job when a rank dies; this makes sure of it. A learner that finds a
        rank gone waits LEARNER_GRACE first: the server's own message, or the launcher's end of the job after
        it (slow under Open MPI), comes first, so that the user reads the cause and not its echoes."""
        if self.watch is not None:
            self.watch()
        now = time.monotonic()
        if limit is not None and now > limit:
            if self.deadline is not None:
                raise RoundTimeout(
                    f"round deadline passed while waiting for {what}{late()}{self._silent()}{self._stopped()}"
                )
            raise RoundTimeout(f"no answer within {patience:.0f} s while waiting for {what}{late()}{self._stopped()}")
        if now < self._next_check and not force:
            return
        self._next_check = now + 1.0
        for rank, pid in self.peers.items():
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                if not self.is_server:  # the server names it, or the launcher ends the job: one message
                    time.sleep(LEARNER_GRACE)
                raise PeerLost(f"rank {rank} ({role(rank)}, pid {pid}) is gone while waiting for {what}") from None

    def _silent(self) -> str:
        """Name the learners that have not acknowledged this round's model (server, on a timeout)."""
        missing = sorted(k for k, req in self._acks.items() if not req.Test())
        self._cancel(self._acks)
        if not missing:
            return ""
        return "; no acknowledgement of the model from " + ", ".join(f"learner {k} (rank {k})" for k in missing)

    def _stopped(self) -> str:
        """Name the ranks on this host whose process is stopped (SIGSTOP, job control, a debugger): alive to
        every check, yet silent. Such a rank may be stuck inside a collective after it reported, where no
        request says who is missing."""
        stopped = [(r, pid) for r, pid in sorted(self.peers.items()) if process_state(pid) in STOPPED_STATES]
        return "".join(f"; {role(r)} (rank {r}) is stopped on this host (pid {pid})" for r, pid in stopped)

    @staticmethod
    def _cancel(requests: dict) -> None:
        for req in requests.values():
            if not req.Test():
                req.Cancel()
                req.Wait()
        requests.clear()

    def _count_down(self, nbytes: int) -> None:
        if self.is_server:
            self.bytes_down += nbytes * self.learners

    def bcast(
        self, buf: np.ndarray, what: str = "broadcast", patience: float | None = None, quick: bool = False
    ) -> np.ndarray:
        """Server to all learners, in place; `patience` replaces the Wire's for this wait; `quick`: every
        rank is known to be in the call (next_pause)."""
        buf = _contiguous(buf)
        self._count_down(buf.nbytes)
        self._wait(self.comm.Ibcast(buf, root=SERVER), what, patience, quick)
        return buf

    def reduce_sum(self, buf: np.ndarray, what: str = "reduce") -> np.ndarray | None:
        """Sum of the learners' buffers at the server (its own `buf` gives only the sum's shape and type).
        Each learner's buffer comes point to point, checked for its length, and the server adds them up in rank
        order: the same sum, bit for bit, under any MPI. Not MPI_Ireduce: Open MPI's nonblocking reduce moves
        one segment of about 8 kB per test, so a 12 MB model took some 1,500 tests, 16-45 s of sleep-polling.
        SUM_WINDOW learners' parts at a time (rank 1-4, 5-8, ...), so the server's memory stays O(model)."""
        buf = _contiguous(buf)
        if not self.is_server:
            self.bytes_up += buf.nbytes
            sending = self.comm.Isend(buf, dest=SERVER, tag=TAG_SUM)
            self._wait(sending, what, quick=self._take_go(what))
            return None
        total = np.zeros_like(buf)
        slots = [np.empty_like(buf) for _ in range(min(SUM_WINDOW, self.learners))]
        for first in range(1, self.size, len(slots)):
            ranks = range(first, min(first + len(slots), self.size))
            self._from_learners(dict(zip(ranks, slots)), TAG_SUM, what, f"part of the {what}", quick=True)
            for slot in slots[: len(ranks)]:
                total += slot
        self.bytes_up += buf.nbytes * self.learners
        return total

    def gather(
        self, buf: np.ndarray, out: np.ndarray | None, what: str = "gather", patience: float | None = None
    ) -> np.ndarray | None:
        """Fixed-size rows from every rank (the server's own row included) into `out` at the server.
        Point to point, so that past the deadline the server names the ranks that sent nothing; `patience`
        replaces the Wire's for this wait."""
        buf = _contiguous(buf)
        if not self.is_server:
            self.bytes_up += buf.nbytes
            self._wait(self.comm.Isend(buf, dest=SERVER, tag=TAG_GATHER), what, patience)
            return None
        assert out is not None
        out[SERVER : SERVER + 1] = buf.reshape(out[SERVER : SERVER + 1].shape)
        pending = {k: self.comm.Irecv(out[k : k + 1], source=k, tag=TAG_GATHER) for k in range(1, self.size)}
        statuses = {k: MPI.Status() for k in pending}
        self._poll(
            lambda: _complete(pending, statuses, what),
            what,
            lambda: self._missing(pending, "nothing"),
            patience=patience,
            requests=pending.values(),
        )
        _check_counts(statuses, out[1:2].nbytes, what)
        self.bytes_up += buf.nbytes * self.learners
        return out

    def _missing(self, pending: dict, noun: str) -> str:
        """Name the learners whose requests are still pending (and cancel them)."""
        names = ", ".join(f"learner {k} (rank {k})" for k in sorted(k for k, req in pending.items() if not req.Test()))
        self._cancel(pending)
        return f"; {noun} from {names}"

    def gatherv(
        self, buf: np.ndarray | None, what: str = "gatherv", expected: np.ndarray | None = None
    ) -> list[np.ndarray] | None:
        """Variable-length uint8 buffers from every learner; the server gets one view per learner. `expected`
        (server): each learner's size in bytes as it announced it before (its report); a learner whose size
        differs is refused before anything is allocated for it."""
        if self.is_server:
            sizes = np.zeros(self.size, dtype=np.int64)
            self._wait(self.comm.Igather(np.zeros(1, np.int64), sizes, root=SERVER), what + " sizes", quick=True)
            for k in range(1, self.size):
                if sizes[k] < 0 or (expected is not None and sizes[k] != expected[k - 1]):
                    announced = "" if expected is None else f", {int(expected[k - 1])} announced in its report"
                    raise PayloadError(f"learner {k} (rank {k}) would send {int(sizes[k])} bytes for {what}{announced}")
            counts = sizes.copy()
            counts[SERVER] = 0
            displs = np.concatenate([[0], np.cumsum(counts)[:-1]])
            # zeros, not empty: a learner that sends fewer bytes than it announced is not an error to MPI (a collective
            # has no status to tell), and the rest of its slot would be whatever this process's heap held there
            out = np.zeros(int(counts.sum()), dtype=np.uint8)
            self.bytes_up += sizes.nbytes // self.size * self.learners + int(counts.sum())
            nothing = [np.zeros(0, np.uint8), MPI.BYTE]  # sent and received as MPI_BYTE on every rank, as MPI asks
            received = self.comm.Igatherv(nothing, [out, counts, displs, MPI.BYTE], root=SERVER)
            self._wait(received, what, quick=True)
            return [out[displs[k] : displs[k] + counts[k]] for k in range(1, self.size)]
        if buf is None:
            raise TypeError("a learner must give gatherv a buffer")
        buf = _contiguous(buf).view(np.uint8).ravel()
        size = np.array([buf.nbytes], dtype=np.int64)
        self.bytes_up += size.nbytes + buf.nbytes
        sizing = self.comm.Igather(size, None, root=SERVER)
        quick = self._take_go(what)
        self._wait(sizing, what + " sizes", quick=quick)
        self._wait(self.comm.Igatherv([buf, MPI.BYTE], None, root=SERVER), what, quick=quick)
        return None

    def _take_go(self, what: str) -> bool:
        """Learner, in the collective after its report: wait for the server's go as a long wait (the others
        may still be training; the tests drive the collective meanwhile). True when it came: every rank is in
        the collective now, so its wait is a quick one."""
        if not self._go_due:
            return False
        self._go_due = False
        self._wait(self.comm.Irecv(_GO, source=SERVER, tag=TAG_GO), f"{what} (the other learners' reports)")
        return True

    def report(self, values: np.ndarray) -> None:
        """A learner's small end-of-round report to the server (point to point, so the server can
        tell exactly who is late)."""
        values = _contiguous(values.astype(np.float64))
        self.bytes_up += values.nbytes
        self._wait(self.comm.Isend(values, dest=SERVER, tag=TAG_REPORT), "report", quick=True)
        self._go_due = True

    def collect_reports(self, width: int) -> np.ndarray:
        """Server: one report row per learner; on deadline, name the learners that did not report. The wait
        expects the reports after about as long as the shortest of the last few such waits (next_pause). Once
        all are in, every learner gets the go (empty: no bytes to count)."""
        rows = np.zeros((self.size, width), dtype=np.float64)
        began = time.monotonic()
        expected = min(self._report_waits) if self._report_waits else None
        self._rows_from_learners(rows, TAG_REPORT, "learner reports", "report", expected=expected)
        self._report_waits.append(time.monotonic() - began)
        for k, req in self._acks.items():  # every learner that reported has acknowledged; complete them
            self._wait(req, f"acknowledgement from learner {k}", quick=True)
        self._acks.clear()
        go = {k: self.comm.Isend(_GO, dest=k, tag=TAG_GO) for k in range(1, self.size)}
        self._poll(lambda: _complete(go), "the learners' go", quick=True, requests=go.values())
        self.bytes_up += rows[1:].nbytes
        return rows[1:]

    def send(self, buf: np.ndarray, dest: int, what: str = "send") -> None:
        """Point to point from `buf` (the start mask's exchange); the server counts what it sends as downlink, a
        learner as uplink."""
        buf = _contiguous(buf)
        if self.is_server:
            self.bytes_down += buf.nbytes
        else:
            self.bytes_up += buf.nbytes
        self._wait(self.comm.Isend(buf, dest=dest, tag=TAG_DIRECT), what)

    def recv(self, buf: np.ndarray, source: int, what: str = "recv") -> np.ndarray:
        """Point to point into `buf`, which the message must fill; the server counts what it receives from a
        learner as uplink."""
        if self.is_server:
            self.bytes_up += buf.nbytes
        self._wait(self.comm.Irecv(buf, source=source, tag=TAG_DIRECT), what, expect=buf.nbytes)
        return buf

    def barrier(self, what: str = "barrier") -> None:
        """Every rank here (the benchmarks' round boundary; the trainer's rounds need none)."""
        self._wait(self.comm.Ibarrier(), what)

    # The model exchange of one round, framed as header + payload.

    def send_model(self, round_: int, payload: np.ndarray, nnz: int, flags: int, patience: float = 0.0) -> None:
        """Server: the round header, then the payload (uint8), to each learner point to point. Each learner's
        copy completes when that learner next polls; a broadcast's tree or ring would wait, hop by hop, for
        every rank on its path, on cores where most ranks sleep. `patience`: seconds the learners should
        wait for the next header (this round's training plus the server's evaluation and checkpoint)."""
        header = np.array([round_, flags, payload.nbytes, nnz, round(patience * 1000)], dtype=np.int64)
        if not flags & (FLAG_STOP | FLAG_WAIT):
            self._acks = {k: self.comm.Irecv(self._ack_rows[k], source=k, tag=TAG_ACK) for k in range(1, self.size)}
            self.bytes_up += self._ack_rows[1:].nbytes
        payload = _contiguous(payload).view(np.uint8).ravel()
        learners = range(1, self.size)
        pending = {(k, TAG_HEADER): self.comm.Isend(header, dest=k, tag=TAG_HEADER) for k in learners}
        if payload.nbytes:
            pending.update({(k, TAG_MODEL): self.comm.Isend(payload, dest=k, tag=TAG_MODEL) for k in learners})
        self._count_down(header.nbytes + payload.nbytes)
        self._poll(lambda: _complete(pending), "the model", quick=True, requests=pending.values())
        self._check("the model", None, force=True)

    def _rows_from_learners(self, rows: np.ndarray, tag: int, what: str, noun: str, **wait) -> None:
        """Server: row k of `rows` from learner k (_from_learners)."""
        self._from_learners({k: rows[k] for k in range(1, self.size)}, tag, what, noun, **wait)

    def _from_learners(self, bufs: dict[int, np.ndarray], tag: int, what: str, noun: str, **wait) -> None:
        """Server: bufs[k] from learner k, one wait for all (`wait`: _poll's quick, expected or patience); a
        learner whose message is missing at the deadline is named ("no {noun}"), one of the wrong length refused."""
        pending = {k: self.comm.Irecv(buf, source=k, tag=tag) for k, buf in bufs.items()}
        statuses = {k: MPI.Status() for k in pending}
        self._poll(
            lambda: _complete(pending, statuses, f"a {noun}"),
            what,
            lambda: self._missing(pending, f"no {noun}"),
            requests=pending.values(),
            **wait,
        )
        _check_counts(statuses, next(iter(bufs.values())).nbytes, f"a {noun}")

    def closing_nbytes(self) -> int:
        """What the end of a run (end_server, end_learner) moves: each learner's farewell up, the final header down."""
        return self.learners * (FAREWELL_NBYTES + 8 * HEADER)

    def end_server(self, round_: int, timeout: float) -> None:
        """Server, after its final save: every learner's farewell (sent as it left its loop on the STOP header; a
        learner stuck or stopped since is named after `timeout` seconds, not waited on for ever in MPI_Finalize),
        then the final STOP header, which the learners wait for with the patience the first one gave them: a
        server stuck in its final save is named by them."""
        rows = np.zeros((self.size, 1), np.int64)
        self._rows_from_learners(
            rows, TAG_FAREWELL, "the learners' farewell after the last round", "farewell", patience=timeout
        )
        self.bytes_up += rows[1:].nbytes
        self.send_model(round_, np.zeros(0, np.uint8), 0, FLAG_STOP)

    def end_learner(self) -> None:
        """Learner, after the STOP header: its farewell, then the server's final STOP header (end_server)."""
        farewell = np.zeros(1, np.int64)
        self.bytes_up += farewell.nbytes
        self._wait(self.comm.Isend(farewell, dest=SERVER, tag=TAG_FAREWELL), "farewell", quick=True)
        self.recv_model(None, "the server's final save")

    def recv_model(self, largest: int | None, what: str = "the next round's model") -> tuple[int, int, int, np.ndarray]:
        """Learner: (round, flags, nnz, payload), waiting at most `next_patience` seconds for the header. The
        header says how long to wait for the next one; every wait of the round on the server (the model, the
        report, the payload's collective, which completes with the slowest learner's) gets that long too.
        A header flagged FLAG_WAIT carries no model: the server, still recording the last round (a long
        evaluation), says it is alive; the wait starts afresh with that header's patience. A payload size
        outside 0..`largest` (the most this learner's model can encode to) is refused before it is allocated;
        largest=None: after the last round, where only the final STOP header may come."""
        while True:
            self.patience = self.next_patience
            header = np.zeros(HEADER, dtype=np.int64)
            self._wait(self.comm.Irecv(header, source=SERVER, tag=TAG_HEADER), what, expect=header.nbytes)
            round_, flags, nbytes, nnz, patience_ms = (int(v) for v in header)
            self._check_header(round_, flags, nbytes)
            if patience_ms > 0:
                self.patience = self.next_patience = patience_ms / 1000
            if not flags & FLAG_WAIT:
                break
        if largest is None:
            if not flags & FLAG_STOP:
                raise PayloadError(f"the server sent a round header (flags {flags}) after the last round")
            largest = 0
        if not 0 <= nbytes <= largest:  # np.empty would raise a ValueError (negative) or a MemoryError (huge)
            raise PayloadError(
                f"the server's header for round {round_} announces a payload of {nbytes} bytes: this learner's "
                f"model encodes to 0..{largest}"
            )
        payload = np.empty(nbytes, dtype=np.uint8)
        if nbytes:
            self._wait(self.comm.Irecv(payload, source=SERVER, tag=TAG_MODEL), "model", quick=True, expect=nbytes)
        if not flags & FLAG_STOP:  # tells the server's watchdog this learner is alive and has the model
            ack = np.array([round_], np.int64)
            self.bytes_up += ack.nbytes
            self._wait(self.comm.Isend(ack, dest=SERVER, tag=TAG_ACK), "acknowledgement", quick=True)
        return round_, flags, nnz, payload

    def _check_header(self, round_: int, flags: int, nbytes: int) -> None:
        """Learner: a header's flags must be known ones, and a stop or a wait comes alone, without a payload (the
        server sends them so): a wait's payload would be taken as the next model's."""
        if flags & ~FLAGS:
            raise PayloadError(
                f"the server's header for round {round_} holds flags {flags}: bits {flags & ~FLAGS} are no flag "
                f"this learner knows (FLAG_MASK {FLAG_MASK}, FLAG_STOP {FLAG_STOP}, FLAG_WAIT {FLAG_WAIT})"
            )
        if flags & (FLAG_STOP | FLAG_WAIT) and (flags not in (FLAG_STOP, FLAG_WAIT) or nbytes):
            raise PayloadError(
                f"the server's header for round {round_} holds flags {flags} and a payload of {nbytes} bytes: a stop "
                f"(FLAG_STOP {FLAG_STOP}) or a wait (FLAG_WAIT {FLAG_WAIT}) comes alone, without a payload"
            )


def next_pause(
    pause: float, waited: float, max_sleep: float, quick: bool = False, expected: float | None = None
) -> float:
    """The sleep before a wait's next test, after `pause` and `waited` seconds so far (module docstring). An
    `expected` wait sleeps AHEAD_SHARE of the time to go until EXPECT_SHARE of `expected`, and from there on
    as a wait begun then, from max_sleep. Otherwise the sleep grows by a tenth of its floor per test, up to the floor
    (QUICK_SLEEP for a quick wait's first QUICK_SPAN, else max_sleep) or LATE_SHARE of the time waited, whichever
    is longer, and never past MAX_PAUSE."""
    if expected is not None:
        due = EXPECT_SHARE * expected
        if waited < due:
            return min(AHEAD_PAUSE, max(max_sleep, AHEAD_SHARE * (due - waited)))
        waited -= due
        if waited < pause:  # the first test past due: start over from max_sleep, then grow as any wait does
            pause = min(pause, max_sleep)
    floor = QUICK_SLEEP if quick and waited < QUICK_SPAN else max_sleep
    return min(pause + floor / 10, max(floor, LATE_SHARE * waited), MAX_PAUSE)


def process_state(pid: int) -> str:
    """The state letter of a process on this host (Linux /proc: R running, S sleeping, T stopped, ...), or ""
    where it cannot be read (gone, or not Linux)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            stat = fh.read().decode(errors="replace")
    except OSError:
        return ""
    fields = stat[stat.rfind(")") + 1 :].split()  # the command name in parentheses may hold spaces
    return fields[0] if fields else ""


def _complete(pending: dict, statuses: dict | None = None, what: str = "") -> bool:
    """True, with `pending` emptied, once all its requests have completed: one test for all of them, so that
    a wake-up drives MPI's progress engine once, not once per learner. With `statuses` (a Status per key of
    `pending`, a learner's rank), each request's status lands in its own, and an error MPI raises names the
    learners whose request failed, in `what`."""
    if statuses is None:
        done = MPI.Request.Testall(list(pending.values()))
    else:
        try:
            done = MPI.Request.Testall([pending[k] for k in statuses], list(statuses.values()))
        except MPI.Exception as e:
            failed = [k for k, st in statuses.items() if st.Get_error() != MPI.SUCCESS]
            who = ", ".join(f"learner {k} (rank {k})" for k in failed) or "a learner"
            raise PayloadError(f"{who} sent {what} that MPI refused: {e.Get_error_string()}") from None
    if done:
        pending.clear()
    return not pending


def _check_count(status: MPI.Status, nbytes: int, what: str) -> None:
    got = status.Get_count(MPI.BYTE)
    if got != nbytes:
        raise PayloadError(f"{what}: {got} bytes arrived, expected {nbytes}")


def _check_counts(statuses: dict, nbytes: int, what: str) -> None:
    """Each learner's message (statuses by rank) must have been `nbytes` long."""
    for k, status in sorted(statuses.items()):
        got = status.Get_count(MPI.BYTE)
        if got != nbytes:
            raise PayloadError(f"learner {k} (rank {k}) sent {got} bytes for {what}, expected {nbytes}")


_GO = np.zeros(0, np.uint8)  # the go carries nothing: its arrival is the message


def _contiguous(buf: np.ndarray) -> np.ndarray:
    if not isinstance(buf, np.ndarray):
        raise TypeError("the wire carries numpy arrays only")
    return np.ascontiguousarray(buf)
