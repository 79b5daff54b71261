"""Faults across the federation: the job never hangs, nothing is lost, resume is exact."""
import json
import os
import signal
import subprocess
import time

import numpy as np
import pytest
from fedtools import metrics, run_fedmpi, start_fedmpi, summary, wait_rows, write_split

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
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail(f"the job did not end within {timeout} s")
    return proc.returncode, out, err, time.monotonic() - start


def test_same_seed_gives_bit_identical_results(split, reference, tmp_path):
    proc = run_fedmpi(split, tmp_path, *ROUNDS, "run.name=again")
    assert proc.returncode == 0, proc.stderr
    assert _same_model(reference, tmp_path / "again")
    assert [r["test_mae"] for r in metrics(reference)] == [r["test_mae"] for r in metrics(tmp_path / "again")]


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGSEGV])
def test_a_dying_learner_ends_the_job_and_resume_matches(split, reference, tmp_path, sig):
    proc = start_fedmpi(split, tmp_path, *ROUNDS, "run.name=r")
    wait_rows(tmp_path / "r", 2, proc)
    pid = json.loads((tmp_path / "r" / "ranks.json").read_text())[2]["pid"]
    os.kill(pid, sig)
    code, out, err, seconds = _finish(proc, 60)
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
    proc = start_fedmpi(bad, tmp_path, *ROUNDS, "run.name=x", "data.cache=false", "federation.rounds=200",
                        "run.checkpoint_every=0")
    wait_rows(tmp_path / "x", 1, proc)
    path = bad / "learner_2.h5"
    with open(path, "r+b") as fh:  # truncated under the learner's open handle: its next read fails
        fh.truncate(path.stat().st_size // 3)
    code, out, err, seconds = _finish(proc, 60)
    assert code != 0 and seconds < 60
    assert "fedmpi: rank 2 (learner 2) failed: DataError" in err and "learner_2.h5" in err, err
    assert len(metrics(tmp_path / "x")) < 200


def test_a_silent_learner_is_named_by_the_round_watchdog(split, tmp_path):
    proc = start_fedmpi(split, tmp_path, *ROUNDS, "run.name=w", "run.round_timeout=3")
    wait_rows(tmp_path / "w", 1, proc)
    pid = json.loads((tmp_path / "w" / "ranks.json").read_text())[1]["pid"]
    os.kill(pid, signal.SIGSTOP)  # alive but silent: no MPI failure, only the deadline can notice
    try:
        code, out, err, seconds = _finish(proc, 60)
    finally:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
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
    done = len(metrics(tmp_path / "p"))
    assert done < 6
    resumed = run_fedmpi(split, tmp_path, *ROUNDS, "run.name=p", extra=["--resume"])
    assert resumed.returncode == 0, resumed.stderr
    assert [r["round"] for r in metrics(tmp_path / "p")] == list(range(1, 7))
    assert _same_model(reference, tmp_path / "p")


def test_corrupt_latest_checkpoint_falls_back_to_the_previous_one(split, reference, tmp_path):
    proc = start_fedmpi(split, tmp_path, *ROUNDS, "run.name=c", "run.keep_checkpoints=3")
    wait_rows(tmp_path / "c", 4, proc)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    ckpts = sorted((tmp_path / "c" / "checkpoints").glob("round-*.npz"))
    assert len(ckpts) >= 2
    data = ckpts[-1].read_bytes()
    ckpts[-1].write_bytes(data[: len(data) // 2])  # truncated
    resumed = run_fedmpi(split, tmp_path, *ROUNDS, "run.name=c", extra=["--resume"])
    assert resumed.returncode == 0, resumed.stderr
    assert "skipping checkpoint" in resumed.stderr and ckpts[-1].name in resumed.stderr
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


def test_prunefl_resumes_exactly_across_its_reconfigurations(split, tmp_path):
    """PruneFL's squared gradients live only within their reconfiguration round and the mask they choose is in
    the server's checkpoint, so a preempted PruneFL run resumes to the uninterrupted run's model bit for bit."""
    sets = ["federation.rounds=6", "federation.target=0.9", "federation.algorithm=prunefl",
            "federation.reconfigure_every=2"]
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
