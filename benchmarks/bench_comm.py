"""Communication and aggregation benchmark (printed numbers, not a test).

1. Bytes on the wire, measured by the trainer's own counters: the real CLI under mpirun, 8
   learners, the CPU-preset model (width 0.25 at 45x54x45, 184,625 parameters), dense FedAvg
   against FedSparsify-Global and -Local at 0.9, 0.95 and 0.99 (random volumes: only bytes matter).
2. Server aggregation time and peak memory with 2..32 learners (benchmarks/bench_aggregate.py).

    python benchmarks/bench_comm.py [--rounds 10] [--learners 2 4 8 16 32] [--parameters 1000000]
"""

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))
from fedtools import MPIRUN, MPIRUN_FLAGS, metrics, run_fedmpi, write_split  # noqa: E402

from preprocess.grid import target_grid  # noqa: E402


def wire_bytes(rounds: int) -> None:
    """Part 1: the trainer's byte counters over a short run of each algorithm and target, as a markdown table."""
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        split = write_split(tmp / "split", learners=8, per_learner=2, test=4, shape=target_grid(4)[0])
        print(f"\n### Bytes per round, 8 learners, {rounds} rounds, 184,625 parameters (width 0.25, 45x54x45)\n")
        print(
            "| algorithm | target | final sparsity | last round up | last round down | total up+down "
            "| vs dense FedAvg |"
        )
        print("|---|---|---|---|---|---|---|")
        dense_total = None
        for algo, target in [
            ("fedavg", 0.0),
            ("fedsparsify-global", 0.9),
            ("fedsparsify-global", 0.95),
            ("fedsparsify-global", 0.99),
            ("fedsparsify-local", 0.9),
            ("fedsparsify-local", 0.95),
            ("fedsparsify-local", 0.99),
        ]:
            proc = run_fedmpi(
                split,
                tmp / "runs",
                f"federation.algorithm={algo}",
                f"federation.target={target}",
                f"federation.rounds={rounds}",
                "run.name=b",
                "model.width=0.25",
                "train.epochs=1",
                "run.checkpoint_every=0",
                ranks=9,
                timeout=1200,
            )
            if proc.returncode:
                sys.exit(proc.stdout + proc.stderr)
            rows = metrics(tmp / "runs" / "b")
            total = sum(r["bytes_up"] + r["bytes_down"] for r in rows)
            dense_total = dense_total or total
            last = rows[-1]
            print(
                f"| {algo} | {target} | {last['sparsity']:.3f} | {last['bytes_up'] / 1e6:.3f} MB "
                f"| {last['bytes_down'] / 1e6:.3f} MB | {total / 1e6:.2f} MB | {total / dense_total:.3f} |",
                flush=True,
            )


def aggregation(learners: list[int], n: int) -> None:
    """Part 2: bench_aggregate.py under mpirun for each learner count and both merge paths, as a markdown table."""
    print(f"\n### Server aggregation, {n:,} parameters at sparsity 0.9 (mean of 3 rounds)\n")
    print("| learners | variant | collective s | aggregate s | server peak RSS MB |")
    print("|---|---|---|---|---|")
    for k in learners:
        for variant in ("fedsparsify-global", "fedsparsify-local"):
            out = subprocess.run(
                [
                    MPIRUN,
                    *MPIRUN_FLAGS,
                    "-n",
                    str(k + 1),
                    sys.executable,
                    str(HERE / "bench_aggregate.py"),
                    str(n),
                    "0.9",
                    variant,
                ],
                capture_output=True,
                text=True,
                timeout=600,
            )
            if out.returncode:
                sys.exit(out.stdout + out.stderr)
            r = json.loads(out.stdout.strip().splitlines()[-1])
            print(
                f"| {k} | {variant} | {r['seconds_collective']:.3f} | {r['seconds_aggregate']:.3f} "
                f"| {r['server_peak_mb']:.0f} |",
                flush=True,
            )


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--learners", type=int, nargs="+", default=[2, 4, 8, 16, 32])
    ap.add_argument("--parameters", type=int, default=1_000_000)
    args = ap.parse_args()
    wire_bytes(args.rounds)
    aggregation(args.learners, args.parameters)
