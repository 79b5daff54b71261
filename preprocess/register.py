"""Linear registration of scanner-space T1s to nilearn's MNI152 template with ANTs (antspyx).

`nifti` assumes MNI world coordinates; real scans come off the scanner with the head anywhere
in the field of view. This module estimates, per subject, the 4x4 matrix `mni_to_native`
(world mm, RAS+) that maps a template point to the same anatomical point in the scan,
p_native = T @ p_mni, and then lets `nifti.to_mni` resample the original voxels once through
it (the subject's voxel->world affine becomes inv(T) @ affine, i.e. voxel -> MNI world).

Choices, for CPU speed and for the template nilearn ships:
- nilearn has only the skull-stripped ICBM 2009a T1, so the metric is restricted to its brain
  mask dilated by MASK_MARGIN_MM: a whole-head scan's scalp only counts where it would overlap
  the brain; skull-stripped input (`--skull-strip deepbet`) matches the template best.
- Both images at REG_MM (the output grids are 2-6 mm), one Affine (12 dof) or Rigid stage from
  a centre-of-mass start, Mattes mutual information, 25% regular sampling, levels of 6 and 3 mm
  with at most 1000 and 200 iterations (a 12 mm level sent some heads astray). One ITK thread
  per worker, even where ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS asks for more (several threads make the
  result vary from run to run): `nifti` runs subjects in parallel.
- ANTs draws its sampling points at random; a fixed seed per attempt (ANTS_RANDOM_SEED) makes
  runs reproducible. An unlucky draw occasionally diverges (about one run in four for the
  hardest synthetic head), so a registration that fails the quality check is retried with the
  next of SEEDS and the best attempt is kept: cheap, since only failures pay.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import tempfile
from pathlib import Path

import numpy as np
from scipy import ndimage

from fedmpi.errors import MissingExtra
from preprocess import grid, nifti, qc, skullstrip

METHODS = ("none", "rigid", "affine")
SKULL_STRIP = ("none", "deepbet")
REG_MM = 3.0
MASK_MARGIN_MM = 6.0
SCHEDULE = {
    "aff_iterations": (1000, 200),
    "aff_shrink_factors": (2, 1),
    "aff_smoothing_sigmas": (1, 0),
    "aff_metric": "mattes",
    "aff_sampling": 32,
    "aff_random_sampling_rate": 0.25,
}
SEEDS = (1, 2, 3)
TEMPLATE = "nilearn MNI152 ICBM 2009a symmetric T1 (skull-stripped)"
# RAS <-> LPS (ITK's world convention): flip x and y.
RAS_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])


def require_extra(method: str, skull_strip: str) -> None:
    """MissingExtra naming every missing package and the install command, before any work is done."""
    needs = ([(f"--register {method}", "antspyx", _ants)] if method != "none" else []) + (
        [(f"--skull-strip {skull_strip}", "deepbet", lambda: __import__("deepbet"))] if skull_strip != "none" else []
    )
    missing = []
    for option, package, load in needs:
        try:
            load()
        except ImportError:
            missing.append((option, package))
    if missing:
        options, packages = (" and ".join(x) for x in zip(*missing))
        raise MissingExtra(
            f"{options} need{'s' if len(missing) == 1 else ''} the optional {packages}, "
            "not installed: pip install -e '.[register]'"
        )


@dataclasses.dataclass(frozen=True)
class Options:
    """What `nifti --register/--skull-strip/--min-ncc` asked for."""

    method: str = "affine"
    skull_strip: str = "none"
    min_ncc: float = qc.DEFAULT_MIN_NCC

    def params(self) -> dict:
        """Recorded in the HDF5 `preprocessing` attribute (and part of the input fingerprint)."""
        return {
            "registration": self.method,
            "skull_strip": self.skull_strip,
            "template": TEMPLATE,
            "registration_mm": REG_MM,
            "registration_schedule": SCHEDULE,
            "registration_seeds": SEEDS,
            "metric_mask": f"template brain mask dilated {MASK_MARGIN_MM:g} mm",
            "mni_to_native": "4x4 world mm RAS, p_native = T @ p_mni",
            "min_ncc": self.min_ncc,
        }


@dataclasses.dataclass(frozen=True, eq=False)  # hashed by identity: one cached ANTs copy per worker
class Reference:
    """The template at REG_MM (+ dilated metric mask) and on the output grid; plain arrays for workers."""

    t1: np.ndarray
    metric_mask: np.ndarray
    affine: np.ndarray
    on_grid: np.ndarray


def reference(voxel: int) -> Reference:
    """Built once in the parent process and handed to workers."""
    tpl, mask = grid.template_1mm("t1"), grid.template_1mm("mask")
    shape = tuple(int(np.ceil(n / REG_MM)) for n in tpl.data.shape)
    affine = tpl.affine.copy()
    affine[:3, :3] *= REG_MM
    t1 = grid.resample(grid.antialias(tpl.data, (1, 1, 1), REG_MM), tpl.affine, shape, affine)
    brain = grid.resample(grid.antialias(mask.data, (1, 1, 1), REG_MM), mask.affine, shape, affine) >= 0.5
    margin = ndimage.binary_dilation(brain, iterations=round(MASK_MARGIN_MM / REG_MM))
    return Reference(t1, margin.astype(np.float32), affine, np.array(grid.template(voxel)))


def ras_from_itk(parameters, fixed_parameters) -> np.ndarray:
    """An ITK affine/rigid transform (12 parameters + centre, LPS mm) as a 4x4 RAS world matrix.

    ITK maps x -> A (x - c) + t + c; a registration's forward transform maps fixed (template)
    points to moving (subject) points, which is `mni_to_native`.
    """
    p = np.asarray(parameters, dtype=np.float64)
    c = np.asarray(fixed_parameters, dtype=np.float64)[:3]
    lps = np.eye(4)
    lps[:3, :3] = p[:9].reshape(3, 3)
    lps[:3, 3] = p[9:12] + c - lps[:3, :3] @ c
    return RAS_LPS @ lps @ RAS_LPS


def _ants():
    """antspyx with one ITK thread, set before ITK starts and whatever the environment asked for.

    ITK adds up the metric over its threads in no fixed order, so with several threads the same seed gives
    another matrix from run to run: outputs would not be reproducible and two copies of one scan would no
    longer have identical volumes (convert.same_scans). Parallelism is over subjects (--workers).
    """
    os.environ["ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"] = "1"
    import ants

    return ants


def _ants_image(data: np.ndarray, affine: np.ndarray):
    """numpy array + RAS voxel->world affine -> ANTsImage (origin, spacing, direction in LPS)."""
    lps = RAS_LPS @ affine
    spacing = np.sqrt((lps[:3, :3] ** 2).sum(axis=0))
    return _ants().from_numpy(
        np.ascontiguousarray(data, dtype=np.float32),
        origin=tuple(lps[:3, 3]),
        spacing=tuple(spacing),
        direction=lps[:3, :3] / spacing,
    )


@functools.lru_cache(maxsize=1)
def _fixed(ref: Reference):
    return _ants_image(ref.t1, ref.affine), _ants_image(ref.metric_mask, ref.affine)


@contextlib.contextmanager
def _seed(seed: int):
    saved = os.environ.get("ANTS_RANDOM_SEED")
    os.environ["ANTS_RANDOM_SEED"] = str(seed)
    try:
        yield
    finally:
        if saved is None:
            del os.environ["ANTS_RANDOM_SEED"]
        else:
            os.environ["ANTS_RANDOM_SEED"] = saved


def estimate(data: np.ndarray, affine: np.ndarray, method: str, ref: Reference, seed: int = SEEDS[0]) -> np.ndarray:
    """mni_to_native for one image (any orientation); BadImage when ANTs gives up."""
    ants = _ants()
    sizes = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
    shape = tuple(int(np.ceil(n * s / REG_MM)) for n, s in zip(data.shape, sizes))
    coarse = affine.copy()
    coarse[:3, :3] = affine[:3, :3] / sizes * REG_MM
    moving = _ants_image(grid.resample(grid.antialias(data, sizes, REG_MM), affine, shape, coarse), coarse)
    fixed, mask = _fixed(ref)
    kind = {"affine": "Affine", "rigid": "Rigid"}[method]
    with tempfile.TemporaryDirectory(prefix="fedmpi-reg-") as tmp, _seed(seed):
        try:
            out = ants.registration(
                fixed, moving, type_of_transform=kind, mask=mask, outprefix=str(Path(tmp) / "x"), **SCHEDULE
            )
            tx = ants.read_transform(out["fwdtransforms"][0])
        except Exception as exc:  # ANTs raises RuntimeError and others on degenerate images
            raise nifti.BadImage(f"registration failed: {exc}") from None
        return ras_from_itk(tx.parameters, tx.fixed_parameters)


@dataclasses.dataclass
class Registered:
    """One subject on the MNI grid, the matrix that put it there and its quality figure."""

    volume: np.ndarray
    mni_to_native: np.ndarray
    ncc: float


def preprocess_file(
    path,
    voxel: int,
    mask: np.ndarray,
    options: Options,
    ref: Reference,
    max_image_mb: float = nifti.DEFAULT_MAX_IMAGE_MB,
) -> Registered:
    """load -> RAS -> [skull strip] -> register -> nifti.to_mni through the matrix -> QC.

    Retries with the next seed while the template correlation is below options.min_ncc.
    Raises BadImage (naming the file) for unusable images, failed registrations and when
    no attempt reaches options.min_ncc.
    """
    name = Path(path).name
    data, affine = nifti.load(path, max_image_mb)
    nonfinite = int(data.size - np.count_nonzero(np.isfinite(data)))
    if nonfinite:  # missing voxels are for images already in MNI space (SPM's bounding box), not for ANTs
        raise nifti.BadImage(f"{name} has {nonfinite} non-finite voxels (NaN or inf); registration needs every voxel")
    best = None
    try:
        data, affine = nifti.to_ras(data, affine)
        if options.skull_strip == "deepbet":
            data = data * skullstrip.brain_mask(data, affine)
        for seed in SEEDS:
            matrix = estimate(data, affine, options.method, ref, seed)
            try:
                volume = nifti.to_mni(data, np.linalg.inv(matrix) @ affine, voxel, mask)
            except nifti.BadImage:  # this attempt moved the brain out of the field of view
                continue
            ncc = qc.template_ncc(volume, ref.on_grid, mask)
            if best is None or ncc > best.ncc:
                best = Registered(volume, matrix, ncc)
            if ncc >= options.min_ncc:
                return best
    except nifti.BadImage as exc:
        raise nifti.BadImage(f"{name} {exc}") from None
    if best is None:
        raise nifti.BadImage(f"{name} registration failed: every attempt left the brain outside the image")
    # a whole head's neck and skull pull the affine fit off the brain (seen: 100 mm of neck, a cropped top)
    hint = (
        "; a whole-head image registers better brain-extracted: --skull-strip deepbet"
        if options.skull_strip == "none"
        else ""
    )
    raise nifti.BadImage(
        f"{name} registration quality too low: template correlation {best.ncc:.2f} < "
        f"{options.min_ncc:g} (--min-ncc) after {len(SEEDS)} attempts; wrong orientation, "
        f"not a head T1, or a failed registration?{hint}"
    )
