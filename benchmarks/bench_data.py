"""Data-path throughput: synthesis and preprocessing (subjects/s), HDF5 reads (volumes/s, MB/s).

Reads are timed for 2 mm float16 volumes from the page cache on one pinned core, through
the trainer's VolumeDataset (fast raw-chunk path, float32 tensors out) and through plain
h5py for comparison. When the `register` extra is installed, registration of a scanner-space
cohort (`nifti --register affine`, with and without `--skull-strip deepbet`) is timed with one
worker, which uses one thread; its CPU seconds per subject are printed too, as they are less
sensitive to other load on the machine than wall time. Prints a markdown table; numbers go to
docs/data.md and docs/registration.md.

    python benchmarks/bench_data.py [--subjects 16] [--volumes 200]
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def _pin_one_core() -> str:
    if hasattr(os, "sched_setaffinity"):
        core = min(os.sched_getaffinity(0))
        os.sched_setaffinity(0, {core})
        return f"pinned to CPU {core}"
    return "not pinned"


def _timed(fn, repeat: int = 3) -> float:
    """Best wall time of `repeat` runs (the page cache is warm after the first)."""
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def _registration_rows(tmp: Path, subjects: int) -> list[tuple[str, str, str]]:
    """nifti --register affine [--skull-strip deepbet] on a native-space cohort, one worker (one thread)."""
    from fedmpi.errors import MissingExtra
    from preprocess import convert, register, synth

    rows = []
    t = time.perf_counter()
    synth.write_cohort(tmp / "native", subjects, seed=0, workers=1, space="native")
    dt = time.perf_counter() - t
    rows.append(("synth --space native, 1 worker", f"{subjects / dt:.2f} subjects/s", f"{dt / subjects:.2f} s/subject"))
    for strip in ("none", "deepbet"):
        flags = "--register affine" + ("" if strip == "none" else " --skull-strip deepbet")
        try:
            register.require_extra("affine", strip)
        except MissingExtra as exc:
            rows.append((f"nifti --voxel 4 {flags}", "not measured", str(exc)))
            continue
        cpu, t = time.process_time(), time.perf_counter()
        convert.convert(
            tmp / "native", tmp / f"reg-{strip}.h5", voxel=4, workers=1, registration=register.Options("affine", strip)
        )
        dt, cpu = time.perf_counter() - t, time.process_time() - cpu
        rows.append(
            (
                f"nifti --voxel 4 {flags}, 1 worker",
                f"{subjects / dt:.2f} subjects/s",
                f"{dt / subjects:.2f} s/subject wall, {cpu / subjects:.2f} s/subject CPU",
            )
        )
    return rows


def main() -> None:
    """Time each step of the data path on a fresh cohort in a temporary directory, and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--subjects", type=int, default=16, help="subjects to synthesise and preprocess")
    parser.add_argument("--volumes", type=int, default=200, help="rows of the 2 mm read-test file")
    args = parser.parse_args()
    if args.subjects < 1 or args.volumes < 1:
        parser.error("--subjects and --volumes must be at least 1")

    from fedmpi.data import VolumeDataset
    from preprocess import convert, grid, h5io, synth

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        synth.anatomy()  # template loading is a one-off, not per subject
        grid.brain_mask(2), grid.brain_mask(4)
        t = time.perf_counter()
        synth.write_cohort(tmp / "bids", args.subjects, seed=0, workers=1)
        dt = time.perf_counter() - t
        rows.append(("synth, 1 worker", f"{args.subjects / dt:.2f} subjects/s", f"{dt / args.subjects:.2f} s/subject"))
        for voxel in (4, 2):
            out = tmp / f"v{voxel}.h5"
            t = time.perf_counter()
            convert.convert(tmp / "bids", out, voxel=voxel, workers=1)
            dt = time.perf_counter() - t
            rows.append(
                (
                    f"nifti --voxel {voxel}, 1 worker",
                    f"{args.subjects / dt:.2f} subjects/s",
                    f"{dt / args.subjects:.2f} s/subject",
                )
            )
        rows += _registration_rows(tmp, args.subjects)

        # read test file: the preprocessed 2 mm volumes repeated to --volumes rows
        with h5io.open_checked(tmp / "v2.h5") as f:
            vols = f["images"][:]
            attrs = dict(f.attrs)
        n = args.volumes
        table = {
            "age": np.full(n, 60.0),
            "subject_id": [f"r{i}" for i in range(n)],
            "sex": ["F"] * n,
            "site": ["A"] * n,
        }
        big = tmp / "read.h5"
        h5io.write_volumes(big, (vols[i % len(vols)] for i in range(n)), table, attrs)
        mb_vol = vols[0].nbytes / 1e6
        mb_file = big.stat().st_size / 1e6
        pinned = _pin_one_core()
        torch.set_num_threads(1)
        big.read_bytes()  # page cache

        ds = VolumeDataset(big)
        dt = _timed(lambda: [ds[i] for i in range(n)])
        rows.append(
            (
                "read, VolumeDataset -> float32 tensor",
                f"{n / dt:.0f} volumes/s",
                f"{n * mb_vol / dt:.0f} MB/s decoded, {mb_file / dt:.0f} MB/s compressed",
            )
        )
        with h5io.open_checked(big) as f:
            images = f["images"]
            buf = np.empty(images.shape[1:], images.dtype)
            dt = _timed(lambda: [images.read_direct(buf, np.s_[i]) for i in range(n)])
        rows.append(
            ("read, plain h5py read_direct (float16)", f"{n / dt:.0f} volumes/s", f"{n * mb_vol / dt:.0f} MB/s decoded")
        )
        cached = VolumeDataset(big, cache=True)
        [cached[i] for i in range(n)]
        dt = _timed(lambda: [cached[i] for i in range(n)])
        rows.append(("read, VolumeDataset cache=True (warm)", f"{n / dt:.0f} volumes/s", ""))

    print(
        f"\nfedmpi data benchmark: {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} CPUs, reads {pinned}; 2 mm float16 volume = {mb_vol:.2f} MB decoded, "
        f"{mb_file / n:.2f} MB stored (gzip 1); load average at the end {os.getloadavg()[0]:.1f}\n"
    )
    print("| step | throughput | notes |")
    print("|---|---|---|")
    for step, rate, note in rows:
        print(f"| {step} | {rate} | {note} |")


if __name__ == "__main__":
    main()
