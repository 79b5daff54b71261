"""The benchmarks run: they call the trainer's modules, which change under them (Wire.barrier was dropped as
unused once, and bench_aggregate and bench_mpi_floor failed on it until a review ran them)."""

import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.mpi(min_size=3)
@pytest.mark.parametrize("variant", ["fedsparsify-global", "fedsparsify-local"])
def test_bench_aggregate_runs_and_prints_its_line(variant, capsys):
    from mpi4py import MPI

    _load("bench_aggregate").main(2000, 0.9, variant, rounds=1)
    out = capsys.readouterr().out
    if MPI.COMM_WORLD.Get_rank() == 0:
        line = json.loads(out)
        assert line["variant"] == variant and line["learners"] == MPI.COMM_WORLD.Get_size() - 1
        assert line["seconds_collective"] > 0
    else:
        assert out == ""


def test_the_round_benchmarks_floor_fails_when_one_of_its_processes_does():
    """A floor process that dies (a bad --set, a crash) must end the benchmark with an error: the others and the
    parent waited at the round barrier for it forever."""
    code = f"import sys; sys.path.insert(0, {str(BENCHMARKS)!r}); import bench_round; "
    code += "bench_round.floor(['train.amp=fp8'], learners=2, per_learner=1, rounds=1)"
    try:
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    except subprocess.TimeoutExpired:
        pytest.fail("the floor waited for a process that had died")
    assert proc.returncode != 0
    assert re.search(r"compute floor: process [01] exited with code 1 \(its error above\)", proc.stderr)
    assert "train.amp must be one of" in proc.stderr


def test_the_round_benchmarks_floor_trains_as_the_learners_do(monkeypatch):
    """The compute floor is the learners' own training on in-memory batches: every train.* option that the learners'
    local training takes reaches the floor's too (it dropped weight decay, FedProx's term and channels-last, and
    ran one thread whatever train.threads said), and nothing else differs but the data."""
    import torch

    import fedmpi.memory
    import fedmpi.training
    from fedmpi.config import load_config

    bench_round = _load("bench_round")
    sets = [
        *bench_round.WORKLOAD,
        "train.weight_decay=0.01",
        "train.prox_mu=0.1",
        "train.channels_last=true",
        "train.momentum=0.5",
        "train.amp=bf16",
        "train.epochs=2",
        "train.threads=2",
    ]
    calls = []
    monkeypatch.setattr(fedmpi.training, "local_train", lambda model, loader, **kw: calls.append(kw) or {})
    monkeypatch.setattr(fedmpi.memory, "keep_freed_memory", lambda: True)
    threads = torch.get_num_threads()
    try:
        cfg, model, batches = bench_round.floor_setup(sets, 0, per_learner=2)
        floor_threads = torch.get_num_threads()
    finally:
        torch.set_num_threads(threads)
    bench_round.floor_round(cfg, model, batches)

    class Loader:
        def for_round(self, seed):
            return batches

    fedmpi.training.train_round(load_config(overrides=sets), model, Loader(), 1, torch.device("cpu"))
    floor, learner = calls
    assert {k: v for k, v in learner.items() if k not in ("device", "masks", "squared_grads")} == floor
    assert floor_threads == 2
    assert next(model.parameters()).is_contiguous(memory_format=torch.channels_last_3d)


def test_the_round_benchmark_counts_the_evaluations_share_of_the_arithmetic():
    """The share it prints is the server's forward passes over the test volumes against the learners' steps: one
    batch each way, then twice the epochs and twice the test volumes."""
    bench_round = _load("bench_round")
    train, evaluation = bench_round.arithmetic(bench_round.WORKLOAD, per_learner=4, test=4)
    train2, evaluation2 = bench_round.arithmetic([*bench_round.WORKLOAD, "train.epochs=2"], per_learner=4, test=8)
    assert train2 == pytest.approx(2 * train) and evaluation2 == pytest.approx(2 * evaluation)
    # a step is a forward pass and a backward one of about twice its arithmetic, less the first layer's input gradient
    assert 2 * evaluation < train < 3 * evaluation
