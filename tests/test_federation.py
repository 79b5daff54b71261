"""End to end: the real CLI under `mpirun -n 3` (1 server, 2 learners) on a tiny learnable split."""

import math
import signal
import subprocess
from pathlib import Path

import h5py
import numpy as np
import pytest
from fedtools import TINY, metrics, run_fedmpi, summary, train_command, wait_rows, write_split, write_volumes

from fedmpi import centralized
from fedmpi.algorithms import ALGORITHMS
from fedmpi.checkpoint import load_model, model_digest
from fedmpi.config import load_config
from fedmpi.errors import EXIT_PREEMPTED

pytestmark = pytest.mark.slow
ROUNDS = 8
TARGET = 0.9


@pytest.fixture(scope="module")
def split(tmp_path_factory):
    return write_split(tmp_path_factory.mktemp("split"))


_RUNS: dict[tuple, Path] = {}


def _run(split, tmp_path, algorithm, *sets):
    """A finished federation of these settings; tests that only read a run's records share it (the first test
    to ask for it runs it in its tmp_path)."""
    key = (split, algorithm, *sets)
    if key not in _RUNS:
        proc = run_fedmpi(
            split,
            tmp_path,
            f"federation.algorithm={algorithm}",
            f"federation.rounds={ROUNDS}",
            f"federation.target={TARGET}",
            "run.name=r",
            *sets,
        )
        assert proc.returncode == 0, proc.stdout + proc.stderr
        _RUNS[key] = tmp_path / "r"
    return _RUNS[key]


@pytest.mark.parametrize(
    "algorithm,sets",
    [
        ("fedsparsify-global", ()),
        ("fedsparsify-local", ("federation.vote_cap=true",)),
        ("fedsparsify-local", ("federation.merge=kept", "federation.vote_cap=true", "train.lr=0.01")),
        ("oneshot", ("federation.oneshot_round=3",)),
        ("snip", ()),
        ("grasp", ()),
    ],
)
def test_pruning_algorithms_reach_their_target_while_mae_falls(split, tmp_path, algorithm, sets):
    run = _run(split, tmp_path, algorithm, *sets)
    rows, s = metrics(run), summary(run)
    assert [r["round"] for r in rows] == list(range(1, ROUNDS + 1))
    assert s["final_sparsity"] == pytest.approx(TARGET, abs=0.005)
    values = np.load(run / "model.npz")  # the saved model is sparse on disk
    assert values["sparse"].nbytes < 0.25 * s["dense_model_bytes"]
    assert rows[-1]["test_mae"] < rows[0]["test_mae"]
    assert s["final_mae"] < s["baseline_mae"]
    sparsities = [r["sparsity"] for r in rows]
    assert sparsities == sorted(sparsities), "no regrowth: sparsity never falls"
    assert all(r["regrown"] == 0 for r in rows)
    assert sum(r["pruned"] for r in rows) == round(TARGET * s["parameters"])  # counted once, when pruned


def test_prunefl_regrows_in_reconfiguration_rounds_and_counts_the_squared_gradients(split, tmp_path):
    """Learner 1 prunes to the target before round 1; rounds 3 and 6 reconfigure the mask from the learners'
    squared gradients (sent dense, 4 bytes per parameter per learner, on top of the values); pruned positions
    come back and the model stays at the target."""
    run = _run(split, tmp_path, "prunefl", "federation.reconfigure_every=3")
    rows, s = metrics(run), summary(run)
    n, learners = s["parameters"], 2
    k = round(TARGET * n)
    assert [r["round"] for r in rows if r["regrown"]] == [3, 6]
    assert all(r["pruned"] == r["regrown"] for r in rows[1:])  # reconfiguration keeps the density
    assert rows[0]["pruned"] == k and rows[0]["regrown"] == 0  # the start mask, counted in round 1
    assert all(r["sparsity_sent"] == pytest.approx(TARGET, abs=1 / n) for r in rows)
    assert all(r["sparsity"] == pytest.approx(TARGET, abs=1 / n) for r in rows)  # regrown values are not zeros
    assert rows[2]["bytes_up"] - rows[1]["bytes_up"] == 4 * n * learners  # same mask, plus the squared gradients
    assert rows[5]["bytes_up"] - rows[4]["bytes_up"] == 4 * n * learners
    assert s["final_sparsity"] == pytest.approx(TARGET, abs=0.005)
    assert rows[-1]["test_mae"] < rows[0]["test_mae"] and s["final_mae"] < s["baseline_mae"]


def test_local_vote_only_records_the_votes_own_sparsity(split, tmp_path):
    """The authors' Local merge: the global model is whatever the vote keeps. With two learners the
    quorum is one, so the union of their masks survives and the model lags the schedule; metrics
    record the model's own sparsity next to the target. (With the reference rule a position one of two
    learners kept is halved, which ruins this tiny model: the kept rule averages over the keepers.)"""
    run = _run(split, tmp_path, "fedsparsify-local", "federation.merge=kept")
    rows, s = metrics(run), summary(run)
    sparsities = [r["sparsity"] for r in rows]
    assert sparsities == sorted(sparsities) and sparsities[-1] > 0.3
    assert any(r["sparsity"] < r["target_sparsity"] - 0.01 for r in rows)
    assert s["final_sparsity"] == pytest.approx(sparsities[-1]) and s["final_sparsity"] <= TARGET + 0.005
    assert s["final_mae"] < s["baseline_mae"]


def test_random_pruning_reaches_its_target(split, tmp_path):
    """Random pruning is the weak baseline: it may cut the output bias (the mean age), so only its
    sparsity and the sanity of its model are asserted."""
    run = _run(split, tmp_path, "random")
    s = summary(run)
    assert s["final_sparsity"] == pytest.approx(TARGET, abs=0.005)
    assert np.isfinite(s["final_mae"])


def test_fedavg_stays_dense_and_learns(split, tmp_path):
    run = _run(split, tmp_path, "fedavg")
    rows, s = metrics(run), summary(run)
    assert s["final_sparsity"] < 0.01
    assert rows[-1]["test_mae"] < rows[0]["test_mae"] and s["final_mae"] < s["baseline_mae"]
    assert all(not r["mask_sent"] for r in rows[1:]), "the mask goes out once when it never changes"


@pytest.mark.parametrize("algorithm", ["fedsparsify-global", "fedsparsify-local"])
def test_bytes_on_the_wire_follow_sparsity(split, tmp_path, algorithm):
    """A round's payload is at most 1.05 x (1 - s) x dense, plus the mask in rounds where it is sent."""
    run = _run(split, tmp_path, algorithm)
    s = summary(run)
    n, learners = s["parameters"], 2
    mask_bytes = learners * (math.ceil(n / 8) + 24)
    for r in metrics(run):
        keep = 1 - r["sparsity_sent"]
        down_allowance = mask_bytes if r["mask_sent"] else 0
        up_allowance = 0 if ALGORITHMS[algorithm].shared_mask else mask_bytes  # learners send their own masks
        assert r["bytes_down"] <= 1.05 * keep * r["dense_bytes_down"] + down_allowance, r
        assert r["bytes_up"] <= 1.05 * keep * r["dense_bytes_up"] + up_allowance, r
        assert r["bytes_down"] > 0 and r["bytes_up"] > 0
    late = metrics(run)[-1]
    assert late["bytes_up"] < 0.2 * late["dense_bytes_up"]
    assert s["total_bytes_down"] == sum(r["bytes_down"] for r in metrics(run))
    # after the last row: the STOP header, each learner's farewell (8 bytes) and the final STOP header
    assert s["closing_bytes"] == learners * (5 * 8 + 8 + 5 * 8)


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
