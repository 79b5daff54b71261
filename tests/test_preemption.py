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


def test_a_second_sigterm_ends_the_run_at_once_and_the_warning_never_does(capsys, monkeypatch):
    """A SIGTERM waited for the round in flight, however often it came, so a round that never finished (a stalled
    peer) held a `kill`ed job until the round watchdog, 30 minutes. Now the first is said and a second ends the run
    at once, as a second Ctrl-C does; the same SIGTERM delivered twice at once is one. SLURM's time-limit warning,
    however often, only asks for the stop: its SIGTERM at the limit ends the round the warning left to finish."""
    from fedmpi.errors import Terminated, is_user_error
    from fedmpi.sentinel import RANK_VARIABLES

    for name in RANK_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    with preemption.requests() as stop:
        for _ in range(3):
            os.kill(os.getpid(), signal.SIGUSR1)
        assert stop()
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGTERM)  # the same one again (launcher and sentinel both forward it)
        err = capsys.readouterr().err
        assert err.count("SIGTERM: stopping at a checkpoint after the current round") == 1, err
        assert "a second SIGTERM ends it at once" in err
        monkeypatch.setattr(preemption, "REPEAT_SECONDS", 0.0)  # a second one, a while later
        with pytest.raises(Terminated, match="ended at once, not at a checkpoint") as raised:
            os.kill(os.getpid(), signal.SIGTERM)
        # once only: a further copy (pkill reaches the rank and its sentinel) must not raise into the failure path,
        # which would then leave the rank waiting in MPI_Finalize instead of aborting the job
        os.kill(os.getpid(), signal.SIGTERM)
    assert is_user_error(raised.value) and not isinstance(raised.value, Exception)
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_IGN


def test_a_ctrl_c_whose_handler_runs_inside_the_first_ones_is_not_said_twice(capsys, monkeypatch):
    """Python runs a signal's handler between any two bytecodes, so the launcher's and the sentinel's copies of one
    Ctrl-C can nest: the second ran after the first had looked for an earlier press and before it recorded its own,
    and the line came twice (seen once in a fresh clone's test_reliability run)."""
    from fedmpi.sentinel import RANK_VARIABLES

    for name in RANK_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    real = preemption.time.monotonic
    nested = []

    def clock():  # the second copy lands while the first reads the clock
        if not nested:
            nested.append(True)
            os.kill(os.getpid(), signal.SIGINT)
        return real()

    with preemption.requests() as stop:
        monkeypatch.setattr(preemption.time, "monotonic", clock)
        os.kill(os.getpid(), signal.SIGINT)
        monkeypatch.setattr(preemption.time, "monotonic", real)
        assert stop() and nested
    assert capsys.readouterr().err.count("Ctrl-C: stopping at a checkpoint after the current round") == 1


def test_a_signal_that_came_while_blocked_before_the_handlers_is_taken_as_a_stop():
    """jobs/fedsparsify.slurm starts each rank with SIGUSR1 and SIGTERM blocked: a warning during the interpreter's
    start-up stays pending (its default action would end the rank) and becomes the stop request once fedmpi takes
    the signals."""
    import subprocess
    import sys

    code = (
        "import os, signal\n"
        "from fedmpi import preemption\n"
        "os.kill(os.getpid(), signal.SIGUSR1)\n"
        "with preemption.requests() as stop:\n"
        "    print('stop asked' if stop() else 'no stop')\n"
        "    assert signal.SIGUSR1 not in signal.pthread_sigmask(signal.SIG_BLOCK, [])\n"
    )
    if subprocess.run(["env", "--block-signal=USR1", "true"], capture_output=True).returncode:
        pytest.skip("env --block-signal needs GNU coreutils 8.31 or later")
    blocked = subprocess.run(
        ["env", "--block-signal=USR1,TERM", sys.executable, "-c", code], capture_output=True, text=True
    )
    assert (blocked.returncode, blocked.stdout) == (0, "stop asked\n"), blocked.stderr
    unblocked = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert unblocked.returncode == -signal.SIGUSR1  # what happened before: the warning ended the rank
