"""Run one function over many subjects in worker processes, with an optional progress bar.

Workers are spawned (not forked): callers may live inside an MPI rank or a process that
already imported torch, where fork is unsafe. Heavy shared inputs (templates, masks) go
through `initializer` once per worker instead of once per task.
"""
from __future__ import annotations

import os
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
        with ProcessPoolExecutor(n, mp_context=get_context("spawn"), initializer=initializer,
                                 initargs=initargs) as pool:
            for result in pool.map(func, jobs, chunksize=1):
                yield result
                bar.update()
