"""Synthetic T1 cohort built from the MNI152 templates nilearn ships (the embedded default data).

Why this design: the trainer needs data whose age signal is anatomical (so a CNN has to
learn it) and whose acquisition differs per site (so preprocessing has real work to do),
without any download. Each subject is rendered in three steps:

1. tissue fractions on an internal 1.5 mm MNI grid, aged by an *effective* age (the
   chronological age plus a per-subject "brain-age gap"): the lateral ventricles grow by a
   shell whose thickness rises with age, cortical grey matter thins from the outside in, and
   the grey/white contrast shrinks; a scalp/skull/CSF shell surrounds the brain;
2. a smooth random per-subject deformation (a few separable low-frequency modes);
3. an affine resampling into the site's scanner grid (voxel size, axis order and direction),
   with a head-size scale that depends on sex, a small shift, a multiplicative bias field,
   Rician-like noise and the site's intensity scale and storage type.

Space: by default ("mni") the head sits where the template is, so the images need no
registration. In "native" (scanner) space each head also gets a random rigid pose (rotations
up to 15 degrees, shifts up to 20 mm about the brain centre, drawn from a separate random
stream so the MNI-space cohort is unchanged) inside a field of view 25 mm wider per side, and
the ground truth a registration should recover is written under derivatives/synth-truth/.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

from fedmpi.files import atomic_dir
from preprocess import grid, outputs, parallel

INTERNAL_MM = 1.5
# World-space box (mm) that every site's field of view covers: the brain plus a 15 mm shell.
FOV_MIN = np.array([-88.0, -124.0, -88.0])
FOV_MAX = np.array([88.0, 90.0, 98.0])
BRAIN_CENTRE = np.array([0.0, -18.0, 12.0])
AGE_RANGE = (45.0, 80.0)
SPACES = ("mni", "native")
# the smallest subject's T1w.nii.gz in a 1,200-subject cohort is 1.59 MB (median 2.5 MB): less room than this
# for the whole cohort cannot be enough
MIN_SUBJECT_BYTES = 1_500_000
# Native space: rigid head pose (uniform per axis) and the extra field of view that keeps the brain in view.
MAX_ROTATION_DEG = 15.0
MAX_SHIFT_MM = 20.0
NATIVE_MARGIN_MM = 25.0
TEMPLATE_SPACE = "MNI152NLin2009aSym"  # nilearn's ICBM 2009a symmetric template
TRUTH_DIR = Path("derivatives") / "synth-truth"
TRUTH_VOXEL = 2


@dataclasses.dataclass(frozen=True)
class Site:
    """One scanner: voxel sizes per array axis, axis orientation code, intensities, storage."""

    name: str
    voxel: tuple[float, float, float]
    orientation: str
    scale: float
    noise: float
    bias: float
    dtype: str  # "int16" (raw counts) or "int16-scaled" (float data stored with scl_slope)


SITES = (
    Site("A", (1.25, 1.25, 1.25), "RAS", 250.0, 0.02, 0.10, "int16"),
    Site("B", (1.5, 1.5, 1.5), "LAS", 400.0, 0.03, 0.20, "int16"),
    Site("C", (1.0, 1.0, 2.0), "PIR", 200.0, 0.025, 0.15, "int16"),
    Site("D", (2.0, 2.0, 2.0), "LPS", 3.0, 0.04, 0.25, "int16-scaled"),
)


@dataclasses.dataclass(frozen=True)
class Subject:
    """Everything that defines one synthetic subject (drawn up front so runs are reproducible)."""

    index: int
    participant_id: str
    age: float
    sex: str
    site: str
    seed: int


def draw_subjects(n: int, seed: int) -> list[Subject]:
    """Ages uniform on 45-80, sex 50/50, sites in equal shares (shuffled)."""
    if n < 1:
        raise ValueError(f"--subjects must be >= 1, got {n}")
    rng = np.random.default_rng([seed, 0x5EED])
    ages = np.round(rng.uniform(*AGE_RANGE, size=n), 1)
    sexes = rng.choice(["F", "M"], size=n)
    sites = np.array([SITES[i % len(SITES)].name for i in range(n)])
    rng.shuffle(sites)
    return [Subject(i, f"sub-{i + 1:04d}", float(ages[i]), str(sexes[i]), str(sites[i]), seed) for i in range(n)]


# ----------------------------------------------------------------------------- anatomy maps


@dataclasses.dataclass
class Anatomy:
    """Template-derived maps on the internal grid; computed once and shared with workers."""

    affine: np.ndarray
    gm: np.ndarray
    wm: np.ndarray
    csf: np.ndarray  # in-brain CSF fraction
    vent_dist: np.ndarray  # mm from the lateral-ventricle seed (0 inside)
    vent_roi: np.ndarray  # 1 in the periventricular region where ventricles may grow
    depth: np.ndarray  # mm from tissue to the nearest sulcal/outer CSF
    outside: np.ndarray  # mm outside the brain mask (0 inside)


def internal_grid() -> tuple[tuple[int, int, int], np.ndarray]:
    """Shape and affine of the internal 1.5 mm generation grid covering FOV_MIN..FOV_MAX."""
    shape = tuple(math.ceil((hi - lo) / INTERNAL_MM) + 1 for lo, hi in zip(FOV_MIN, FOV_MAX))
    affine = np.diag([INTERNAL_MM] * 3 + [1.0])
    affine[:3, 3] = FOV_MIN
    return shape, affine


@functools.cache
def anatomy() -> Anatomy:
    """Resample the 1 mm templates to the internal grid and precompute the distance maps."""
    shape, affine = internal_grid()

    def onto(name):
        tpl = grid.template_1mm(name)
        return grid.resample(grid.antialias(tpl.data, (1, 1, 1), INTERNAL_MM), tpl.affine, shape, affine)

    mask = np.clip(onto("mask"), 0, 1)
    gm = np.clip(onto("gm"), 0, 1) * mask
    wm = np.clip(onto("wm"), 0, 1) * mask
    csf = np.clip(mask - gm - wm, 0, 1)
    inside = mask >= 0.5
    tissue = (gm + wm) >= 0.5
    world = _world_coords(shape, affine)
    depth_in_brain = ndimage.distance_transform_edt(inside, sampling=INTERNAL_MM)
    central = (np.abs(world[0]) < 30) & (world[1] > -50) & (world[1] < 30) & (world[2] > -5) & (world[2] < 35)
    seed = (csf > 0.5) & central & (depth_in_brain > 15)
    vent_dist = ndimage.distance_transform_edt(~seed, sampling=INTERNAL_MM).astype(np.float32)
    vent_roi = ndimage.gaussian_filter((vent_dist < 12).astype(np.float32) * inside, 1.0)
    depth = ndimage.distance_transform_edt(tissue, sampling=INTERNAL_MM).astype(np.float32)
    outside = ndimage.distance_transform_edt(~inside, sampling=INTERNAL_MM).astype(np.float32)
    return Anatomy(affine, gm, wm, csf, vent_dist, vent_roi.astype(np.float32), depth, outside)


def _world_coords(shape, affine) -> np.ndarray:
    """World mm coordinates (3, *shape) of every voxel of a grid."""
    idx = np.indices(shape, dtype=np.float32).reshape(3, -1)
    return (affine[:3, :3] @ idx + affine[:3, 3:4]).reshape((3, *tuple(shape))).astype(np.float32)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * x))


def tissue_fractions(anat: Anatomy, effective_age: float, ventricle_factor: float = 1.0):
    """Aged (gm, wm, csf) fractions on the internal grid; pure function of the age.

    Ventricles gain a shell of 0.5-6 mm (accelerating with age); cortical grey matter loses
    the outer 0.2-1.8 mm; what tissue loses becomes CSF.
    """
    t = float(np.clip((effective_age - AGE_RANGE[0]) / (AGE_RANGE[1] - AGE_RANGE[0]), -0.2, 1.2))
    r_vent = ventricle_factor * (0.5 + 5.5 * max(t, 0.0) ** 1.5)
    grow = _sigmoid((r_vent - anat.vent_dist) / 0.75) * anat.vent_roi
    r_gm = 0.2 + 1.6 * t
    thin = _sigmoid((r_gm - anat.depth) / 0.75) * (1.0 - anat.vent_roi)
    gm = anat.gm * (1.0 - grow) * (1.0 - thin)
    wm = anat.wm * (1.0 - grow)
    csf = anat.csf + (anat.gm - gm) + (anat.wm - wm)
    return gm, wm, csf


def intensity(anat: Anatomy, gm, wm, csf, effective_age: float) -> np.ndarray:
    """T1-like intensity (white matter ~0.85): tissue mix inside, CSF/skull/scalp shell outside."""
    t = float(np.clip((effective_age - AGE_RANGE[0]) / (AGE_RANGE[1] - AGE_RANGE[0]), -0.2, 1.2))
    brain = gm * (0.56 + 0.05 * t) + wm * (0.87 - 0.05 * t) + csf * 0.16
    d = anat.outside
    shell = np.where(d < 2.5, 0.16, np.where(d < 7.5, 0.05, np.where(d < 13.0, 0.75, 0.0)))
    in_brain = anat.gm + anat.wm + anat.csf
    out = brain + (1.0 - np.clip(in_brain, 0, 1)) * shell
    return out.astype(np.float32)


def _smooth_modes(rng, n: int, length: int, max_cycles: float = 1.5) -> np.ndarray:
    """n random smooth 1D profiles of `length` samples (low-frequency sinusoids), unit rms."""
    x = np.linspace(0.0, 1.0, length, dtype=np.float32)
    freq = rng.uniform(0.3, max_cycles, size=(n, 1))
    phase = rng.uniform(0, 2 * np.pi, size=(n, 1))
    return (np.sqrt(2.0) * np.sin(2 * np.pi * freq * x + phase)).astype(np.float32)


def displacement(shape, rng, amplitude_vox: float, terms: int = 4) -> np.ndarray:
    """Sampling coordinates of a smooth random warp: per axis a sum of separable low-frequency modes."""
    coords = np.indices(shape, dtype=np.float32)
    for axis in range(3):
        fx, fy, fz = (_smooth_modes(rng, terms, s) for s in shape)
        w = rng.normal(0, amplitude_vox / np.sqrt(terms), size=terms).astype(np.float32)
        for k in range(terms):
            coords[axis] += w[k] * fx[k][:, None, None] * fy[k][None, :, None] * fz[k][None, None, :]
    return coords


def warp(volume: np.ndarray, coords: np.ndarray) -> np.ndarray:
    """`volume` sampled at a warp's coordinates (displacement): trilinear, edges extended."""
    return ndimage.map_coordinates(volume, coords, order=1, mode="nearest", output=np.float32)


def site_grid(site: Site, rng, margin: float = 0.0) -> tuple[tuple[int, ...], np.ndarray]:
    """Scanner grid of a site: axis order/direction from its orientation code, FOV (+ margin mm) with jitter."""
    axes = {"L": (0, -1), "R": (0, 1), "P": (1, -1), "A": (1, 1), "I": (2, -1), "S": (2, 1)}
    affine = np.zeros((4, 4))
    affine[3, 3] = 1.0
    shape = []
    lo = FOV_MIN - margin + rng.uniform(-3, 3, size=3)
    hi = FOV_MAX + margin + rng.uniform(-3, 3, size=3)
    for i, letter in enumerate(site.orientation):
        w, sign = axes[letter]
        n = math.ceil((hi[w] - lo[w]) / site.voxel[i])
        affine[w, i] = sign * site.voxel[i]
        affine[w, 3] = lo[w] if sign > 0 else lo[w] + (n - 1) * site.voxel[i]
        shape.append(n)
    return tuple(shape), affine


def _bias_field(shape, rng, strength: float) -> np.ndarray:
    """Smooth multiplicative field: product of per-axis exp(quadratic) profiles."""
    field = np.ones(shape, dtype=np.float32)
    for axis, n in enumerate(shape):
        u = np.linspace(-1, 1, n, dtype=np.float32)
        a, b = rng.normal(0, strength, size=2)
        prof = np.exp(a * u + b * (u**2 - 1.0 / 3.0)).astype(np.float32)
        field *= prof.reshape([-1 if i == axis else 1 for i in range(3)])
    return field


def head_pose(subject: Subject) -> np.ndarray:
    """Random rigid pose of a native-space head (RAS mm, about the brain centre), from its own stream."""
    rng = np.random.default_rng([subject.seed, subject.index, 0x9053])
    angles = np.deg2rad(rng.uniform(-MAX_ROTATION_DEG, MAX_ROTATION_DEG, size=3))
    shift = rng.uniform(-MAX_SHIFT_MM, MAX_SHIFT_MM, size=3)
    rot = np.eye(3)
    for axis, angle in enumerate(angles):
        c, s = np.cos(angle), np.sin(angle)
        i, j = [a for a in range(3) if a != axis]
        r = np.eye(3)
        r[i, i], r[i, j], r[j, i], r[j, j] = c, -s, s, c
        rot = r @ rot
    pose = np.eye(4)
    pose[:3, :3] = rot
    pose[:3, 3] = BRAIN_CENTRE + shift - rot @ BRAIN_CENTRE
    return pose


@dataclasses.dataclass
class Truth:
    """What a perfect affine registration of a native-space subject recovers (derivatives/synth-truth/).

    The subject's smooth anatomical deformation has a linear part (up to several % of stretch)
    that an affine registration to the template rightly removes, so the truth is defined by the
    best affine fit (least squares over the brain) of the whole template -> scanner mapping:
    mni_to_native = pose . head scale . linear part of the deformation (world mm, RAS);
    mni: the noise-free head resampled through it onto the 2 mm MNI grid (same bias field and
    intensity scale as the scan); brain_mask: the brain in the scanner grid.
    """

    mni: nib.Nifti1Image
    brain_mask: nib.Nifti1Image
    mni_to_native: np.ndarray


def render(subject: Subject, anat: Anatomy | None = None) -> nib.Nifti1Image:
    """The subject's T1 image as its site's scanner would store it, head in MNI position."""
    return _acquire(subject, anat if anat is not None else anatomy(), native=False)[0]


def render_native(subject: Subject, anat: Anatomy | None = None) -> tuple[nib.Nifti1Image, Truth]:
    """The subject's T1 image with its head in a random rigid pose, and the ground truth."""
    return _acquire(subject, anat if anat is not None else anatomy(), native=True)


def _acquire(subject: Subject, anat: Anatomy, native: bool):
    site = next(s for s in SITES if s.name == subject.site)
    rng = np.random.default_rng([subject.seed, subject.index, 0xA9E])
    eff_age = subject.age + rng.normal(0.0, 3.0)
    vent_factor = float(np.exp(rng.normal(0.0, 0.2)))
    gm, wm, csf = tissue_fractions(anat, eff_age, vent_factor)
    coords = displacement(gm.shape, rng, amplitude_vox=2.0 / INTERNAL_MM)
    vol = warp(intensity(anat, gm, wm, csf, eff_age), coords)

    shape, site_affine = site_grid(site, rng, NATIVE_MARGIN_MM if native else 0.0)
    scale = (0.96 if subject.sex == "F" else 1.0) * rng.normal(1.0, 0.02)
    shift = rng.normal(0.0, 1.5, size=3)
    # scanner world -> template world: undo the head scale about the brain centre and the shift
    to_tpl = np.eye(4)
    to_tpl[:3, :3] /= scale
    to_tpl[:3, 3] = BRAIN_CENTRE - (BRAIN_CENTRE + shift) / scale
    if native:
        to_tpl = to_tpl @ np.linalg.inv(head_pose(subject))
    data = grid.resample(vol, anat.affine, shape, to_tpl @ site_affine, order=1)
    bias = _bias_field(shape, rng, site.bias)
    data *= bias
    sd = site.noise
    noisy = np.hypot(
        data + rng.standard_normal(shape, dtype=np.float32) * sd, rng.standard_normal(shape, dtype=np.float32) * sd
    )
    noisy *= site.scale
    if site.dtype == "int16":
        img = nib.Nifti1Image(np.clip(np.rint(noisy), 0, 32767).astype(np.int16), site_affine)
    else:
        img = nib.Nifti1Image(noisy.astype(np.float32), site_affine)
        img.set_data_dtype(np.int16)  # nibabel picks scl_slope on save
    img.header.set_xyzt_units("mm")
    img.set_qform(site_affine, code=1)
    img.set_sform(site_affine, code=1)
    if not native:
        return img, None
    return img, _truth(anat, vol, coords, bias * site.scale, shape, site_affine, to_tpl)


def linear_part(coords: np.ndarray, affine: np.ndarray, region: np.ndarray, step: int = 2) -> np.ndarray:
    """Least-squares affine D (world mm) with D @ x ~ where the warp `coords` samples x from, over `region`."""
    idx = np.argwhere(region[::step, ::step, ::step]).T * step
    src = coords[:, idx[0], idx[1], idx[2]]
    x = affine[:3, :3] @ idx + affine[:3, 3:4]
    c = affine[:3, :3] @ src + affine[:3, 3:4]
    design = np.vstack([x, np.ones(x.shape[1])]).T
    fit = np.linalg.lstsq(design, c.T, rcond=None)[0].T
    return np.vstack([fit, [0.0, 0.0, 0.0, 1.0]])


def _truth(anat: Anatomy, vol, coords, gain, shape, site_affine, to_tpl) -> Truth:
    brain = warp(anat.gm + anat.wm + anat.csf, coords)
    linear = linear_part(coords, anat.affine, brain >= 0.5)
    mni_to_native = np.linalg.inv(to_tpl) @ np.linalg.inv(linear)
    t_shape, t_affine = grid.target_grid(TRUTH_VOXEL)
    smooth = grid.antialias(vol, (INTERNAL_MM,) * 3, TRUTH_VOXEL)
    mni = grid.resample(smooth, anat.affine, t_shape, np.linalg.inv(linear) @ t_affine)
    mni *= grid.resample(gain, site_affine, t_shape, mni_to_native @ t_affine, order=1)
    mask = grid.resample(brain, anat.affine, shape, to_tpl @ site_affine, order=1) >= 0.5
    mask_img = nib.Nifti1Image(mask.astype(np.uint8), site_affine)
    mni_img = nib.Nifti1Image(mni, t_affine)
    for img in (mask_img, mni_img):
        img.header.set_xyzt_units("mm")
        img.set_qform(img.affine, code=1)
        img.set_sform(img.affine, code=1)
    return Truth(mni_img, mask_img, mni_to_native)


def truth_paths(root, participant_id: str) -> dict[str, Path]:
    """Where a native-space cohort keeps a subject's ground truth: mni, brain_mask, mni_to_native."""
    base = Path(root) / TRUTH_DIR / participant_id / "anat"
    return {
        "mni": base / f"{participant_id}_space-{TEMPLATE_SPACE}_res-{TRUTH_VOXEL}mm_T1w.nii.gz",
        "brain_mask": base / f"{participant_id}_desc-brain_mask.nii.gz",
        "mni_to_native": base / f"{participant_id}_from-{TEMPLATE_SPACE}_to-T1w_xfm.txt",
    }


def read_truth_matrix(path) -> np.ndarray:
    """A native-space subject's true MNI -> scanner matrix (truth_paths), 4x4: what registration is checked against."""
    return np.loadtxt(path).reshape(4, 4)


# ----------------------------------------------------------------------------- cohort writer

_WORKER_ANATOMY: Anatomy | None = None


def _init_worker(anat: Anatomy) -> None:
    global _WORKER_ANATOMY
    _WORKER_ANATOMY = anat


def _write_subject(args) -> str:
    subject, root, space = args
    anat_dir = Path(root) / subject.participant_id / "anat"
    anat_dir.mkdir(parents=True, exist_ok=True)
    if space == "mni":
        nib.save(render(subject, _WORKER_ANATOMY), anat_dir / f"{subject.participant_id}_T1w.nii.gz")
        return subject.participant_id
    img, truth = render_native(subject, _WORKER_ANATOMY)
    nib.save(img, anat_dir / f"{subject.participant_id}_T1w.nii.gz")
    paths = truth_paths(root, subject.participant_id)
    paths["mni"].parent.mkdir(parents=True, exist_ok=True)
    nib.save(truth.mni, paths["mni"])
    nib.save(truth.brain_mask, paths["brain_mask"])
    np.savetxt(
        paths["mni_to_native"],
        truth.mni_to_native,
        fmt="%.10f",
        header=f"{TEMPLATE_SPACE} world mm -> this subject's scanner world mm (RAS): p_T1w = M @ p_MNI",
    )
    return subject.participant_id


def description(subjects: int, seed: int, space: str = "mni") -> dict:
    """Contents of dataset_description.json: identifies a complete cohort and its parameters."""
    from fedmpi import __version__

    desc = {
        "Name": "fedmpi synthetic T1 cohort",
        "BIDSVersion": "1.8.0",
        "DatasetType": "raw",
        "GeneratedBy": [{"Name": "fedmpi preprocess synth", "Version": __version__}],
        "subjects": subjects,
        "seed": seed,
        "sites": [dataclasses.asdict(s) for s in SITES],
    }
    if space != "mni":  # MNI-space cohorts keep the description they always had
        desc["space"] = space
    return desc


def is_complete(out: Path, subjects: int, seed: int, space: str = "mni") -> bool:
    """True when `out` already holds the cohort these parameters describe."""
    desc = Path(out) / "dataset_description.json"
    if not desc.is_file():
        return False
    try:
        got = json.loads(desc.read_text())
    except (OSError, ValueError):
        return False
    return got.get("subjects") == subjects and got.get("seed") == seed and got.get("space", "mni") == space


def check_room(out, subjects: int, what: str) -> None:
    """outputs.OutputError when the disk under `out` cannot hold the cohort (at least MIN_SUBJECT_BYTES a
    subject), before its subjects are drawn: 10**12 of them died in a MemoryError allocating their ages."""
    outputs.check_space(out, subjects * MIN_SUBJECT_BYTES, what)


def write_cohort(
    out, subjects: int, seed: int = 0, workers: int | None = None, progress: bool = False, space: str = "mni"
) -> Path:
    """Write a BIDS-like cohort to `out` atomically (built in a sibling temp dir, then renamed).

    space "mni" puts every head where the template is; "native" gives each a random rigid pose
    and adds derivatives/synth-truth/ (see `Truth`). Raises FileExistsError when `out` exists
    and is not this very cohort (returns early when it is), outputs.OutputError when it cannot
    be created.
    """
    out = Path(out)
    if space not in SPACES:
        raise ValueError(f"space must be one of {SPACES}, got {space!r}")
    if is_complete(out, subjects, seed, space):
        return out
    outputs.check_dir(out, "--out")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        flag = "" if space == "mni" else f" --space {space}"
        raise FileExistsError(
            f"{out} exists and is not the cohort --subjects {subjects} "
            f"--seed {seed}{flag}; choose another --out or remove it"
        )
    check_room(out, subjects, "--out")
    people = draw_subjects(subjects, seed)
    anat = anatomy()
    with atomic_dir(out) as tmp:
        _render_all(people, anat, tmp, space, workers, progress)
        with open(tmp / "participants.tsv", "w") as f:
            f.write("participant_id\tage\tsex\tsite\n")
            for p in people:
                f.write(f"{p.participant_id}\t{p.age:.1f}\t{p.sex}\t{p.site}\n")
        (tmp / "dataset_description.json").write_text(json.dumps(description(subjects, seed, space), indent=2))
    return out


def _render_all(people, anat, root: Path, space: str, workers, progress: bool) -> None:
    jobs = [(p, str(root), space) for p in people]
    for _ in parallel.run(
        _write_subject,
        jobs,
        workers=workers,
        initializer=_init_worker,
        initargs=(anat,),
        desc="synth",
        progress=progress,
        name=lambda job: job[0].participant_id,
    ):
        pass
