"""The suite's own hang watchdog (pyproject.toml: faulthandler_timeout with faulthandler_exit_on_timeout):
a test that waits for ever fails the run within the timeout, under mpirun too, instead of holding CI
until its limit. Each test runs pytest on a hanging test file with the project's configuration and only
the timeout shortened."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from fedtools import MPIRUN, MPIRUN_FLAGS, kill_job

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT_S = 3


def _pytest_args() -> list[str]:
    """The project's pytest configuration, the watchdog's timeout shortened, nothing cached."""
    shortened = f"faulthandler_timeout={TIMEOUT_S}"
    return ["-m", "pytest", "-q", "-p", "no:cacheprovider", "-c", str(ROOT / "pyproject.toml"), "-o", shortened]


def _run(cmd: list[str], cwd: Path, limit: float = 60) -> subprocess.CompletedProcess:
    """Run cmd as a job of its own; if the watchdog did not end it within `limit`, kill every process of it
    (fedtools.kill_job: Open MPI's ranks too) and fail."""
    marker = uuid.uuid4().hex
    env = dict(os.environ, FEDMPI_TEST_JOB=marker)
    proc = subprocess.Popen(
        cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    proc.marker = marker  # type: ignore[attr-defined]
    try:
        out, err = proc.communicate(timeout=limit)
    except subprocess.TimeoutExpired:
        kill_job(proc)
        pytest.fail(f"the hanging test still ran after {limit} s: no watchdog ended it")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


@pytest.mark.slow
def test_a_test_that_never_returns_ends_the_run_with_its_stack(tmp_path):
    test_file = tmp_path / "test_forever.py"
    test_file.write_text("import time\n\ndef test_forever():\n    time.sleep(3600)\n")
    proc = _run([sys.executable, *_pytest_args(), str(test_file)], tmp_path)
    assert proc.returncode not in (0, 5), proc.stdout + proc.stderr
    assert "Timeout" in proc.stderr, proc.stderr
    assert "in test_forever" in proc.stderr, proc.stderr  # the stack names the test that hung


@pytest.mark.slow
def test_a_rank_waiting_for_a_message_that_never_comes_ends_the_mpi_job(tmp_path):
    """Rank 1 waits in MPI for a message rank 0 never sends, and the others wait in a barrier: the
    watchdog ends the waiting ranks and mpirun the job, with an exit code that make's `|| [ $? -eq 5 ]`
    ("no tests") does not forgive."""
    test_file = tmp_path / "test_mpi_forever.py"
    test_file.write_text(
        "import numpy as np\n"
        "import pytest\n"
        "from mpi4py import MPI\n\n"
        "@pytest.mark.mpi(min_size=2)\n"
        "def test_waits_for_a_message_never_sent():\n"
        "    comm = MPI.COMM_WORLD\n"
        "    if comm.rank == 1:\n"
        "        comm.Recv(np.empty(1), source=0)\n"
        "    comm.Barrier()\n"
    )
    cmd = [MPIRUN, *MPIRUN_FLAGS, "-n", "3", sys.executable, *_pytest_args(), "--with-mpi", str(test_file)]
    proc = _run(cmd, tmp_path)
    assert proc.returncode not in (0, 5), proc.stdout + proc.stderr
    out = proc.stdout + proc.stderr
    assert "in test_waits_for_a_message_never_sent" in out, out
