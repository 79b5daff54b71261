"""fedmpi.preemption: SIGTERM and SLURM's SIGUSR1 ask for a stop, and are ignored once the work is done."""

import os
import signal

import pytest

from fedmpi import preemption


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1])
def test_either_signal_asks_for_a_stop_and_is_ignored_once_the_work_is_done(sig):
    """Ignored afterwards, which Python's finalization keeps (it restores the default action, ending the
    process, only where a Python handler was set): a rank that has finished and waits in MPI_Finalize for
    the others is not killed by a late warning."""
    with preemption.requests() as stop:
        assert not stop()
        os.kill(os.getpid(), sig)
        assert stop()
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_IGN
    assert signal.getsignal(signal.SIGUSR1) is signal.SIG_IGN
    os.kill(os.getpid(), sig)  # ignored: under the default action this test process would end here


def test_the_signals_are_ignored_after_a_failure_too():
    with pytest.raises(RuntimeError), preemption.requests():
        raise RuntimeError("boom")
    assert signal.getsignal(signal.SIGUSR1) is signal.SIG_IGN
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_IGN
