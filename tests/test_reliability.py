"""Faults across the federation: the job never hangs, nothing is lost, resume is exact."""

import contextlib
import json
import os
import signal
import subprocess
import time

import numpy as np
import pytest
from fedtools import (
    MPIRUN,
    MPIRUN_FLAGS,
    job_processes,
    kill_job,
    launcher_is_open_mpi,
    metrics,
    rank_process,
    run_fedmpi,
    start_fedmpi,
    summary,
    train_command,
    wait_rows,
    wait_until,
    write_split,
)

from fedmpi.checkpoint import load_model

pytestmark = pytest.mark.slow
ROUNDS = ["federation.rounds=6", "federation.target=0.9", "federation.algorithm=fedsparsify-global"]


@pytest.fixture(scope="module")
def split(tmp_path_factory):
    return write_split(tmp_path_factory.mktemp("split"))


@pytest.fixture(scope="module")
def reference(split, tmp_path_factory):
    """An uninterrupted run every resumed run must match bit for bit."""
    runs = tmp_path_factory.mktemp("ref")
    proc = run_fedmpi(split, runs, *ROUNDS, "run.name=ref")
    assert proc.returncode == 0, proc.stderr
    return runs / "ref"


def _same_model(a, b):
    va, ma, _ = load_model(a / "model.npz")
    vb, mb, _ = load_model(b / "model.npz")
    return np.array_equal(ma, mb) and va.tobytes() == vb.tobytes()


def _finish(proc, timeout):
    start = time.monotonic()
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_job(proc)
        pytest.fail(f"the job did not end within {timeout} s")
    return proc.returncode, out, err, time.monotonic() - start


def test_same_seed_gives_bit_identical_results(split, reference, tmp_path):
    proc = run_fedmpi(split, tmp_path, *ROUNDS, "run.name=again")
    assert proc.returncode == 0, proc.stderr
    assert _same_model(reference, tmp_path / "again")
    assert [r["test_mae"] for r in metrics(reference)] == [r["test_mae"] for r in metrics(tmp_path / "again")]


def test_how_work_is_scheduled_never_changes_the_model(split, reference, tmp_path):
    """Loader workers, the volume cache, evaluation and checkpoint frequency change where time goes
    (the server overlaps them with the next round), never the numbers: same seed, bit-identical model."""
    proc = run_fedmpi(
        split,
        tmp_path,
        *ROUNDS,
        "run.name=sched",
        "data.workers=2",
        "data.cache=off",
        "eval.every=4",
        "run.checkpoint_every=0",
    )
    assert proc.returncode == 0, proc.stderr
    assert _same_model(reference, tmp_path / "sched")
    rows = metrics(tmp_path / "sched")
    assert [r["test_mae"] is not None for r in rows] == [False, False, False, True, False, True]


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGSEGV], ids=["SIGKILL", "SIGSEGV"])
def test_a_dying_learner_ends_the_job_and_resume_matches(split, reference, tmp_path, sig):
    proc = start_fedmpi(split, tmp_path, *ROUNDS, "run.name=r")
    wait_rows(tmp_path / "r", 2, proc)
    pid = json.loads((tmp_path / "r" / "ranks.json").read_text())[2]["pid"]
    os.kill(pid, sig)
    code, _out, err, seconds = _finish(proc, 60)
    assert code != 0 and seconds < 60
    assert f"fedmpi: rank 2 (learner 2, pid {pid}) was killed by {sig.name}" in err, err
    resumed = run_fedmpi(split, tmp_path, *ROUNDS, "run.name=r", extra=["--resume"])
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming" in resumed.stdout
    rounds = [r["round"] for r in metrics(tmp_path / "r")]
    assert rounds == list(range(1, 7)), "metrics continued, not duplicated"
    assert _same_model(reference, tmp_path / "r")


def test_an_exception_on_a_learner_ends_the_job_naming_it(split, tmp_path):
    bad = write_split(tmp_path / "split", shape=(45, 54, 45))  # 5 MB a learner: more than h5py's chunk cache
    proc = start_fedmpi(
        bad, tmp_path, *ROUNDS, "run.name=x", "data.cache=false", "federation.rounds=200", "run.checkpoint_every=0"
    )
    wait_rows(tmp_path / "x", 1, proc)
    path = bad / "learner_2.h5"
    with open(path, "r+b") as fh:  # truncated under the learner's open handle: its next read fails
        fh.truncate(path.stat().st_size // 3)
    code, _out, err, seconds = _finish(proc, 60)
    assert code != 0 and seconds < 60
    assert "fedmpi: rank 2 (learner 2) failed: DataError" in err and "learner_2.h5" in err, err
    assert len(metrics(tmp_path / "x")) < 200


def test_a_silent_learner_is_named_by_the_round_watchdog(split, tmp_path):
    proc = start_fedmpi(split, tmp_path, *ROUNDS, "run.name=w", "run.round_timeout=10")
    wait_rows(tmp_path / "w", 1, proc)
    pid = json.loads((tmp_path / "w" / "ranks.json").read_text())[1]["pid"]
    os.kill(pid, signal.SIGSTOP)  # alive but silent: no MPI failure, only the deadline can notice
    try:
        code, _out, err, _seconds = _finish(proc, 60)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    assert code != 0
    assert "learner 1 (rank 1)" in err and "learner 2" not in err, err
    assert "round deadline passed" in err


def test_preemption_signal_checkpoints_and_resume_matches(split, reference, tmp_path):
    proc = start_fedmpi(split, tmp_path, *ROUNDS, "run.name=p")
    wait_rows(tmp_path / "p", 1, proc)
    os.kill(json.loads((tmp_path / "p" / "ranks.json").read_text())[0]["pid"], signal.SIGUSR1)
    code, out, err, _ = _finish(proc, 60)
    assert code == 75, out + err
    assert summary(tmp_path / "p")["preempted"] is True
    assert "\nstopped: " in out and "\ndone: " not in out  # a grep for finished runs must not find it
    done = len(metrics(tmp_path / "p"))
    assert done < 6
    resumed = run_fedmpi(split, tmp_path, *ROUNDS, "run.name=p", extra=["--resume"])
    assert resumed.returncode == 0, resumed.stderr
    assert [r["round"] for r in metrics(tmp_path / "p")] == list(range(1, 7))
    assert _same_model(reference, tmp_path / "p")


@pytest.mark.parametrize("sig", [signal.SIGUSR1, signal.SIGTERM, signal.SIGINT], ids=["SIGUSR1", "SIGTERM", "SIGINT"])
def test_a_signal_to_the_launcher_ends_the_job_and_resume_matches(split, reference, tmp_path, sig):
    """A signal sent to mpirun itself (a batch script that started the federation with mpirun passes the
    scheduler's on; a user's kill; Ctrl-C). Both launchers forward SIGUSR1 to every rank: a stop at a checkpoint,
    exit 75. MPICH's hydra forwards SIGTERM and SIGINT too; Open MPI's mpirun cannot (5.0.11 refuses
    --forward-signals SIGTERM) and ends every rank, SIGKILL following SIGTERM within about half a second, printing
    nothing, exit 1, so the round in flight is lost. Either way the job ends within seconds, no rank is left
    running, and --resume ends on the uninterrupted run's model."""
    proc = start_fedmpi(split, tmp_path, *ROUNDS, "run.name=l")
    wait_rows(tmp_path / "l", 1, proc)
    os.kill(proc.pid, sig)
    code, out, err, seconds = _finish(proc, 60)
    assert seconds < 30, out + err
    deadline = time.monotonic() + 10
    while list(job_processes(proc)) and time.monotonic() < deadline:
        time.sleep(0.1)
    left = list(job_processes(proc))
    kill_job(proc)  # what a failure left running
    assert not left, f"ranks outlived the launcher: {[pid for pid, _env in left]}"
    if sig != signal.SIGUSR1 and launcher_is_open_mpi():
        assert code != 0, out + err
    else:
        assert code == 75, out + err
        assert "\nstopped: " in out and summary(tmp_path / "l")["preempted"] is True
        if sig == signal.SIGINT:  # said once (by the launcher's first task), not by every rank
            assert (out + err).count("fedmpi: Ctrl-C: stopping at a checkpoint") == 1, out + err
    resumed = run_fedmpi(split, tmp_path, *ROUNDS, "run.name=l", extra=["--resume"])
    assert resumed.returncode == 0, resumed.stderr
    assert [r["round"] for r in metrics(tmp_path / "l")] == list(range(1, 7))
    assert _same_model(reference, tmp_path / "l")


def test_a_second_sigterm_ends_a_stalled_job_at_once(split, tmp_path):
    """A `kill` of the ranks asks for a stop after the round in flight; when that round never finishes (a learner
    stopped, alive but silent), the job waited, whatever else came, until the round watchdog (run.round_timeout,
    30 minutes by default; 600 s here). A second SIGTERM now ends it at once, naming why; the last checkpoint
    stands. The ranks are signalled, not the launcher (MPICH's mpirun would end the job on a second signal itself)."""
    from fedmpi.checkpoint import Checkpoints

    proc = start_fedmpi(split, tmp_path, *ROUNDS, "run.name=t", "run.round_timeout=600")
    ranks = [rank_process(proc, k) for k in range(3)]
    wait_rows(tmp_path / "t", 1, proc)
    os.kill(ranks[1], signal.SIGSTOP)
    try:
        for _ in range(2):
            time.sleep(2.5)  # apart by more than preemption.REPEAT_SECONDS: a second SIGTERM, not the first twice
            for pid in ranks:
                os.kill(pid, signal.SIGTERM)
        code, out, err, seconds = _finish(proc, 60)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(ranks[1], signal.SIGKILL)
    assert code not in (0, 75) and seconds < 30, out + err
    assert err.count("fedmpi: SIGTERM: stopping at a checkpoint after the current round") == 1, err
    assert "fedmpi: rank 0 (server) failed: Terminated: SIGTERM again: ended at once" in err, err
    assert "Traceback" not in err and "round deadline" not in err, err
    assert Checkpoints(tmp_path / "t" / "checkpoints").latest() is not None


def test_a_warning_after_the_last_round_does_not_fail_the_finished_job(split, tmp_path):
    """Seen under a real SLURM: the time-limit warning came while the server wrote its final outputs, and the
    learners, done and waiting in MPI_Finalize, died of it (Python's finalization restores a handled signal's
    default action), so the finished job ended FAILED with exit 138. Here the warning comes twice: while the
    server is held once its summary is written (the learners wait for its final word, their handler takes it),
    and while the server is held once it is done, the learners warned once they no longer handle SIGUSR1
    themselves; the server goes on: the job ends 0."""
    proc = start_fedmpi(split, tmp_path, *ROUNDS, "run.name=w")
    server, learners = rank_process(proc, 0), [rank_process(proc, k) for k in (1, 2)]
    wait_until(lambda: (tmp_path / "w" / "summary.json").exists(), proc, "the summary was written")
    os.kill(server, signal.SIGSTOP)
    try:
        for pid in learners:
            os.kill(pid, signal.SIGUSR1)
        time.sleep(0.5)
    finally:
        os.kill(server, signal.SIGCONT)
    wait_until(lambda: not _catches(server, signal.SIGUSR1), proc, "the server finished")
    with contextlib.suppress(ProcessLookupError):  # a launcher whose MPI_Finalize does not wait
        os.kill(server, signal.SIGSTOP)
    try:
        for pid in learners:  # past fedmpi's handler: the signal is ignored now (or, before, at its default)
            wait_until(lambda pid=pid: not _catches(pid, signal.SIGUSR1), proc, f"learner pid {pid} finished")
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGUSR1)
        time.sleep(0.5)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(server, signal.SIGCONT)
    code, out, err, _ = _finish(proc, 60)
    assert code == 0, out + err
    assert "killed by" not in err, err
    assert summary(tmp_path / "w")["rounds"] == 6


# Installed through PYTHONPATH: on one rank, once `module` is imported, run `patch` on it (a fault at a point no
# signal from outside can hit in time).
HOOK = """
import importlib.abc, importlib.util, os, signal, sys, time
class _Hook(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        rank = os.environ.get("PMI_RANK", os.environ.get("OMPI_COMM_WORLD_RANK"))
        if name != {module!r} or rank != {rank!r}:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        run = spec.loader.exec_module
        def exec_module(module):
            run(module)
            {patch}
        spec.loader.exec_module = exec_module
        return spec
sys.meta_path.insert(0, _Hook())
"""


def _hook(tmp_path, monkeypatch, module: str, rank: int, patch: str) -> None:
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    (hooks / "sitecustomize.py").write_text(HOOK.format(module=module, rank=str(rank), patch=patch))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(hooks), os.environ.get("PYTHONPATH")])))


def test_a_learner_stuck_after_the_last_round_is_named_not_waited_on(split, tmp_path, monkeypatch):
    """Learner 2 stops itself once it has left its loop on the STOP header. The server used to write its outputs,
    print `done:` and wait for it in MPI_Finalize for ever (so did the launcher): now it waits for every
    learner's farewell at most run.round_timeout and names the missing one."""
    stop = "os.kill(os.getpid(), signal.SIGSTOP)"
    patch = f"run_ = module.Learner.run; module.Learner.run = lambda self: (run_(self), {stop})"
    _hook(tmp_path, monkeypatch, "fedmpi.learner", 2, patch)
    proc = start_fedmpi(split, tmp_path, *ROUNDS, "run.name=s", "run.round_timeout=5")
    code, out, err, seconds = _finish(proc, 60)
    assert code == 1 and seconds < 60, (code, out + err)
    assert "no farewell from learner 2 (rank 2)" in err and "learner 2 (rank 2) is stopped on this host" in err, err
    assert "\ndone: 6 rounds" in out  # said before the wait, its outputs whole
    assert summary(tmp_path / "s")["rounds"] == 6


def test_a_server_stuck_in_its_final_save_is_named_by_the_learners(split, tmp_path, monkeypatch):
    """The server hangs writing model.npz (a stuck file system) after the STOP header. The learners used to wait
    for it in MPI_Finalize for ever; now they wait for its final word with the STOP header's patience."""
    _hook(tmp_path, monkeypatch, "fedmpi.checkpoint", 0, "module.save_model = lambda *a, **k: time.sleep(3600)")
    proc = start_fedmpi(split, tmp_path, *ROUNDS, "run.name=f", "run.round_timeout=5")
    code, _out, err, seconds = _finish(proc, 60)
    assert code != 0 and seconds < 60
    assert "waiting for the server's final save: the server (rank 0) is silent" in err, err
    assert not (tmp_path / "f" / "model.npz").exists() and not (tmp_path / "f" / "summary.json").exists()


def _catches(pid: int, sig: int) -> bool:
    """Whether process pid has a handler for sig (SigCgt in /proc/pid/status); False once it is gone."""
    try:
        with open(f"/proc/{pid}/status") as fh:
            caught = next(int(line.split()[1], 16) for line in fh if line.startswith("SigCgt:"))
    except (FileNotFoundError, ProcessLookupError):
        return False
    return bool(caught >> (sig - 1) & 1)


def test_corrupt_latest_checkpoint_falls_back_to_the_previous_one(split, reference, tmp_path):
    proc = start_fedmpi(split, tmp_path, *ROUNDS, "run.name=c", "run.keep_checkpoints=3")
    wait_rows(tmp_path / "c", 4, proc)
    kill_job(proc)
    # The newest checkpoint the metrics reach (one of a later round may exist, written just before the kill:
    # resuming skips it without a word, as it must never resume past the metrics)
    newest = tmp_path / "c" / "checkpoints" / f"round-{metrics(tmp_path / 'c')[-1]['round']:06d}.npz"
    assert len([p for p in newest.parent.glob("round-*.npz") if p.name < newest.name]) >= 1
    data = newest.read_bytes()
    newest.write_bytes(data[: len(data) // 2])  # truncated
    resumed = run_fedmpi(split, tmp_path, *ROUNDS, "run.name=c", extra=["--resume"])
    assert resumed.returncode == 0, resumed.stderr
    assert "skipping checkpoint" in resumed.stderr and newest.name in resumed.stderr
    assert [r["round"] for r in metrics(tmp_path / "c")] == list(range(1, 7))
    assert _same_model(reference, tmp_path / "c")


def test_missing_learner_file_is_reported_before_training(split, tmp_path):
    """The preflight verdict travels through MPI: every rank stops, rank 0 names the problem (the checks
    themselves are tested without mpirun in test_launch.py)."""
    bad = write_split(tmp_path / "split")
    (bad / "learner_2.h5").unlink()
    proc = run_fedmpi(bad, tmp_path, *ROUNDS)
    assert proc.returncode == 2
    assert "rank 2" in proc.stderr and "learner_2.h5" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "demo" / "metrics.jsonl").exists()


def test_a_learner_set_up_otherwise_stops_every_rank_before_anything_is_read(split, tmp_path):
    """One node read another configuration (an MPMD launch: learner 2 with a wider model): before, the job ran
    until the first model reached that learner and failed there with 'buffer holds a vector of length ...'."""
    same = train_command(split, tmp_path, [*ROUNDS, "run.name=mixed"])
    other = train_command(split, tmp_path, [*ROUNDS, "run.name=mixed", "model.width=0.5"])
    command = [MPIRUN, *MPIRUN_FLAGS, "-n", "2", *same, ":", "-n", "1", *other]
    proc = subprocess.run(
        command, capture_output=True, text=True, timeout=120, env=dict(os.environ, OMP_NUM_THREADS="1")
    )
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("fedmpi: error:")]
    assert len(lines) == 1 and lines[0].startswith("fedmpi: error: rank 2: its configuration differs from rank 0's")
    assert "model.width: 0.125 -> 0.5" in lines[0] and "Traceback" not in proc.stderr
    assert not (tmp_path / "mixed").exists()


def test_a_task_that_refuses_its_own_configuration_before_mpi_ends_the_job_saying_so(split, tmp_path):
    """Task 2 reads federation.learners=3 for a job of 3 tasks: it refuses before MPI starts, where only the first
    task prints a configuration error, and MPICH's tasks in MPI_Init were never told (pmodels/mpich#6124): the job
    waited, silent, for the start-up alarm (120 s). Here the alarm is 600 s: only the sentinel's word to the
    launcher ends the job within the test's timeout."""
    sets = [*ROUNDS, "run.name=refused", "run.startup_timeout=600"]
    same, other = train_command(split, tmp_path, sets), train_command(split, tmp_path, [*sets, "federation.learners=3"])
    command = [MPIRUN, *MPIRUN_FLAGS, "-n", "2", *same, ":", "-n", "1", *other]
    proc = subprocess.run(
        command, capture_output=True, text=True, timeout=120, env=dict(os.environ, OMP_NUM_THREADS="1")
    )
    assert proc.returncode == 2, proc.stderr
    assert "fedmpi: task 2 (pid " in proc.stderr and "ended with exit code 2 before MPI started" in proc.stderr
    assert "SIGALRM" not in proc.stderr and not (tmp_path / "refused").exists()


def _stopped(pid: int):
    os.kill(pid, signal.SIGSTOP)
    return time.monotonic()


def _kill_quietly(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


def test_a_learner_stopped_before_mpi_starts_ends_the_job(split, tmp_path):
    """MPI_Init waits for every rank: without the start-up alarm the whole job would hang in it."""
    proc = start_fedmpi(split, tmp_path, *ROUNDS, "run.name=s0", "run.startup_timeout=10")
    pid = rank_process(proc, 2)
    stopped = _stopped(pid)
    try:
        code, _out, err, _ = _finish(proc, 60)
    finally:
        _kill_quietly(pid)
    assert code != 0 and time.monotonic() - stopped < 60
    assert "was killed by SIGALRM (MPI start-up did not complete within run.startup_timeout" in err, err


def test_a_learner_stopped_during_start_up_is_named_by_the_server(split, tmp_path):
    proc = start_fedmpi(split, tmp_path, *ROUNDS, "run.name=s1", "run.startup_timeout=10")
    line = proc.stdout.readline()  # "fedmpi: ranks 0=pid@host, ...": the rank table is complete
    pid = int(line.split("2=")[1].split("@")[0])
    stopped = _stopped(pid)
    try:
        code, _out, err, _ = _finish(proc, 60)
    finally:
        _kill_quietly(pid)
    assert code != 0 and time.monotonic() - stopped < 60
    # MPICH's server waits for learner 2's start-up record ("... from learner 2 (rank 2)"); Open MPI's is still in
    # the configuration's broadcast, which learner 2 must take, and names it as the stopped process on this host
    said = err.split("RoundTimeout")[1] if "rank 0 (server) failed: RoundTimeout" in err else ""
    assert "from learner 2 (rank 2)" in said or "learner 2 (rank 2) is stopped on this host" in said, err
    assert "learner 1 (rank 1)" not in said


def test_a_stopped_server_is_named_by_the_learners(split, tmp_path):
    proc = start_fedmpi(split, tmp_path, *ROUNDS, "federation.rounds=60", "run.name=s2", "run.round_timeout=12")
    wait_rows(tmp_path / "s2", 2, proc)
    pid = json.loads((tmp_path / "s2" / "ranks.json").read_text())[0]["pid"]
    stopped = _stopped(pid)
    try:
        code, _out, err, _ = _finish(proc, 90)
    finally:
        _kill_quietly(pid)
    assert code != 0 and time.monotonic() - stopped < 60
    assert "RoundTimeout" in err and "the server (rank 0) is silent" in err, err


def test_two_runs_of_one_name_exactly_one_runs(split, tmp_path):
    first = start_fedmpi(split, tmp_path, *ROUNDS, "federation.rounds=40", "run.name=same")
    wait_rows(tmp_path / "same", 1, first)
    second = run_fedmpi(split, tmp_path, *ROUNDS, "run.name=same", "run.seed=7", extra=["--overwrite"])
    holder = json.loads((tmp_path / "same" / "ranks.json").read_text())[0]["pid"]
    code, *_ = _finish(first, 300)
    assert second.returncode == 2, second.stdout + second.stderr
    assert f"is in use by a running job (pid {holder} on" in second.stderr and "Traceback" not in second.stderr
    assert code == 0
    assert [r["round"] for r in metrics(tmp_path / "same")] == list(range(1, 41))  # one writer, no duplicates
    assert json.loads((tmp_path / "same" / "config.json").read_text())["run"]["seed"] == 0
    assert summary(tmp_path / "same")["rounds"] == 40


@pytest.mark.parametrize("where", ["learner_2.h5", "test.h5"])
def test_a_nan_age_is_named_before_training(split, tmp_path, where):
    import h5py

    bad = write_split(tmp_path / "split")
    with h5py.File(bad / where, "r+") as f:
        f["age"][0] = np.nan
    proc = run_fedmpi(bad, tmp_path, *ROUNDS, "run.name=nan")
    assert proc.returncode == 2 and where in proc.stderr and "age(s) not in" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "nan" / "metrics.jsonl").exists()


def test_prunefl_resumes_exactly_across_its_reconfigurations(split, tmp_path):
    """PruneFL's squared gradients live only within their reconfiguration round and the mask they choose is in
    the server's checkpoint, so a preempted PruneFL run resumes to the uninterrupted run's model bit for bit."""
    sets = [
        "federation.rounds=6",
        "federation.target=0.9",
        "federation.algorithm=prunefl",
        "federation.reconfigure_every=2",
    ]
    straight = run_fedmpi(split, tmp_path, *sets, "run.name=straight")
    assert straight.returncode == 0, straight.stderr
    proc = start_fedmpi(split, tmp_path, *sets, "run.name=p")
    wait_rows(tmp_path / "p", 1, proc)
    os.kill(json.loads((tmp_path / "p" / "ranks.json").read_text())[0]["pid"], signal.SIGUSR1)
    code, out, err, _ = _finish(proc, 60)
    assert code == 75, out + err
    assert len(metrics(tmp_path / "p")) < 6
    resumed = run_fedmpi(split, tmp_path, *sets, "run.name=p", extra=["--resume"])
    assert resumed.returncode == 0, resumed.stderr
    rows = metrics(tmp_path / "p")
    assert [r["round"] for r in rows] == list(range(1, 7)) and sum(r["regrown"] for r in rows) > 0
    assert _same_model(tmp_path / "straight", tmp_path / "p")
