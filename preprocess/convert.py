"""BIDS dataset -> one HDF5 volume file, in parallel, resumable, never half-written.

Each subject's preprocessed volume is first staged as FILE.h5.parts/<id>-<fingerprint>.npy
(written atomically; with registration its matrix and quality figure go first into a .json
beside it). A re-run after an interruption, a dead worker or bad subjects reuses every staged
subject whose input and parameters are unchanged (the key, _subject_key, hashes the image path,
size, mtime and every parameter that changes the volume; --max-image-mb only refuses images, so
it is not part of it). Once all subjects are staged they are packed into the HDF5 file under a
temporary name, renamed, and the staging directory is removed. An output whose recorded input
fingerprint matches the current input is left alone, unless --skip-bad left out subjects this machine
could not read or process (nifti.Unavailable: memory, an I/O error): those are recorded apart (the
attr skipped_unavailable), the staging directory is kept, and a re-run retries them. Output paths are
checked before any subject is processed.

Before the pack every good subject's staged volume is hashed (blake2b of its voxels): subjects with
identical volumes are one scan under several ids, copied (bids.scan refuses links), and are all bad
input. It reads each part once more: 1.8 MB a subject at 2 mm float16, 3.6 GB for 2,000 subjects, which
took 3-4 s on one core here with the parts in the page cache (without, the disk's read time).
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import math
import shutil
from pathlib import Path

import h5py
import numpy as np

from fedmpi.errors import UserError
from fedmpi.files import atomic_path
from preprocess import bids, grid, h5io, nifti, outputs, parallel, qc, register

# Without --register the images must already be in MNI space; the MNI mask's coverage only tells an image far
# away. Their correlation with the template tells more: on the synthetic cohort (4 mm) heads in place score
# 0.51-0.89, the same head moved 15 mm 0.30, turned 20 degrees 0.36, flipped front to back 0.21.
PLACEMENT_NCC = 0.4
# Checks that refuse subjects, named in the input fingerprint: an output written before one of them existed is
# not up to date, as it may hold subjects the check refuses (its re-run rebuilds it once).
CHECKS = ("identical preprocessed volumes are bad input",)


class BadInput(UserError, ValueError):
    """Some subjects cannot be used; `bad` maps subject -> reason."""

    def __init__(self, message: str, bad: dict[str, str]):
        super().__init__(message)
        self.bad = bad


@dataclasses.dataclass
class Result:
    """What a conversion did: the output path, subjects written/skipped/reused."""

    path: Path
    written: int
    skipped: dict[str, str]
    reused: int
    up_to_date: bool
    misplaced: dict[str, float] = dataclasses.field(default_factory=dict)  # unregistered, NCC < PLACEMENT_NCC
    # written subjects whose session image took participants.tsv's age (bids.Entry.session_age_assumed)
    session_ages_assumed: list[str] = dataclasses.field(default_factory=list)
    # skipped subjects this machine could not read or process (nifti.Unavailable): a re-run retries them
    unavailable: list[str] = dataclasses.field(default_factory=list)
    # written subjects without an age (--ages-optional: a file to predict on)
    ageless: list[str] = dataclasses.field(default_factory=list)


def skipped_report_path(out: Path) -> Path:
    """FILE.h5 -> FILE.skipped.tsv (the --skip-bad report lives next to the output)."""
    return out.with_name(out.name[:-3] + ".skipped.tsv" if out.name.endswith(".h5") else out.name + ".skipped.tsv")


def parts_dir(out: Path) -> Path:
    """FILE.h5 -> FILE.h5.parts, where finished subjects are staged until the pack (a re-run reuses them)."""
    return out.with_name(out.name + ".parts")


def _subject_key(entry: bids.Entry, params: dict) -> str:
    """What a staged subject was made from: its image's path, size and mtime, those of the files beside a .hdr that
    hold its voxels and orientation (the .hdr alone does not change when they do), and the parameters."""
    st = entry.image.stat()
    key: list = [str(entry.image.resolve()), st.st_size, st.st_mtime_ns, params]
    beside = []
    for path in bids.companions(entry.image):
        try:
            other = path.stat()
        except FileNotFoundError:
            continue
        beside.append([path.name, other.st_size, other.st_mtime_ns])
    if beside:  # a single-file image's key is as before, so its staged parts and outputs stay up to date
        key.append(beside)
    blob = json.dumps(key, sort_keys=True)
    return hashlib.sha1(blob.encode()).hexdigest()[:16]


def _fingerprint(entries, keys, bad: dict, params, max_image_mb: float) -> str:
    """Identifies the whole input: every usable row, its image key, the rows found bad, and a size limit
    other than the default (it decides which subjects are refused, so a re-run with another one is not
    up to date; the default adds nothing, so outputs written before it counted stay up to date), and CHECKS."""
    rows = [[e.participant_id, k, e.age, e.sex, e.site] for e, k in zip(entries, keys)]
    limit = [] if max_image_mb == nifti.DEFAULT_MAX_IMAGE_MB else [max_image_mb]
    blob = json.dumps([rows, sorted(bad.items()), params, *limit, *CHECKS], sort_keys=True)
    return hashlib.sha1(blob.encode()).hexdigest()


def _is_up_to_date(out: Path, fingerprint: str, skip_bad: bool) -> bool:
    """The output was built from this very input (and skipped nothing, unless skipping is allowed), and skipped no
    subject for the machine's want (nifti.Unavailable): with more memory, or the disk fixed, a re-run gets it."""
    if not out.is_file():
        return False
    try:
        with h5io.open_checked(out) as f:
            same = f.attrs.get("input_fingerprint") == fingerprint
            skipped = json.loads(f.attrs.get("skipped", "{}"))
            unavailable = json.loads(f.attrs.get("skipped_unavailable", "[]"))
    except (h5io.DataError, ValueError):
        return False
    return same and (skip_bad or not skipped) and not unavailable


_MASK: np.ndarray | None = None
_REFERENCE: register.Reference | None = None


def _init_worker(mask: np.ndarray, reference: register.Reference | None = None) -> None:
    global _MASK, _REFERENCE
    _MASK, _REFERENCE = mask, reference


def _sidecar(part: Path) -> Path:
    return part.with_suffix(".json")


def _stage(job) -> tuple[str, str | None, bool]:
    """Preprocess one subject into its part file(s); (subject, None, False), or (subject, reason, whether the reason
    is the machine's, not the image's: nifti.Unavailable)."""
    pid, image, part, voxel, dtype, max_image_mb, registration = job
    assert _MASK is not None, "_init_worker runs first"
    try:
        if registration is None:
            vol = nifti.preprocess_file(image, voxel, _MASK, max_image_mb)
        else:
            assert _REFERENCE is not None, "a registration run passes its reference to _init_worker"
            done = register.preprocess_file(image, voxel, _MASK, registration, _REFERENCE, max_image_mb)
            vol = done.volume
            with atomic_path(_sidecar(part), sweep=False) as tmp:  # the stage is swept at the start
                tmp.write_text(json.dumps({"mni_to_native": done.mni_to_native.tolist(), "ncc": done.ncc}))
    except nifti.BadImage as exc:
        return pid, str(exc), isinstance(exc, nifti.Unavailable)
    except MemoryError:  # smoothing and resampling hold 2-3 copies of the image (a read that fails is Unavailable)
        return (
            pid,
            f"not enough memory to preprocess {Path(image).name}; use fewer --workers, or a lower --max-image-mb to "
            "refuse large images",
            True,
        )
    staged = io.BytesIO()  # np.save into a file writes with tofile, whose short write on a full disk has no errno
    np.save(staged, vol.astype(h5io.DTYPES[dtype]))
    with atomic_path(part, sweep=False) as tmp:
        tmp.write_bytes(staged.getbuffer())
    return pid, None, False


def _digest(part: Path) -> str:
    """blake2b of a staged volume's voxels, read through a memory map. The parts of one run share shape and
    dtype, so equal digests are equal volumes."""
    return hashlib.blake2b(np.ascontiguousarray(np.load(part, mmap_mode="r")).data).hexdigest()


def same_scans(digests: dict[str, str]) -> dict[str, str]:
    """Subject -> reason for each subject whose volume digest another subject shares. Identical input images
    give identical volumes: one scan under several ids would count as several people and could land in a
    learner's training file and the test file. All of them are refused, as which subject it is of is unknown;
    a reason names a few others and counts the rest (bids.first_names)."""
    groups: dict[str, list[str]] = {}
    for pid, digest in digests.items():
        groups.setdefault(digest, []).append(pid)
    reasons = {}
    for group in (g for g in groups.values() if len(g) > 1):
        for pid in group:
            others = bids.first_names(sorted(p for p in group if p != pid))
            reasons[pid] = (
                f"the same scan as {others} (identical voxels after preprocessing): "
                "one scan cannot be several subjects; which subject is it?"
            )
    return reasons


def _remove_temporaries(stage: Path) -> None:
    """Half-written part files (temporary names start with a dot) of a worker that was killed."""
    for path in stage.glob(".*"):
        path.unlink(missing_ok=True)


def check_outputs(out: Path) -> None:
    """OutputError now, before any subject is processed, for an output that could not be written."""
    outputs.check_file(out, "--out")
    if out.is_file() and not h5py.is_hdf5(out):  # a slip of the shell (an input image, participants.tsv)
        raise outputs.OutputError(f"--out {out} exists and is not an HDF5 file; it would be replaced, so it is refused")
    outputs.check_dir(parts_dir(out), "staging directory")
    outputs.check_file(skipped_report_path(out), "--skip-bad report")


def convert(
    bids_dir,
    out,
    *,
    voxel: int = 4,
    dtype: str = "float16",
    workers: int | None = None,
    skip_bad: bool = False,
    progress: bool = False,
    age_range: tuple[float, float] = bids.DEFAULT_AGE_RANGE,
    max_image_mb: float = nifti.DEFAULT_MAX_IMAGE_MB,
    registration: register.Options | None = None,
    select: tuple[str, ...] = (),
    ages_required: bool = True,
) -> Result:
    """Preprocess every subject of `bids_dir` into `out` (see module doc for the guarantees).

    With `registration`, each image is registered to the MNI template first (register.py) and
    subjects failing its quality check are bad input. So are subjects whose staged volumes are identical
    (same_scans), new and reused parts alike. Raises outputs.OutputError for an output
    path that cannot be written, bids.DatasetError for an unusable dataset, BadInput when
    subjects are bad and skip_bad is False (nothing is written; the good subjects stay staged for
    the re-run), parallel.WorkerDied when a worker process dies (finished subjects stay staged).
    """
    out, bids_dir = Path(out), Path(bids_dir)
    shape, affine = grid.target_grid(voxel)
    if dtype not in h5io.DTYPES:
        raise ValueError(f"dtype must be one of {sorted(h5io.DTYPES)}, got {dtype!r}")
    check_outputs(out)
    entries, bad = bids.scan(bids_dir, age_range, select, ages_required)
    params = {
        "voxel_mm": voxel,
        "dtype": dtype,
        "reorient": "RAS+ (sform/qform set and agreeing; no plain Analyze)",
        # images with larger voxels are bad input: staged parts and outputs made before are rebuilt once
        "max_voxel_mm": nifti.MAX_VOXEL_MM,
        # likewise (2026-12-03) images blanked by an extreme value, and qform-only headers with a 0 voxel size
        "outliers": f"refused above {nifti.MAX_OUTLIER_SHARE:g} of the brain's variance in its most extreme "
        f"{nifti.OUTLIER_FRACTION:.1%} of voxels",
        "zero_pixdim": "refused without an sform (nibabel took 1 mm)",
        # worded anew when missing voxels stopped darkening their neighbours (normalised by the finite voxels'
        # weight), so that outputs of images with NaN or a field of view cutting the mask are rebuilt
        "antialias": "gaussian, FWHM = target voxel; with the trilinear interpolation, divided by the weight of "
        "the finite voxels in the field of view",
        "interpolation": "trilinear",
        "mask": "nilearn MNI152 brain mask (ICBM 2009a) resampled, >= 0.5",
        # worded anew when the values change, so that outputs and staged parts of the old way are rebuilt
        "normalisation": "z-score within the mask voxels the image covers (finite, in its field of view), zero "
        "elsewhere",
        "source": str(bids_dir.resolve()),
    }
    if registration is not None:
        params.update(registration.params())
    if select:
        params["select"] = list(select)
    keys = [_subject_key(e, params) for e in entries]
    fingerprint = _fingerprint(entries, keys, bad, params, max_image_mb)
    report = skipped_report_path(out)
    stage = parts_dir(out)
    # one run at a time per output: a second one removed the first's temporaries and parts (a traceback there)
    with outputs.exclusive(out.with_name(f".{out.name}.lock"), f"--out {out}", wait=False):
        if (skip_bad or not bad) and _is_up_to_date(out, fingerprint, skip_bad):
            shutil.rmtree(stage, ignore_errors=True)  # left by a run that stopped on bad input: the output has it all
            return Result(out, 0, {}, 0, True)

        parts = {e.participant_id: stage / f"{e.participant_id}-{k}.npy" for e, k in zip(entries, keys)}
        todo = [
            (e.participant_id, e.image, parts[e.participant_id], voxel, dtype, max_image_mb, registration)
            for e in entries
            if not parts[e.participant_id].is_file()
        ]
        # every part is a whole .npy volume: a cohort the disk cannot stage is refused now, not hours in
        part_bytes = math.prod(shape) * np.dtype(h5io.DTYPES[dtype]).itemsize
        outputs.check_space(stage, len(todo) * part_bytes, "staging the subjects in")
        stage.mkdir(parents=True, exist_ok=True)
        _remove_temporaries(stage)
        reference = register.reference(voxel) if registration is not None and todo else None
        unavailable: set[str] = set()
        try:
            for pid, reason, retry in parallel.run(
                _stage,
                todo,
                workers=workers,
                initializer=_init_worker,
                initargs=(grid.brain_mask(voxel), reference),
                desc="nifti",
                progress=progress,
                name=lambda job: job[0],
            ):
                if reason:
                    bad[pid] = " ".join(reason.split())  # one line each on the terminal and in the TSV
                if retry:
                    unavailable.add(pid)
        except parallel.WorkerDied as exc:
            _remove_temporaries(stage)
            raise parallel.WorkerDied(
                f"{exc}; nothing written; finished subjects stay in {stage} and a re-run "
                "resumes (use fewer --workers, or a lower --max-image-mb to refuse large images)",
                exc.names,
            ) from None
        # every staged part, new or reused: a copy may have been staged by an earlier run
        staged = {e.participant_id: parts[e.participant_id] for e in entries if e.participant_id not in bad}
        bad.update(same_scans({pid: _digest(part) for pid, part in staged.items()}))

        good = [e for e in entries if e.participant_id not in bad]
        fresh = {job[0] for job in todo}
        reused = sum(e.participant_id not in fresh for e in good)  # not the refused copies
        if not good:
            shutil.rmtree(stage, ignore_errors=True)  # nothing staged is of use
        if bad and not skip_bad:
            # the good subjects stay staged, so the re-run this asks for does only the rest
            kept = f"; the {len(good)} good subject(s) stay staged in {stage} for the re-run" if good else ""
            raise BadInput(
                f"{len(bad)} bad subject(s) in {bids_dir}; nothing written (fix them or re-run with --skip-bad){kept}",
                bad,
            )
        if not good:
            raise BadInput(f"no usable subject in {bids_dir}", bad)

        table = {
            "age": [e.age for e in good],
            "subject_id": [e.participant_id for e in good],
            "sex": [e.sex for e in good],
            "site": [e.site for e in good],
        }
        if registration is not None:
            done = [json.loads(_sidecar(parts[e.participant_id]).read_text()) for e in good]
            table["mni_to_native"] = [d["mni_to_native"] for d in done]
            table["registration_ncc"] = [d["ncc"] for d in done]
        attrs = h5io.base_attrs(voxel, shape, affine, params, fingerprint)
        attrs["skipped"] = json.dumps(bad, sort_keys=True)
        if unavailable:  # absent otherwise: outputs written before it are read as skipping none
            attrs["skipped_unavailable"] = json.dumps(sorted(unavailable))
        attrs["age_range"] = np.asarray(age_range, dtype=np.float64)
        correlations: dict[str, float] = {}

        def volumes():
            template, mask = grid.template(voxel), grid.brain_mask(voxel)
            for e in good:
                volume = np.load(parts[e.participant_id])
                if registration is None:  # a registration checked its own (--min-ncc)
                    correlations[e.participant_id] = qc.template_ncc(volume.astype(np.float32), template, mask)
                yield volume

        h5io.write_volumes(out, volumes(), table, attrs, dtype)
        if bad:
            with atomic_path(report) as tmp:
                tmp.write_text("participant_id\treason\n" + "".join(f"{p}\t{r}\n" for p, r in sorted(bad.items())))
        elif report.exists():
            report.unlink()
        if not unavailable:  # else kept: the re-run that retries them reuses the rest
            shutil.rmtree(stage, ignore_errors=True)
        misplaced = {pid: r for pid, r in correlations.items() if r < PLACEMENT_NCC}
        assumed = [e.participant_id for e in good if e.session_age_assumed]
        ageless = [e.participant_id for e in good if math.isnan(e.age)]
        return Result(out, len(good), bad, reused, False, misplaced, assumed, sorted(unavailable), ageless)
