"""How close a federation round gets to the training it must do (printed numbers, not a test).

The compute floor is measured the way learners actually run: N processes (one torch thread each, as
the trainer gives ranks that share a node's cores), each doing its local SGD steps on in-memory
batches of the configured model, with a barrier per round and nothing else: no MPI, no server, no
data loading. The federation is the real CLI under mpirun on the same workload. The two alternate
(floor, federation, floor, ..., federation, floor) so that machine noise shows; each federation is
compared with the mean of the floors just before and just after it, which cancels a steady drift in
the machine's speed. For every federation round the benchmark prints its wall time (between
consecutive model sends by the server), the floor, their ratio, and where the rest went, from
the trainer's own metrics.

    python benchmarks/bench_round.py                     # 8 learners x 32 volumes of 40x48x40, width 0.25
    python benchmarks/bench_round.py --repeats 3 --rounds 12 --set federation.algorithm=fedsparsify-local

Run it on a quiet machine: anything else on the cores shows up in both the floor and the federation,
but not in the same rounds. On a shared VM the speed of the cores itself drifts by 10-30% over minutes,
which is why the pairs alternate and the headline is the median of their ratios.
"""

from __future__ import annotations

import argparse
import itertools
import json
import multiprocessing as mp
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))
from fedtools import metrics, run_fedmpi, write_split  # noqa: E402

from fedmpi.sentinel import role  # noqa: E402
from fedmpi.startup import startup_line, startup_seconds  # noqa: E402

SHAPE = (40, 48, 40)
TEST_VOLUMES = 32  # the server evaluates these every eval.every rounds
WORKLOAD = [
    "model.width=0.25",
    "model.dropout=0",
    "train.epochs=1",
    "train.batch_size=4",
    "train.lr=0.001",
    "train.momentum=0",
    "train.threads=1",
    "federation.algorithm=fedavg",
    "run.checkpoint_every=1",
    "eval.batch_size=4",
]


def _floor_worker(rank: int, cfg_sets: list[str], per_learner: int, rounds: int, barrier, times) -> None:
    try:
        _floor_rounds(rank, cfg_sets, per_learner, rounds, barrier, times)
    except threading.BrokenBarrierError:  # another floor process failed: its error is the one to read
        return


def floor_setup(cfg_sets: list[str], seed: int, per_learner: int):
    """(config, model, batches) of one floor process, set up as a learner rank sets itself up: the trainer's
    allocator setting and torch threads (train.threads; 0 is OMP_NUM_THREADS, which the benchmark's federation
    sets to 1), the configured model in its memory format, and `per_learner` random volumes in batches."""
    import torch

    from fedmpi.config import load_config
    from fedmpi.device import prepare_model
    from fedmpi.memory import keep_freed_memory
    from fedmpi.model import build_model

    keep_freed_memory()  # as the trainer's ranks do at start-up
    cfg = load_config(overrides=cfg_sets)
    torch.set_num_threads(cfg.train.threads or 1)
    torch.manual_seed(seed)
    model = prepare_model(build_model(cfg, SHAPE), torch.device("cpu"), cfg.train)
    x = torch.randn(per_learner, 1, *SHAPE)
    y = torch.rand(per_learner) * 35 + 45
    bs = cfg.train.batch_size
    return cfg, model, [(x[i : i + bs], y[i : i + bs]) for i in range(0, per_learner, bs)]


def floor_round(cfg, model, batches) -> None:
    """One round of a floor process: the local training a learner's round does (training.train_round's call,
    with every train.* option), on in-memory batches."""
    from fedmpi.training import local_train, train_options

    local_train(model, batches, **train_options(cfg))


def arithmetic(cfg_sets: list[str], per_learner: int, test: int) -> tuple[float, float]:
    """(GFLOP of one learner's local training in a round, GFLOP of one evaluation of `test` volumes), by torch's
    FLOP counter over the floor's own training and the server's own prediction loop (it counts convolutions and
    matrix products, not norms, pooling or the update): the evaluation's share of a round's arithmetic, which no
    machine changes."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from fedmpi.training import predict

    threads = torch.get_num_threads()
    try:
        cfg, model, batches = floor_setup(cfg_sets, 0, per_learner)
        with FlopCounterMode(display=False) as training:
            floor_round(cfg, model, batches)
        x, bs = torch.randn(test, 1, *SHAPE), cfg.eval.batch_size
        with FlopCounterMode(display=False) as evaluation:
            predict(model, [(x[i : i + bs], torch.zeros(len(x[i : i + bs]))) for i in range(0, test, bs)])
    finally:
        torch.set_num_threads(threads)
    return training.get_total_flops() / 1e9, evaluation.get_total_flops() / 1e9


def _floor_rounds(rank: int, cfg_sets: list[str], per_learner: int, rounds: int, barrier, times) -> None:
    cfg, model, batches = floor_setup(cfg_sets, rank, per_learner)
    for t in range(rounds + 1):  # round 0 warms up (first-call kernel set-up), like the trainer's start-up
        barrier.wait()
        began = time.perf_counter()
        floor_round(cfg, model, batches)
        times[rank * (rounds + 1) + t] = time.perf_counter() - began
    barrier.wait()


def floor(cfg_sets: list[str], learners: int, per_learner: int, rounds: int) -> list[float]:
    """Barrier-to-barrier seconds of each round of N processes doing only their local steps."""
    ctx = mp.get_context("spawn")
    barrier = ctx.Barrier(learners + 1)
    times = ctx.Array("d", learners * (rounds + 1))
    procs = [
        ctx.Process(target=_floor_worker, args=(k, cfg_sets, per_learner, rounds, barrier, times))
        for k in range(learners)
    ]
    for p in procs:
        p.start()
    ended = threading.Event()
    watch = threading.Thread(target=_abort_when_one_fails, args=(procs, barrier, ended), daemon=True)
    watch.start()
    walls = []
    try:
        barrier.wait()  # all built
        for _ in range(rounds + 1):
            began = time.perf_counter()
            barrier.wait()
            walls.append(time.perf_counter() - began)
    except threading.BrokenBarrierError:
        pass  # a process failed: named below
    finally:
        ended.set()
        for p in procs:
            p.join(timeout=60)
            if p.is_alive():
                p.kill()
                p.join()
    failed = [(k, p.exitcode) for k, p in enumerate(procs) if p.exitcode]
    if failed:
        k, code = failed[0]
        why = f"killed by signal {-code}" if code < 0 else "its error above"
        sys.exit(f"compute floor: process {k} exited with code {code} ({why})")
    return walls[1:]


def _abort_when_one_fails(procs, barrier, ended: threading.Event) -> None:
    """Break the floor's barrier as soon as one of its processes has died (an exception, or a signal such as the
    kernel's out-of-memory kill), so that neither the parent nor the other processes wait for it forever."""
    while not ended.wait(0.2):
        if any(p.exitcode for p in procs):
            barrier.abort()
            return


def alone(cfg_sets: list[str], per_learner: int) -> float:
    """Seconds one learner's local steps take with nothing else running: measured at the start and at the
    end, so that a change in the machine's own speed during the benchmark shows."""
    return statistics.median(floor(cfg_sets, 1, per_learner, 3))


def federation(
    split: Path, runs: Path, cfg_sets: list[str], learners: int, rounds: int
) -> tuple[list[dict], list[dict]]:
    """The real trainer's metrics rows, with each round's wall time (`period`) added, and every rank's start-up
    phases (ranks.json)."""
    proc = run_fedmpi(
        split,
        runs,
        *cfg_sets,
        f"federation.rounds={rounds}",
        "run.name=bench",
        ranks=learners + 1,
        extra=["--overwrite"],
        timeout=3600,
    )
    if proc.returncode:
        sys.exit(proc.stdout + proc.stderr)
    rows = metrics(runs / "bench")
    for r, nxt in itertools.pairwise(rows):  # the last round has no next model sent to end it: not timed
        r["period"] = nxt["started"] - r["started"]
    table = json.loads((runs / "bench" / "ranks.json").read_text())
    if any("startup" not in rank for rank in table):
        sys.exit(f"{runs / 'bench' / 'ranks.json'}: no start-up phases (from a fedmpi before they were kept?)")
    return rows[:-1], [rank["startup"] for rank in table]


PARTS = (
    ("setup", "seconds_setup", "learner: model in, masks, loader"),
    ("encode", "seconds_encode", "learner: flat copy, encode, report"),
    ("send", "seconds_send", "server: encode + send the model"),
    ("collect", "seconds_collect", "reduce/gather after the reports"),
    ("aggregate", "seconds_aggregate", "server: decode, aggregate, prune"),
    ("eval", "seconds_eval", "server: evaluation (overlapped)"),
    ("checkpoint", "seconds_checkpoint", "server: checkpoint (overlapped)"),
)


def add_workload_arguments(ap: argparse.ArgumentParser) -> None:
    """The default workload's size (issue #10's), shared with bench_mpi_floor.py."""
    ap.add_argument("--learners", type=int, default=8)
    ap.add_argument("--per-learner", type=int, default=32, help="volumes per learner")
    ap.add_argument("--rounds", type=int, default=8)


def main() -> int:
    """Alternate floors and federations on one workload and print every federation round against its floors, then
    each federation's ratio in a summary table."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_workload_arguments(ap)
    ap.add_argument("--repeats", type=int, default=4, help="federations, each between two floors")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="passed to the trainer")
    args = ap.parse_args()
    from fedmpi.config import load_config

    if args.rounds < 3:
        ap.error("--rounds must be at least 3: round 1 is start-up, the last round has no next model sent to time it")
    cfg_sets = [*WORKLOAD, *args.set]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        split = write_split(
            tmp / "split", learners=args.learners, per_learner=args.per_learner, test=TEST_VOLUMES, shape=SHAPE
        )
        print(f"workload: {args.learners} learners x {args.per_learner} volumes {SHAPE}, {' '.join(cfg_sets)}")
        learner_gflop, eval_gflop = arithmetic(cfg_sets, args.per_learner, TEST_VOLUMES)
        every = load_config(overrides=cfg_sets).eval.every
        print(
            f"arithmetic (torch's FLOP counter): one learner's round {learner_gflop:.2f} GFLOP, the evaluation of "
            f"{TEST_VOLUMES} test volumes {eval_gflop:.2f} GFLOP, every {every} round(s): "
            f"{eval_gflop / every / (args.learners * learner_gflop):.1%} of the learners' training"
        )
        summary = []
        speed_start = alone(cfg_sets, args.per_learner)
        before = statistics.median(floor(cfg_sets, args.learners, args.per_learner, args.rounds))
        for rep in range(1, args.repeats + 1):
            rows, startup = federation(split, tmp / "runs", cfg_sets, args.learners, args.rounds)
            after = statistics.median(floor(cfg_sets, args.learners, args.per_learner, args.rounds))
            base = (before + after) / 2
            print(
                f"\n### repeat {rep}: floor {base:.3f} s/round "
                f"(median round {before:.3f} s before this federation, {after:.3f} s after)\n"
            )
            print(
                "| round | wall s | floor s | ratio | train (slowest) | "
                + " | ".join(name for name, _, _ in PARTS)
                + " |"
            )
            print("|" + "---:|" * (5 + len(PARTS)))
            for r in rows:
                parts = " | ".join(f"{r.get(key, 0.0):.3f}" for _, key, _ in PARTS)
                print(
                    f"| {r['round']} | {r['period']:.3f} | {base:.3f} | {r['period'] / base:.3f} | "
                    f"{r['seconds_train']:.3f} | {parts} |"
                )
            print(
                "\nbefore round 1: " + startup_line(startup, [role(r) for r in range(len(startup))])[len("fedmpi: ") :]
            )
            steady = [r["period"] for r in rows[1:]]
            first = rows[0]["period"]
            summary.append((rep, base, statistics.median(steady), statistics.median(steady) / base, first, startup))
            before = after
        # the last round has no next model sent to time it: the median is of rounds 2..rounds-1
        steady_rounds = f"rounds 2..{args.rounds - 1}"
        print(
            f"\n| repeat | floor s/round | federation s/round ({steady_rounds}, median) | ratio | round 1 s | "
            "start-up s | longest warm-up s |"
        )
        print("|---:|---:|---:|---:|---:|---:|---:|")
        for rep, base, fed, ratio, first, startup in summary:
            warm = max(t["warm_up"] for t in startup)
            print(
                f"| {rep} | {base:.3f} | {fed:.3f} | {ratio:.3f} | {first:.2f} | {startup_seconds(startup):.2f} | "
                f"{warm:.2f} |"
            )
        print(
            f"\none learner's round alone (the machine's speed): {speed_start:.3f} s at the start, "
            f"{alone(cfg_sets, args.per_learner):.3f} s at the end"
        )
        print("\nparts: " + "; ".join(f"{name} = {text}" for name, _, text in PARTS))
        ratios = np.array([s[3] for s in summary])
        print(
            f"\nsteady-state ratio: median {np.median(ratios):.3f} over {len(ratios)} federations (each against "
            f"the floors just before and after it; range {ratios.min():.3f} .. {ratios.max():.3f})"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
