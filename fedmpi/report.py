"""Tables and plots over finished runs: `python -m fedmpi report RUN_DIR [RUN_DIR ...] --out DIR`.

Reads each run's summary.json, metrics.jsonl, config.json and, when present, test_predictions.csv and
attack.json, and writes:

- results.csv / results.md: one row per run (the overview);
- accuracy.csv (per run), accuracy_paired.csv and accuracy.md: the paired MAE difference of each method
  to dense FedAvg on the same test subjects, with a bootstrap interval and a non-inferiority verdict;
- privacy.csv (per run and attack), privacy_paired.csv and privacy.md: attack AUC per sparsity with intervals,
  and each method's paired AUC difference to dense FedAvg on the same attacked subjects (attacks that kept
  per-subject scores);
- numbers.json: the numbers the README quotes (not summary.json, which would make the output folder look
  like a run directory to this command);
- PNG plots, one panel per setting and distribution, one line per method (mean over seeds, band min-max).

The records are read and checked by fedmpi.records; the tables and statistics are pure functions in
fedmpi.tables and fedmpi.stats, tested without plotting.
"""

from __future__ import annotations

import argparse
import io
import os
import shutil
import sys
import textwrap
from pathlib import Path

import numpy as np

from preprocess import outputs
from preprocess.layout import TEST_FILE

from . import tables
from .errors import EXIT_USAGE, MissingExtra, ReportError, is_user_error
from .files import atomic_write, make_dirs, temporary_dir_beside
from .records import Run, expand_run_dirs, load_run, note
from .runlog import dumps

COLUMNS = (
    "run",
    "algorithm",
    "distribution",
    "target",
    "final_mae",
    "final_rmse",
    "final_r",
    "sparsity",
    "total_bytes",
    "bytes_ratio_vs_fedavg",
    "wall_seconds",
    "mia_auc",
)
SLICE_VIEWS = ("axial", "coronal", "sagittal")
ATTACK_MARKERS = ("o", "s", "^", "D", "v", "P")
SPARSITY_TICKS = (0.0, 0.5, 0.8, 0.9, 0.95, 0.99, 0.999)


# ---------------------------------------------------------------- the overview table (pure)


def results_rows(runs: list[Run]) -> list[dict]:
    """One dict per run with COLUMNS as keys (None = blank), sorted by setting, distribution, algorithm, target.

    bytes_ratio_vs_fedavg divides by the fedavg run of the same setting and distribution (the same seed if
    there is one); it is None without one. mia_auc is the white-box AUC.
    """
    grouped = tables.lines(runs)
    rows = []
    for run in sorted(runs, key=tables.run_order):
        s = run.summary
        white = tables.attack_results(run.attack).get("white_box", {}) if run.attack else {}
        rows.append(
            {
                "run": run.name,
                "algorithm": run.algorithm,
                "distribution": run.distribution,
                "target": run.target,
                "final_mae": s.get("final_mae"),
                "final_rmse": s.get("final_rmse"),
                "final_r": s.get("final_r"),
                "sparsity": s.get("final_sparsity"),
                "total_bytes": tables.total_bytes(s),
                "bytes_ratio_vs_fedavg": tables.bytes_ratio(run, grouped),
                "wall_seconds": s.get("wall_seconds"),
                "mia_auc": white.get("auc"),
            }
        )
    return rows


def to_csv(rows: list[dict]) -> str:
    """results.csv: the overview rows, in COLUMNS order."""
    return tables.to_csv(rows, COLUMNS)


MD_FORMATS = {
    "target": "{:.2f}",
    "final_mae": "{:.2f}",
    "final_rmse": "{:.2f}",
    "final_r": "{:.3f}",
    "sparsity": "{:.3f}",
    "bytes_ratio_vs_fedavg": "{:.3f}",
    "wall_seconds": "{:.0f}",
    "mia_auc": "{:.3f}",
}


def _md_cell(column: str, v) -> str:
    if v is None:
        return ""
    if column == "total_bytes":
        return f"{v / 1e6:.1f} MB"
    return MD_FORMATS.get(column, "{}").format(v)


def to_markdown(rows: list[dict]) -> str:
    """results.md, also printed by `run`: the overview as a markdown table, numbers rounded for reading."""
    lines = [
        "| " + " | ".join(COLUMNS) + " |",
        "|" + "|".join("---" if c in ("run", "algorithm", "distribution") else "---:" for c in COLUMNS) + "|",
    ]
    lines += ["| " + " | ".join(_md_cell(c, r[c]) for c in COLUMNS) + " |" for r in rows]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- plots


def _figure(panel_keys: list[tuple[str, str]]):
    """(figure, axes) with one titled panel per (setting, distribution), three to a row."""
    import matplotlib.pyplot as plt

    n = max(len(panel_keys), 1)
    cols = min(n, 3)
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(6.0 * cols, 4.6 * rows), squeeze=False)
    flat = list(axes.flat)
    for ax in flat[len(panel_keys) :]:
        ax.set_visible(False)
    for (setting, distribution), ax in zip(panel_keys, flat):
        title = distribution or "(distribution unknown)"
        if setting:
            title += "\n" + textwrap.fill(setting, 70)
        ax.set_title(title, fontsize=9)
        ax.grid(True, alpha=0.3)
    return fig, flat[: len(panel_keys)]


def _line_colors(keys) -> dict[tuple, tuple]:
    """One colour per method (algorithm, target), the same in every panel and plot."""
    import matplotlib.pyplot as plt

    methods = sorted(
        {(k.algorithm, k.target) for k in keys},
        key=lambda m: (tables.algorithm_rank(m[0]), m[1] is not None, m[1] or 0.0),
    )
    cmap = plt.get_cmap("tab10" if len(methods) <= 10 else "tab20")
    return {m: cmap(i % cmap.N) for i, m in enumerate(methods)}


def _save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    atomic_write(path, buf.getvalue())
    return path


def plot_curves(
    runs: list[Run],
    path: Path,
    key: str,
    ylabel: str,
    by_bytes: bool = False,
    clip: float | None = None,
    dashed: str | None = None,
    note: str = "",
) -> Path:
    """metrics[key] against round (or cumulative bytes, log scale): per method the mean over seeds, with a
    min-max band. `dashed` draws a second metric of the same method dashed. With `clip`, each panel's y
    axis stops at clip x the largest first value, so one diverging run (random pruning can cut the output
    bias) does not flatten every other curve; it leaves the frame at the top."""
    grouped = tables.lines(runs)
    panel_keys = tables.panels(grouped)
    fig, axes = _figure(panel_keys)
    colors = _line_colors(grouped)
    for panel, ax in zip(panel_keys, axes):
        firsts = []
        for line in tables.panel_lines(grouped, panel):
            group, color = grouped[line], colors[(line.algorithm, line.target)]
            x, mean, low, high = tables.mean_curve(group, key, by_bytes)
            if x.size:
                seeds = f" ({len(group)} seeds)" if len(group) > 1 else ""
                ax.plot(x, mean, color=color, label=tables.line_label(line) + seeds)
                if len(group) > 1:
                    ax.fill_between(x, low, high, color=color, alpha=0.15, linewidth=0)
                firsts.append(mean[0])
            if dashed:
                x, mean, _, _ = tables.mean_curve(group, dashed, by_bytes)
                if x.size:
                    ax.plot(x, mean, color=color, linestyle="--", linewidth=1)
        if clip is not None and firsts:
            ax.set_ylim(0, clip * max(firsts))
        if by_bytes:
            from matplotlib.ticker import NullFormatter

            ax.set_xscale("log")
            ax.xaxis.set_minor_formatter(NullFormatter())  # minor labels overlap on a few decades
        ax.set_xlabel("cumulative bytes sent (up + down)" if by_bytes else "round")
        ax.set_ylabel(ylabel)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
        if note:
            ax.text(0.01, 0.01, note, transform=ax.transAxes, fontsize=7, color="dimgrey")
    return _save(fig, path)


def _to_density(s):
    """Sparsity -> -log10(1 - s): 0.9, 0.99 and 0.999 are equally spaced, where the targets crowd."""
    return -np.log10(np.clip(1.0 - np.asarray(s, dtype=np.float64), 1e-6, None))


def _attack_errorbar(ax, x, points: list[dict], style: dict, label: str | None) -> None:
    """Each seed's AUC with its interval as an asymmetric error bar (none where the interval is missing)."""
    aucs = np.array([p["auc"] for p in points], dtype=np.float64)
    low = np.array([p["auc"] - p["auc_low"] if p.get("auc_low") is not None else 0.0 for p in points])
    high = np.array([p["auc_high"] - p["auc"] if p.get("auc_high") is not None else 0.0 for p in points])
    ax.errorbar(
        x, aucs, yerr=[low, high], linestyle="none", capsize=2, markersize=5, elinewidth=0.8, label=label, **style
    )


def _attack_points(section: dict, name: str) -> list[dict]:
    return [
        p
        for m in section["methods"]
        if name in m["attacks"]
        for p in m["attacks"][name]["runs"]
        if p["auc"] is not None
    ]


def _attack_styles(sections: list[dict]) -> dict[str, dict]:
    import matplotlib.pyplot as plt

    names = list(dict.fromkeys(n for s in sections for m in s["methods"] for n in m["attacks"]))
    cmap = plt.get_cmap("Dark2")
    return {
        n: {"color": cmap(i % cmap.N), "marker": ATTACK_MARKERS[i % len(ATTACK_MARKERS)]} for i, n in enumerate(names)
    }


def plot_mia_sparsity(sections: list[dict], path: Path) -> Path:
    """Attack AUC against the attacked model's sparsity: each seed a point with its interval, a line per
    attack through the methods' means, 0.5 = chance. Attacks are offset sideways so their bars do not hide
    each other; the x axis is -log10(1 - sparsity), labelled in sparsity. `sections`: tables.privacy_sections."""
    fig, axes = _figure([(s["setting"], s["distribution"]) for s in sections])
    styles = _attack_styles(sections)
    for section, ax in zip(sections, axes):
        names = [n for n in styles if _attack_points(section, n)]
        for i, name in enumerate(names):
            offset = (i - (len(names) - 1) / 2) * 0.03
            points = [p for p in _attack_points(section, name) if p["sparsity"] is not None]
            x = _to_density([p["sparsity"] for p in points]) + offset
            _attack_errorbar(ax, x, points, styles[name], name)
            means = [
                (m["sparsity"], m["attacks"][name]["auc_mean"])
                for m in section["methods"]
                if name in m["attacks"] and m["sparsity"] is not None and m["attacks"][name]["auc_mean"]
            ]
            if means:
                ax.plot(
                    _to_density([s for s, _ in means]) + offset,
                    [a for _, a in means],
                    color=styles[name]["color"],
                    linewidth=1,
                )
        spars = [m["sparsity"] for m in section["methods"] if m["sparsity"] is not None]
        right = float(_to_density(max(spars, default=0.0))) + 0.2
        ax.set_xlim(-0.2, right)
        ticks = [t for t in SPARSITY_TICKS if _to_density(t) <= right]
        ax.set_xticks(_to_density(ticks), [f"{t:g}" for t in ticks])
        ax.axhline(0.5, color="grey", linestyle="--", linewidth=1)
        ax.set_xlabel("model sparsity (axis: -log10(1 - sparsity))")
        ax.set_ylabel("membership-inference ROC AUC")
        ax.text(
            0.01,
            0.01,
            "points: seeds, bars: 95% CI; line: mean per method; dashed: chance",
            transform=ax.transAxes,
            fontsize=7,
            color="dimgrey",
        )
        if names:
            ax.legend(fontsize=7)
    return _save(fig, path)


def plot_mia_gap(sections: list[dict], path: Path) -> Path:
    """Attack AUC against the attacked model's MAE gap (non-members minus members), the same points as
    plot_mia_sparsity; the legend gives each attack's Spearman correlation across runs."""
    fig, axes = _figure([(s["setting"], s["distribution"]) for s in sections])
    styles = _attack_styles(sections)
    for section, ax in zip(sections, axes):
        for name in styles:
            points = [p for p in _attack_points(section, name) if p["mae_gap"] is not None]
            if not points:
                continue
            rho = section["correlations"][name]["spearman_auc_vs_gap"]
            label = name + ("" if rho is None else f" (Spearman ρ = {rho:+.2f})")
            _attack_errorbar(ax, [p["mae_gap"] for p in points], points, styles[name], label)
        ax.axhline(0.5, color="grey", linestyle="--", linewidth=1)
        ax.set_xlabel("MAE gap: non-members minus members (years)")
        ax.set_ylabel("membership-inference ROC AUC")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
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

    data_dir = next((r.data_dir for r in runs if r.data_dir and (r.data_dir / TEST_FILE).exists()), None)
    if data_dir is None:
        return None
    ds = VolumeDataset(data_dir / TEST_FILE, cache=False)
    if len(ds) == 0:
        raise ReportError(f"{data_dir / 'test.h5'}: no volumes")
    return ds


# written only when some run has attack.json; a report without one removes an earlier report's from --out
PRIVACY_FILES = ("privacy.csv", "privacy_paired.csv", "privacy.md", "mia_auc_vs_sparsity.png", "mia_auc_vs_gap.png")


def write_report(run_dirs: list[Path], out: Path) -> tuple[list[dict], list[Path]]:
    """Write the tables and plots for these runs under `out`; returns the overview rows and the files written.

    Everything is rendered into a private directory beside `out` first and moved in only once all of it is
    done, so a bad input, an error in a plot or an interrupt leaves `out` as it was. Other files in `out`
    (a results folder that also holds the runs) are left alone.
    """
    out = Path(out)
    outputs.check_dir(out, "--out")
    try:
        stage = temporary_dir_beside(out)
    except OSError as e:
        raise ReportError(f"--out {out}: cannot write there ({e.strerror or e})") from None
    try:
        rows, rendered = _render(run_dirs, stage)
        try:
            make_dirs(out)
            for path in rendered:
                os.replace(path, out / path.name)
            names = {path.name for path in rendered}
            stale = [out / name for name in PRIVACY_FILES if name not in names and (out / name).is_file()]
            for path in stale:  # an earlier report's, of other runs: not to be read beside these tables
                path.unlink()
            if stale:
                gone = ", ".join(p.name for p in stale)
                note(f"removed an earlier report's {gone} from {out}: none of these runs has attack.json")
        except OSError as e:
            raise ReportError(f"--out {out}: cannot write there ({e.strerror or e})") from None
        return rows, [out / path.name for path in rendered]
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def _render(run_dirs: list[Path], out: Path) -> tuple[list[dict], list[Path]]:
    """The tables and plots, written into the empty directory `out`."""
    try:
        import matplotlib
    except ModuleNotFoundError:
        raise MissingExtra(
            "the report's plots need matplotlib: pip install -e '.[report]' (or pip install matplotlib)"
        ) from None

    matplotlib.use("Agg")
    runs = [load_run(p) for p in expand_run_dirs(run_dirs)]
    names = [r.name for r in runs]
    if len(set(names)) != len(names):
        raise ReportError(f"run names must be unique, got {sorted(n for n in set(names) if names.count(n) > 1)}")
    labels = tables.setting_labels({r.name: r.config for r in runs})
    for r in runs:
        r.setting = labels[r.name]
    out = Path(out)
    rows = results_rows(runs)
    paired, notes = tables.paired_rows(runs)
    accuracy = tables.accuracy_sections(runs, paired)
    privacy = tables.privacy_sections(runs)
    privacy_paired, unpaired = tables.privacy_paired_rows(runs)
    texts = {
        "results.csv": to_csv(rows),
        "results.md": to_markdown(rows),
        "accuracy.csv": tables.to_csv(tables.accuracy_rows(runs), tables.ACCURACY_COLUMNS),
        "accuracy_paired.csv": tables.to_csv(paired, tables.PAIRED_COLUMNS),
        "accuracy.md": tables.accuracy_markdown(accuracy),
        "numbers.json": dumps(tables.numbers(accuracy, privacy, privacy_paired), indent=2) + "\n",
    }
    if privacy:  # some run was attacked
        texts["privacy.csv"] = tables.to_csv(tables.privacy_rows(runs), tables.PRIVACY_COLUMNS)
        texts["privacy_paired.csv"] = tables.to_csv(privacy_paired, tables.PRIVACY_PAIRED_COLUMNS)
        texts["privacy.md"] = tables.privacy_markdown(privacy, privacy_paired)
    slices = _slice_source(runs)  # opened before anything is written, so a bad file writes nothing
    for line in tables.duplicate_seeds(runs) + tables.software_mix(runs) + notes + unpaired:
        note(line)
    written = []
    for name, text in texts.items():
        atomic_write(out / name, text.encode())
        written.append(out / name)
    written.append(
        plot_curves(
            runs,
            out / "mae_vs_round.png",
            "test_mae",
            "test MAE (years)",
            clip=1.5,
            note="line: mean over seeds, band: min-max",
        )
    )
    written.append(
        plot_curves(
            runs,
            out / "sparsity_vs_round.png",
            "sparsity",
            "global model sparsity",
            dashed="target_sparsity",
            note="solid: actual sparsity, dashed: target s_t",
        )
    )
    written.append(
        plot_curves(
            runs,
            out / "mae_vs_bytes.png",
            "test_mae",
            "test MAE (years)",
            by_bytes=True,
            clip=1.5,
            note="mean over seeds; a centralized run sends nothing and is absent",
        )
    )
    if privacy:
        written.append(plot_mia_sparsity(privacy, out / "mia_auc_vs_sparsity.png"))
        written.append(plot_mia_gap(privacy, out / "mia_auc_vs_gap.png"))
    else:
        note(
            "no run has attack.json (python -m fedmpi attack --run DIR); skipping privacy.csv, privacy.md, "
            "mia_auc_vs_sparsity.png and mia_auc_vs_gap.png"
        )
    if slices is not None:
        written.append(plot_slices(slices, out / "volume_slices.png"))
    else:
        note("no run's data_dir holds a test.h5; skipping volume_slices.png")
    return rows, written


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of `python -m fedmpi report` (fedmpi.cli makes the subcommand)."""
    parser.add_argument(
        "runs", nargs="+", metavar="RUN_DIR", help="run directories, or a directory of runs (every finished run in it)"
    )
    parser.add_argument("--out", default="report", help="output directory for the tables and PNGs (default: report/)")


def run(args) -> int:
    """`python -m fedmpi report`: write the tables and plots and print the overview; an error the user can fix is
    one line on stderr and exit 2, not a traceback."""
    try:
        rows, written = write_report([Path(p) for p in args.runs], Path(args.out))
    except Exception as e:
        if is_user_error(e):
            print(f"fedmpi report: error: {e}", file=sys.stderr)
            return EXIT_USAGE
        raise
    print(to_markdown(rows), end="")
    for p in written:
        print(f"wrote {p}")
    return 0
