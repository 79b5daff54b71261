"""Training-step and evaluation time of the brain-age model on this machine's CPU (printed numbers).

The full-size model (width 1, 91x109x91, 2,948,801 parameters) costs about 68 GFLOP per training
sample (forward and backward), so a CPU step takes seconds, not the fraction of a second a GPU
needs; the CPU presets (quarter width at 4 mm and 6 mm) are what a laptop can train.

    python benchmarks/bench_model.py                 # every preset, 1 and all threads
    python benchmarks/bench_model.py --steps 5 --presets full
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from fedmpi.model import BrainAgeCNN
from fedmpi.training import local_train, predict
from preprocess.grid import target_grid

PRESETS = {
    "full": (target_grid(2)[0], 1.0, "the paper's model at 2 mm"),
    "cpu-4mm": (target_grid(4)[0], 0.25, "the demo's preset"),
    "study-6mm": (target_grid(6)[0], 0.25, "the CPU study's preset"),
}


def measure(shape, width: float, batch: int, steps: int) -> tuple[float, float]:
    """(seconds per training step, seconds per evaluated volume)."""
    torch.manual_seed(0)
    model = BrainAgeCNN(shape, width=width, dropout=0.0)
    data = [(torch.randn(batch, 1, *shape), torch.full((batch,), 60.0))]
    local_train(model, data, epochs=1, lr=1e-4)  # warm-up: first-call kernel set-up
    began = time.perf_counter()
    local_train(model, data * steps, epochs=1, lr=1e-4)
    step = (time.perf_counter() - began) / steps
    began = time.perf_counter()
    predict(model, data * steps)
    return step, (time.perf_counter() - began) / (steps * batch)


def main() -> int:
    """Print a table row per preset and thread count (one thread, and every core)."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--presets", nargs="+", default=list(PRESETS), choices=list(PRESETS))
    args = ap.parse_args()
    cores = len(os.sched_getaffinity(0))
    print(f"torch {torch.__version__}, {cores} cores; batch {args.batch}, float32\n")
    print(
        "| preset | volumes | width | parameters | threads | s / training step | s / sample (train) "
        "| s / volume (eval) |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for name in args.presets:
        shape, width, what = PRESETS[name]
        params = sum(p.numel() for p in BrainAgeCNN(shape, width=width).parameters())
        for threads in sorted({1, cores}):
            torch.set_num_threads(threads)
            step, evaluated = measure(shape, width, args.batch, args.steps)
            print(
                f"| {name} ({what}) | {'x'.join(map(str, shape))} | {width:g} | {params:,} | {threads} "
                f"| {step:.3f} | {step / args.batch:.3f} | {evaluated:.3f} |",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
