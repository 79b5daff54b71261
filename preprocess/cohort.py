"""The embedded default data: the synthetic cohort taken through the same three steps a user runs
(`synth`, `nifti`, `split`), each once, so the trainer runs with no data directory and no download."""

from __future__ import annotations

from pathlib import Path

from preprocess import convert, outputs, split, synth
from preprocess.distributions import TEST_FRACTION
from preprocess.layout import PARTITION_FILE


def synthetic_cohort(
    root,
    *,
    subjects: int = 240,
    voxel: int = 4,
    learners: int = 8,
    distribution: str = "uniform-iid",
    seed: int = 0,
    workers: int | None = None,
    progress: bool = False,
    test_fraction: float = TEST_FRACTION,
) -> Path:
    """Build (once) and return the split directory of the embedded synthetic cohort.

    Layout under root/synth-s{subjects}-seed{seed}/: bids/ (NIfTI + participants.tsv),
    v{voxel}.h5 (preprocessed), split-{distribution}-{learners}-{voxel}mm/ (learner_k.h5, test.h5,
    partition.json; "-test{fraction}" is added to the name when the held-out fraction is not
    TEST_FRACTION, 0.2). The split's name carries every input that changes its files, so another voxel size never
    reuses a split cut from the wrong resolution. Each step is skipped when its output exists and
    each is built under a temporary name and renamed, so an interrupted run never leaves a half
    cohort. Several processes may call it at once on the same root (two jobs sharing a cache, ranks of several
    nodes): a lock file, base/.build.lock, lets one build while the others wait, then find it built (where the file
    system takes no locks, call it on one rank, then barrier).
    """
    base = Path(root) / f"synth-s{subjects}-seed{seed}"
    bids_dir = base / "bids"
    h5 = base / f"v{voxel}.h5"
    held_out = "" if test_fraction == TEST_FRACTION else f"-test{test_fraction:g}"
    name = f"split-{distribution}-{learners}-{voxel}mm{held_out}"
    out = base / name
    if not base.is_dir():  # a root that is a file, or not writable: one line, not make_dirs' traceback
        outputs.check_dir(base, "the synthetic cohort")
    if not synth.is_complete(bids_dir, subjects, seed):
        synth.check_room(bids_dir, subjects, "the synthetic cohort")
    ages = [s.age for s in synth.draw_subjects(subjects, seed)]  # the split's own checks, before minutes of rendering
    split.partition(ages, learners=learners, distribution=distribution, test_fraction=test_fraction, seed=seed)
    # one builder at a time (two jobs sharing the cache, ranks of several nodes): the others wait, then find it built
    with outputs.exclusive(base / ".build.lock", f"the synthetic cohort {base}", wait=True):
        if not synth.is_complete(bids_dir, subjects, seed):
            synth.write_cohort(bids_dir, subjects, seed, workers, progress)
        if not h5.is_file():
            convert.convert(bids_dir, h5, voxel=voxel, workers=workers, progress=progress)
        if not (out / PARTITION_FILE).is_file():
            split.write_split(
                h5, out, learners=learners, distribution=distribution, seed=seed, test_fraction=test_fraction
            )
    return out
