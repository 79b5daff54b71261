"""preprocess/grid.py against independent references: a shifted grid, hand-computed smoothing kernels, the
grids' boxes, and the brain mask's position in world coordinates."""

import numpy as np
import pytest
from scipy import ndimage

from preprocess import grid


def test_resample_reads_the_source_at_the_target_grids_world_positions():
    """A target grid shifted by +1 voxel along x samples source voxels 1..4: the offset's sign matters."""
    data = np.arange(5 * 6 * 7, dtype=np.float32).reshape(5, 6, 7)
    shifted = np.eye(4)
    shifted[0, 3] = 1.0
    np.testing.assert_array_equal(grid.resample(data, np.eye(4), (4, 6, 7), shifted), data[1:5])


@pytest.mark.parametrize(
    "sizes, sigma_voxels",
    [
        ((1, 1, 1), [np.sqrt(15) / 2.35482] * 3),  # sqrt(4^2 - 1^2) mm FWHM, in 1 mm voxels
        ((2, 2, 2), [np.sqrt(12) / 2.35482 / 2] * 3),  # sqrt(4^2 - 2^2) mm, in 2 mm voxels
        ((1, 1, 4), [np.sqrt(15) / 2.35482] * 2 + [0.0]),  # an axis already at 4 mm is not smoothed
    ],
)
def test_antialias_brings_each_axis_to_one_target_voxel_fwhm(sizes, sigma_voxels):
    impulse = np.zeros((21, 21, 21), np.float32)
    impulse[10, 10, 10] = 1.0
    expected = ndimage.gaussian_filter(impulse, sigma_voxels, mode="constant")
    np.testing.assert_allclose(grid.antialias(impulse, sizes, 4.0), expected, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("voxel", [4, 6])
def test_coarse_grids_cover_the_same_box(voxel):
    """The 4 and 6 mm grids' voxels tile the box [-90, 90] x [-126, 90] x [-72, 108] mm exactly."""
    shape, affine = grid.target_grid(voxel)
    assert np.allclose(np.diag(affine)[:3], voxel)
    corner = affine[:3, 3] - voxel / 2
    np.testing.assert_array_equal(corner, [-90, -126, -72])
    np.testing.assert_array_equal(corner + np.array(shape) * voxel, [90, 90, 108])


@pytest.mark.parametrize("voxel", [2, 4, 6])
def test_the_brain_mask_sits_where_the_1mm_templates_mask_does(voxel):
    """Centroids in world coordinates agree within half a millimetre: a flipped or shifted resampling
    would move it by voxels."""
    tpl = grid.template_1mm("mask")
    a = tpl.affine
    reference = a[:3, :3] @ np.argwhere(tpl.data > 0.5).mean(axis=0) + a[:3, 3]
    _, affine = grid.target_grid(voxel)
    centroid = affine[:3, :3] @ np.argwhere(grid.brain_mask(voxel)).mean(axis=0) + affine[:3, 3]
    np.testing.assert_allclose(centroid, reference, atol=0.5)


def test_the_template_is_z_scored_inside_the_mask_and_zero_outside():
    mask, t1 = grid.brain_mask(4), grid.template(4)
    assert abs(float(t1[mask].mean())) < 1e-4 and abs(float(t1[mask].std()) - 1.0) < 1e-3
    assert np.all(t1[~mask] == 0)


@pytest.mark.parametrize(
    ("shape", "sizes", "target"),
    [((40, 50, 30), (1, 1, 2), 4.0), ((41, 37, 33), (1.25,) * 3, 2.0), ((9, 9, 9), (3,) * 3, 2.0)],
)
def test_antialias_box_is_antialias_of_ones_and_exactly_1_inside(shape, sizes, target):
    """nifti.to_mni takes a whole image's coverage weight from antialias_box: it must be antialias's, and exactly
    1 where the kernel lies inside the array (a whole image's values are divided by it unchanged)."""
    ones = grid.antialias(np.ones(shape, np.float32), sizes, target)
    box = grid.antialias_box(shape, sizes, target)
    np.testing.assert_allclose(box, ones, atol=3e-7)
    np.testing.assert_array_equal(box == 1, ones == 1)
    assert box.dtype == np.float32 and (box[tuple(s // 2 for s in shape)] == 1)
