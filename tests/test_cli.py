"""`python -m fedmpi`'s dispatch: one-process commands end on Ctrl-C with one line, not a traceback."""

import time

import pytest

from fedmpi import cli, report


def test_an_interrupted_report_says_so_in_one_line(monkeypatch, capsys):
    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(report, "run", interrupted)
    assert cli.main(["report", "some_run"]) == 130
    assert capsys.readouterr().err == "fedmpi report: interrupted\n"


def test_train_forks_its_sentinel_first_and_passes_its_flags_to_the_launcher(monkeypatch):
    """`train` forks the rank's sentinel before anything else is imported, and --resume and --overwrite reach
    fedmpi.launch.train each as given (swapped, --overwrite would resume and --resume would replace a run)."""
    from fedmpi import launch, sentinel

    calls = []
    monkeypatch.setattr(sentinel, "supervise", lambda: calls.append(("sentinel", time.perf_counter())))

    def train(config, sets, resume=False, overwrite=False, stop=None, clock=None):
        # the start-up clock was made before the fork: the rank counts from the process the launcher started
        assert clock is not None and clock.last <= calls[-1][1]
        calls[-1] = "sentinel"
        calls.append((config, sets, resume, overwrite))
        return 7

    monkeypatch.setattr(launch, "train", train)
    assert cli.main(["train", "--config", "c.yaml", "--set", "a=1", "--set", "b=2", "--overwrite"]) == 7
    assert calls == ["sentinel", ("c.yaml", ["a=1", "b=2"], False, True)]
    calls.clear()
    assert cli.main(["train", "--resume"]) == 7
    assert calls == ["sentinel", (None, [], True, False)]
    calls.clear()
    monkeypatch.setattr(report, "run", lambda args: 0)
    assert cli.main(["report", "some_run"]) == 0 and calls == []  # one-process commands fork no sentinel


def test_train_takes_the_preemption_signals_before_anything_else(monkeypatch):
    """A warning that arrives while the rank starts (the sentinel's fork, imports that take seconds, MPI
    start-up, data) is kept for the end of the first round, not fatal: the handlers are set before the
    sentinel forks, and the answer reaches fedmpi.launch.train. Once train returns, both are ignored."""
    import os
    import signal

    from fedmpi import launch, sentinel

    def supervise():
        assert callable(signal.getsignal(signal.SIGUSR1)) and callable(signal.getsignal(signal.SIGTERM))
        os.kill(os.getpid(), signal.SIGUSR1)  # under the default action this test process would end here

    asked = []
    monkeypatch.setattr(sentinel, "supervise", supervise)
    monkeypatch.setattr(launch, "train", lambda *args, stop, **kwargs: asked.append(stop()) or 0)
    assert cli.main(["train"]) == 0
    assert asked == [True]
    assert signal.getsignal(signal.SIGUSR1) is signal.SIG_IGN and signal.getsignal(signal.SIGTERM) is signal.SIG_IGN


def test_a_second_sigterm_while_the_rank_starts_ends_it_with_one_line(monkeypatch, capsys):
    """Before MPI is up no failure path of the rank's own is in place (its imports take seconds): a second SIGTERM
    there ends the process with the line and SIGTERM's status, not a traceback."""
    import os
    import signal

    from fedmpi import launch, preemption, sentinel

    def slow_imports(*args, stop, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGTERM)
        raise AssertionError("not ended by the second SIGTERM")

    for name in sentinel.RANK_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(sentinel, "supervise", lambda: None)
    monkeypatch.setattr(preemption, "REPEAT_SECONDS", 0.0)
    monkeypatch.setattr(launch, "train", slow_imports)
    assert cli.main(["train"]) == 128 + signal.SIGTERM
    err = capsys.readouterr().err
    assert err.endswith(
        "fedmpi: SIGTERM again: ended at once, not at a checkpoint (--resume continues from the last one)\n"
    ), err
    assert "Traceback" not in err


def test_a_report_into_a_pipe_its_reader_closed_ends_quietly_like_a_unix_tool():
    """`python -m fedmpi report runs/ | head -3`: SIGPIPE's status, no BrokenPipeError traceback."""
    import os
    import subprocess
    import sys

    script = (
        "import sys\n"
        "from fedmpi import cli, report\n"
        "report.run = lambda args: [print('| row |') for _ in range(100000)] and 0\n"
        "sys.exit(cli.main(['report', 'runs']))\n"
    )
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        done = subprocess.run(
            [sys.executable, "-c", script], stdout=write_end, stderr=subprocess.PIPE, text=True, timeout=120
        )
    finally:
        os.close(write_end)
    assert (done.returncode, done.stderr) == (141, "")


def _train_only(monkeypatch):
    """cli.main(["train", ...]) without the sentinel's fork or a federation: the arguments are parsed, then refused."""
    from fedmpi import launch, sentinel

    monkeypatch.setattr(sentinel, "supervise", lambda: None)
    monkeypatch.setattr(launch, "train", lambda *args, **kwargs: 0)
    for name in ("PMI_RANK", "OMPI_COMM_WORLD_RANK", "PMIX_RANK", "SLURM_PROCID"):
        monkeypatch.delenv(name, raising=False)


@pytest.mark.parametrize(
    "argv, code", [(["train", "--sett", "train.lr=0"], 2), (["train", "--set"], 2), (["train", "--help"], 0)]
)
def test_a_usage_error_or_help_of_train_is_said_once_by_the_launchers_first_task(monkeypatch, capsys, argv, code):
    """mpirun -n 9 python -m fedmpi train --sett ... printed the usage and the error 9 times (every rank parses the
    same arguments), as --help printed every option 9 times; the exit code stays each rank's."""
    _train_only(monkeypatch)
    monkeypatch.setenv("PMI_RANK", "3")
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    assert e.value.code == code and capsys.readouterr() == ("", "")
    monkeypatch.setenv("PMI_RANK", "0")
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    out, err = capsys.readouterr()
    assert e.value.code == code and "usage: python -m fedmpi" in out + err


def test_a_second_config_file_is_refused_not_the_first_dropped(monkeypatch, capsys):
    """sbatch jobs/fedsparsify.slurm A.yaml --config B.yaml passed --config A.yaml --config B.yaml, and A was
    silently not read."""
    _train_only(monkeypatch)
    with pytest.raises(SystemExit) as e:
        cli.main(["train", "--config", "a.yaml", "--set", "run.name=x", "--config", "b.yaml"])
    assert e.value.code == 2 and "--config given twice (a.yaml, then b.yaml)" in capsys.readouterr().err
