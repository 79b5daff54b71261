"""Target MNI grids, the MNI152 templates nilearn ships, and affine resampling.

Everything downstream (trainer, splits, benchmarks) relies on these grids being
fixed, so they are constants here rather than derived from a template at run time.
nilearn and scipy are imported lazily: nilearn costs about two seconds and worker processes
that only resample never need it; the trainer's configuration reads GRIDS without either.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import numpy as np

# FSL MNI152 2 mm grid used by the paper (91 x 109 x 91); 4 mm and 6 mm grids for CPU work (the 6 mm
# grid starts at the 4 mm grid's first voxel corner and covers the same box).
GRIDS: dict[int, tuple[tuple[int, int, int], np.ndarray]] = {
    2: ((91, 109, 91), np.array([[2.0, 0, 0, -90], [0, 2, 0, -126], [0, 0, 2, -72], [0, 0, 0, 1]])),
    4: ((45, 54, 45), np.array([[4.0, 0, 0, -88], [0, 4, 0, -124], [0, 0, 4, -70], [0, 0, 0, 1]])),
    6: ((30, 36, 30), np.array([[6.0, 0, 0, -87], [0, 6, 0, -123], [0, 0, 6, -69], [0, 0, 0, 1]])),
}

FWHM_TO_SIGMA = 1.0 / (2.0 * np.sqrt(2.0 * np.log(2.0)))


def target_grid(voxel: int) -> tuple[tuple[int, int, int], np.ndarray]:
    """Shape and RAS+ affine of the MNI grid at `voxel` mm (2, 4 or 6)."""
    if voxel not in GRIDS:
        raise ValueError(f"voxel size must be one of {sorted(GRIDS)} mm, got {voxel!r}")
    shape, affine = GRIDS[voxel]
    return shape, affine.copy()


# nilearn's loaders of its bundled 1 mm MNI152 (ICBM 2009a) maps, which share one grid
TEMPLATES = {
    "t1": "load_mni152_template",
    "gm": "load_mni152_gm_template",
    "wm": "load_mni152_wm_template",
    "mask": "load_mni152_brain_mask",
}


class Map1mm(NamedTuple):
    data: np.ndarray  # float32, read-only
    affine: np.ndarray


@functools.cache
def template_1mm(name: str) -> Map1mm:
    """One of nilearn's bundled 1 mm MNI152 maps (TEMPLATES), loaded when first asked for: `nifti` needs only the
    mask, and all four loaded together kept 230 MB more in the command's own process (which holds the run while
    the workers preprocess). These files live inside the nilearn package; nothing is downloaded."""
    from nilearn import datasets

    image = getattr(datasets, TEMPLATES[name])(resolution=1)
    data = np.asarray(image.get_fdata(), dtype=np.float32)
    affine = np.asarray(image.affine, dtype=np.float64)
    for arr in (data, affine):
        arr.setflags(write=False)
    return Map1mm(data, affine)


def resample(
    data: np.ndarray, affine: np.ndarray, shape, target_affine: np.ndarray, order: int = 1, cval: float = 0.0
) -> np.ndarray:
    """Sample `data` (voxel->world `affine`) at the voxel centres of a target grid."""
    from scipy import ndimage

    vox = np.linalg.solve(affine, target_affine)  # target voxel -> source voxel
    return ndimage.affine_transform(
        data,
        vox[:3, :3],
        offset=vox[:3, 3],
        output_shape=tuple(shape),
        order=order,
        mode="constant",
        cval=cval,
        prefilter=False,
        output=np.float32,
    )


def antialias(data: np.ndarray, voxel_sizes, target_mm: float) -> np.ndarray:
    """Gaussian pre-smoothing so that downsampling to `target_mm` does not alias.

    The kernel brings the effective resolution of each axis to a FWHM of one target
    voxel: sigma_mm = sqrt(target^2 - voxel^2) * FWHM_TO_SIGMA (no smoothing when the
    source is already as coarse as the target).
    """
    sigma = _antialias_sigma(voxel_sizes, target_mm)
    if sigma is None:
        return data
    from scipy import ndimage

    return ndimage.gaussian_filter(data, sigma, mode="constant", output=np.float32)


def _antialias_sigma(voxel_sizes, target_mm: float) -> np.ndarray | None:
    """antialias's sigma per array axis in voxels, or None where it does not smooth."""
    sizes = np.asarray(voxel_sizes, dtype=float)
    sigma = np.sqrt(np.clip(target_mm**2 - sizes**2, 0.0, None)) * FWHM_TO_SIGMA / sizes
    return sigma if np.any(sigma > 0.05) else None


def antialias_box(shape, voxel_sizes, target_mm: float) -> np.ndarray:
    """antialias of an array of ones of `shape` (the weight an image's field of view gives its voxels),
    built from one filtered line per axis: exactly 1 where the kernel lies inside the array."""
    sigma = _antialias_sigma(voxel_sizes, target_mm)
    out = np.ones(tuple(shape), dtype=np.float32)
    if sigma is None:
        return out
    from scipy import ndimage

    for axis, (n, s) in enumerate(zip(shape, sigma)):
        if s > 1e-15:  # as gaussian_filter, which leaves an axis with no sigma alone
            line = ndimage.gaussian_filter1d(np.ones(n, np.float32), s, mode="constant", output=np.float32)
            out *= line.reshape([-1 if i == axis else 1 for i in range(len(shape))])
    return out


@functools.cache
def brain_mask(voxel: int) -> np.ndarray:
    """nilearn's MNI152 brain mask on our grid at `voxel` mm (bool, read-only)."""
    shape, affine = target_grid(voxel)
    tpl = template_1mm("mask")
    smooth = antialias(tpl.data, (1.0, 1.0, 1.0), float(voxel))
    mask = resample(smooth, tpl.affine, shape, affine, order=1) >= 0.5
    mask.setflags(write=False)
    return mask


@functools.cache
def template(voxel: int) -> np.ndarray:
    """nilearn's MNI152 T1 (skull-stripped) on our grid at `voxel` mm, preprocessed like a subject.

    Anti-aliased, resampled, zero outside brain_mask(voxel) and z-scored inside it, so that the
    mean of template * volume over the mask is their correlation (the QC figure). Read-only.
    """
    shape, affine = target_grid(voxel)
    t1 = template_1mm("t1")
    mask = brain_mask(voxel)
    out = resample(antialias(t1.data, (1.0, 1.0, 1.0), float(voxel)), t1.affine, shape, affine, order=1)
    vals = out[mask].astype(np.float64)
    out = np.where(mask, (out - vals.mean()) / vals.std(), 0.0).astype(np.float32)
    out.setflags(write=False)
    return out
