"""The centralized baseline (fedmpi.centralized): one process trains on every learner's data pooled, no MPI."""

import signal
import subprocess
from pathlib import Path

import h5py
import numpy as np
import pytest
from fedtools import TINY, metrics, run_fedmpi, summary, train_command, wait_rows, write_split, write_volumes

from fedmpi import centralized, preflight
from fedmpi.checkpoint import load_model, model_digest
from fedmpi.config import load_config
from fedmpi.errors import EXIT_PREEMPTED

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def split(tmp_path_factory):
    return write_split(tmp_path_factory.mktemp("split"))


def test_centralized_baseline_runs_in_one_process(split, tmp_path):
    proc = run_fedmpi(
        split,
        tmp_path,
        "federation.algorithm=centralized",
        "federation.rounds=8",
        "train.lr=0.005",
        "run.name=c",
        mpirun=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows, s = metrics(tmp_path / "c"), summary(tmp_path / "c")
    assert len(rows) == 8 and rows[-1]["test_mae"] < rows[0]["test_mae"]
    assert s["total_bytes_up"] == 0 and s["closing_bytes"] == 0
    assert f"fedmpi: the centralized baseline ready after {s['startup_seconds']:.1f} s: imports " in proc.stdout


def test_a_diverged_centralized_run_stops_instead_of_finishing_with_a_nan_model(split, tmp_path):
    """A federation refuses non-finite learner values; the centralized baseline finished "done" (exit 0) with every
    weight NaN, and its model then failed whatever read it. It stops at the round that diverged, naming it."""
    proc = run_fedmpi(
        split,
        tmp_path,
        "federation.algorithm=centralized",
        "federation.rounds=3",
        "train.lr=1e6",
        "run.name=d",
        mpirun=False,
    )
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "DivergedError: round 1: training left" in proc.stderr and "a lower train.lr?" in proc.stderr
    assert not (tmp_path / "d" / "summary.json").exists() and not (tmp_path / "d" / "model.npz").exists()
    assert not (tmp_path / "d" / "metrics.jsonl").exists() or metrics(tmp_path / "d") == []


def test_centralized_baseline_start_up_problems_are_one_line_and_exit_2_like_a_federations(split, tmp_path):
    (tmp_path / "file").write_text("x")
    proc = run_fedmpi(split, tmp_path / "file", "federation.algorithm=centralized", mpirun=False)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stderr.startswith("fedmpi: error: cannot write the run directory") and proc.stderr.count("\n") == 1


def test_a_refused_centralized_start_leaves_no_run_directory(tmp_path, capsys):
    """The learner files are checked after the run directory is locked: a problem there gives it up again."""
    data = write_split(tmp_path / "data", learners=2, per_learner=6, test=6)
    write_volumes(data / "learner_2.h5", np.full(6, 60.0), np.random.default_rng(0), shape=(16, 20, 18))
    assert _centralized(data, tmp_path / "runs") == 2
    assert "learner_2.h5: volume shape (16, 20, 18) differs from test.h5's" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


def _centralized(data_dir, run_dir, *sets, resume=False, should_stop=lambda: False):
    """run_centralized in this process, as `train` calls it for federation.algorithm=centralized."""
    overrides = [f"data.dir={data_dir}", f"run.dir={run_dir}", *TINY, "federation.algorithm=centralized", "run.name=c"]
    cfg = load_config(overrides=[*overrides, *sets])
    return centralized.run_centralized(cfg, Path(data_dir), resume, False, should_stop)


def test_centralized_baseline_stops_at_a_checkpoint_on_request_and_resumes_exactly(tmp_path, capsys):
    """Asked to stop (SLURM's warning, SIGTERM: fedmpi.preemption), the centralized baseline, like the
    server, checkpoints the round just done, whatever checkpoint_every says, and exits 75; --resume then ends
    with the uninterrupted run's model, bit for bit."""
    data = write_split(tmp_path / "data", learners=2, per_learner=6, test=6)
    sets = ("federation.rounds=4", "run.checkpoint_every=3")
    assert _centralized(data, tmp_path / "ref", *sets) == 0
    asked = iter([False, True])  # after round 2, not a round checkpoint_every saves
    capsys.readouterr()
    assert _centralized(data, tmp_path / "runs", *sets, should_stop=lambda: next(asked)) == EXIT_PREEMPTED
    out = capsys.readouterr().out
    assert "\nstopped: 2 rounds, test MAE" in out and "done:" not in out
    run = tmp_path / "runs" / "c"
    assert summary(run)["preempted"] is True and summary(run)["rounds"] == 2
    assert [r["round"] for r in metrics(run)] == [1, 2]
    assert _centralized(data, tmp_path / "runs", *sets, resume=True) == 0
    assert "\ndone: 4 rounds, test MAE" in capsys.readouterr().out
    assert [r["round"] for r in metrics(run)] == [1, 2, 3, 4]
    (ref_values, ref_mask, _), (values, mask, _) = (load_model(p / "model.npz") for p in (tmp_path / "ref" / "c", run))
    assert values.tobytes() == ref_values.tobytes() and np.array_equal(mask, ref_mask)
    assert summary(run)["model_sha256"] == summary(tmp_path / "ref" / "c")["model_sha256"] == model_digest(values)


@pytest.mark.parametrize(
    "sig", [signal.SIGTERM, pytest.param(signal.SIGINT, marks=pytest.mark.slow)], ids=["SIGTERM", "SIGINT"]
)
def test_the_centralized_baseline_stops_at_a_checkpoint_on_sigterm_and_ctrl_c(split, tmp_path, sig):
    """`kill` or SLURM's SIGTERM reaches the centralized baseline through launch.train (it was swallowed: the run
    went on to its last round); Ctrl-C (SIGINT) is the same request, with one line saying so. Either way `stopped:`
    after the round, exit 75."""
    sets = ["federation.algorithm=centralized", "federation.rounds=200", "run.name=c"]
    proc = subprocess.Popen(
        train_command(split, tmp_path, sets), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        wait_rows(tmp_path / "c", 1, proc)
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=120)
    finally:
        proc.kill()  # a no-op once it has ended
    assert proc.returncode == EXIT_PREEMPTED, out + err
    assert "continue with --resume" in out and "\nstopped: " in out and "\ndone: " not in out
    assert "Traceback" not in err and "KeyboardInterrupt" not in err
    said = err.count("Ctrl-C: stopping at a checkpoint after the current round")
    assert said == (1 if sig == signal.SIGINT else 0), err
    assert summary(tmp_path / "c")["preempted"] is True and len(metrics(tmp_path / "c")) < 200


def test_centralized_baseline_without_learner_files_is_one_line_and_exit_2(tmp_path, capsys):
    write_split(tmp_path / "data", learners=0, test=4)  # test.h5 alone
    assert _centralized(tmp_path / "data", tmp_path / "runs") == 2
    assert capsys.readouterr().err == f"fedmpi: error: {tmp_path / 'data'}: no learner_<k>.h5 files\n"


def test_centralized_baseline_pools_every_learner_and_evaluates_the_last_round(tmp_path, monkeypatch):
    """The pooled training set gives the model's starting age, the mean-predictor baseline and the subject count;
    with eval.every = 2 rounds 2 and 3 (the last) are evaluated, round 1 is not."""
    data = write_split(tmp_path / "data", learners=2, per_learner=6, test=6)
    ages = {}
    for name in ("learner_1.h5", "learner_2.h5", "test.h5"):
        with h5py.File(data / name, "r") as f:
            ages[name] = f["age"][:]
    train = np.concatenate([ages["learner_1.h5"], ages["learner_2.h5"]])
    started = []
    real = centralized.build_model

    def spy(cfg, shape, mean_age=62.68):
        started.append(mean_age)
        return real(cfg, shape, mean_age)

    monkeypatch.setattr(centralized, "build_model", spy)
    assert _centralized(data, tmp_path / "runs", "federation.rounds=3", "eval.every=2") == 0
    rows, s = metrics(tmp_path / "runs" / "c"), summary(tmp_path / "runs" / "c")
    assert [r["test_mae"] is not None for r in rows] == [False, True, True]
    assert started == [pytest.approx(float(train.mean()), rel=1e-6)]
    assert s["train_subjects"] == 12 and s["test_subjects"] == 6
    assert s["baseline_mae"] == pytest.approx(float(np.mean(np.abs(ages["test.h5"] - train.mean()))), rel=1e-6)


def test_centralized_resume_refuses_a_changed_learner_file(tmp_path, capsys):
    """A resumed run must go on with the data it was trained on; each learner file is checked, not only test.h5."""
    data = write_split(tmp_path / "data", learners=2, per_learner=6, test=6)
    assert _centralized(data, tmp_path / "runs", "federation.rounds=1") == 0
    write_volumes(data / "learner_1.h5", np.linspace(50.0, 70.0, 6), np.random.default_rng(9))
    capsys.readouterr()
    assert _centralized(data, tmp_path / "runs", "federation.rounds=1", resume=True) == 2
    err = capsys.readouterr().err
    assert "the data differ from what the checkpoint was trained on (learner_1.h5 changed since)" in err


def test_a_pooled_cache_the_memory_cannot_hold_is_refused_before_a_volume_is_decoded(tmp_path, capsys, monkeypatch):
    """One process caches every learner file and test.h5: 18 volumes of 16x20x16 float32 = 368,640 bytes."""
    data = write_split(tmp_path / "data", learners=2, per_learner=6, test=6)
    monkeypatch.setattr(preflight, "available_memory", lambda: 300_000)
    assert _centralized(data, tmp_path / "runs") == 2
    err = capsys.readouterr().err
    assert err.startswith("fedmpi: error: data.cache=memory would keep 0.369 MB of decoded volumes (18 volumes of 2 ")
    assert "0.3 MB is left there: set data.cache=off" in err and not (tmp_path / "runs" / "c").exists()
    assert _centralized(data, tmp_path / "runs", "data.cache=off", "federation.rounds=1") == 0
