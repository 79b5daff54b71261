"""Tables and plots over finished runs: `python -m fedmpi report RUN_DIR [RUN_DIR ...] --out DIR`.

Reads each run's summary.json, metrics.jsonl, config.json and (if present) attack.json, and
writes results.csv / results.md (one row per run) and PNG plots. Each plot has one panel per
data distribution, colour = algorithm and line style = target sparsity, so a whole sweep stays
readable. Table building is pure (no I/O) so it is tested without plotting.
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .algorithms import ALGORITHMS, BASELINE
from .errors import ReportError, is_user_error
from .files import atomic_write
from .runlog import RunLog, read_json

COLUMNS = ("run", "algorithm", "distribution", "target", "final_mae", "final_rmse", "final_r", "sparsity",
           "total_bytes", "bytes_ratio_vs_fedavg", "wall_seconds", "mia_auc")
ALGORITHM_ORDER = tuple(ALGORITHMS)
LINESTYLES = ("-", "--", "-.", ":")
SLICE_VIEWS = ("axial", "coronal", "sagittal")



@dataclass
class Run:
    name: str
    config: dict
    summary: dict
    metrics: list[dict]
    attack: dict | None
    distribution: str

    @property
    def algorithm(self) -> str:
        return self.summary.get("algorithm") or self.config.get("federation", {}).get("algorithm", "")

    @property
    def target(self) -> float | None:
        if self.algorithm not in ALGORITHMS or ALGORITHMS[self.algorithm].dense:
            return None
        return self.summary.get("target_sparsity", self.config.get("federation", {}).get("target"))

    @property
    def data_dir(self) -> Path | None:
        return Path(self.summary["data_dir"]) if self.summary.get("data_dir") else None


# ---------------------------------------------------------------- loading

def _read_metrics(run_dir: Path) -> list[dict]:
    log = RunLog(run_dir)
    if not log.metrics_path.exists():
        raise ReportError(f"{log.metrics_path}: missing")
    return log.checked_rows()


def _split_distribution(data_dir: Path | None) -> str:
    """The distribution recorded by `preprocess split` in test.h5, or "" when there is none."""
    if data_dir is None or not (data_dir / "test.h5").exists():
        return ""
    import h5py

    try:
        with h5py.File(data_dir / "test.h5", "r") as f:
            return json.loads(f.attrs.get("split", "{}")).get("distribution", "")
    except (OSError, ValueError):
        return ""


def load_run(path: Path) -> Run:
    """Everything the report needs from one run directory."""
    path = Path(path)
    summary = read_json(path / "summary.json", ReportError)
    config = read_json(path / "config.json", ReportError)
    attack_path = path / "attack.json"
    attack = read_json(attack_path, ReportError) if attack_path.exists() else None
    data = config.get("data", {})
    if summary.get("distribution"):
        distribution = summary["distribution"]
    elif not data.get("dir"):  # the synthetic cohort is split as data.distribution says
        distribution = data.get("distribution", "")
    else:
        distribution = _split_distribution(Path(summary["data_dir"]) if summary.get("data_dir") else None)
    return Run(path.name, config, summary, _read_metrics(path), attack, distribution)


def expand_run_dirs(paths: list[Path]) -> list[Path]:
    """Run directories from the arguments: a directory holding runs (runs/) stands for its finished runs."""
    out = []
    for p in map(Path, paths):
        if not p.is_dir():
            raise ReportError(f"{p}: not a directory")
        if (p / "summary.json").exists() or (p / "metrics.jsonl").exists():
            out.append(p)
            continue
        children = sorted(c for c in p.iterdir() if (c / "summary.json").exists())
        if not children:
            raise ReportError(f"{p}: neither a run directory (no summary.json) nor a directory of finished runs")
        out.extend(children)
    return out


# ---------------------------------------------------------------- tables (pure)

def _algorithm_rank(algorithm: str) -> tuple:
    return (ALGORITHM_ORDER.index(algorithm) if algorithm in ALGORITHM_ORDER else len(ALGORITHM_ORDER), algorithm)


def _sort_key(run: Run):
    return run.distribution, _algorithm_rank(run.algorithm), run.target or 0.0, run.name


def total_bytes(summary: dict) -> int | None:
    """Bytes up + down over the whole run, or None when the summary lacks the counters."""
    if "total_bytes_up" not in summary or "total_bytes_down" not in summary:
        return None
    return int(summary["total_bytes_up"]) + int(summary["total_bytes_down"])


def results_rows(runs: list[Run]) -> list[dict]:
    """One dict per run with COLUMNS as keys (None = blank), sorted by distribution, algorithm, target.

    bytes_ratio_vs_fedavg divides by the fedavg run of the same distribution (the first by
    name when there are several); it is None without one. mia_auc is the white-box AUC.
    """
    fedavg: dict[str, int] = {}
    for run in sorted(runs, key=lambda r: r.name):
        b = total_bytes(run.summary)
        if run.algorithm == BASELINE and b and run.distribution not in fedavg:
            fedavg[run.distribution] = b
    rows = []
    for run in sorted(runs, key=_sort_key):
        s = run.summary
        b = total_bytes(s)
        ref = fedavg.get(run.distribution)
        rows.append({
            "run": run.name, "algorithm": run.algorithm, "distribution": run.distribution, "target": run.target,
            "final_mae": s.get("final_mae"), "final_rmse": s.get("final_rmse"), "final_r": s.get("final_r"),
            "sparsity": s.get("final_sparsity"), "total_bytes": b,
            "bytes_ratio_vs_fedavg": b / ref if b is not None and ref else None,
            "wall_seconds": s.get("wall_seconds"),
            "mia_auc": run.attack["white_box"]["auc"] if run.attack else None,
        })
    return rows


def _csv_cell(v) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.6g}"
    return str(v)


def to_csv(rows: list[dict]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(COLUMNS)
    for r in rows:
        w.writerow([_csv_cell(r[c]) for c in COLUMNS])
    return buf.getvalue()


MD_FORMATS = {"target": "{:.2f}", "final_mae": "{:.2f}", "final_rmse": "{:.2f}", "final_r": "{:.3f}",
              "sparsity": "{:.3f}", "bytes_ratio_vs_fedavg": "{:.3f}", "wall_seconds": "{:.0f}",
              "mia_auc": "{:.3f}"}


def _md_cell(column: str, v) -> str:
    if v is None:
        return ""
    if column == "total_bytes":
        return f"{v / 1e6:.1f} MB"
    return MD_FORMATS.get(column, "{}").format(v)


def to_markdown(rows: list[dict]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |",
             "|" + "|".join("---" if c in ("run", "algorithm", "distribution") else "---:" for c in COLUMNS) + "|"]
    lines += ["| " + " | ".join(_md_cell(c, r[c]) for c in COLUMNS) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def cumulative_bytes(metrics: list[dict]) -> np.ndarray:
    """Bytes up + down sent by the end of each round."""
    return np.cumsum([int(r["bytes_up"]) + int(r["bytes_down"]) for r in metrics])


def line_label(run: Run) -> str:
    return run.algorithm if run.target is None else f"{run.algorithm} {run.target:g}"


# ---------------------------------------------------------------- plots

def _panels(runs: list[Run]):
    """(figure, {distribution: axis}) with one panel per distribution."""
    import matplotlib.pyplot as plt

    dists = sorted({r.distribution for r in runs})
    fig, axes = plt.subplots(1, len(dists), figsize=(5.5 * len(dists), 4.2), squeeze=False)
    panels = dict(zip(dists, axes[0]))
    for d, ax in panels.items():
        ax.set_title(d or "(distribution unknown)")
        ax.grid(True, alpha=0.3)
    return fig, panels


def _styles(runs: list[Run]) -> dict[str, dict]:
    """Matplotlib line style per run: colour by algorithm, dash pattern by target."""
    import matplotlib.pyplot as plt

    colors = plt.get_cmap("tab10").colors
    algos = sorted({r.algorithm for r in runs}, key=_algorithm_rank)
    targets = sorted({r.target for r in runs if r.target is not None})
    return {r.name: {"color": colors[algos.index(r.algorithm) % len(colors)],
                     "linestyle": "-" if r.target is None else LINESTYLES[targets.index(r.target) % len(LINESTYLES)]}
            for r in runs}


def _save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    atomic_write(path, buf.getvalue())
    return path


def _finish_panels(panels, xlabel: str, ylabel: str) -> None:
    for ax in panels.values():
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)


def plot_curves(runs: list[Run], path: Path, key: str, ylabel: str, by_bytes: bool = False,
                clip: float | None = None) -> Path:
    """metrics[key] per run against round (or cumulative bytes, log scale). With `clip`, each panel's
    y axis stops at clip x the largest first value, so one diverging run (random pruning can cut the
    output bias) does not flatten every other curve; it leaves the frame at the top."""
    fig, panels = _panels(runs)
    styles = _styles(runs)
    first: dict[str, list[float]] = {}
    for run in runs:
        values = [r[key] for r in run.metrics if r.get(key) is not None]
        if values:
            first.setdefault(run.distribution, []).append(values[0])
    for run in runs:
        rows = [r for r in run.metrics if r.get(key) is not None]
        if by_bytes:
            x_all = cumulative_bytes(run.metrics)
            x = [x_all[i] for i, r in enumerate(run.metrics) if r.get(key) is not None]
            keep = [i for i, v in enumerate(x) if v > 0]  # a centralized run sends nothing
            x, rows = [x[i] for i in keep], [rows[i] for i in keep]
        else:
            x = [r["round"] for r in rows]
        if rows:
            panels[run.distribution].plot(x, [r[key] for r in rows], label=line_label(run), **styles[run.name])
    if by_bytes:
        from matplotlib.ticker import NullFormatter

        for ax in panels.values():
            ax.set_xscale("log")
            ax.xaxis.set_minor_formatter(NullFormatter())  # minor labels overlap on a few decades
    if clip is not None:
        for dist, ax in panels.items():
            if first.get(dist):
                ax.set_ylim(0, clip * max(first[dist]))
    _finish_panels(panels, "cumulative bytes sent (up + down)" if by_bytes else "round", ylabel)
    return _save(fig, path)


def plot_mia(runs: list[Run], path: Path) -> Path:
    """White-box (filled) and black-box (hollow) attack AUC against the model's sparsity."""
    fig, panels = _panels(runs)
    styles = _styles(runs)
    seen: set = set()
    for run in runs:
        ax, color = panels[run.distribution], styles[run.name]["color"]
        x = run.attack["sparsity"]
        label = run.algorithm if (run.distribution, run.algorithm) not in seen else None
        seen.add((run.distribution, run.algorithm))
        white = run.attack["white_box"]
        ax.errorbar([x], [white["auc"]], yerr=[white.get("auc_se", 0.0)], fmt="o", color=color, label=label,
                    capsize=3)
        ax.scatter([x], [run.attack["black_box"]["auc"]], facecolors="none", edgecolors=color)
    for ax in panels.values():
        ax.axhline(0.5, color="grey", linestyle="--", linewidth=1)
        ax.text(0.01, 0.02, "filled: white-box (bar: 1 s.e.), hollow: black-box; 0.5 = chance",
                transform=ax.transAxes, fontsize=7)
    _finish_panels(panels, "model sparsity", "membership-inference ROC AUC")
    return _save(fig, path)


def plot_slices(ds, path: Path, volumes: int = 4) -> Path:
    """Middle axial / coronal / sagittal slices of a VolumeDataset's volumes at spread-out ages."""
    import matplotlib.pyplot as plt

    order = np.argsort(ds.ages, kind="mergesort")
    picks = order[np.unique(np.linspace(0, len(order) - 1, min(volumes, len(order))).round().astype(int))]
    fig, axes = plt.subplots(len(picks), 3, figsize=(7.5, 2.4 * len(picks)), squeeze=False)
    for row, i in zip(axes, picks):
        vol = ds[int(i)][0][0].numpy()
        x, y, z = (s // 2 for s in vol.shape)
        for ax, view, img in zip(row, SLICE_VIEWS, (vol[:, :, z], vol[:, y, :], vol[x, :, :])):
            ax.imshow(img.T, origin="lower", cmap="gray")
            ax.set_title(f"#{int(i)} age {float(ds.ages[i]):.1f}: {view}", fontsize=8)
            ax.axis("off")
    return _save(fig, path)


# ---------------------------------------------------------------- command

def _slice_source(runs: list[Run]):
    """The test set of the first run whose data_dir still holds one, or None."""
    from .data import VolumeDataset

    data_dir = next((r.data_dir for r in runs if r.data_dir and (r.data_dir / "test.h5").exists()), None)
    if data_dir is None:
        return None
    ds = VolumeDataset(data_dir / "test.h5", cache=False)
    if len(ds) == 0:
        raise ReportError(f"{data_dir / 'test.h5'}: no volumes")
    return ds


def write_report(run_dirs: list[Path], out: Path) -> tuple[list[dict], list[Path]]:
    """Write the tables and plots for these runs under `out`; returns the table rows and the files written."""
    try:
        import matplotlib
    except ModuleNotFoundError:
        raise ReportError("the report's plots need matplotlib: pip install -e '.[report]' (or pip install "
                          "matplotlib)") from None

    matplotlib.use("Agg")
    runs = [load_run(p) for p in expand_run_dirs(run_dirs)]
    names = [r.name for r in runs]
    if len(set(names)) != len(names):
        raise ReportError(f"run names must be unique, got {sorted(n for n in set(names) if names.count(n) > 1)}")
    out = Path(out)
    rows = results_rows(runs)
    slices = _slice_source(runs)  # opened before anything is written, so a bad file writes nothing
    written = []
    atomic_write(out / "results.csv", to_csv(rows).encode())
    atomic_write(out / "results.md", to_markdown(rows).encode())
    written += [out / "results.csv", out / "results.md"]
    written.append(plot_curves(runs, out / "mae_vs_round.png", "test_mae", "test MAE (years)", clip=1.5))
    written.append(plot_curves(runs, out / "sparsity_vs_round.png", "sparsity", "global model sparsity"))
    written.append(plot_curves(runs, out / "mae_vs_bytes.png", "test_mae", "test MAE (years)", by_bytes=True,
                               clip=1.5))
    attacked = [r for r in runs if r.attack]
    if attacked:
        written.append(plot_mia(attacked, out / "mia_auc_vs_sparsity.png"))
    else:
        print("fedmpi report: no run has attack.json (python -m fedmpi attack --run DIR); "
              "skipping mia_auc_vs_sparsity.png", file=sys.stderr)
    if slices is not None:
        written.append(plot_slices(slices, out / "volume_slices.png"))
    else:
        print("fedmpi report: no run's data_dir holds a test.h5; skipping volume_slices.png", file=sys.stderr)
    return rows, written


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("runs", nargs="+", metavar="RUN_DIR",
                        help="run directories, or a directory of runs (every finished run in it)")
    parser.add_argument("--out", default="report", help="output directory for the tables and PNGs")


def run(args) -> int:
    try:
        rows, written = write_report([Path(p) for p in args.runs], Path(args.out))
    except Exception as e:
        if is_user_error(e):
            print(f"fedmpi report: error: {e}", file=sys.stderr)
            return 1
        raise
    print(to_markdown(rows), end="")
    for p in written:
        print(f"wrote {p}")
    return 0
