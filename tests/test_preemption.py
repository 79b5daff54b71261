"""fedmpi.preemption: SIGTERM, SLURM's SIGUSR1 and Ctrl-C ask for a stop, and are ignored once the work is done."""

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


def test_ctrl_c_asks_for_a_stop_says_so_once_and_a_second_one_interrupts(capsys, monkeypatch):
    """Ctrl-C raised KeyboardInterrupt wherever each rank happened to be (tracebacks from weakref callbacks, a
    "failed" line from every rank); now the run stops at the round's checkpoint like SIGTERM, the launcher's first
    task says so, and a second Ctrl-C interrupts at once."""
    from fedmpi.sentinel import RANK_VARIABLES

    for name in RANK_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    with preemption.requests() as stop:
        os.kill(os.getpid(), signal.SIGINT)
        assert stop()
        os.kill(os.getpid(), signal.SIGINT)  # the same one again (launcher and sentinel both forward it)
        assert capsys.readouterr().err.count("Ctrl-C: stopping at a checkpoint after the current round") == 1
        monkeypatch.setattr(preemption, "REPEAT_SECONDS", 0.0)  # a second press, a while later
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    monkeypatch.setenv("PMI_RANK", "2")  # another rank of the job: it stops with the others, silently
    with preemption.requests() as stop:
        os.kill(os.getpid(), signal.SIGINT)
        assert stop() and capsys.readouterr().err == ""
