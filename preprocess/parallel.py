"""Run one function over many subjects in worker processes, with an optional progress bar.

Workers are spawned (not forked): callers may live inside an MPI rank or a process that
already imported torch, where fork is unsafe. Heavy shared inputs (templates, masks) go
through `initializer` once per worker instead of once per task.
"""
from __future__ import annotations

import contextlib
import os
import signal
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from typing import Callable, Iterator, Sequence


def default_workers() -> int:
    """CPUs this process may use."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def run(func: Callable, jobs: Sequence, *, workers: int | None, initializer: Callable,
        initargs: tuple, desc: str, progress: bool) -> Iterator:
    """Yield func(job) for every job, in order; in-process when one worker suffices."""
    from tqdm import tqdm

    n = max(1, min(workers or default_workers(), len(jobs)))
    with tqdm(total=len(jobs), desc=desc, unit="subj", disable=not progress, leave=False) as bar:
        if n == 1:
            initializer(*initargs)
            for job in jobs:
                yield func(job)
                bar.update()
            return
        pool = ProcessPoolExecutor(n, mp_context=get_context("spawn"), initializer=_start_worker,
                                   initargs=(initializer,) + tuple(initargs))
        try:
            with _without_mpi_environment():
                results = pool.map(func, jobs, chunksize=1)  # submits all: the workers start here
            for result in results:
                yield result
                bar.update()
        finally:
            # on Ctrl-C or an error: finish the running tasks, drop the queued ones
            pool.shutdown(wait=True, cancel_futures=True)


def _start_worker(initializer: Callable, *initargs) -> None:
    """Ctrl-C reaches the whole process group: only the parent reacts, workers just stop."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    initializer(*initargs)


MPI_ENV_PREFIXES = ("PMI_", "PMIX_", "OMPI_", "HYDRA_", "HYDI_", "MPI_LOCAL", "I_MPI_")


@contextlib.contextmanager
def _without_mpi_environment():
    """Hide the launcher's variables from workers started inside an MPI rank.

    A spawned worker re-imports the parent's main script; if that imports mpi4py, MPI would
    initialise with the rank's inherited launcher connection and fail or hang. Without
    those variables it starts as an independent singleton instead.
    """
    saved = {k: os.environ.pop(k) for k in list(os.environ) if k.startswith(MPI_ENV_PREFIXES)}
    try:
        yield
    finally:
        os.environ.update(saved)
