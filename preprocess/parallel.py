"""Run one function over many subjects in worker processes, with an optional progress bar.

Workers are spawned (not forked): callers may live inside an MPI rank or a process that
already imported torch, where fork is unsafe. Heavy shared inputs (templates, masks) go
through `initializer` once per worker instead of once per task.

A worker that dies (the out-of-memory killer, a crash in native code) breaks the pool; each
worker notes the job it is running in shared memory, so the error names the subjects that
were in flight instead of a bare BrokenProcessPool.
"""

from __future__ import annotations

import contextlib
import functools
import os
import signal
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from multiprocessing import get_context
from typing import Any

from fedmpi.errors import UserError


class WorkerDied(UserError, RuntimeError):
    """A worker process ended abruptly; `names` are the jobs in flight when it did (its own among them)."""

    def __init__(self, message: str, names: list[str]):
        super().__init__(message)
        self.names = names


def default_workers() -> int:
    """CPUs this process may use."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def run(
    func: Callable,
    jobs: Sequence,
    *,
    workers: int | None,
    initializer: Callable,
    initargs: tuple,
    desc: str,
    progress: bool,
    name: Callable[[Any], str] = str,
) -> Iterator:
    """Yield func(job) for every job, in order; in-process when one worker suffices.

    Raises WorkerDied, naming the in-flight jobs by `name(job)`, when a worker process dies.
    """
    from tqdm import tqdm

    n = max(1, min(workers or default_workers(), len(jobs)))
    with tqdm(total=len(jobs), desc=desc, unit="subj", disable=not progress, leave=False) as bar:
        if n == 1:
            initializer(*initargs)
            for job in jobs:
                yield func(job)
                bar.update()
            return
        ctx = get_context("spawn")
        running = ctx.RawArray("q", n)  # per worker: 1 + index of the job it runs, 0 when idle
        slots = ctx.Value("i", 0)
        pool = ProcessPoolExecutor(
            n, mp_context=ctx, initializer=_start_worker, initargs=(running, slots, initializer, *initargs)
        )
        broken = False
        try:
            with _without_mpi_environment():
                # submits all: the workers start here
                results = pool.map(functools.partial(_tracked, func), enumerate(jobs), chunksize=1)
            try:
                for result in results:
                    yield result
                    bar.update()
            except BrokenProcessPool:
                broken = True
                names = [name(jobs[i - 1]) for i in sorted(set(running)) if i]
                what = "between jobs"
                if names:
                    what = f"while processing {', '.join(names)}" + (" (in flight together)" if len(names) > 1 else "")
                raise WorkerDied(
                    f"a {desc} worker process died {what} (killed by the out-of-memory killer "
                    "or another signal, or crashed)",
                    names,
                ) from None
        finally:
            if broken:  # the survivors can stay blocked on the dead pool's queue: waiting for them can hang
                for proc in list((getattr(pool, "_processes", None) or {}).values()):
                    proc.kill()
                pool.shutdown(wait=False, cancel_futures=True)
            else:  # on Ctrl-C or an error: finish the running tasks, drop the queued ones
                pool.shutdown(wait=True, cancel_futures=True)


_RUNNING: Any = None
_SLOT = -1


def _start_worker(running, slots, initializer: Callable, *initargs) -> None:
    """Take this worker's slot in the table of running jobs; ignore Ctrl-C (it reaches the whole
    process group: only the parent reacts, workers just stop)."""
    global _RUNNING, _SLOT
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    with slots.get_lock():
        _SLOT = slots.value
        slots.value += 1
    _RUNNING = running
    initializer(*initargs)


def _tracked(func: Callable, item: tuple[int, Any]):
    """func(job), with the job's index noted in this worker's slot while it runs."""
    index, job = item
    _RUNNING[_SLOT] = index + 1
    try:
        return func(job)
    finally:
        _RUNNING[_SLOT] = 0


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
