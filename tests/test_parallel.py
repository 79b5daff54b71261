"""Worker pools: order, in-process fallback, and MPI launcher variables hidden from workers."""
import os

from preprocess import parallel


def _noop():
    """Initializer with nothing to share."""


def test_results_keep_job_order_in_process():
    assert list(parallel.run(abs, [-3, 1, -2], workers=1, initializer=_noop, initargs=(),
                             desc="t", progress=False)) == [3, 1, 2]


def test_workers_do_not_see_the_mpi_launcher(monkeypatch):
    monkeypatch.setenv("PMI_RANK", "3")
    monkeypatch.setenv("OMPI_COMM_WORLD_RANK", "3")
    got = list(parallel.run(os.getenv, ["PMI_RANK", "OMPI_COMM_WORLD_RANK", "HOME"], workers=2,
                            initializer=_noop, initargs=(), desc="t", progress=False))
    assert got[:2] == [None, None] and got[2] == os.environ.get("HOME")
    assert os.environ["PMI_RANK"] == "3"  # the parent's environment is restored
