"""fedmpi.startup: the start-up clock, against hand-computed phases, and the process's age from /proc."""

import subprocess
import sys
import time

import numpy as np
import pytest

from fedmpi import startup
from fedmpi.messages import STARTUP, records
from fedmpi.startup import StartClock, last_ready, process_age, startup_line, startup_seconds, startup_table


def test_a_process_counts_its_age_from_its_own_start():
    """The time before fedmpi's first line (the interpreter, imports on a slow file system) is counted too."""
    code = "import time; time.sleep(0.6); from fedmpi.startup import process_age; print(process_age())"
    age = float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)
    assert 0.55 <= age < 30
    assert process_age() > 0  # this test's own process started before it ran


def test_phases_are_the_times_between_marks_from_the_process_start(monkeypatch):
    clock_times = iter([100.0, 101.0, 103.5, 104.0, 110.25, 111.0, 112.0])
    monkeypatch.setattr(startup, "process_age", lambda: 2.0)
    monkeypatch.setattr(startup.time, "perf_counter", lambda: next(clock_times))
    clock = StartClock()  # made at 100.0, its process started 2 s before
    clock.mark("imports")  # 101.0
    clock.mark("mpi")  # 103.5
    clock.mark("volumes")  # 104.0
    clock.mark("model")  # 110.25
    clock.mark("volumes")  # 111.0: a phase marked twice adds up
    rec = records(clock.record(), STARTUP)[0]
    assert dict(zip(STARTUP.names, rec.tolist())) == {
        "imports": 3.0,
        "mpi": 2.5,
        "prepare": 0.0,
        "preflight": 0.0,
        "volumes": 1.25,
        "model": 6.25,
        "warm_up": 0.0,
    }
    clock.mark("lunch")
    with pytest.raises(ValueError, match="no start-up phase lunch: one of imports, mpi, prepare, preflight"):
        clock.record()


def test_the_line_names_the_last_rank_ready_and_its_phases():
    rows = np.array(
        [
            [0.5, 0.5, 0.5, 0.25, 2.0, 1.0, 0.0],
            [1.0, 0.5, 0.5, 0.25, 0.5, 0.25, 4.0],
            [0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 1.0],
        ]
    )
    table = startup_table(rows)
    assert [t["ready"] for t in table] == [4.75, 7.0, 4.0]
    assert table[1] == {
        "imports": 1.0, "mpi": 0.5, "prepare": 0.5, "preflight": 0.25, "volumes": 0.5, "model": 0.25, "warm_up": 4.0,
        "ready": 7.0,
    }  # fmt: skip
    assert startup_line(table, ["server", "learner 1", "learner 2"]) == (
        "fedmpi: every rank ready after 7.0 s; the last, learner 1: imports 1.0, mpi 0.5, prepare 0.5, preflight 0.2, "
        "volumes 0.5, model 0.2, warm_up 4.0 s"
    )
    assert startup_seconds(table) == 7.0
    assert startup_line(table[:1], ["the centralized baseline"]) == (
        "fedmpi: the centralized baseline ready after 4.8 s: imports 0.5, mpi 0.5, prepare 0.5, preflight 0.2, "
        "volumes 2.0, model 1.0, warm_up 0.0 s"
    )


def test_the_last_rank_ready_is_told_by_its_time_after_mpi_init_not_by_its_own_age():
    """Every rank leaves MPI_Init together, but a launcher may start them seconds apart (srun across nodes, a
    container's start): the server, started 9 s before learner 1, was ready 6 s before it."""
    rows = np.array([[1.0, 9.0, 1.0, 0.5, 0.5, 0.0, 0.0], [1.0, 0.0, 1.0, 0.5, 2.0, 0.5, 4.0]])
    table = startup_table(rows)
    assert [t["ready"] for t in table] == [12.0, 9.0]
    assert last_ready(table) == 1 and startup_seconds(table) == 18.0
    assert startup_line(table, ["server", "learner 1"]).startswith(
        "fedmpi: every rank ready after 18.0 s; the last, learner 1: imports 1.0, mpi 0.0, "
    )


def test_ready_is_the_sum_of_the_phases_as_shown():
    rows = np.full((1, 7), 0.0004)  # each rounds to 0.000, the sum to 0.003
    assert startup_table(rows)[0]["ready"] == 0.0


def test_the_start_up_clock_imports_no_numpy_before_the_sentinels_fork():
    """The sentinel forks while the process is small: the clock made before it must not import numpy."""
    code = "import sys, fedmpi.cli, fedmpi.startup; fedmpi.startup.StartClock(); print('numpy' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout == "False\n"


def test_a_clock_made_now_counts_what_came_before_it():
    clock = StartClock()
    time.sleep(0.05)
    clock.mark("imports")
    assert clock.seconds["imports"] == pytest.approx(process_age(), abs=0.05)  # /proc's start counts in 10 ms ticks
