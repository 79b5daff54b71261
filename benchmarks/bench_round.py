"""How close a federation round gets to the training it must do (printed numbers, not a test).

The compute floor is measured the way learners actually run: N processes (one torch thread each, as
the trainer gives ranks that share a node's cores), each doing its local SGD steps on in-memory
batches of the configured model, with a barrier per round and nothing else: no MPI, no server, no
data loading. The federation is the real CLI under mpirun on the same workload. The two alternate
(floor, federation, floor, ..., federation, floor) so that machine noise shows; each federation is
compared with the mean of the floors just before and just after it, which cancels a steady drift in
the machine's speed. For every federation round the benchmark prints its wall time (between
consecutive model sends by the server), the floor, their ratio, and where the rest went, from
the trainer's own metrics; then, for its steady rounds, the same excess in core-seconds, read from /proc
while the job runs: the learners' processes against the floor's, the server's main thread, its other
threads (the evaluation and checkpoint that overlap the learners' training), the launcher, the sampling itself,
the rest of the machine and the idle cores. On cores that every rank shares, that split, not the wall times of
overlapped work, says what a round costs beyond its training.

    python benchmarks/bench_round.py                     # 8 learners x 32 volumes of 40x48x40, width 0.25
    python benchmarks/bench_round.py --repeats 3 --rounds 12 --set federation.algorithm=fedsparsify-local

Run it on a quiet machine: anything else on the cores shows up in both the floor and the federation,
but not in the same rounds. On a shared VM the speed of the cores itself drifts by 10-30% over minutes,
which is why the pairs alternate and the headline is the median of their ratios.
"""

from __future__ import annotations

import argparse
import collections
import itertools
import json
import multiprocessing as mp
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import NamedTuple

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))
from fedtools import kill_job, metrics, start_fedmpi, write_split  # noqa: E402

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


TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
RANK_VARIABLES = ("PMI_RANK", "OMPI_COMM_WORLD_RANK")  # MPICH's hydra, Open MPI
SERVER_MAIN, SERVER_OTHER, LEARNERS, LAUNCHER = (
    "server: main thread",
    "server: other threads (evaluation, checkpoint)",
    "learners",
    "launcher",
)
IDLE, SAMPLING, REST = "idle", "this benchmark's sampling", "rest of the machine"
SAMPLE_EVERY = 0.2  # seconds between readings of /proc while a federation runs


def idle_seconds() -> float:
    """Seconds the machine's cores have been idle since boot, all cores together (/proc/stat: idle + iowait)."""
    fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()
    return (int(fields[4]) + int(fields[5])) / TICKS


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


class FloorRun(NamedTuple):
    walls: list[float]  # barrier-to-barrier seconds of each round after the warm-up
    busy: float  # mean cores the machine kept busy over those rounds (the floor's processes and anything else)
    sampling: float  # mean cores of those that the benchmark's sampling took (a part of busy)

    @property
    def median(self) -> float:
        return statistics.median(self.walls)


def floor(cfg_sets: list[str], learners: int, per_learner: int, rounds: int) -> FloorRun:
    """N processes doing only their local steps, a barrier per round."""
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
    walls, idle, clock = [], [], []
    sampler = CoreSampler(os.getpid())  # as the federation is sampled: what measuring costs falls on both
    try:
        barrier.wait()  # all built
        sampler.start()
        for _ in range(rounds + 1):
            began = time.perf_counter()
            idle.append(idle_seconds())
            clock.append(time.time())
            barrier.wait()
            walls.append(time.perf_counter() - began)
        idle.append(idle_seconds())
        clock.append(time.time())
    except threading.BrokenBarrierError:
        pass  # a process failed: named below
    finally:
        sampler.stop()
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
    busy = (os.cpu_count() or 1) - (idle[-1] - idle[1]) / sum(walls[1:])
    return FloorRun(walls[1:], busy, sampler.cores(clock[1], clock[-1])[SAMPLING])


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
    return floor(cfg_sets, 1, per_learner, 3).median


def _cpu_seconds(stat: str) -> float:
    """User + system seconds from a /proc .../stat line (fields 14 and 15; the name may hold spaces)."""
    fields = stat.rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def _children(pid: int) -> list[int]:
    kids: list[int] = []
    for tid in os.listdir(f"/proc/{pid}/task"):
        kids += [int(k) for k in Path(f"/proc/{pid}/task/{tid}/children").read_text().split()]
    return kids


def _rank_of(pid: int) -> int | None:
    env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    for var in RANK_VARIABLES:
        for item in env:
            if item.startswith(var.encode() + b"="):
                return int(item.split(b"=", 1)[1])
    return None


def job_cpu(root: int, ranks: dict[int, int | None] | None = None) -> collections.Counter:
    """CPU seconds so far of each part of the job under process `root` (the launcher): every rank's processes
    by role, rank 0's split into main threads and the others (the recorder's evaluation and checkpoint). A
    process that ends between two readings takes its seconds with it. `ranks` keeps each process's rank from one
    reading to the next (its environment does not change), which makes a reading cheaper."""
    parts: collections.Counter = collections.Counter()
    todo, ranks = [root], {} if ranks is None else ranks
    while todo:
        pid = todo.pop()
        try:
            todo += _children(pid)
            if pid not in ranks:
                ranks[pid] = _rank_of(pid)
            if ranks[pid] != 0:
                parts[LAUNCHER if ranks[pid] is None else LEARNERS] += _cpu_seconds(
                    Path(f"/proc/{pid}/stat").read_text()
                )
                continue
            for tid in os.listdir(f"/proc/{pid}/task"):  # the rank's sentinel, a main thread that waits, adds ~0
                parts[SERVER_MAIN if int(tid) == pid else SERVER_OTHER] += _cpu_seconds(
                    Path(f"/proc/{pid}/task/{tid}/stat").read_text()
                )
        except (FileNotFoundError, ProcessLookupError, ValueError):  # gone meanwhile
            continue
    return parts


class CoreSampler(threading.Thread):
    """Samples the machine's idle time and the job's CPU by part every `every` seconds while the job runs, so that
    a span of rounds can be split into core-seconds: the learners', the server's threads', the launcher's, the
    idle cores', its own (what measuring costs; the floors are sampled too, so it falls on both sides) and the
    rest of the machine's."""

    def __init__(self, root: int, every: float = SAMPLE_EVERY):
        super().__init__(daemon=True)
        self.root, self.every = root, every
        self.samples: list[tuple[float, float, collections.Counter, float]] = []
        self.ranks: dict[int, int | None] = {}
        self.done = threading.Event()

    def run(self) -> None:
        self._read()
        while not self.done.wait(self.every):
            self._read()
        self._read()  # once done: a span that ends then is within a reading of its last sample

    def stop(self) -> None:
        """Take the last reading and end the thread (nothing to do if it never started)."""
        self.done.set()
        if self.is_alive():
            self.join()

    def _read(self) -> None:
        self.samples.append((time.time(), idle_seconds(), job_cpu(self.root, self.ranks), time.thread_time()))

    def cores(self, begin: float, end: float) -> dict[str, float]:
        """Mean cores each part kept busy from `begin` to `end` (time.time()), between the samples nearest them;
        they add up to the machine's cores."""
        (t0, idle0, cpu0, own0), (t1, idle1, cpu1, own1) = (
            min(self.samples, key=lambda s: abs(s[0] - at)) for at in (begin, end)
        )
        if t1 <= t0:
            raise ValueError("no samples span the rounds: too few rounds to sample")
        span, total = t1 - t0, os.cpu_count() or 1
        out = {part: (cpu1[part] - cpu0[part]) / span for part in (LEARNERS, SERVER_MAIN, SERVER_OTHER, LAUNCHER)}
        out[IDLE] = (idle1 - idle0) / span
        out[SAMPLING] = (own1 - own0) / span
        out[REST] = total - sum(out.values())
        return out


def extra_core_seconds(
    cores: dict[str, float], round_s: float, floor_busy: float, floor_round_s: float, floor_sampling: float
) -> dict:
    """Core-seconds a federation round spends beyond a floor round, by part: the learners' against the floor's busy
    cores less its sampling, the sampling and the idle cores' against the floor's, every other part whole. They add
    up to the difference of the two rounds times the machine's cores (`cores` adds up to them: CoreSampler.cores)."""
    total = sum(cores.values())
    out = {part: n * round_s for part, n in cores.items() if part not in (LEARNERS, IDLE, SAMPLING)}
    out = {LEARNERS: cores[LEARNERS] * round_s - (floor_busy - floor_sampling) * floor_round_s, **out}
    out[SAMPLING] = cores[SAMPLING] * round_s - floor_sampling * floor_round_s
    out[IDLE] = cores[IDLE] * round_s - (total - floor_busy) * floor_round_s
    return out


def federation(
    split: Path, runs: Path, cfg_sets: list[str], learners: int, rounds: int
) -> tuple[list[dict], list[dict], dict[str, float]]:
    """The real trainer's metrics rows, with each round's wall time (`period`) added, every rank's start-up
    phases (ranks.json), and the mean cores each part of the job kept busy over rounds 2.. (CoreSampler)."""
    job = start_fedmpi(
        split,
        runs,
        *cfg_sets,
        f"federation.rounds={rounds}",
        "run.name=bench",
        ranks=learners + 1,
        extra=["--overwrite"],
    )
    sampler = CoreSampler(job.pid)
    sampler.start()
    try:
        out, err = job.communicate(timeout=3600)
    except BaseException:  # timed out or interrupted: no ranks left running, as subprocess.run's timeout did
        kill_job(job)
        raise
    finally:
        sampler.stop()
    if job.returncode:
        sys.exit(out + err)
    rows = metrics(runs / "bench")
    for r, nxt in itertools.pairwise(rows):  # the last round has no next model sent to end it: not timed
        r["period"] = nxt["started"] - r["started"]
    table = json.loads((runs / "bench" / "ranks.json").read_text())
    if any("startup" not in rank for rank in table):
        sys.exit(f"{runs / 'bench' / 'ranks.json'}: no start-up phases (from a fedmpi before they were kept?)")
    return rows[:-1], [rank["startup"] for rank in table], sampler.cores(rows[1]["started"], rows[-1]["started"])


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
        before = floor(cfg_sets, args.learners, args.per_learner, args.rounds)
        for rep in range(1, args.repeats + 1):
            rows, startup, cores = federation(split, tmp / "runs", cfg_sets, args.learners, args.rounds)
            after = floor(cfg_sets, args.learners, args.per_learner, args.rounds)
            base = (before.median + after.median) / 2
            print(
                f"\n### repeat {rep}: floor {base:.3f} s/round (median round {before.median:.3f} s before this "
                f"federation, {after.median:.3f} s after)\n"
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
            steady = statistics.median(r["period"] for r in rows[1:])
            extra = extra_core_seconds(
                cores, steady, (before.busy + after.busy) / 2, base, (before.sampling + after.sampling) / 2
            )
            floor_round_cs = (os.cpu_count() or 1) * base
            print(
                f"\nwhere the extra {steady / base - 1:.1%} went, rounds 2..{args.rounds - 1} (core-seconds a round "
                f"beyond the floor's {floor_round_cs:.3f}): "
                + "; ".join(f"{part} {cs:+.3f} ({cs / floor_round_cs:+.1%})" for part, cs in extra.items())
            )
            summary.append(
                (
                    rep,
                    base,
                    steady,
                    steady / base,
                    rows[0]["period"],
                    startup,
                    extra[LEARNERS] / floor_round_cs,
                    extra[SERVER_OTHER] / floor_round_cs,
                    extra[SAMPLING] / floor_round_cs,
                )
            )
            before = after
        # the last round has no next model sent to time it: the median is of rounds 2..rounds-1
        steady_rounds = f"rounds 2..{args.rounds - 1}"
        print(
            f"\n| repeat | floor s/round | federation s/round ({steady_rounds}, median) | ratio | round 1 s | "
            "start-up s | longest warm-up s | learners' CPU beyond the floor's | server's other threads | "
            "sampling beyond the floor's |"
        )
        print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        for rep, base, fed, ratio, first, startup, learners_extra, recorder, sampling in summary:
            warm = max(t["warm_up"] for t in startup)
            print(
                f"| {rep} | {base:.3f} | {fed:.3f} | {ratio:.3f} | {first:.2f} | {startup_seconds(startup):.2f} | "
                f"{warm:.2f} | {learners_extra:+.1%} | {recorder:.1%} | {sampling:.1%} |"
            )
        print(
            f"\none learner's round alone (the machine's speed): {speed_start:.3f} s at the start, "
            f"{alone(cfg_sets, args.per_learner):.3f} s at the end"
        )
        print("\nparts: " + "; ".join(f"{name} = {text}" for name, _, text in PARTS))
        print(
            f"core-seconds: CPU from /proc, sampled every {SAMPLE_EVERY} s over the steady rounds; each part's share "
            "is of the floor's round times the machine's cores, so the shares add up to the ratio's excess (the "
            "learners', the sampling's and the idle cores' against the floor's, which is sampled the same way, the "
            "rest whole)"
        )
        ratios = np.array([s[3] for s in summary])
        print(
            f"\nsteady-state ratio: median {np.median(ratios):.3f} over {len(ratios)} federations (each against "
            f"the floors just before and after it; range {ratios.min():.3f} .. {ratios.max():.3f})"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
