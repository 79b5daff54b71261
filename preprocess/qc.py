"""Registration quality: the template-correlation figure and the QC report.

The figure is the Pearson correlation between a preprocessed volume and nilearn's MNI152 T1
preprocessed the same way (grid.template), over the MNI brain mask of the output grid. It
needs nothing but the volume, so `python -m preprocess qc` computes it for files written
before registration existed too. On the synthetic cohort good registrations score 0.62-0.92,
upside-down or back-to-front heads 0.30-0.42 and an image without a head about 0
(docs/registration.md), hence the default threshold of 0.5. A left-right flip scores like a
good registration: the template is symmetric.

The report is a directory: qc.tsv (one row per subject, worst first) and mosaic-NNN.png pages
showing axial, coronal and sagittal slices of each subject with the template's white-matter
outline drawn over them, worst subjects first.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from fedmpi.errors import DataError, MissingExtra
from fedmpi.files import atomic_dir
from preprocess import grid, h5io, outputs

DEFAULT_MIN_NCC = 0.5
PER_PAGE = 12
REPORT_MARKER = "qc.tsv"
# Slices per view as fractions of the grid along that axis (axial: z, coronal: y, sagittal: x).
SLICES = {"axial": (0.42, 0.62), "coronal": (0.45, 0.62), "sagittal": (0.40, 0.5)}
WM_LEVEL = 0.6  # template z-score between grey and white matter: the outline drawn on the mosaic


def template_ncc(volume: np.ndarray, template: np.ndarray, mask: np.ndarray) -> float:
    """Correlation of `volume` with `template` over `mask` (nan when either is constant there)."""
    a = volume[mask].astype(np.float64)
    b = template[mask].astype(np.float64)
    a -= a.mean()
    b -= b.mean()
    denom = np.sqrt((a * a).sum() * (b * b).sum())
    return float((a * b).sum() / denom) if denom > 0 else float("nan")


def quality(h5) -> tuple[dict, np.ndarray, str]:
    """(table, figures, source) for a volume file: stored registration_ncc, or computed from the volumes."""
    with h5io.open_checked(h5) as f:
        voxel = _grid_voxel(h5, f)  # the mosaic needs the grid even when the figures are stored
        table = {"subject_id": f["subject_id"].asstr()[:], "site": f["site"].asstr()[:], "age": f["age"][:]}
        if "registration_ncc" in f:
            return table, f["registration_ncc"][:].astype(np.float64), "stored"
        mask, template = grid.brain_mask(voxel), grid.template(voxel)
        reader = h5io.ChunkReader(f["images"])
        figures = [template_ncc(reader.read(i), template, mask) for i in range(f["images"].shape[0])]
        return table, np.asarray(figures), "computed"


def _grid_voxel(h5, f) -> int:
    """The file's voxel size, once its images are known to lie on that MNI grid (the template and
    mask are compared voxel by voxel)."""
    voxel = int(f.attrs["voxel_size"])
    shape = grid.target_grid(voxel)[0]
    if f["images"].shape[1:] != shape:
        raise DataError(
            f"volume file {h5} holds images of {'x'.join(map(str, f['images'].shape[1:]))} voxels, not the "
            f"{voxel} mm MNI grid ({'x'.join(map(str, shape))}) the QC template is on"
        )
    return voxel


def recorded_threshold(h5) -> float | None:
    """The --min-ncc a registered file was made with (None for files without registration)."""
    with h5io.open_checked(h5) as f:
        params = json.loads(f.attrs.get("preprocessing", "{}"))
    return params.get("min_ncc")


def write_report(h5, out, min_ncc: float | None = None) -> tuple[Path, int, int]:
    """Write qc.tsv and mosaic pages for `h5` into directory `out` (built beside it, then renamed).

    min_ncc defaults to the threshold the file was registered with, else DEFAULT_MIN_NCC.
    Returns (out, subjects, subjects below the threshold). An existing QC report directory
    is replaced; any other non-empty directory is refused (FileExistsError), and so is an `out` that
    cannot be written or that holds `h5` (outputs.OutputError), before any volume is read.
    """
    try:
        import matplotlib
    except ImportError:
        raise MissingExtra(
            "the QC mosaic needs matplotlib, which is not installed: pip install -e '.[report]'"
        ) from None
    matplotlib.use("Agg")
    h5, out = Path(h5), Path(out)
    outputs.check_dir(out, "--out")
    if out.resolve() in h5.resolve().parents:
        raise outputs.OutputError(
            f"the input {h5} lies inside --out {out}, which the report replaces; choose another --out"
        )
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / REPORT_MARKER).is_file())):
        raise FileExistsError(f"{out} exists and is not a QC report directory; choose another --out")
    threshold = min_ncc if min_ncc is not None else recorded_threshold(h5)
    threshold = DEFAULT_MIN_NCC if threshold is None else threshold
    table, figures, source = quality(h5)
    order = np.argsort(np.nan_to_num(figures, nan=-np.inf), kind="stable")
    below = ~(figures >= threshold)
    with atomic_dir(out) as tmp:
        with open(tmp / REPORT_MARKER, "w") as f:
            f.write("participant_id\tsite\tage\tregistration_ncc\tstatus\n")
            for i in order:
                status = f"below {threshold:g}" if below[i] else "ok"
                f.write(
                    f"{table['subject_id'][i]}\t{table['site'][i]}\t{_age(table['age'][i])}\t{figures[i]:.4f}\t{status}\n"
                )
        for page, start in enumerate(range(0, len(order), PER_PAGE), start=1):
            rows = order[start : start + PER_PAGE]
            _mosaic_page(h5, rows, table, figures, below, source, tmp / f"mosaic-{page:03d}.png")
    return out, len(order), int(below.sum())


def _age(age: float) -> str:
    """An age as qc.tsv gives it: n/a (BIDS's word) where it is unknown (preprocess nifti --ages-optional)."""
    return "n/a" if np.isnan(age) else f"{age:.1f}"


def _views(volume: np.ndarray):
    """(name, 2D slice oriented for display: left on the left, anterior/superior up)."""
    nx, ny, nz = volume.shape
    for name, fracs in SLICES.items():
        for frac in fracs:
            if name == "axial":
                yield f"z{frac:.2f}", volume[:, :, int(frac * nz)].T
            elif name == "coronal":
                yield f"y{frac:.2f}", volume[:, int(frac * ny), :].T
            else:
                yield f"x{frac:.2f}", volume[int(frac * nx), :, :].T


def _mosaic_page(h5, rows, table, figures, below, source, path: Path) -> None:
    import matplotlib.pyplot as plt

    with h5io.open_checked(h5) as f:
        voxel = _grid_voxel(h5, f)
        reader = h5io.ChunkReader(f["images"])
        volumes = [reader.read(int(i)).astype(np.float32) for i in rows]
    outline = list(_views(grid.template(voxel)))
    outside = ~grid.brain_mask(voxel)
    cmap = plt.get_cmap("gray").with_extremes(bad="black")
    ncols = sum(len(v) for v in SLICES.values())
    fig, axes = plt.subplots(len(rows), ncols, figsize=(1.35 * ncols, 1.45 * len(rows)), squeeze=False)
    for r, (i, vol) in enumerate(zip(rows, volumes)):
        vol[outside] = np.nan  # stored volumes are zero outside the mask: show it black, not mid-grey
        for c, ((_, img), (_, tpl)) in enumerate(zip(_views(vol), outline)):
            ax = axes[r, c]
            ax.imshow(img, cmap=cmap, origin="lower", vmin=-2.5, vmax=2.5, interpolation="nearest")
            ax.contour(tpl, levels=[WM_LEVEL], colors="#ff3b30", linewidths=0.6)
            ax.set_xticks([])
            ax.set_yticks([])
        colour = "#c00000" if below[i] else "black"
        axes[r, 0].set_ylabel(f"{table['subject_id'][i]}\nr={figures[i]:.2f}", fontsize=7, color=colour)
    fig.suptitle(f"{Path(h5).name}: template correlation ({source}), worst first; red: template WM outline", fontsize=8)
    fig.tight_layout(rect=(0, 0, 1, 0.97), pad=0.3)
    fig.savefig(path, format="png", dpi=80)
    plt.close(fig)
