"""Run the study grid: {algorithms} x {distributions} x {targets}, then the membership-inference
attack on every run, then one report (results.md, results.csv, plots).

    python jobs/sweep.py --preset cpu --out runs/study --report docs/results   # local, mpirun
    python jobs/sweep.py --preset paper --slurm --out runs/paper               # SLURM job array
    python jobs/sweep.py --collect --out runs/paper --report docs/paper        # after the array

The cpu preset is the CPU-scale study (4 mm synthetic cohort, jobs/configs/study-cpu.yaml);
the paper preset uses the configs in jobs/configs/paper/ (point their data.dir at your splits).
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from make_configs import configs  # noqa: E402

# The CPU study fits in about 30 minutes on 2 cores: every method on uniform-iid (the pruning
# variants at 0.9, 0.95 and 0.99, the other baselines at 0.95), and FedAvg against both variants
# at 0.95 and Global at 0.99 on the two non-IID distributions.
CPU_GRID = {
    "uniform-iid": {"fedavg": (0.0,), "fedsparsify-global": (0.9, 0.95, 0.99), "fedsparsify-local": (0.9, 0.95, 0.99),
                    "oneshot": (0.95,), "random": (0.95,), "snip": (0.95,)},
    "uniform-noniid": {"fedavg": (0.0,), "fedsparsify-global": (0.95, 0.99), "fedsparsify-local": (0.95,)},
    "skewed-noniid": {"fedavg": (0.0,), "fedsparsify-global": (0.95, 0.99), "fedsparsify-local": (0.95,)},
}


def cpu_runs(out: Path):
    base = yaml.safe_load((HERE / "configs" / "study-cpu.yaml").read_text())
    for dist, grid in CPU_GRID.items():
        for algo, targets in grid.items():
            for target in targets:
                name = f"{algo}-{dist}" + (f"-{target}" if algo != "fedavg" else "")
                sets = [f"data.distribution={dist}", f"federation.algorithm={algo}", f"federation.target={target}",
                        f"run.name={name}", f"run.dir={out}"]
                yield name, base["federation"]["learners"], sets


def run(cmd: list[str]) -> None:
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=("cpu", "paper"), default="cpu")
    ap.add_argument("--out", type=Path, default=Path("runs/study"), help="parent directory of the runs")
    ap.add_argument("--report", type=Path, help="write the report here (default: OUT/report)")
    ap.add_argument("--slurm", action="store_true", help="paper preset: write the config list and submit an array")
    ap.add_argument("--collect", action="store_true", help="skip training: attack and report the runs in OUT")
    ap.add_argument("--mpirun", default=str(Path(sys.executable).with_name("mpirun")))
    args = ap.parse_args()
    report = args.report or args.out / "report"
    began = time.time()
    if args.slurm:
        listing = args.out / "configs.txt"
        args.out.mkdir(parents=True, exist_ok=True)
        paths = []
        for name, cfg in configs():
            cfg["run"]["dir"] = str(args.out)
            path = args.out / "configs" / f"{name}.yaml"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(yaml.safe_dump(cfg, sort_keys=False))
            paths.append(str(path))
        listing.write_text("\n".join(paths) + "\n")
        run(["sbatch", f"--array=1-{len(paths)}", str(HERE / "sweep.slurm"), str(listing)])
        print(f"submitted {len(paths)} runs; when they are done: python jobs/sweep.py --collect --out {args.out}")
        return 0
    if not args.collect:
        if args.preset == "cpu":
            for name, learners, sets in cpu_runs(args.out):
                cmd = [args.mpirun, "-n", str(learners + 1), sys.executable, "-m", "fedmpi", "train",
                       "--config", str(HERE / "configs" / "study-cpu.yaml"), "--overwrite"]
                for s in sets:
                    cmd += ["--set", s]
                run(cmd)
        else:
            for name, cfg in configs():
                learners = cfg["federation"]["learners"]
                run([args.mpirun, "-n", str(learners + 1), sys.executable, "-m", "fedmpi", "train", "--config",
                     str(HERE / "configs" / "paper" / f"{name}.yaml"), "--set", f"run.dir={args.out}", "--overwrite"])
    for summary in sorted(args.out.glob("*/summary.json")):
        run([sys.executable, "-m", "fedmpi", "attack", "--run", str(summary.parent)])
    run([sys.executable, "-m", "fedmpi", "report", str(args.out), "--out", str(report)])
    print(f"study done in {(time.time() - began) / 60:.1f} minutes; report in {report}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
