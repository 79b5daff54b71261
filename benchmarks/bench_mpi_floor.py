"""The round benchmark's resolution: its compute floor against the same floor run in MPI ranks.

bench_round.py compares the federation under mpirun with a floor run as plain processes. This runs
the floor's work, unchanged, in MPI ranks instead: `mpirun -n N+1`, ranks 1..N doing their local
steps on in-memory batches and rank 0 idle, with a `Wire.barrier` per round and nothing else, and
alternates it with bench_round's floor. Its ratios show what launching by mpirun alone does to the
comparison, and how much the ratio scatters on this machine with no federation at all.

    python benchmarks/bench_mpi_floor.py --repeats 3
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import bench_round  # noqa: E402
from fedtools import MPIRUN, MPIRUN_FLAGS  # noqa: E402


def rank_main(learners: int, per_learner: int, rounds: int) -> None:
    """One MPI rank: bench_round's floor worker, with the trainer's Wire barrier between rounds."""
    import numpy as np
    import torch

    from fedmpi.memory import keep_freed_memory
    from fedmpi.wire import Wire

    keep_freed_memory()
    torch.set_num_threads(1)
    wire = Wire()
    if wire.rank:
        cfg, model, batches = bench_round.floor_setup(bench_round.WORKLOAD, wire.rank, per_learner)
    walls = []
    for _ in range(rounds + 1):  # round 0 warms up, as in bench_round's floor
        wire.barrier()
        began = time.perf_counter()
        if wire.rank:
            bench_round.floor_round(cfg, model, batches)
        wire.barrier()
        walls.append(time.perf_counter() - began)
    if wire.rank == 0:
        print(f"{np.median(walls[1:]):.6f}", flush=True)


def mpi_floor(learners: int, per_learner: int, rounds: int) -> float:
    """Median round of the floor run in MPI ranks, by rank 0's clock."""
    cmd = [MPIRUN, *MPIRUN_FLAGS, "-n", str(learners + 1), sys.executable, __file__, "--rank"]
    cmd += ["--learners", str(learners), "--per-learner", str(per_learner), "--rounds", str(rounds)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    if proc.returncode:
        sys.exit(proc.stdout + proc.stderr)
    return float(proc.stdout.split()[-1])


def main() -> int:
    """Alternate plain floors with MPI floors and print each repeat's ratio; with --rank (the command mpi_floor
    starts), be one rank of an MPI floor instead."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    bench_round.add_workload_arguments(ap)
    ap.add_argument("--repeats", type=int, default=3, help="MPI floors, each between two plain floors")
    ap.add_argument("--rank", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.rank:
        rank_main(args.learners, args.per_learner, args.rounds)
        return 0

    def plain() -> float:
        return bench_round.floor(bench_round.WORKLOAD, args.learners, args.per_learner, args.rounds).median

    print("| repeat | floor s/round (before, after) | MPI floor s/round | ratio |\n|---:|---|---:|---:|")
    before = plain()
    for rep in range(1, args.repeats + 1):
        ranks = mpi_floor(args.learners, args.per_learner, args.rounds)
        after = plain()
        print(f"| {rep} | {before:.3f}, {after:.3f} | {ranks:.3f} | {ranks / ((before + after) / 2):.3f} |", flush=True)
        before = after
    return 0


if __name__ == "__main__":
    sys.exit(main())
