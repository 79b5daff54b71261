"""SLURM's warning before the time limit (SIGUSR1: `--signal=B:USR1@600` in jobs/fedsparsify.slurm, which
forwards it) and SIGTERM ask a run to checkpoint after the current round and exit 75, to be requeued.
Ctrl-C (SIGINT, which mpirun forwards to every rank) asks the same: a KeyboardInterrupt landed anywhere
in every rank (tracebacks from inside weakref callbacks, a "failed" line per rank); a second Ctrl-C ends
the run at once (mpirun aborts the job; a lone process raises KeyboardInterrupt). A second SIGTERM does
too (errors.Terminated): a round that never finishes (a stalled peer) held a `kill`ed job until the round
watchdog, 30 minutes. The time-limit warning never does: SLURM's SIGTERM at the limit after it would end
the round that the warning had left to finish.

`train` takes them before anything else: its imports alone take seconds, and either signal's default
action ends the process. Once the rank's work is done they are ignored: Python's finalization restores
the default action of a signal it handled, and a finished rank may still wait in MPI_Finalize for the
others, where a late warning killed it (seen on a real SLURM: exit 138, a finished job FAILED)."""

from __future__ import annotations

import contextlib
import signal
import sys
import time
from collections.abc import Callable, Iterator

from .errors import Terminated
from .sentinel import first_task

SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)
REPEAT_SECONDS = 1.0  # a signal within this long of the first of its kind is the same one, delivered twice
SAID = {  # what the launcher's first task says of the first of each kind that a second one ends at once
    signal.SIGINT: "Ctrl-C: stopping at a checkpoint after the current round (exit 75; --resume continues the run); "
    "Ctrl-C again ends it at once",
    signal.SIGTERM: "SIGTERM: stopping at a checkpoint after the current round (exit 75; --resume continues the "
    "run); a second SIGTERM ends it at once",
}


def _at_once(signum, frame):
    """What a second Ctrl-C or SIGTERM does: raise in the main thread wherever it is, so the rank's failure path
    ends the job (launch.train)."""
    if signum == signal.SIGINT:
        signal.default_int_handler(signum, frame)
    raise Terminated("SIGTERM again: ended at once, not at a checkpoint (--resume continues from the last one)")


@contextlib.contextmanager
def requests() -> Iterator[Callable[[], bool]]:
    """Yield the question "was a stop asked?", which the server and the centralized baseline ask after each
    round (learners follow the server); ignore the signals on the way out, however it is left."""
    requested = {"stop": False}
    came: dict[int, list[float]] = {sig: [] for sig in SAID}
    ended: list[int] = []

    def handler(signum, frame):
        if signum in came:
            # A rank may get one signal twice at once (from the launcher, and forwarded by its sentinel), and the
            # second's handler can run inside the first's: each records its arrival before it looks at the others,
            # so only the first recorded speaks (with a look first, both once saw none and both printed the line).
            times = came[signum]
            times.append(time.monotonic())
            if len(times) > 1:
                # Once only: a further copy (pkill reaches the rank and its sentinel, which passes it on) raising in
                # the failure path before it ignores the signals would leave the rank in MPI_Finalize, unaborted.
                if times[-1] - times[0] > REPEAT_SECONDS and not ended:
                    ended.append(signum)
                    _at_once(signum, frame)
                return
            if first_task():
                print(f"fedmpi: {SAID[signum]}", file=sys.stderr, flush=True)
        requested["stop"] = True

    for sig in SIGNALS:
        signal.signal(sig, handler)
    # jobs/fedsparsify.slurm starts the ranks with these blocked, so that one arriving before the handlers
    # stays pending (its default action would end the rank): it is taken here, and kept for the first round.
    signal.pthread_sigmask(signal.SIG_UNBLOCK, SIGNALS)
    try:
        yield lambda: requested["stop"]
    finally:
        for sig in SIGNALS:
            signal.signal(sig, signal.SIG_IGN)
