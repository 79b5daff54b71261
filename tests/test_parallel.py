"""Worker pools: order, in-process fallback, MPI launcher variables hidden from workers, dead workers named."""

import os
import signal
import time

import pytest

from fedmpi.errors import UserError
from preprocess import parallel


def _noop():
    """Initializer with nothing to share."""


def test_results_keep_job_order_in_process():
    assert list(
        parallel.run(abs, [-3, 1, -2], workers=1, initializer=_noop, initargs=(), desc="t", progress=False)
    ) == [3, 1, 2]


def test_workers_do_not_see_the_mpi_launcher(monkeypatch):
    monkeypatch.setenv("PMI_RANK", "3")
    monkeypatch.setenv("OMPI_COMM_WORLD_RANK", "3")
    got = list(
        parallel.run(
            os.getenv,
            ["PMI_RANK", "OMPI_COMM_WORLD_RANK", "HOME"],
            workers=2,
            initializer=_noop,
            initargs=(),
            desc="t",
            progress=False,
        )
    )
    assert got[:2] == [None, None] and got[2] == os.environ.get("HOME")
    assert os.environ["PMI_RANK"] == "3"  # the parent's environment is restored


def _die_on_three(job):
    """Runs in a spawned worker (imported from this module there): job 3 dies as the OOM killer would kill it."""
    number, how = job
    if number == 3:
        if how == "exit":
            os._exit(1)
        os.kill(os.getpid(), getattr(signal, how))
    time.sleep(0.2)
    return number


@pytest.mark.parametrize("how", ["SIGKILL", "SIGSEGV", "exit"])
def test_a_dead_worker_is_named_not_a_broken_pool(how):
    jobs = [(n, how) for n in range(1, 7)]
    got = []
    with pytest.raises(parallel.WorkerDied) as exc:
        for result in parallel.run(
            _die_on_three,
            jobs,
            workers=2,
            initializer=_noop,
            initargs=(),
            desc="t",
            progress=False,
            name=lambda job: f"subject-{job[0]}",
        ):
            got.append(result)
    assert "subject-3" in exc.value.names and "subject-3" in str(exc.value)
    assert str(exc.value).startswith("a t worker process died while processing ")
    assert isinstance(exc.value, UserError)
    assert set(got) <= {1, 2}  # results stay in job order: nothing after the dead job
