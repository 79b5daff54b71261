"""End to end: the real CLI under `mpirun -n 3` (1 server, 2 learners) on a tiny learnable split."""

import json
import math
import os
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from fedtools import MPIRUN, MPIRUN_FLAGS, metrics, run_fedmpi, summary, train_command, write_split

from fedmpi.algorithms import ALGORITHMS
from fedmpi.data import file_digest
from fedmpi.messages import STARTUP
from fedmpi.startup import startup_seconds

pytestmark = pytest.mark.slow
ROUNDS = 8
TARGET = 0.9


@pytest.fixture(scope="module")
def split(tmp_path_factory):
    return write_split(tmp_path_factory.mktemp("split"))


_RUNS: dict[tuple, Path] = {}
_LAUNCHED: dict[Path, float] = {}  # a shared run's launch, wall clock


def _run(split, tmp_path, algorithm, *sets):
    """A finished federation of these settings; tests that only read a run's records share it (the first test
    to ask for it runs it in its tmp_path)."""
    key = (split, algorithm, *sets)
    if key not in _RUNS:
        _LAUNCHED[tmp_path / "r"] = time.time()
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


def test_every_ranks_start_up_is_kept_phase_by_phase(split, tmp_path):
    """ranks.json keeps each rank's start-up phases and summary.json when the last rank was ready: round 1's wait
    for the slowest rank (its warm-up, a GPU's cuDNN search) is said, not folded into round 1's time."""
    run = _run(split, tmp_path, "fedavg")
    ranks = json.loads((run / "ranks.json").read_text())
    assert [r["rank"] for r in ranks] == [0, 1, 2] and all(r["pid"] > 0 for r in ranks)
    for r in ranks:
        phases = {k: v for k, v in r["startup"].items() if k != "ready"}
        assert list(phases) == list(STARTUP.names) and all(v >= 0 for v in phases.values())
        assert r["startup"]["ready"] == pytest.approx(sum(phases.values()), abs=0.002)
        assert phases["imports"] > 0 and phases["mpi"] > 0 and phases["volumes"] > 0
        assert (phases["warm_up"] > 0) == (r["rank"] > 0)  # the learners warm up; the server does not train
    table = [r["startup"] for r in ranks]
    assert summary(run)["startup_seconds"] == startup_seconds(table)
    # no rank's start-up reaches back before mpirun was started, nor past round 1's model going out (within /proc's
    # 10 ms ticks of a process's start, and of ranks leaving MPI_Init apart on busy cores)
    assert startup_seconds(table) <= metrics(run)[0]["started"] - _LAUNCHED[run] + 0.25


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


def test_each_node_reads_only_its_own_file_from_a_directory_of_its_own(split, tmp_path):
    """The real-site layout: each site preprocesses its own scans into its learner file, on its own node, and the
    server holds the test set; the same data.dir path names other contents on each node (here an MPMD launch, one
    directory per rank). The run records every file's digest; a node missing its file is named with its own path, and
    one whose copy differs from the server's copy of the same file is refused."""
    files = ["test.h5", "learner_1.h5", "learner_2.h5"]
    for rank, name in enumerate(files):
        (tmp_path / f"node{rank}").mkdir()
        shutil.copy(split / name, tmp_path / f"node{rank}" / name)
    runs = tmp_path / "runs"

    def launch(name):
        sets = ["federation.algorithm=fedsparsify-global", "federation.rounds=2", f"run.name={name}"]
        command = [MPIRUN, *MPIRUN_FLAGS]
        for rank in range(3):
            command += [":"] * (rank > 0) + ["-n", "1", *train_command(tmp_path / f"node{rank}", runs, sets)]
        env = dict(os.environ, OMP_NUM_THREADS="1")
        return subprocess.run(command, capture_output=True, text=True, timeout=240, env=env)

    proc = launch("sites")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    s = summary(runs / "sites")
    assert s["data_dir"] == str(tmp_path / "node0") and s["rounds"] == 2
    assert s["split"] == {name: file_digest(split / name) for name in files}
    (tmp_path / "node2" / "learner_2.h5").unlink()
    proc = launch("missing")
    assert proc.returncode == 2
    assert f"fedmpi: error: rank 2: volume file {tmp_path / 'node2' / 'learner_2.h5'}" in proc.stderr, proc.stderr
    assert not (runs / "missing" / "summary.json").exists()
    # the whole split staged to every node, one node's copy of another split: rank 0 holds the file to compare
    for name in files[1:]:
        shutil.copy(split / name, tmp_path / "node0" / name)
    shutil.copy(split / "learner_1.h5", tmp_path / "node2" / "learner_2.h5")
    proc = launch("stale")
    assert proc.returncode == 2
    assert "fedmpi: error: rank 2: its learner_2.h5 is not the copy in rank 0's" in proc.stderr, proc.stderr
    assert not (runs / "stale" / "summary.json").exists()
