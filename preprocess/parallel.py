"""Run one function over many subjects in worker processes, with an optional progress bar.

Workers are spawned (not forked): callers may live inside an MPI rank or a process that
already imported torch, where fork is unsafe. Heavy shared inputs (templates, masks) go
through `initializer` once per worker instead of once per task, read from a private temporary
file: sent with the spawn, megabytes of them kept the parent writing until the worker read them,
and a worker that died first (a Ctrl-C during its start-up) left the parent blocked for ever.

A worker that dies (the out-of-memory killer, a crash in native code) breaks the pool; each
worker notes the job it is running in shared memory, so the error names the subjects that
were in flight instead of a bare BrokenProcessPool, and how it died: its signal, and for a
SIGKILL whether the kernel's out-of-memory killer sent it (its counts before and after).
"""

from __future__ import annotations

import contextlib
import functools
import os
import pickle
import signal
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from multiprocessing import get_context
from pathlib import Path
from typing import Any

from fedmpi.errors import UserError
from fedmpi.hostmemory import OomKills, kill_cause, killed_for_memory, oom_kills


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
    with contextlib.ExitStack() as stack:
        bar = stack.enter_context(tqdm(total=len(jobs), desc=desc, unit="subj", disable=not progress, leave=False))
        if n == 1:
            initializer(*initargs)
            for job in jobs:
                yield func(job)
                bar.update()
            return
        ctx = get_context("spawn")
        running = ctx.RawArray("q", n)  # per worker: 1 + index of the job it runs, 0 when idle
        slots = ctx.Value("i", 0)
        shared = stack.enter_context(tempfile.TemporaryDirectory(prefix="preprocess-workers-"))
        inputs = Path(shared) / "initargs.pickle"
        inputs.write_bytes(pickle.dumps(initargs, protocol=pickle.HIGHEST_PROTOCOL))
        before = oom_kills()
        pool = ProcessPoolExecutor(
            n, mp_context=ctx, initializer=_start_worker, initargs=(running, slots, initializer, str(inputs))
        )
        broken = False
        try:
            with _without_mpi_environment(), _spawning():
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
                raise WorkerDied(f"a {desc} worker process died {what} ({_how_it_died(pool, before)})", names) from None
        finally:
            if broken:  # the survivors can stay blocked on the dead pool's queue: waiting for them can hang
                _kill_workers(pool)
                pool.shutdown(wait=False, cancel_futures=True)
            else:  # on Ctrl-C or an error: finish the running tasks, drop the queued ones
                try:
                    pool.shutdown(wait=True, cancel_futures=True)
                except BaseException:  # a second Ctrl-C: stop waiting, and leave no worker behind
                    _kill_workers(pool)
                    raise


def _how_it_died(pool: ProcessPoolExecutor, before: OomKills) -> str:
    """The dead worker's end, from its exit status and, for a SIGKILL, the kernel's out-of-memory counts since
    `before`. The broken pool ends the others with SIGTERM (they may be ending as this runs), so an end by any other
    status is the dead one's."""
    workers = _workers(pool)
    # Its pipes close a moment before it can be reaped, and the pool's own thread reaps it too (the status goes to
    # one caller, which stores it where the other then reads it): polled, not joined.
    deadline = time.monotonic() + DEATH_PATIENCE
    while any(worker.exitcode is None for worker in workers) and time.monotonic() < deadline:
        time.sleep(0.02)
    ends = [worker.exitcode for worker in workers]
    end = next((code for code in ends if code and code != -signal.SIGTERM), None)
    if end is None and 0 in ends:  # the pool's worker returns, with 0, when its initializer raised
        return "its start-up failed: the error above"
    if end is None:
        return "killed by the out-of-memory killer or another signal, or crashed"
    if end > 0:
        return f"it exited with code {end}"
    sig = signal.Signals(-end)
    if sig != signal.SIGKILL:
        return f"killed by {sig.name}" + (": a crash in native code" if sig in (signal.SIGSEGV, signal.SIGBUS) else "")
    for_memory = killed_for_memory(before, oom_kills())
    if for_memory is None:
        return "killed by SIGKILL: out of memory, or by the scheduler or a user"
    return f"killed by SIGKILL, {kill_cause(for_memory)}"


def _kill_workers(pool: ProcessPoolExecutor) -> None:
    for proc in _workers(pool):
        proc.kill()


def _workers(pool: ProcessPoolExecutor) -> list:
    """The pool's worker processes (its private table, which a broken pool keeps)."""
    return list((getattr(pool, "_processes", None) or {}).values())


OOM_SCORE_ADJ_MAX = 1000  # the kernel's highest: killed before any process of the same size with a lower one
DEATH_PATIENCE = 2.0  # seconds a broken pool's workers get to be reaped before their ends are read
_RUNNING: Any = None
_SLOT = -1


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


@contextlib.contextmanager
def _spawning() -> Iterator[None]:
    """While the pool spawns its workers. A stop raised in the middle left the pool half made: a worker cut off
    from its start-up data (it died printing "pickle data was truncated") or never told to stop, waiting for
    work for ever. So Ctrl-C and SIGTERM are noted here and taken once the workers are started; and they are
    blocked meanwhile, a mask the workers inherit, so that a Ctrl-C reaching the whole process group does not
    kill them as they start (they ignore it from then on). Python runs signal handlers in the main thread only,
    so elsewhere nothing changes."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    came: list[int] = []
    previous = {sig: signal.signal(sig, lambda signum, frame: came.append(signum)) for sig in STOP_SIGNALS}
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if came:
            signal.raise_signal(came[0])


def _start_worker(running, slots, initializer: Callable, inputs: str) -> None:
    """Offer itself first to the out-of-memory killer, take this worker's slot in the table of running jobs, and
    run `initializer` on the inputs the parent wrote; ignore Ctrl-C (it reaches the whole process group: only the
    parent reacts, workers just stop)."""
    global _RUNNING, _SLOT
    _first_to_go()
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    threading.Thread(target=_end_with_parent, args=(os.getppid(),), name="end-with-parent", daemon=True).start()
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)  # blocked by the parent while it spawned this worker
    with slots.get_lock():
        _SLOT = slots.value
        slots.value += 1
    _RUNNING = running
    initializer(*pickle.loads(Path(inputs).read_bytes()))  # the parent's own file, in its private directory


def _first_to_go() -> None:
    """Make this worker the out-of-memory killer's first choice, before its parent: the parent holds the run (it
    names the subjects in flight and how the worker died, and leaves the finished ones staged for a re-run), and
    being the larger process (nilearn, the templates) it was the one killed: `preprocess nifti --workers 2` in a
    memory cgroup of 500 MiB (a SLURM job's --mem) died as "Killed", leaving only a warning of leaked semaphores.
    Raising one's own score needs no privilege; where the kernel has no such file, nothing changes."""
    with contextlib.suppress(OSError):
        Path("/proc/self/oom_score_adj").write_text(str(OOM_SCORE_ADJ_MAX))


def _end_with_parent(parent: int, every: float = 1.0) -> None:
    """End this worker once its parent is gone. A parent killed outright (kill -9, the out-of-memory killer) shuts
    no pool down: its workers stayed for ever, asleep on the dead pool's pipe, holding their memory and the
    command's stdout. A staged file this cuts short is a dot-named temporary, which the next run removes."""
    while os.getppid() == parent:
        time.sleep(every)
    os._exit(1)


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
