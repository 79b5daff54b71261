"""SLURM's warning before the time limit (SIGUSR1: `--signal=B:USR1@600` in jobs/fedsparsify.slurm, which
forwards it) and SIGTERM ask a run to checkpoint after the current round and exit 75, to be requeued.

`train` takes them before anything else: its imports alone take seconds, and either signal's default
action ends the process. Once the rank's work is done they are ignored: Python's finalization restores
the default action of a signal it handled, and a finished rank may still wait in MPI_Finalize for the
others, where a late warning killed it (seen on a real SLURM: exit 138, a finished job FAILED)."""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Callable, Iterator

SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


@contextlib.contextmanager
def requests() -> Iterator[Callable[[], bool]]:
    """Yield the question "was a stop asked?", which the server and the centralized baseline ask after each
    round (learners follow the server); ignore both signals on the way out, however it is left."""
    requested = {"stop": False}

    def handler(signum, frame):
        requested["stop"] = True

    for sig in SIGNALS:
        signal.signal(sig, handler)
    try:
        yield lambda: requested["stop"]
    finally:
        for sig in SIGNALS:
            signal.signal(sig, signal.SIG_IGN)
