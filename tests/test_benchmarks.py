"""The benchmarks run: they call the trainer's modules, which change under them (Wire.barrier was dropped as
unused once, and bench_aggregate and bench_mpi_floor failed on it until a review ran them)."""

import collections
import importlib.util
import json
import os
import re
import subprocess
import sys
import time
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


def test_the_round_benchmarks_floor_is_sampled_as_the_federation_is():
    """The floor runs under the same sampler as the federation, so that what measuring costs falls on both sides of
    the ratio: its rounds report the sampler's cores as a small part of the busy ones."""
    code = f"import sys; sys.path.insert(0, {str(BENCHMARKS)!r}); import bench_round; "
    code += "run = bench_round.floor(bench_round.WORKLOAD, learners=2, per_learner=4, rounds=3); "
    code += "print(run.busy, run.sampling)"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    busy, sampling = map(float, proc.stdout.split())
    assert 0 < sampling < 0.2 * busy


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


def test_the_round_benchmark_splits_the_extra_core_seconds_so_that_they_add_up():
    """Hand-computed: a 2.2 s federation round against a 2.0 s floor round on 2 cores is 0.4 core-seconds more; the
    learners' part is theirs less the floor's busy cores but for its sampling, the sampling's theirs less the
    floor's, the idle cores' theirs less the floor's idle ones."""
    bench_round = _load("bench_round")
    cores = {
        bench_round.LEARNERS: 1.8,
        bench_round.SERVER_MAIN: 0.01,
        bench_round.SERVER_OTHER: 0.1,
        bench_round.LAUNCHER: 0.0,
        bench_round.IDLE: 0.04,
        bench_round.SAMPLING: 0.01,
        bench_round.REST: 0.04,
    }
    extra = bench_round.extra_core_seconds(cores, round_s=2.2, floor_busy=1.98, floor_round_s=2.0, floor_sampling=0.008)
    assert extra[bench_round.LEARNERS] == pytest.approx(1.8 * 2.2 - (1.98 - 0.008) * 2.0)
    assert extra[bench_round.SERVER_OTHER] == pytest.approx(0.22)
    assert extra[bench_round.SAMPLING] == pytest.approx(0.01 * 2.2 - 0.008 * 2.0)
    assert extra[bench_round.IDLE] == pytest.approx(0.04 * 2.2 - 0.02 * 2.0)
    assert sum(extra.values()) == pytest.approx(2 * (2.2 - 2.0))


def test_the_round_benchmark_counts_its_own_sampling_apart_from_the_rest_of_the_machine():
    """Hand-computed: over 2 s between the samples nearest the rounds' ends, the sampler's own 0.04 CPU-seconds are
    0.02 cores, and the rest of the machine is what no part accounts for."""
    bench_round = _load("bench_round")
    sampler = bench_round.CoreSampler(root=0)
    at = collections.Counter
    sampler.samples = [
        (10.0, 100.0, at({bench_round.LEARNERS: 5.0}), 1.00),
        (11.0, 100.1, at({bench_round.LEARNERS: 6.0}), 1.02),
        (12.0, 100.2, at({bench_round.LEARNERS: 7.6, bench_round.SERVER_OTHER: 0.2}), 1.04),
    ]
    cores = sampler.cores(begin=9.9, end=12.1)
    total = os.cpu_count() or 1
    assert cores[bench_round.LEARNERS] == pytest.approx(1.3)
    assert cores[bench_round.SERVER_OTHER] == pytest.approx(0.1)
    assert cores[bench_round.IDLE] == pytest.approx(0.1)
    assert cores[bench_round.SAMPLING] == pytest.approx(0.02)
    assert cores[bench_round.REST] == pytest.approx(total - 1.52)
    assert sum(cores.values()) == pytest.approx(total)


def test_the_round_benchmark_takes_a_jobs_cpu_apart_by_rank_and_thread():
    """job_cpu reads the job's processes under the launcher: rank 0's main thread and its other threads apart,
    every other rank's processes as the learners', a process without a rank as the launcher's."""
    bench_round = _load("bench_round")
    spin = (
        "import threading, time\ndef spin(s):\n    t = time.thread_time()\n    while time.thread_time() - t < s: pass\n"
    )
    server = spin + "threading.Thread(target=lambda: (spin(0.6), time.sleep(600)), daemon=True).start()\n"
    server += "spin(0.2); time.sleep(600)"
    learner = spin + "spin(0.4); time.sleep(600)"
    launcher = "import os, subprocess, sys\n"
    launcher += f"ps = [subprocess.Popen([sys.executable, '-c', {server!r}], env=dict(os.environ, PMI_RANK='0')), "
    launcher += f"subprocess.Popen([sys.executable, '-c', {learner!r}], env=dict(os.environ, PMI_RANK='1'))]\n"
    launcher += "sys.stdin.readline()\n[p.kill() for p in ps]; [p.wait() for p in ps]\n"
    env = {k: v for k, v in os.environ.items() if k not in bench_round.RANK_VARIABLES}  # under mpirun: no rank
    job = subprocess.Popen([sys.executable, "-c", launcher], stdin=subprocess.PIPE, text=True, env=env)
    try:
        deadline, parts, ranks = time.monotonic() + 60, None, {}
        while time.monotonic() < deadline:  # until each has spun its share; the ranks kept between readings
            parts = bench_round.job_cpu(job.pid, ranks)
            spun = {bench_round.SERVER_OTHER: 0.55, bench_round.SERVER_MAIN: 0.15, bench_round.LEARNERS: 0.35}
            if all(parts[part] >= s for part, s in spun.items()):  # in clock ticks: 0.05 s short of a spin
                break
            time.sleep(0.1)
    finally:
        job.communicate("\n", timeout=30)
    assert parts is not None
    assert 0.55 <= parts[bench_round.SERVER_OTHER] < 0.75, parts  # the thread's, not the main thread's
    assert 0.15 <= parts[bench_round.SERVER_MAIN] < 0.55, parts  # its spin and its start-up (imports)
    assert 0.35 <= parts[bench_round.LEARNERS] < 0.75, parts
    assert parts[bench_round.LAUNCHER] < 0.3, parts  # it waits on its stdin
    assert ranks[job.pid] is None and sorted(r for r in ranks.values() if r is not None) == [0, 1]
