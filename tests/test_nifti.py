"""Loading, validation and MNI-grid preprocessing of single images."""

import errno
import gzip
import os
import re

import nibabel as nib
import numpy as np
import pytest

from preprocess import grid, nifti


@pytest.fixture(scope="module")
def ras_image(cohort):
    """A site-A subject (stored RAS) of the session cohort."""
    for path in sorted(cohort.bids.glob("sub-*/anat/*_T1w.nii.gz")):
        img = nib.load(path)
        if nib.aff2axcodes(img.affine) == ("R", "A", "S"):
            return nib.Nifti1Image(np.asarray(img.dataobj), img.affine)
    raise AssertionError("no RAS subject in the cohort")


def _reoriented(img, codes):
    ornt = nib.orientations.ornt_transform(nib.io_orientation(img.affine), nib.orientations.axcodes2ornt(codes))
    return img.as_reoriented(ornt)


@pytest.mark.parametrize("codes", ["LAS", "LPS", "PIR"])
def test_orientation_does_not_change_the_result(ras_image, tmp_path, codes):
    other = _reoriented(ras_image, codes)
    assert "".join(nib.aff2axcodes(other.affine)) == codes
    assert not np.array_equal(np.asarray(other.dataobj), np.asarray(ras_image.dataobj))
    nib.save(ras_image, tmp_path / "ras.nii.gz")
    nib.save(other, tmp_path / "other.nii.gz")
    mask = grid.brain_mask(4)
    a = nifti.preprocess_file(tmp_path / "ras.nii.gz", 4, mask)
    b = nifti.preprocess_file(tmp_path / "other.nii.gz", 4, mask)
    np.testing.assert_allclose(a, b, atol=1e-5)


def test_output_is_on_the_grid_masked_and_zscored(ras_image):
    for voxel in (2, 4):
        mask = grid.brain_mask(voxel)
        out = nifti.to_mni(np.asarray(ras_image.dataobj, np.float32), ras_image.affine, voxel, mask)
        assert out.shape == grid.target_grid(voxel)[0] and out.dtype == np.float32
        assert np.all(out[~mask] == 0)
        assert abs(out[mask].mean()) < 1e-4 and abs(out[mask].std() - 1) < 1e-4


def test_grids_and_masks():
    assert grid.target_grid(2)[0] == (91, 109, 91)
    assert grid.target_grid(4)[0] == (45, 54, 45)
    np.testing.assert_array_equal(grid.target_grid(2)[1][:3, 3], [-90, -126, -72])
    for voxel in (2, 4):
        mask = grid.brain_mask(voxel)
        volume_ml = mask.sum() * voxel**3 / 1000
        assert 1700 < volume_ml < 2100  # the MNI152 brain mask is about 1.9 l
    with pytest.raises(ValueError, match="voxel size"):
        grid.target_grid(3)


@pytest.mark.parametrize(
    "cls, suffix",
    [(nib.Nifti1Image, ".nii"), (nib.MGHImage, ".mgz"), (nib.Nifti1Pair, ".hdr"), (nib.Spm2AnalyzeImage, ".hdr")],
)
def test_other_formats_give_the_same_volume(ras_image, tmp_path, cls, suffix):
    """Analyze needs SPM's .mat beside it: plain Analyze 7.5 stores no orientation."""
    data = np.asarray(ras_image.dataobj).astype(np.float32)
    nib.save(cls(data, ras_image.affine), tmp_path / f"x{suffix}")
    nib.save(nib.Nifti1Image(data, ras_image.affine), tmp_path / "ref.nii.gz")
    mask = grid.brain_mask(4)
    np.testing.assert_allclose(
        nifti.preprocess_file(tmp_path / f"x{suffix}", 4, mask),
        nifti.preprocess_file(tmp_path / "ref.nii.gz", 4, mask),
        atol=1e-5,
    )


def test_single_frame_4d_is_accepted(tmp_path):
    data = np.ones((4, 4, 4, 1), np.float32)
    nib.save(nib.Nifti1Image(data, np.eye(4)), tmp_path / "x.nii")
    assert nifti.load(tmp_path / "x.nii")[0].shape == (4, 4, 4)
    nib.save(nib.Nifti1Image(np.ones((4, 4, 4, 1, 1), np.float32), np.eye(4)), tmp_path / "five.nii")
    assert nifti.load(tmp_path / "five.nii")[0].shape == (4, 4, 4)  # some converters write (x, y, z, 1, 1)
    nib.save(nib.Nifti1Image(np.ones((4, 4, 4, 1, 2), np.float32), np.eye(4)), tmp_path / "two.nii")
    with pytest.raises(nifti.BadImage, match=r"two.nii has 5 dimensions \(4, 4, 4, 1, 2\)"):
        nifti.load(tmp_path / "two.nii")


def _bad_files(tmp_path, good_bytes):
    cases = {}
    (tmp_path / "garbage.nii.gz").write_bytes(b"not an image at all" * 10)
    cases["garbage.nii.gz"] = "unreadable or truncated"
    (tmp_path / "trunc.nii.gz").write_bytes(good_bytes[: len(good_bytes) // 2])
    cases["trunc.nii.gz"] = "unreadable or truncated"
    raw = gzip.decompress(good_bytes)
    (tmp_path / "trunc.nii").write_bytes(raw[: len(raw) // 2])
    cases["trunc.nii"] = "unreadable or truncated"
    nib.save(nib.Nifti1Image(np.ones((5, 5, 5, 3), np.float32), np.eye(4)), tmp_path / "frames.nii.gz")
    cases["frames.nii.gz"] = "4D with 3 frames"
    nan = np.full((5, 5, 5), np.nan, np.float32)
    nan[0, 0, 0] = np.inf
    nib.save(nib.Nifti1Image(nan, np.eye(4)), tmp_path / "nan.nii.gz")
    cases["nan.nii.gz"] = r"has no finite voxel \(all NaN or inf\)"
    nan[1:3] = 0
    nib.save(nib.Nifti1Image(nan, np.eye(4)), tmp_path / "zero-nan.nii.gz")
    cases["zero-nan.nii.gz"] = "all zeros"
    nib.save(nib.Nifti1Image(np.ones((5, 5, 5), np.complex64), np.eye(4)), tmp_path / "complex.nii.gz")
    cases["complex.nii.gz"] = r"holds complex values \(complex64\); expected a magnitude image"
    nib.save(nib.Nifti1Image(np.zeros((5, 5, 5), np.int16), np.eye(4)), tmp_path / "zero.nii.gz")
    cases["zero.nii.gz"] = "all zeros"
    return cases


def test_each_bad_image_gets_its_reason(ras_image, tmp_path):
    nib.save(ras_image, tmp_path / "good.nii.gz")
    cases = _bad_files(tmp_path, (tmp_path / "good.nii.gz").read_bytes())
    for name, reason in cases.items():
        with pytest.raises(nifti.BadImage, match=reason) as exc:
            nifti.load(tmp_path / name)
        assert name in str(exc.value)


def test_image_outside_mni_space_is_rejected(ras_image, tmp_path):
    far = ras_image.affine.copy()
    far[:3, 3] += 500.0
    nib.save(nib.Nifti1Image(np.asarray(ras_image.dataobj), far), tmp_path / "far.nii.gz")
    with pytest.raises(nifti.BadImage, match=r"far.nii.gz covers only 0% of the MNI brain mask"):
        nifti.preprocess_file(tmp_path / "far.nii.gz", 4, grid.brain_mask(4))


def test_zscore_rejects_a_constant_brain():
    mask = np.zeros((4, 4, 4), bool)
    mask[1:3, 1:3, 1:3] = True
    with pytest.raises(nifti.BadImage, match="constant"):
        nifti.zscore(np.ones((4, 4, 4), np.float32), mask)


def test_zscore_is_unchanged_below_the_outlier_limit_and_refuses_a_brain_blanked_by_one_value():
    rng = np.random.default_rng(0)
    mask = np.ones((20, 20, 20), bool)
    volume = rng.normal(100.0, 10.0, mask.shape).astype(np.float32)
    vals = volume.astype(np.float64).ravel()
    np.testing.assert_array_equal(
        nifti.zscore(volume, mask), ((vals - vals.mean()) / vals.std()).astype(np.float32).reshape(mask.shape)
    )
    volume[3, 4, 5] = 1e30  # the other 7,999 voxels would come out within 1e-25 of 0
    with pytest.raises(nifti.BadImage, match=r"has 100% of its intensity variance .* in its 8 most extreme voxel\(s\)"):
        nifti.zscore(volume, mask)
    # the limit itself: 8 spikes of +-a on a background of +-1 hold 8a^2 / (8a^2 + 7992) of the variance
    for spike, refused in ((25.0, False), (40.0, True)):
        volume = np.where(np.indices(mask.shape).sum(0) % 2 == 0, 1.0, -1.0).astype(np.float32)
        volume.flat[:8] = spike * np.array([1, -1] * 4)
        assert (_top_share(volume.astype(np.float64).ravel(), 8) > nifti.MAX_OUTLIER_SHARE) == refused
        if refused:
            with pytest.raises(nifti.BadImage, match="most extreme"):
                nifti.zscore(volume, mask)
        else:
            assert np.isfinite(nifti.zscore(volume, mask)).all()


def _top_share(vals: np.ndarray, top: int) -> float:
    squares = np.sort(((vals - vals.mean()) / vals.std()) ** 2)
    return float(squares[-top:].sum() / squares.sum())


def test_values_beyond_float32_are_named_not_read_as_missing(ras_image, tmp_path):
    """A float64 image of 1e300s became all inf in float32: 'no finite voxel (all NaN or inf)', and numpy's overflow
    warning on the console; one such voxel was quietly counted as outside the field of view."""
    data = np.asarray(ras_image.dataobj, dtype=np.float64).copy()
    data[tuple(n // 2 for n in data.shape)] = 1e300
    nib.save(nib.Nifti1Image(data, ras_image.affine), tmp_path / "big.nii.gz")
    with pytest.raises(nifti.BadImage, match=r"^big.nii.gz holds values beyond float32's range .*stored as float64"):
        nifti.load(tmp_path / "big.nii.gz")
    data[tuple(n // 2 for n in data.shape)] = np.inf  # non-finite, as written: missing, as before
    nib.save(nib.Nifti1Image(data, ras_image.affine), tmp_path / "inf.nii.gz")
    assert np.isinf(nifti.load(tmp_path / "inf.nii.gz")[0]).sum() == 1


def test_a_colour_image_is_named_as_such(tmp_path):
    """RGB24 was 'unreadable or truncated image ...: The DTypes VoidDType and Float32DType do not have a common
    DType'."""
    rgb = np.zeros((10, 12, 10), dtype=[("R", "u1"), ("G", "u1"), ("B", "u1")])
    nib.save(nib.Nifti1Image(rgb, np.eye(4)), tmp_path / "rgb.nii.gz")
    with pytest.raises(nifti.BadImage, match=r"^rgb.nii.gz holds colour values \(R, G, B\); expected a grey-scale T1$"):
        nifti.load(tmp_path / "rgb.nii.gz")


def test_a_zero_voxel_size_without_an_sform_is_named(ras_image, tmp_path):
    """A qform-only header's voxel sizes are its pixdim; nibabel takes a 0 there as 1 mm and said so only in a log
    line, so a 2 mm axis was read as 1 mm."""
    header = ras_image.header.copy()
    header.set_sform(None, code=0)
    header.set_qform(ras_image.affine, code=1)
    image = nib.Nifti1Image(np.asarray(ras_image.dataobj), None, header)
    image.header["pixdim"][1] = 0
    nib.save(image, tmp_path / "zero.nii.gz")
    with pytest.raises(nifti.BadImage, match=r"^zero.nii.gz has voxel size 0 along i \(pixdim\) and no sform"):
        nifti.load(tmp_path / "zero.nii.gz")


def test_an_image_with_a_corrupt_voxel_is_a_bad_image(ras_image, tmp_path):
    data = np.asarray(ras_image.dataobj, dtype=np.float32).copy()
    data[tuple(n // 2 for n in data.shape)] = 1e30
    nib.save(nib.Nifti1Image(data, ras_image.affine), tmp_path / "spike.nii.gz")
    with pytest.raises(nifti.BadImage, match=r"^spike.nii.gz has 100% of its intensity variance"):
        nifti.preprocess_file(tmp_path / "spike.nii.gz", 4, grid.brain_mask(4))


def _header_only(path, shape):
    """A file whose header claims `shape` but holds no voxels (like a 4000^3 header on a few bytes)."""
    hdr = nib.Nifti1Header()
    hdr.set_data_shape(shape)
    hdr.set_data_dtype(np.uint8)
    raw = hdr.binaryblock + b"\0" * 4
    path.write_bytes(gzip.compress(raw) if path.name.endswith(".gz") else raw)


@pytest.mark.parametrize(
    "name, shape, message",
    [
        ("huge.nii", (4000, 4000, 4000), "4000x4000x4000 voxels (256 GB as float32), above the 512 MB limit"),
        ("big.nii.gz", (700, 700, 700), "700x700x700 voxels (1.37 GB as float32), above the 512 MB limit"),
        ("frames.nii.gz", (700, 700, 700, 3), "4D with 3 frames"),
        ("one-frame.nii", (400, 400, 900, 1), "400x400x900 voxels (576 MB as float32)"),
    ],
)
def test_oversized_headers_are_refused_before_reading(tmp_path, name, shape, message):
    """The file holds no voxels: reading any data would fail as truncated or run out of memory."""
    _header_only(tmp_path / name, shape)
    with pytest.raises(nifti.BadImage, match=re.escape(message)) as exc:
        nifti.load(tmp_path / name)
    assert name in str(exc.value) and "truncated" not in str(exc.value)


@pytest.mark.parametrize(
    "cls, suffix", [(nib.Nifti1Image, ".nii.gz"), (nib.MGHImage, ".mgz"), (nib.Nifti1Pair, ".hdr")]
)
def test_size_limit_is_configurable_and_applies_to_every_format(tmp_path, cls, suffix):
    data = np.ones((50, 50, 50), np.float32)  # 0.5 MB as float32
    nib.save(cls(data, np.eye(4)), tmp_path / f"x{suffix}")
    assert nifti.load(tmp_path / f"x{suffix}", max_image_mb=0.5)[0].shape == (50, 50, 50)
    with pytest.raises(
        nifti.BadImage, match=re.escape("50x50x50 voxels (0.5 MB as float32), above the 0.4 MB limit (--max-image-mb)")
    ):
        nifti.load(tmp_path / f"x{suffix}", max_image_mb=0.4)
    with pytest.raises(nifti.BadImage, match=r"above the 0\.4 MB limit"):
        nifti.preprocess_file(tmp_path / f"x{suffix}", 4, grid.brain_mask(4), max_image_mb=0.4)


@pytest.mark.parametrize(
    "error, reason",
    [
        (MemoryError, r"not enough memory to read x.nii \(0.0005 MB as float32\)"),
        (OSError, r"unreadable or truncated image x.nii: OSError$"),
        (ValueError, r"unreadable or truncated image x.nii: ValueError$"),
    ],
)
def test_a_failure_without_a_message_still_has_a_reason(tmp_path, monkeypatch, error, reason):
    nib.save(nib.Nifti1Image(np.ones((5, 5, 5), np.float32), np.eye(4)), tmp_path / "x.nii")

    def fail(*args, **kwargs):
        raise error

    monkeypatch.setattr(nib.arrayproxy.ArrayProxy, "__array__", fail)
    with pytest.raises(nifti.BadImage, match=reason):
        nifti.load(tmp_path / "x.nii")


@pytest.mark.parametrize(
    "error, unavailable",
    [
        (MemoryError(), True),
        (OSError(errno.EIO, "Input/output error", "x.nii"), True),
        (PermissionError(errno.EACCES, "Permission denied", "x.nii"), True),
        (FileNotFoundError(errno.ENOENT, "No such file or directory", "x.img"), False),
        (OSError("damaged"), False),
        (ValueError("damaged"), False),
    ],
)
def test_a_failed_read_is_unavailable_when_the_machine_not_the_image_is_at_fault(
    tmp_path, monkeypatch, error, unavailable
):
    """Out of memory, an I/O error, a refusal: the image may read on a re-run (convert retries an Unavailable one);
    a missing file or damaged bytes stay the dataset's. All were plain BadImage, and an output that skipped a subject
    for memory stayed up to date once the machine had more."""
    nib.save(nib.Nifti1Image(np.ones((5, 5, 5), np.float32), np.eye(4)), tmp_path / "x.nii")

    def fail(*args, **kwargs):
        raise error

    monkeypatch.setattr(nib.arrayproxy.ArrayProxy, "__array__", fail)
    with pytest.raises(nifti.BadImage) as caught:
        nifti.load(tmp_path / "x.nii")
    assert isinstance(caught.value, nifti.Unavailable) == unavailable


def test_an_io_error_reading_the_header_is_unavailable(tmp_path, monkeypatch):
    """nibabel's header read too: an EIO there was 'unreadable or truncated image', the image's fault."""
    nib.save(nib.Nifti1Image(np.ones((5, 5, 5), np.float32), np.eye(4)), tmp_path / "x.nii")

    def fail(*args, **kwargs):
        raise OSError(errno.EIO, "Input/output error", os.fspath(tmp_path / "x.nii"))

    monkeypatch.setattr(nib, "load", fail)
    with pytest.raises(nifti.Unavailable, match=r"^x.nii cannot be read: Input/output error$"):
        nifti.load(tmp_path / "x.nii")


@pytest.mark.parametrize("name, denied", [("x.nii.gz", "x.nii.gz"), ("x.nii", "x.nii"), ("x.hdr", "x.img")])
def test_a_file_the_system_will_not_read_is_named_with_the_reason(tmp_path, monkeypatch, name, denied):
    """Tests run as root, whom chmod does not deny: opening `denied` is made to raise PermissionError. nibabel said
    'Could not read file: PATH' (.nii.gz) or 'Cannot work out file type of PATH' (.nii), and a pair's .img was
    '[Errno 13] Permission denied: PATH', each after 'unreadable or truncated image'."""
    cls = nib.Nifti1Pair if name.endswith(".hdr") else nib.Nifti1Image
    nib.save(cls(np.ones((5, 5, 5), np.float32), np.eye(4)), tmp_path / name)
    real_open = open

    def fake_open(path, *args, **kwargs):
        if os.fspath(path) == os.fspath(tmp_path / denied):
            raise PermissionError(errno.EACCES, "Permission denied", os.fspath(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr("builtins.open", fake_open)  # load's own open, nibabel's for a .gz (gzip)
    # nibabel opens an uncompressed file with the open its ImageOpener held when imported
    monkeypatch.setitem(nib.openers.ImageOpener.compress_ext_map, None, (fake_open, ("mode", "buffering")))
    with pytest.raises(nifti.BadImage, match=f"^{re.escape(denied)} cannot be read: Permission denied$"):
        nifti.load(tmp_path / name)


def test_degenerate_affine_is_bad_input(tmp_path):
    """An sform whose z row is zero (nibabel refuses to write one, so the header is made by hand)."""
    hdr = nib.Nifti1Header()
    hdr.set_data_shape((5, 5, 5))
    hdr.set_data_dtype(np.float32)
    hdr["vox_offset"] = 352
    hdr["sform_code"] = 1
    hdr["srow_x"], hdr["srow_y"], hdr["srow_z"] = [1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 0, 0]
    (tmp_path / "flat.nii").write_bytes(hdr.binaryblock + b"\0" * 4 + np.ones((5, 5, 5), np.float32).tobytes())
    with pytest.raises(nifti.BadImage, match=r"^flat.nii has a degenerate voxel-to-world affine$"):
        nifti.load(tmp_path / "flat.nii")


def _top_of_the_head(path, z_from):
    """Random texture over the whole MNI box in x and y, but only above z = z_from mm (a partial field of view)."""
    shape = (98, 116, int((112 - z_from) / 2))
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    affine[:3, 3] = [-98.0, -134.0, z_from]
    nib.save(nib.Nifti1Image(np.random.default_rng(0).uniform(1, 2, size=shape).astype(np.float32), affine), path)
    return path


def test_partial_field_of_view_is_judged_on_the_brain_mask_alone(tmp_path):
    """z >= 0 holds ~60% of the 4 mm brain mask (accepted), z >= 30 ~30% (refused), although the second box
    covers more grid voxels than the mask has."""
    mask = grid.brain_mask(4)
    out = nifti.preprocess_file(_top_of_the_head(tmp_path / "most.nii.gz", 0.0), 4, mask)
    assert out.shape == mask.shape and np.all(out[~mask] == 0)
    with pytest.raises(nifti.BadImage, match=r"^top.nii.gz covers only (29|30|31)% of the MNI brain mask"):
        nifti.preprocess_file(_top_of_the_head(tmp_path / "top.nii.gz", 30.0), 4, mask)


def _cut(image, z_mm):
    """`image`'s data with every voxel below z = z_mm (world) removed: as NaN, and as a field of view that
    starts there (the array cropped, the affine moved)."""
    data = np.asarray(image.dataobj, np.float32)
    k = int(np.ceil((z_mm - image.affine[2, 3]) / image.affine[2, 2]))
    nan = data.copy()
    nan[:, :, :k] = np.nan
    cropped = image.affine.copy()
    cropped[:3, 3] = image.affine[:3, :3] @ [0, 0, k] + image.affine[:3, 3]
    return nan, (np.ascontiguousarray(data[:, :, k:]), cropped)


def test_the_brain_an_image_does_not_cover_is_left_out_of_its_z_scores(ras_image):
    """The inferior 30 mm missing (NaN, or outside the field of view): the covered brain is z-scored on its
    own (mean 0, std 1) and the missing part holds 0; before, the missing voxels counted as zeros in the
    mean and std and came out near -4. A whole image gives the same values as before (mask fully covered)."""
    mask = grid.brain_mask(4)
    whole = nifti.to_mni(np.asarray(ras_image.dataobj, np.float32), ras_image.affine, 4, mask)
    nan, (cropped, affine) = _cut(ras_image, -40.0)
    for out in (nifti.to_mni(nan, ras_image.affine, 4, mask), nifti.to_mni(cropped, affine, 4, mask)):
        z = grid.target_grid(4)[1][2, 3] + 4 * np.arange(mask.shape[2])
        missing = mask & (z < -42)[None, None, :]
        covered = mask & (z > -36)[None, None, :]
        assert missing.sum() > 0.02 * mask.sum() and np.all(out[missing] == 0) and np.all(out[~mask] == 0)
        inside = out[mask & (out != 0)]
        assert abs(inside.mean()) < 1e-3 and abs(inside.std() - 1) < 1e-3
        assert np.corrcoef(out[covered], whole[covered])[0, 1] > 0.999  # the same brain, rescaled
    shape, target = grid.target_grid(4)
    data, sizes = np.asarray(ras_image.dataobj, np.float32), np.abs(np.diag(ras_image.affine)[:3])
    before = grid.resample(grid.antialias(data, sizes, 4.0), ras_image.affine, shape, target, order=1)
    np.testing.assert_array_equal(whole, nifti.zscore(before, mask))  # full cover: z-scored over the whole mask


@pytest.mark.parametrize(("voxel", "cut_mm"), [(4, -40.0), (2, -41.0)])
def test_the_voxels_beside_the_missing_part_are_not_darkened_by_it(ras_image, voxel, cut_mm):
    """The inferior part missing (NaN, or outside the field of view): the first covered slice is the mean of
    the image's own voxels, as in the whole image. Before, the smoothing and the trilinear interpolation took
    the missing voxels as zeros, and that slice came out darker than the same brain whole (here 0.16-0.3 SD
    on average; up to 1 SD in a voxel at 2 mm), a band along every cut that no brain has."""
    mask = grid.brain_mask(voxel)
    whole = nifti.to_mni(np.asarray(ras_image.dataobj, np.float32), ras_image.affine, voxel, mask)
    nan, (cropped, affine) = _cut(ras_image, cut_mm)
    z = np.broadcast_to(grid.target_grid(voxel)[1][2, 3] + voxel * np.arange(mask.shape[2]), mask.shape)
    for out in (nifti.to_mni(nan, ras_image.affine, voxel, mask), nifti.to_mni(cropped, affine, voxel, mask)):
        covered = mask & (out != 0)
        same = (whole - whole[covered].mean()) / whole[covered].std()  # z-scored over the same voxels
        edge = covered & (z == z[covered].min())
        assert edge.sum() > 100
        assert abs((out[edge] - same[edge]).mean()) < 0.06


def test_an_image_mostly_non_finite_is_refused_naming_them(ras_image):
    nan, _ = _cut(ras_image, 20.0)
    with pytest.raises(nifti.BadImage, match=r"covers only \d+% of the MNI brain mask, its \d+ non-finite voxels"):
        nifti.to_mni(nan, ras_image.affine, 4, grid.brain_mask(4))


def test_antialiasing_uses_each_array_axis_voxel_size_for_an_oblique_image(monkeypatch):
    """1 x 1 x 3 mm voxels tilted 30 degrees about x: the voxel sizes are the affine's column norms (its row
    norms would be 1, 1.73, 2.65 mm)."""
    c, s = np.cos(np.radians(30)), np.sin(np.radians(30))
    shape = (180, 220, 60)
    affine = np.eye(4)
    affine[:3, :3] = np.array([[1, 0, 0], [0, c, -s], [0, s, c]]) @ np.diag([1.0, 1.0, 3.0])
    affine[:3, 3] = -affine[:3, :3] @ (np.array(shape) / 2) + [0, -18, 12]  # centred on the brain
    seen = []
    real = grid.antialias
    monkeypatch.setattr(grid, "antialias", lambda data, sizes, target: seen.append(sizes) or real(data, sizes, target))
    data = np.random.default_rng(0).uniform(1, 2, size=shape).astype(np.float32)
    nifti.to_mni(data, affine, 4, grid.brain_mask(4))
    np.testing.assert_allclose(seen[0], [1.0, 1.0, 3.0])


def test_sform_and_qform_that_disagree_on_left_and_right_are_refused(ras_image, tmp_path):
    """nibabel reads the sform, FSL and ITK may read the qform: one of them mirrors the hemispheres, and a nearly
    symmetric brain passes every later check. Before, the sform silently won."""
    img = nib.Nifti1Image(np.asarray(ras_image.dataobj), ras_image.affine)
    img.header.set_sform(ras_image.affine, code=1)
    img.header.set_qform(ras_image.affine @ np.diag([-1.0, 1, 1, 1]), code=1)
    nib.save(img, tmp_path / "x.nii.gz")
    with pytest.raises(nifti.BadImage, match=r"sform \(RAS\) and qform \(LAS\) disagree"):
        nifti.load(tmp_path / "x.nii.gz")
    img.header.set_qform(ras_image.affine, code=1)  # agreeing: accepted
    nib.save(img, tmp_path / "y.nii.gz")
    assert nifti.load(tmp_path / "y.nii.gz")[0].shape == ras_image.shape


def test_an_image_without_orientation_is_refused(ras_image, tmp_path):
    """Neither sform nor qform set (nibabel would guess Analyze's flipped x), or plain Analyze 7.5 without SPM's
    .mat: which side is left is unknown."""
    data = np.asarray(ras_image.dataobj).astype(np.float32)
    nib.save(nib.Nifti1Image(data, None), tmp_path / "x.nii")  # no affine given: both codes stay 0
    with pytest.raises(nifti.BadImage, match="sform_code and qform_code 0: its orientation"):
        nifti.load(tmp_path / "x.nii")
    nib.save(nib.AnalyzeImage(data, ras_image.affine), tmp_path / "plain.hdr")
    assert not (tmp_path / "plain.mat").exists()
    with pytest.raises(nifti.BadImage, match=r"Analyze 7.5 image without SPM's .mat"):
        nifti.load(tmp_path / "plain.hdr")


def test_an_unreadable_qform_is_bad_input_not_a_crash(tmp_path):
    """A quaternion out of range made nibabel raise ValueError from get_qform, which ended the whole run."""
    img = nib.Nifti1Image(np.ones((4, 4, 4), np.float32), np.eye(4))
    img.header.set_qform(np.eye(4), code=1)
    img.header["quatern_b"], img.header["quatern_c"], img.header["quatern_d"] = 0.9, 0.9, 0.9
    nib.save(img, tmp_path / "q.nii")
    with pytest.raises(nifti.BadImage, match=r"^q.nii has an unreadable qform"):
        nifti.load(tmp_path / "q.nii")


@pytest.mark.parametrize("units, per_mm", [("mm", 1.0), ("unknown", 1.0), ("micron", 1000.0), ("meter", 0.001)])
def test_spatial_units_are_converted_to_mm(ras_image, tmp_path, units, per_mm):
    """A NIfTI in microns or meters, read as if in mm, was refused as covering 0% of the MNI brain mask; ITK
    converts such units to mm, and so does load. Unknown units are mm in practice."""
    nib.save(ras_image, tmp_path / "ref.nii.gz")
    img = nib.Nifti1Image(np.asarray(ras_image.dataobj), np.diag([per_mm, per_mm, per_mm, 1.0]) @ ras_image.affine)
    img.header.set_xyzt_units(units, "sec")
    nib.save(img, tmp_path / "x.nii.gz")
    assert nib.load(tmp_path / "x.nii.gz").header.get_xyzt_units() == (units, "sec")
    np.testing.assert_allclose(nifti.load(tmp_path / "x.nii.gz")[1], ras_image.affine, rtol=1e-6, atol=1e-6)
    mask = grid.brain_mask(4)
    np.testing.assert_allclose(
        nifti.preprocess_file(tmp_path / "x.nii.gz", 4, mask),
        nifti.preprocess_file(tmp_path / "ref.nii.gz", 4, mask),
        atol=1e-5,
    )


@pytest.mark.parametrize("shape", [(0, 10, 10), (10, 10, 0, 1), (10, 10, 10, 0), (-5, 10, 10)])
def test_a_header_with_an_empty_dimension_is_refused_naming_its_shape(tmp_path, shape):
    """Before, (0, 10, 10) was said to have 'no finite voxel (all NaN or inf)', (10, 10, 10, 0) to be '4D with 0
    frames', and a negative size to be 'unreadable or truncated'."""
    path = tmp_path / "x.nii"
    if min(shape) == 0:
        nib.save(nib.Nifti1Image(np.zeros(shape, np.float32), np.eye(4)), path)
    else:  # nibabel writes no negative size: the header's dim is set by hand
        hdr = nib.Nifti1Header()
        hdr.set_data_dtype(np.float32)
        hdr.set_sform(np.eye(4), code=1)
        hdr["vox_offset"] = 352
        hdr["dim"] = [len(shape), *shape, *[1] * (7 - len(shape))]
        path.write_bytes(hdr.binaryblock + b"\0" * 4)
    assert nib.load(path).shape == shape
    message = f"x.nii has the shape {shape} in its header, a dimension of size {min(shape)}: it holds no voxels"
    with pytest.raises(nifti.BadImage, match=f"^{re.escape(message)}$"):
        nifti.load(path)


@pytest.mark.parametrize(
    "units, scale, sizes, limit, meant",
    [
        ("mm", 1000.0, "1250x1250x1250", "above the 20 mm of any head scan", "micron"),  # pixdim in microns
        ("meter", 1.0, "1250x1250x1250", "above the 20 mm of any head scan", "mm"),
        ("micron", 1.0, "0.00125x0.00125x0.00125", "below the 0.05 mm of any whole-brain MRI", "mm"),
        ("mm", 0.001, "0.00125x0.00125x0.00125", "below the 0.05 mm of any whole-brain MRI", "meter"),
    ],
)
def test_a_header_in_other_units_than_it_says_is_named_with_the_units_and_the_fix(
    ras_image, tmp_path, units, scale, sizes, limit, meant
):
    """Numbers in other units than xyzt_units says: 1250 mm voxels put the MNI grid inside the image's first voxels
    (a blur of a few voxels was written), and 0.00125 mm voxels, mm numbers under micron units, were said to cover 0%
    of the MNI brain mask, 'is it in MNI world coordinates (registered)?': a registration cannot mend a header."""
    img = nib.Nifti1Image(np.asarray(ras_image.dataobj), np.diag([scale, scale, scale, 1.0]) @ ras_image.affine)
    img.header.set_xyzt_units(units, "sec")
    nib.save(img, tmp_path / "x.nii.gz")
    rescale = "" if meant == "mm" else " or scale the sform, qform and pixdim to mm"
    message = (
        f"x.nii.gz has voxels of {sizes} mm, {limit}: its numbers look written in {meant} (1.25x1.25x1.25 mm voxels "
        f"if so) while its spatial units (xyzt_units) say {units}; fix the header, not the registration: set the "
        f"units the numbers are in (nibabel: img.header.set_xyzt_units('{meant}')){rescale}"
    )
    with pytest.raises(nifti.BadImage, match=f"^{re.escape(message)}$"):
        nifti.preprocess_file(tmp_path / "x.nii.gz", 4, grid.brain_mask(4))
    img.header.set_xyzt_units(meant, "sec")  # the fix the message gives
    nib.save(img, tmp_path / "x.nii.gz")
    np.testing.assert_allclose(nifti.load(tmp_path / "x.nii.gz")[1], ras_image.affine, rtol=1e-6, atol=1e-6)


def test_voxel_sizes_no_units_explain_are_asked_about_and_a_format_without_units_is_named(ras_image, tmp_path):
    one_axis = nib.Nifti1Image(np.asarray(ras_image.dataobj), ras_image.affine @ np.diag([1.0, 1.0, 1000.0, 1.0]))
    one_axis.header.set_xyzt_units(0, "sec")
    nib.save(one_axis, tmp_path / "x.nii.gz")
    message = (
        "x.nii.gz has voxels of 1.25x1.25x1250 mm, above the 20 mm of any head scan: are its voxel sizes (sform, "
        "pixdim) or its spatial units (xyzt_units, unknown (read as mm)) wrong? Fix the header, not the registration"
    )
    with pytest.raises(nifti.BadImage, match=f"^{re.escape(message)}$"):
        nifti.load(tmp_path / "x.nii.gz")
    mgh = nib.MGHImage(np.asarray(ras_image.dataobj, np.float32), np.diag([1e3, 1e3, 1e3, 1.0]) @ ras_image.affine)
    nib.save(mgh, tmp_path / "x.mgz")
    message = (
        "x.mgz has voxels of 1250x1250x1250 mm, above the 20 mm of any head scan (in micron it would be 1.25x1.25x1.25 "
        "mm): fix the header, not the registration: scale its affine to mm"
    )
    with pytest.raises(nifti.BadImage, match=f"^{re.escape(message)}$"):
        nifti.load(tmp_path / "x.mgz")


def test_thick_slices_are_not_too_large(ras_image, tmp_path):
    affine = ras_image.affine @ np.diag([1.0, 1.0, 8.0, 1.0])  # 1.25 x 1.25 x 10 mm, a clinical thick-slice scan
    nib.save(nib.Nifti1Image(np.asarray(ras_image.dataobj)[:, :, ::8], affine), tmp_path / "x.nii.gz")
    assert nifti.load(tmp_path / "x.nii.gz")[0].shape[2] == -(-ras_image.shape[2] // 8)
