"""Worker pools: order, in-process fallback, MPI launcher variables hidden from workers, dead workers named."""

import contextlib
import os
import signal
import subprocess
import sys
import time
from multiprocessing import get_context
from pathlib import Path

import pytest

from fedmpi.errors import UserError
from fedmpi.hostmemory import oom_kills
from preprocess import parallel


def _noop():
    """Initializer with nothing to share."""


def test_results_keep_job_order_in_process():
    assert list(
        parallel.run(abs, [-3, 1, -2], workers=1, initializer=_noop, initargs=(), desc="t", progress=False)
    ) == [3, 1, 2]


def test_workers_do_not_see_the_mpi_launcher(monkeypatch):
    monkeypatch.setenv("PMI_RANK", "3")
    monkeypatch.setenv("OMPI_COMM_WORLD_RANK", "3")
    got = list(
        parallel.run(
            os.getenv,
            ["PMI_RANK", "OMPI_COMM_WORLD_RANK", "HOME"],
            workers=2,
            initializer=_noop,
            initargs=(),
            desc="t",
            progress=False,
        )
    )
    assert got[:2] == [None, None] and got[2] == os.environ.get("HOME")
    assert os.environ["PMI_RANK"] == "3"  # the parent's environment is restored


def _die_on_three(job):
    """Runs in a spawned worker (imported from this module there): job 3 dies as the OOM killer would kill it."""
    number, how = job
    if number == 3:
        if how == "exit":
            os._exit(1)
        if how == "allocate":
            import numpy as np

            blocks = [np.ones(1 << 24) for _ in range(16)]  # 16 x 128 MB, touched
            return len(blocks)
        os.kill(os.getpid(), getattr(signal, how))
    time.sleep(0.2)
    return number


def _run_dying(jobs):
    """parallel.run over (number, how) jobs on 2 workers, where job 3 dies `how`; jobs named subject-N."""
    return parallel.run(
        _die_on_three,
        jobs,
        workers=2,
        initializer=_noop,
        initargs=(),
        desc="t",
        progress=False,
        name=lambda job: f"subject-{job[0]}",
    )


@pytest.mark.parametrize(
    ("how", "end"),
    [
        ("SIGKILL", "(killed by SIGKILL"),  # whether for memory: the kernel's counts, below
        ("SIGSEGV", "(killed by SIGSEGV: a crash in native code)"),
        ("exit", "(it exited with code 1)"),
    ],
)
def test_a_dead_worker_is_named_not_a_broken_pool(how, end):
    """The subjects in flight, and how the worker died: each used to read "killed by the out-of-memory killer or
    another signal, or crashed"."""
    jobs = [(n, how) for n in range(1, 7)]
    got = []
    with pytest.raises(parallel.WorkerDied) as exc:
        for result in _run_dying(jobs):
            got.append(result)
    assert "subject-3" in exc.value.names and "subject-3" in str(exc.value)
    assert str(exc.value).startswith("a t worker process died while processing ")
    assert end in str(exc.value)
    if how == "SIGKILL" and oom_kills() != (None, None):
        assert "not by the kernel's out-of-memory killer: by the scheduler, a user or another process" in str(exc.value)
    assert isinstance(exc.value, UserError)
    assert set(got) <= {1, 2}  # results stay in job order: nothing after the dead job


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="memory cgroups are Linux's")
def test_a_worker_the_kernel_kills_for_memory_is_named_so(tmp_path):
    """preprocess in a memory cgroup of 300 MB (as a SLURM job's --mem makes), one worker allocating 2 GB: the
    out-of-memory killer's SIGKILL, told from another by the kernel's counts, with the limit. Needs a writable
    memory cgroup (root)."""
    # imported here: workers and other tests import this module without tests/ on the path
    from fedtools import memory_cgroup, remove_cgroup

    group = memory_cgroup(tmp_path, 300 << 20)
    code = (
        "from test_parallel import _run_dying\ntry:\n    list(_run_dying([(n, 'allocate') for n in range(1, 5)]))\n"
        "except Exception as e:\n    print(e)"
    )
    tests = str(Path(__file__).parent)
    try:
        out = subprocess.run(
            [sys.executable, "-c", code],
            capture_output=True,
            text=True,
            timeout=120,
            env={**os.environ, "PYTHONPATH": os.pathsep.join([tests, os.environ.get("PYTHONPATH", "")])},
            preexec_fn=lambda: (group / "cgroup.procs").write_text(str(os.getpid())),
        )
    finally:
        remove_cgroup(group)
    assert "a t worker process died while processing " in out.stdout and "subject-3" in out.stdout, out.stderr
    assert "(killed by SIGKILL, by the kernel's out-of-memory killer: the processes here asked for more memory " in (
        out.stdout
    )
    assert "than its memory cgroup's limit of 315 MB = 300 MiB" in out.stdout


def _own_oom_score_adj(_job):
    return Path("/proc/self/oom_score_adj").read_text().strip()


@pytest.mark.skipif(not Path("/proc/self/oom_score_adj").exists(), reason="no oom_score_adj here")
def test_workers_go_before_their_parent_when_memory_runs_out():
    """The parent (nilearn, the templates: 460 MB against a worker's 140 MB at 2 mm) was the out-of-memory killer's
    choice: killed, it could say nothing and leave nothing staged. Its workers now offer themselves first."""
    own = _own_oom_score_adj(None)
    got = list(
        parallel.run(_own_oom_score_adj, [1, 2], workers=2, initializer=_noop, initargs=(), desc="t", progress=False)
    )
    assert got == [str(parallel.OOM_SCORE_ADJ_MAX)] * 2 and _own_oom_score_adj(None) == own


def _refuse_to_start():
    raise FileNotFoundError("the templates are missing")


def test_a_worker_whose_start_up_failed_is_not_said_to_be_killed():
    """The pool's worker returns, with exit 0, when its initializer raises (its traceback on stderr): the message
    said it was killed by the out-of-memory killer or a signal, or crashed."""
    with pytest.raises(parallel.WorkerDied) as exc:
        list(
            parallel.run(abs, [1, 2, 3], workers=2, initializer=_refuse_to_start, initargs=(), desc="t", progress=False)
        )
    assert str(exc.value) == "a t worker process died between jobs (its start-up failed: the error above)"


def test_the_dead_workers_own_job_is_named():
    """Job 3 dies at once as the first job; the only other job (5) may be in flight, nothing else exists."""
    with pytest.raises(parallel.WorkerDied) as exc:
        list(_run_dying([(3, "SIGKILL"), (5, "SIGKILL")]))
    assert "subject-3" in exc.value.names and set(exc.value.names) <= {"subject-3", "subject-5"}


def test_a_finished_job_leaves_its_worker_slot(monkeypatch):
    running = get_context("spawn").RawArray("q", 2)
    monkeypatch.setattr(parallel, "_RUNNING", running)
    monkeypatch.setattr(parallel, "_SLOT", 1)
    during = []
    assert parallel._tracked(lambda job: during.append(running[1]) or job * 2, (6, 21)) == 42
    assert during == [7] and list(running) == [0, 0]
    with pytest.raises(ZeroDivisionError):
        parallel._tracked(lambda job: 1 / 0, (2, None))
    assert list(running) == [0, 0]


def test_a_worker_ignores_ctrl_c_and_runs_the_initializer_on_the_inputs_the_parent_wrote(monkeypatch, tmp_path):
    import pickle

    ctx = get_context("spawn")
    monkeypatch.setattr(parallel, "_RUNNING", None)
    monkeypatch.setattr(parallel, "_SLOT", -1)
    before = signal.getsignal(signal.SIGINT)
    got = []
    (tmp_path / "inputs").write_bytes(pickle.dumps(("shared",)))
    try:
        parallel._start_worker(ctx.RawArray("q", 2), ctx.Value("i", 1), got.append, str(tmp_path / "inputs"))
        assert signal.getsignal(signal.SIGINT) == signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, before)
    assert got == ["shared"] and parallel._SLOT == 1


def _slow_mark(job):
    """Runs in a spawned worker: note that job ran, after a while."""
    path, number = job
    time.sleep(0.3)
    (path / f"ran-{number}").write_text("")
    return number


def test_queued_jobs_are_dropped_when_the_caller_stops(tmp_path):
    results = parallel.run(
        _slow_mark,
        [(tmp_path, n) for n in range(20)],
        workers=2,
        initializer=_noop,
        initargs=(),
        desc="t",
        progress=False,
    )
    assert next(results) == 0
    results.close()  # as a caller's Ctrl-C or error does: the pool shuts down here
    assert len(list(tmp_path.glob("ran-*"))) < 10


def test_while_the_workers_are_spawned_a_stop_waits_until_they_are_started():
    """A stop raised in the middle of spawning left the pool half made: Ctrl-C and SIGTERM are taken once it is
    done, and blocked meanwhile (the workers inherit the mask as they start)."""
    import os

    def stop(signum, frame):
        raise KeyboardInterrupt

    # pytest started in the background (nohup ... &) inherits Ctrl-C ignored: give it Python's own handler
    previous, interrupt = signal.signal(signal.SIGTERM, stop), signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        for sig in (signal.SIGTERM, signal.SIGINT):
            with pytest.raises(KeyboardInterrupt), parallel._spawning():
                assert set(parallel.STOP_SIGNALS) <= signal.pthread_sigmask(signal.SIG_BLOCK, [])
                os.kill(os.getpid(), sig)
                reached = True  # the stop was not raised here
            assert reached and not set(parallel.STOP_SIGNALS) & signal.pthread_sigmask(signal.SIG_BLOCK, [])
            assert signal.getsignal(signal.SIGTERM) is stop
            assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
            reached = False
    finally:
        signal.signal(signal.SIGTERM, previous)
        signal.signal(signal.SIGINT, interrupt)


def _sleep_forever(job):
    time.sleep(3600)


def test_workers_end_when_their_parent_is_killed(tmp_path):
    """SIGKILL of the command alone (kill -9, the out-of-memory killer choosing it): its workers were left behind
    for ever, asleep on the dead pool's pipe with their memory and the command's stdout."""
    import subprocess
    import sys

    script = (
        "import sys\n"
        "from preprocess import parallel\n"
        "from tests.test_parallel import _noop, _sleep_forever\n"
        "if __name__ == '__main__':\n"
        "    list(parallel.run(_sleep_forever, [1, 2], workers=2, initializer=_noop, initargs=(), desc='t',"
        " progress=False))\n"
    )
    main = tmp_path / "main.py"
    main.write_text(script)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]))
    job = subprocess.Popen([sys.executable, str(main)], env=env, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while len(subprocess.run(["pgrep", "-P", str(job.pid)], capture_output=True).stdout.split()) < 3:
            assert job.poll() is None and time.monotonic() < deadline, "the workers did not start"
            time.sleep(0.1)  # two workers and multiprocessing's resource tracker
        time.sleep(1)
        job.kill()
        job.wait()
        deadline = time.monotonic() + 20
        while True:
            try:
                os.killpg(job.pid, 0)
            except ProcessLookupError:
                break
            assert time.monotonic() < deadline, "workers of the killed command were left behind"
            time.sleep(0.2)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(job.pid, signal.SIGKILL)
