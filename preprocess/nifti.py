"""Load one structural image, check it, and bring it onto the MNI grid.

The pipeline assumes the image's world coordinates are already MNI-aligned (as for the
synthetic cohort, or after a registration the user ran): it reorients to RAS+, smooths
just enough to avoid aliasing, resamples onto the fixed grid, applies the MNI brain mask
and z-scores within it. It does not register; an image that barely overlaps the mask is
rejected rather than silently producing garbage.
"""

from __future__ import annotations

import errno
import math
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from fedmpi.errors import UserError
from preprocess import bids, grid, outputs

MIN_MASK_COVERAGE = 0.5
# Largest image accepted, as float32 in MB (10**6 bytes). A worker holds several copies while
# resampling, so this bounds its memory; a 1 mm whole-head T1 is 20-70 MB, 0.5 mm 7 T data ~400 MB.
DEFAULT_MAX_IMAGE_MB = 512.0
# mm per unit of a NIfTI's spatial xyzt_units code (its low 3 bits): meter 1, micron 3. Every other code
# (0 unknown, 2 mm, and the undefined 4-7) is taken as mm, as ITK's NiftiImageIO does.
NIFTI_MM_PER_UNIT = {1: 1000.0, 3: 0.001}
# Largest voxel edge accepted, in mm: thick-slice clinical T1s reach 5-10 mm. Above it the header is wrong (a meter
# or micron slip): the brain spans a few voxels, and the grid inside the image's field of view passed every check.
MAX_VOXEL_MM = 20.0
# Smallest, in mm: half the finest whole-brain MRI (ex vivo, 0.1 mm; MR microscopy of tissue samples goes finer, but
# a head at 0.05 mm is over 100 GB, far beyond --max-image-mb). Below it the header is wrong the other way (mm numbers
# under xyzt_units micron, meter numbers under mm: 0.001 mm voxels): the whole image lies inside one MNI grid voxel.
MIN_VOXEL_MM = 0.05
# The NIfTI spatial units that the header's numbers may have been meant in, as (name, mm per unit)
UNITS = (("mm", 1.0), ("micron", 0.001), ("meter", 1000.0))
# Most of a brain's intensity variance in a few voxels is a corrupt or extreme value (a 1e30 from a broken writer,
# a spike): z-scored by that variance, the rest of the brain comes out near 0, an almost blank volume that passed
# every check. The MNI152 template and the synthetic cohort keep about 1% of it in their most extreme 0.1% of voxels
# (normal noise: 1.1%); an image past half is refused.
OUTLIER_FRACTION = 0.001
MAX_OUTLIER_SHARE = 0.5


class BadImage(UserError, ValueError):
    """An input image that cannot be used; the message is the human-readable reason."""


class Unavailable(BadImage):
    """An image this machine could not read or process now (out of memory, an I/O error), through no fault of its
    own: an output that skipped it is not up to date, so that a re-run retries it (convert)."""


# Errors that say a file is not there, or not a file: the dataset's to fix, and fixing it changes the input's
# fingerprint (convert). Any other errno (EIO, EACCES, ESTALE, ENOMEM) is the system's: the image is Unavailable.
ABSENT_ERRNOS = (errno.ENOENT, errno.ENOTDIR, errno.EISDIR, errno.ELOOP)


def unreadable(name, exc: OSError) -> BadImage:
    """bids.unreadable's line, as an Unavailable image unless the file is absent (ABSENT_ERRNOS)."""
    kind = BadImage if exc.errno in ABSENT_ERRNOS else Unavailable
    return kind(bids.unreadable(name, exc))


def _read_error(path: Path, exc: OSError) -> BadImage:
    """What an OSError while nibabel reads `path` says: a damaged file (gzip's BadGzipFile has no errno), or one the
    system will not give back, named by the file it failed on (a NIfTI pair's or Analyze image's voxels lie in its
    .img)."""
    if exc.errno is None:
        return BadImage(f"unreadable or truncated image {path.name}: {_reason(exc)}")
    return unreadable(Path(exc.filename or path).name, exc)


def _reason(exc: Exception) -> str:
    """An exception's message, or its type when it has none (never an empty reason)."""
    return str(exc) or type(exc).__name__


def check_header(name: str, shape: tuple[int, ...], max_image_mb: float) -> None:
    """Refuse from the header alone what must not be read: no voxels, several frames, other dimensions,
    and images above the size limit (a small .nii.gz can claim gigabytes of voxels)."""
    if any(n < 1 for n in shape):  # read on, an empty image was said to have 'no finite voxel'
        raise BadImage(
            f"{name} has the shape {shape} in its header, a dimension of size {min(shape)}: it holds no voxels"
        )
    if len(shape) == 4 and shape[3] != 1:
        raise BadImage(f"{name} is 4D with {shape[3]} frames; expected one 3D volume")
    if len(shape) < 3 or any(n != 1 for n in shape[3:]):  # trailing 1s (x, y, z, 1, 1) hold one volume
        raise BadImage(f"{name} has {len(shape)} dimensions {shape}; expected a 3D volume")
    nbytes = math.prod(shape) * 4
    if nbytes > max_image_mb * 1e6:
        raise BadImage(
            f"{name} is {'x'.join(str(s) for s in shape[:3])} voxels ({outputs.size_text(nbytes)} as float32), "
            f"above the {max_image_mb:g} MB limit (--max-image-mb)"
        )


def load(path, max_image_mb: float = DEFAULT_MAX_IMAGE_MB) -> tuple[np.ndarray, np.ndarray]:
    """Read a 3D image (one with trailing dimensions of 1, a single frame, is accepted) as float32 + affine.

    Raises BadImage for unreadable or truncated files, several frames, images above
    `max_image_mb` (checked before any voxel is read), voxels outside [MIN_VOXEL_MM, MAX_VOXEL_MM] (units_problem),
    and images without a finite non-zero voxel.
    Non-finite voxels (NaN, as SPM writes outside its bounding box) stay: to_mni counts them as
    outside the field of view. The affine is in mm, whatever spatial units a NIfTI declares (mm_per_unit).
    """
    path = Path(path)
    try:  # nibabel turns this into 'Cannot work out file type' (.nii) or 'Could not read file' (.nii.gz)
        with open(path, "rb"):
            pass
    except OSError as exc:
        raise unreadable(path.name, exc) from None
    try:
        img: Any = nib.load(str(path))  # a spatial image (nibabel types it as any file-based image)
        shape = tuple(int(s) for s in img.shape)
    except OSError as exc:
        raise _read_error(path, exc) from None
    except Exception as exc:  # nibabel raises many types for a bad header
        raise BadImage(f"unreadable or truncated image {path.name}: {_reason(exc)}") from None
    check_header(path.name, shape, max_image_mb)
    stored = np.dtype(img.get_data_dtype())
    if stored.kind == "c":  # a cast to float32 would drop the imaginary part unsaid
        raise BadImage(f"{path.name} holds complex values ({stored}); expected a magnitude image")
    if stored.fields:  # RGB24/RGBA32: no cast to float32 ("no common DType")
        raise BadImage(f"{path.name} holds colour values ({', '.join(stored.names)}); expected a grey-scale T1")
    try:
        with np.errstate(over="raise"):  # a finite value beyond float32 would become inf: counted as missing
            data = np.asarray(img.dataobj, dtype=np.float32)
    except FloatingPointError:
        raise BadImage(
            f"{path.name} holds values beyond float32's range (above 3.4e38; stored as {stored}, "
            f"scaled by scl_slope {getattr(img.dataobj, 'slope', 1.0):g}): a corrupt image or a wrong scaling"
        ) from None
    except MemoryError:
        size = outputs.size_text(math.prod(shape) * 4)
        raise Unavailable(f"not enough memory to read {path.name} ({size} as float32)") from None
    except OSError as exc:
        raise _read_error(path, exc) from None
    except Exception as exc:  # nibabel, gzip and zlib raise many types for a bad file
        raise BadImage(f"unreadable or truncated image {path.name}: {_reason(exc)}") from None
    if data.ndim > 3:
        data = data.reshape(data.shape[:3])
    scale = mm_per_unit(img)
    affine = np.diag([scale, scale, scale, 1.0]) @ np.asarray(img.affine, dtype=np.float64)
    if not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-9:
        raise BadImage(f"{path.name} has a degenerate voxel-to-world affine")
    units_problem(path.name, img, np.sqrt((affine[:3, :3] ** 2).sum(axis=0)), scale)
    orientation_problem(path.name, img)
    finite = np.isfinite(data)
    if not finite.any():
        raise BadImage(f"{path.name} has no finite voxel (all NaN or inf)")
    if not np.any(data[finite]):
        raise BadImage(f"{path.name} is all zeros")
    return data, affine


def mm_per_unit(img) -> float:
    """The factor that brings the affine of `img` to mm: nibabel gives it in the header's spatial units, which
    a NIfTI may set to meter or micron (its voxel sizes and world coordinates would otherwise be read
    1000 times off, and the image refused as outside MNI space). MGH and Analyze are always mm."""
    if isinstance(img, nib.Nifti1Pair):  # every NIfTI-1/2 image or pair
        return NIFTI_MM_PER_UNIT.get(int(img.header["xyzt_units"]) & 0x07, 1.0)
    return 1.0


def _sizes_text(sizes) -> str:
    return "x".join(f"{s:.4g}" for s in sizes)


def units_problem(name: str, img, sizes: np.ndarray, scale: float) -> None:
    """BadImage for voxel sizes (mm, read at `scale` mm per header unit) outside [MIN_VOXEL_MM, MAX_VOXEL_MM]: a
    header whose numbers are in other units than it says. The message names the units that would make them a head
    scan's and the fix, in the header: 0.001 mm voxels were said to cover 0% of the MNI brain mask, with the hint
    'is it registered?', which sent the user to a registration that cannot mend a header."""
    small, large = bool(np.any(sizes < MIN_VOXEL_MM)), bool(np.any(sizes > MAX_VOXEL_MM))
    if not (small or large):
        return
    limit = (
        f"below the {MIN_VOXEL_MM:g} mm of any whole-brain MRI"
        if small
        else f"above the {MAX_VOXEL_MM:g} mm of any head scan"
    )
    text = f"{name} has voxels of {_sizes_text(sizes)} mm, {limit}"
    numbers = sizes / scale  # as the header writes them
    fits = [
        (unit, numbers * per)
        for unit, per in UNITS
        if np.all((numbers * per >= MIN_VOXEL_MM) & (numbers * per <= MAX_VOXEL_MM))
    ]
    if not isinstance(img, nib.Nifti1Pair):  # MGH and Analyze have no units field: always mm
        meant = "".join(f" (in {unit} it would be {_sizes_text(mm)} mm)" for unit, mm in fits)
        raise BadImage(f"{text}{meant}: fix the header, not the registration: scale its affine to mm")
    code = int(img.header["xyzt_units"]) & 0x07
    declared = {0: "unknown (read as mm)", 1: "meter", 2: "mm", 3: "micron"}.get(code, f"code {code} (read as mm)")
    if not fits:
        raise BadImage(
            f"{text}: are its voxel sizes (sform, pixdim) or its spatial units (xyzt_units, {declared}) wrong? "
            "Fix the header, not the registration"
        )
    unit, mm = fits[0]
    rescale = "" if unit == "mm" else " or scale the sform, qform and pixdim to mm"
    raise BadImage(
        f"{text}: its numbers look written in {unit} ({_sizes_text(mm)} mm voxels if so) while its spatial units "
        f"(xyzt_units) say {declared}; fix the header, not the registration: set the units the numbers are in "
        f"(nibabel: img.header.set_xyzt_units('{unit}')){rescale}"
    )


def _stored_pixdim(img) -> np.ndarray:
    """pixdim as the file holds it: nibabel's loaded header has already turned a 0 there into 1."""
    stored = img.file_map.get("header") or img.file_map["image"]
    try:
        with nib.openers.ImageOpener(stored.filename) as f:
            return np.asarray(type(img.header).from_fileobj(f, check=False)["pixdim"])
    except Exception:  # an in-memory image, or a header nibabel read once but not twice: its loaded one
        return np.asarray(img.header["pixdim"])


def orientation_problem(name: str, img) -> None:
    """BadImage when the header does not say which side is left: a NIfTI with neither sform nor qform
    (nibabel then guesses the Analyze convention, x flipped), a plain Analyze file (no orientation at
    all, radiological or neurological by the writer's habit) or a NIfTI whose sform and qform disagree
    on the axis directions (nibabel takes the sform, ITK/ANTs and others may take the qform). Each of
    these can mirror the hemispheres without moving the brain, which no later check would notice. Also a
    qform-only NIfTI with a zero voxel size, whose geometry nibabel guesses."""
    header = img.header
    if isinstance(img, nib.Nifti1Pair):  # every NIfTI-1/2 image or pair
        sform_code, qform_code = int(header["sform_code"]), int(header["qform_code"])
        if sform_code == 0 and qform_code == 0:
            raise BadImage(
                f"{name} has sform_code and qform_code 0: its orientation (which side is left) is unknown; "
                "set the sform/qform (e.g. fslorient or nibabel) to the image's real orientation"
            )
        if sform_code == 0:  # the qform's voxel sizes are pixdim's, and nibabel takes a 0 there as 1 mm
            zero = [axis for axis, size in zip("ijk", _stored_pixdim(img)[1:4]) if size == 0]
            if zero:
                raise BadImage(
                    f"{name} has voxel size 0 along {', '.join(zero)} (pixdim) and no sform: its geometry is "
                    "unknown (nibabel would take 1 mm); fix the header's pixdim"
                )
        if sform_code and qform_code:
            sform = header.get_sform()
            try:
                qform = header.get_qform()
            except (ValueError, nib.spatialimages.HeaderDataError) as exc:  # e.g. a quaternion out of range
                raise BadImage(f"{name} has an unreadable qform ({exc}); fix or clear it (qform_code 0)") from None
            same_axes = np.array_equal(nib.orientations.io_orientation(sform), nib.orientations.io_orientation(qform))
            if not same_axes or np.sign(np.linalg.det(sform[:3, :3])) != np.sign(np.linalg.det(qform[:3, :3])):
                raise BadImage(
                    f"{name}: sform ({''.join(nib.aff2axcodes(sform))}) and qform ({''.join(nib.aff2axcodes(qform))}) "
                    "disagree on the axis directions, so the hemispheres are ambiguous; make them agree "
                    "(e.g. fslorient -copysform2qform once you know which is right)"
                )
    elif isinstance(img, nib.AnalyzeImage):
        # nibabel's Spm99/Spm2AnalyzeImage read a .mat beside the .hdr when there is one; without it
        # the left-right axis is a guess (nibabel assumes radiological, many writers used neurological)
        mat = Path(img.get_filename() or "").with_suffix(".mat")
        if not mat.is_file():
            raise BadImage(
                f"{name} is an Analyze 7.5 image without SPM's .mat: which side is left is unknown; "
                "convert it to NIfTI with a known orientation"
            )


def to_ras(data: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Reorder/flip the array axes so they point Right, Anterior, Superior (exact, no resampling)."""
    ornt = nib.orientations.io_orientation(affine)
    ras = nib.orientations.apply_orientation(data, ornt)
    new_affine = affine @ nib.orientations.inv_ornt_aff(ornt, data.shape)
    return np.ascontiguousarray(ras), new_affine


def to_mni(data: np.ndarray, affine: np.ndarray, voxel: int, mask: np.ndarray) -> np.ndarray:
    """Any-orientation data -> anti-aliased, resampled onto the MNI grid, z-scored in `mask`.

    Mask voxels the image does not cover (outside its field of view, or non-finite there) hold 0,
    the brain's mean, and are left out of the mean and std: counted as zeros, they would come out
    as a constant far below the brain and shift every covered voxel's value.
    `mask` is grid.brain_mask(voxel), passed in so worker processes need not load nilearn.
    """
    shape, target = grid.target_grid(voxel)
    data, affine = to_ras(data, affine)
    finite = np.isfinite(data)
    nonfinite = int(data.size - np.count_nonzero(finite))
    if nonfinite:
        data = np.where(finite, data, np.float32(0))
    sizes = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
    # The share of each grid voxel's smoothing and interpolation weight that falls on finite voxels inside
    # the field of view: exactly 1 where the image is whole, less next to what it lacks.
    # (a whole image's: its field of view, a box, smoothed axis by axis)
    if nonfinite:
        smoothed = grid.antialias(finite.astype(np.float32), sizes, float(voxel))
    else:
        smoothed = grid.antialias_box(data.shape, sizes, float(voxel))
    weight = grid.resample(smoothed, affine, shape, target)
    covered = weight >= 0.5
    coverage = float(np.count_nonzero(covered & mask)) / float(np.count_nonzero(mask))
    if coverage < MIN_MASK_COVERAGE:
        missing = f", its {nonfinite} non-finite voxels counted as missing" if nonfinite else ""
        raise BadImage(
            f"covers only {coverage:.0%} of the MNI brain mask{missing}; is it in MNI world coordinates (registered)?"
        )
    out = grid.resample(grid.antialias(data, sizes, float(voxel)), affine, shape, target, order=1)
    # Normalised convolution: the missing voxels (zeros here) took part of the weight of the voxels beside
    # them, which came out darker (up to 1 SD at 2 mm); divided by the weight, each is the mean of the image's
    # own voxels. Where the image is whole the weight is 1 and the values are unchanged.
    out = np.where(covered, out / np.maximum(weight, 0.5), np.float32(0))
    return zscore(out, mask & covered)


def zscore(volume: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Zero outside `mask`; inside, subtract the mean and divide by the std of masked voxels. BadImage for a
    constant brain, and for one whose variance lies mostly in a few voxels (OUTLIER_FRACTION, MAX_OUTLIER_SHARE)."""
    vals = volume[mask].astype(np.float64)
    std = vals.std()
    if not std > 0:
        raise BadImage("constant intensity inside the brain mask")
    z = (vals - vals.mean()) / std
    squares = z * z
    top = max(1, int(OUTLIER_FRACTION * squares.size))
    share = np.partition(squares, squares.size - top)[squares.size - top :].sum() / squares.sum()
    if share > MAX_OUTLIER_SHARE:
        raise BadImage(
            f"has {share:.0%} of its intensity variance inside the brain mask in its {top} most extreme voxel(s) "
            f"(largest |z| {np.abs(z).max():.0f}): a corrupt or extreme value would leave the rest of the brain "
            "almost blank once normalised"
        )
    out = np.zeros(volume.shape, np.float32)
    out[mask] = z.astype(np.float32)
    return out


def preprocess_file(path, voxel: int, mask: np.ndarray, max_image_mb: float = DEFAULT_MAX_IMAGE_MB) -> np.ndarray:
    """load + to_mni, with the file name in any BadImage message."""
    data, affine = load(path, max_image_mb)
    try:
        return to_mni(data, affine, voxel, mask)
    except BadImage as exc:
        raise BadImage(f"{Path(path).name} {exc}") from None
