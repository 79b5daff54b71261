"""How long each rank took to be ready for round 1, phase by phase.

A job's first round can wait seconds on its slowest rank: imports on a shared file system, MPI's start-up,
the synthetic cohort, decoding volumes, CUDA's context and cuDNN's benchmark search in the warm-up step. Each
rank marks its phases as they end (StartClock), the server gathers them (messages.STARTUP), prints the slowest
rank's and keeps every rank's in ranks.json, so round 1 is timed from the moment every rank is ready.
"""

from __future__ import annotations

import os
import time


def process_age() -> float:
    """Seconds since this process started, from Linux's /proc (0 elsewhere, or where it cannot be read): the
    interpreter's start and the imports before fedmpi's first line count, which a slow file system makes long."""
    try:
        with open("/proc/self/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()  # the command name, in parentheses, may hold spaces
        started = int(fields[19]) / os.sysconf("SC_CLK_TCK")  # field 22, starttime: clock ticks since boot
        return max(0.0, time.clock_gettime(time.CLOCK_BOOTTIME) - started)
    except (OSError, ValueError, IndexError, AttributeError):
        return 0.0


class StartClock:
    """A rank's start-up phases (messages.STARTUP's fields), each the time since the previous mark: together they
    add up to the time from the process's start to the last mark. Made in the launcher's process, before the
    sentinel's fork, so the rank (the fork's child) counts from the process the launcher started; numpy (the
    records) is imported only once the rank needs its record, so the process forked stays small."""

    def __init__(self) -> None:
        self.last = time.perf_counter() - process_age()
        self.seconds: dict[str, float] = {}

    def mark(self, phase: str) -> None:
        """`phase` ended now: the time since the previous mark is its (added to what it had)."""
        now = time.perf_counter()
        self.seconds[phase] = self.seconds.get(phase, 0.0) + now - self.last
        self.last = now

    def record(self):
        """This rank's STARTUP record, as the wire carries it (0 for a phase it had none of)."""
        from .messages import STARTUP, record

        names = STARTUP.names or ()
        if unknown := set(self.seconds) - set(names):
            raise ValueError(f"no start-up phase {', '.join(sorted(unknown))}: one of {', '.join(names)}")
        return record(STARTUP, **{name: self.seconds.get(name, 0.0) for name in names})


def startup_table(rows) -> list[dict[str, float]]:
    """Every rank's STARTUP record (float64 rows, rank order) as {phase: seconds, ..., "ready": their sum}."""
    from .messages import STARTUP, fields_of

    table = []
    for row in rows:
        phases = {k: round(v, 3) for k, v in fields_of(row, STARTUP).items()}
        table.append({**phases, "ready": round(sum(phases.values()), 3)})  # the sum of the phases as shown
    return table


def _to_mpi(phases: dict[str, float]) -> float:
    return phases["imports"] + phases["mpi"]


def last_ready(table: list[dict[str, float]]) -> int:
    """The rank that was ready last. Ranks leave MPI_Init together (it waits for every rank), but each counts from
    its own process's start, which a launcher may stagger across nodes: the time after MPI_Init tells, not `ready`."""
    return max(range(len(table)), key=lambda k: table[k]["ready"] - _to_mpi(table[k]))


def startup_seconds(table: list[dict[str, float]]) -> float:
    """From the first process's start to the last rank ready: the longest way to MPI_Init's end, then the longest
    way from there."""
    return round(max(_to_mpi(t) for t in table) + max(t["ready"] - _to_mpi(t) for t in table), 3)


def say_ready(rows, roles: list[str]) -> tuple[list[dict[str, float]], float]:
    """Every rank's STARTUP rows as their table (startup_table), the line said (startup_line) and when the last
    rank was ready (startup_seconds)."""
    table = startup_table(rows)
    print(startup_line(table, roles), flush=True)
    return table, startup_seconds(table)


def startup_line(table: list[dict[str, float]], roles: list[str]) -> str:
    """The line said once every rank is ready: when the last one was, which one it was and where its time went."""
    last = last_ready(table)
    phases = ", ".join(f"{k} {v:.1f}" for k, v in table[last].items() if k != "ready")
    if len(table) == 1:
        return f"fedmpi: {roles[0]} ready after {table[0]['ready']:.1f} s: {phases} s"
    return f"fedmpi: every rank ready after {startup_seconds(table):.1f} s; the last, {roles[last]}: {phases} s"
