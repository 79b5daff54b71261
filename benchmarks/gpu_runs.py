"""The federation tables of benchmarks/gpu_check.sh, from the runs' own records (printed numbers, not a test).

    python benchmarks/gpu_runs.py rounds RUN_DIR               # each round's breakdown, and the steady round time
    python benchmarks/gpu_runs.py compare RUNS_DIR NAME NAME...  # runs on the same cohort and seed, side by side

`compare` says whether each run ended with the first one's model bit for bit (their summaries' model_sha256; cuDNN's
algorithm choice may differ between runs on a GPU) and, where not, how far apart their parameters are.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fedmpi.checkpoint import load_model

KEYS = (
    "seconds_train",
    "seconds_setup",
    "seconds_encode",
    "seconds_send",
    "seconds_collect",
    "seconds_aggregate",
    "seconds_eval",
    "seconds_checkpoint",
    "seconds_comm",
)


def rows_of(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def steady(rows: list[dict]) -> tuple[float, float] | None:
    """(seconds a round by the server's clock, the slowest learner's median training) over rounds 3..n: past
    start-up and the first rounds' one-off costs (cuDNN's autotuning); None under 4 rounds."""
    if len(rows) < 4:
        return None
    per_round = (rows[-1]["wall_seconds"] - rows[1]["wall_seconds"]) / (len(rows) - 2)
    return per_round, float(np.median([r["seconds_train"] for r in rows[2:]]))


def startup(run: Path) -> None:
    """Each rank's start-up phases (ranks.json, fedmpi.startup): what round 1 would have waited for."""
    ranks = [r for r in json.loads((run / "ranks.json").read_text()) if "startup" in r]
    if not ranks:
        return
    phases = list(ranks[0]["startup"])
    print("| rank | " + " | ".join(phases) + " |")
    print("|---|" + "---:|" * len(phases))
    for r in ranks:
        print(f"| {r['role']} | " + " | ".join(f"{r['startup'][k]:.2f}" for k in phases) + " |")
    print()


def rounds(run: Path) -> None:
    if (run / "ranks.json").exists():
        startup(run)
    rows = rows_of(run)
    print("| round | wall | " + " | ".join(k.replace("seconds_", "") for k in KEYS) + " | bytes up | bytes down |")
    print("|" + "---:|" * (len(KEYS) + 4))
    previous = 0.0
    for r in rows:
        print(
            f"| {r['round']} | {r['wall_seconds'] - previous:.3f} | "
            + " | ".join(f"{r[k]:.3f}" for k in KEYS)
            + f" | {r['bytes_up'] / 1e6:.1f} MB | {r['bytes_down'] / 1e6:.1f} MB |"
        )
        previous = r["wall_seconds"]
    figures = steady(rows)
    if figures:
        per_round, train = figures
        print(
            f"steady state, rounds 3-{len(rows)}: {per_round:.3f} s a round by the server's clock; the slowest "
            f"learner's training {train:.3f} s (median): {per_round / train:.2f} x"
        )


def compare(runs: Path, names: list[str]) -> None:
    print("\n| run | train.amp | train.deterministic | test MAE | sparsity | s/round (rounds 3..n) | model sha256 |")
    print("|---|---|---|---:|---:|---:|---|")
    done = [name for name in names if (runs / name / "summary.json").exists()]
    amp, digest, values = {}, {}, {}
    for name in done:
        summary = json.loads((runs / name / "summary.json").read_text())
        train = json.loads((runs / name / "config.json").read_text())["train"]
        amp[name], digest[name] = train["amp"], summary["model_sha256"]
        values[name] = load_model(runs / name / "model.npz")[0]
        figures = steady(rows_of(runs / name))
        print(
            f"| {name} | {amp[name]} | {train.get('deterministic', False)} | {summary['final_mae']:.4f} | "
            f"{summary['final_sparsity']:.3f} | "
            f"{f'{figures[0]:.3f}' if figures else '-'} | {digest[name][:16]} |"
        )
    for name in done[1:]:
        first = done[0]
        if digest[name] == digest[first]:  # checkpoint.model_digest: the parameters' float32 bytes
            same = "the same model bit for bit"
        else:
            same = f"largest gap {float(np.max(np.abs(values[name].astype(np.float64) - values[first]))):.3g}"
        print(f"{name} against {first} (train.amp {amp[name]} against {amp[first]}): parameters: {same}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="what", required=True)
    sub.add_parser("rounds").add_argument("run", type=Path)
    both = sub.add_parser("compare")
    both.add_argument("runs", type=Path)
    both.add_argument("names", nargs="+")
    args = ap.parse_args()
    if args.what == "rounds":
        rounds(args.run)
    else:
        compare(args.runs, args.names)
    return 0


if __name__ == "__main__":
    sys.exit(main())
