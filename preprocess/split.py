"""Held-out test set and federated learner partitions (the paper's three distributions).

The partitioning is a pure function of the ages (`partition`); `write_split` turns it into
files. Rules, chosen to mirror the paper and documented in docs/data.md:
- test: ages go into 20 equal-width bins over [min, max]; from each bin floor(f * n_bin + 0.5)
  subjects (round half up) are drawn at random;
- uniform-iid: sort the rest by age, deal each run of K consecutive subjects to a random
  permutation of the K learners -> sizes equal within 1, the same age histogram everywhere;
- uniform-noniid: sort by a jittered age (age + N(0, 5% of the age span)), cut into K/2
  equal contiguous groups and deal each group alternately to a pair of learners -> equal
  sizes, shifted but overlapping age ranges, learners in pairs (K must be even);
- skewed-noniid: sizes proportional to 1.35**-k (largest remainder rounding), each learner a
  contiguous block of the jittered age order, blocks placed along the age axis in a random
  order -> each learner about 1.35x smaller than the previous one, different age ranges.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

from fedmpi.files import atomic_write, make_dirs, umask_mode
from preprocess import bids, h5io, outputs
from preprocess.distributions import DISTRIBUTIONS, TEST_FRACTION, SplitError, validate
from preprocess.layout import OWNED, PARTITION_FILE, TEST_FILE, learner_file

N_BINS = 20
SKEW = 1.35
JITTER = 0.05
TMP_PREFIX = ".split-tmp-"


def age_bins(ages: np.ndarray, n_bins: int = N_BINS) -> np.ndarray:
    """Index (0..n_bins-1) of each age's equal-width bin over [min, max]."""
    lo, hi = float(ages.min()), float(ages.max())
    if hi == lo:
        return np.zeros(len(ages), dtype=np.int64)
    return np.minimum(((ages - lo) / (hi - lo) * n_bins).astype(np.int64), n_bins - 1)


def test_indices(ages: np.ndarray, fraction: float, rng) -> np.ndarray:
    """Stratified hold-out: round-half-up(fraction * bin size) random subjects from every age bin."""
    bins = age_bins(ages)
    chosen = []
    for b in range(N_BINS):
        members = np.flatnonzero(bins == b)
        k = int(np.floor(fraction * len(members) + 0.5))
        chosen.append(rng.choice(members, size=k, replace=False))
    return np.sort(np.concatenate(chosen)).astype(np.int64)


def least_fraction(largest: int) -> float:
    """The smallest fraction with three significant digits that holds one subject out of a bin of `largest`.

    0.5 / largest rounded to nearest could fall below it (0.5 / 7 = 0.0714285... shows as 0.0714, and
    0.0714 x 7 rounds to 0), so it is rounded up and checked with the rounding test_indices applies."""
    least = 0.5 / largest
    step = 10.0 ** (math.floor(math.log10(least)) - 2)
    units = math.ceil(round(least / step, 6))
    while math.floor(float(f"{units * step:.3g}") * largest + 0.5) < 1:
        units += 1
    return float(f"{units * step:.3g}")


def skewed_sizes(n: int, k: int) -> np.ndarray:
    """Sizes proportional to SKEW**-i summing to n (largest remainder rounding)."""
    w = SKEW ** -np.arange(k, dtype=float)
    exact = n * w / w.sum()
    sizes = np.floor(exact).astype(np.int64)
    order = np.argsort(-(exact - sizes), kind="stable")
    sizes[order[: n - sizes.sum()]] += 1
    return sizes


def _jittered_order(ages: np.ndarray, rng) -> np.ndarray:
    span = float(ages.max() - ages.min()) or 1.0
    return np.argsort(ages + rng.normal(0.0, JITTER * span, size=len(ages)), kind="stable")


def _uniform_iid(ages: np.ndarray, k: int, rng) -> list:
    n = len(ages)
    order = np.argsort(ages + rng.uniform(0, 1e-6, size=n), kind="stable")
    # every run of k consecutive ages goes to k distinct learners: sizes equal within 1
    owner = np.concatenate([rng.permutation(k) for _ in range(-(-n // k))])[:n]
    return [order[owner == j] for j in range(k)]


def _uniform_noniid(ages: np.ndarray, k: int, rng) -> list:
    order = _jittered_order(ages, rng)
    parts: list = [[] for _ in range(k)]
    for g, group in enumerate(np.array_split(order, k // 2)):
        first = rng.integers(2)
        parts[2 * g + first] = group[0::2]
        parts[2 * g + 1 - first] = group[1::2]
    return parts


def _skewed_noniid(ages: np.ndarray, k: int, rng) -> list:
    order = _jittered_order(ages, rng)
    sizes = skewed_sizes(len(ages), k)
    placement = rng.permutation(k)  # learner placement[i] takes the i-th block along age
    bounds = np.concatenate([[0], np.cumsum(sizes[placement])])
    parts: list = [None] * k
    for i, learner in enumerate(placement):
        parts[learner] = order[bounds[i] : bounds[i + 1]]
    return parts


# How each distribution of preprocess.distributions is built: (ages, learners, rng) -> each learner's positions.
BUILDERS = {"uniform-iid": _uniform_iid, "uniform-noniid": _uniform_noniid, "skewed-noniid": _skewed_noniid}


def learner_indices(ages: np.ndarray, k: int, distribution: str, rng) -> list[np.ndarray]:
    """Positions (into `ages`) of each learner's subjects."""
    check(len(ages), k, distribution)
    parts = BUILDERS[distribution](ages, k, rng)
    return [np.sort(np.asarray(p, dtype=np.int64)) for p in parts]


def check(n_train: int, k: int, distribution: str) -> None:
    """SplitError when the distribution cannot be built for n_train subjects and k learners."""
    validate(k, distribution)
    # k > n_train first: skewed_sizes allocates k numbers, and k comes from the command line
    if k > n_train or (DISTRIBUTIONS[distribution].skewed and skewed_sizes(n_train, k)[-1] < 1):
        raise SplitError(
            f"{n_train} training subjects cannot give each of {k} learners at least one subject under {distribution}"
        )


def partition(
    ages, *, learners: int, distribution: str, test_fraction: float = TEST_FRACTION, seed: int = 0
) -> tuple[np.ndarray, list[np.ndarray]]:
    """(test rows, [rows of learner 1..K]) as sorted indices into `ages`."""
    ages = np.asarray(ages, dtype=np.float64)
    validate(learners, distribution)
    if not 0.0 < test_fraction < 1.0:
        raise SplitError(f"--test-fraction must be between 0 and 1, got {test_fraction}")
    if seed < 0:
        raise SplitError(f"--seed must be >= 0, got {seed}")
    if len(ages) == 0:
        raise SplitError("no subjects to split")
    nonfinite = int(np.count_nonzero(~np.isfinite(ages)))
    if nonfinite:
        raise SplitError(f"{nonfinite} of {len(ages)} ages are not finite numbers (NaN or inf)")
    rng = np.random.default_rng([seed, 0x5B17])
    test = test_indices(ages, test_fraction, rng)
    if len(test) == 0:
        largest = int(np.bincount(age_bins(ages)).max())
        raise SplitError(
            f"--test-fraction {test_fraction:g} holds out no subject: the largest of the {N_BINS} age "
            f"bins has {largest} subject(s), and {test_fraction:g} x {largest} rounds to 0; "
            f"use at least {least_fraction(largest):g}"
        )
    rest = np.setdiff1d(np.arange(len(ages)), test)
    parts = learner_indices(ages[rest], learners, distribution, rng)
    return test, [rest[p] for p in parts]


def _stats(ages: np.ndarray) -> dict:
    return {
        "size": len(ages),
        "age_mean": round(float(ages.mean()), 3),
        "age_std": round(float(ages.std()), 3),
        "age_min": round(float(ages.min()), 3),
        "age_max": round(float(ages.max()), 3),
    }


def check_ages(path: Path, ages: np.ndarray, ids, age_range: tuple[float, float]) -> None:
    """SplitError naming the subjects whose age is not finite or outside `age_range` (MIN, MAX]."""
    bad = bids.bad_ages(ages, age_range)
    if len(bad):
        shown = bids.first_names([f"{ids[i]} ({ages[i]:g})" for i in bad], shown=5)
        raise SplitError(
            f"volume file {path} has {len(bad)} subject(s) with an unusable age: {shown}; ages must be "
            f"finite and in {bids.age_range_text(age_range)}; fix participants.tsv and re-run "
            f"preprocess nifti{bids.unknown_ages_note(ages, bad, 'split')}"
        )


def _check_out_dir(h5: Path, out: Path) -> None:
    """Refuse an --out that holds the input, holds other files without being a split, or whose
    owned names are not files."""
    outputs.check_dir(out, "--out")
    if out.resolve() in h5.resolve().parents:
        raise SplitError(f"the input {h5} lies inside --out {out}; choose an output directory that does not hold it")
    if not out.is_dir():
        return
    entries = list(out.iterdir())
    clash = [p for p in entries if OWNED.fullmatch(p.name) and not p.is_file()]
    if clash:
        raise SplitError(f"{clash[0]} is not a file; a split would write a file of that name; choose another --out")
    foreign = [p for p in entries if not OWNED.fullmatch(p.name) and not p.name.startswith(TMP_PREFIX)]
    if foreign and not (out / PARTITION_FILE).is_file():
        raise SplitError(f"{out} exists and is not a split directory; choose another --out")


def write_split(
    h5,
    out,
    *,
    learners: int = 8,
    distribution: str = "uniform-iid",
    test_fraction: float = TEST_FRACTION,
    seed: int = 0,
) -> Path:
    """learner_1.h5 .. learner_K.h5, test.h5 and partition.json in `out`, built atomically.

    The files are built in a temporary directory inside `out` and moved in; partition.json
    goes last, so a directory without it is an unfinished split. A second split into `out` while one runs is
    refused (OutputError): `.NAME.lock` beside `out` is held while the files are written. Only the files a split owns
    (OWNED) are replaced or removed: other files in an existing split directory stay. A
    non-empty directory without partition.json that holds other files is refused, and so is
    an `out` that holds the input file.
    """
    h5, out = Path(h5), Path(out)
    _check_out_dir(h5, out)
    with h5io.open_checked(h5) as f:
        ages = f["age"][:].astype(np.float64)
        ids = f["subject_id"].asstr()[:]
        try:
            age_range = bids.stored_age_range(f.attrs)
        except ValueError as e:
            raise SplitError(f"volume file {h5}: {e}") from None
    check_ages(h5, ages, ids, age_range)
    test, parts = partition(ages, learners=learners, distribution=distribution, test_fraction=test_fraction, seed=seed)
    meta = {
        "distribution": distribution,
        "learners": learners,
        "seed": seed,
        "test_fraction": test_fraction,
        "age_bins": N_BINS,
        "source": str(h5.resolve()),
    }
    # one split at a time per --out: a second one swept the first's temporary directory as a killed split's
    with outputs.exclusive(out.with_name(f".{out.name}.lock"), f"--out {out}", wait=False):
        created = not out.exists()
        make_dirs(out)
        for stale in out.glob(TMP_PREFIX + "*"):  # left by a split that was killed
            shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=TMP_PREFIX, dir=out))
        os.chmod(tmp, umask_mode(directory=True))
        done = False
        try:
            per_learner: list[dict] = []
            summary = dict(meta, test=dict(_stats(ages[test]), file=TEST_FILE), per_learner=per_learner)
            h5io.copy_rows(h5, tmp / TEST_FILE, test, {"split": json.dumps(dict(meta, role="test"))})
            for j, rows in enumerate(parts, start=1):
                name = learner_file(j)
                h5io.copy_rows(h5, tmp / name, rows, {"split": json.dumps(dict(meta, role="learner", learner=j))})
                per_learner.append(dict(_stats(ages[rows]), learner=j, file=name))
            _move_in(tmp, out, json.dumps(summary, indent=2))
            done = True
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
            if not done and created and not any(out.iterdir()):
                out.rmdir()
    return out


def _move_in(tmp: Path, out: Path, summary: str) -> None:
    """Replace the owned files of `out` by those built in `tmp`; partition.json, written last,
    marks the split complete (its directory entry is fsynced with the renames before it)."""
    (out / PARTITION_FILE).unlink(missing_ok=True)
    new = {p.name for p in tmp.iterdir()}
    for name in sorted(new):
        os.replace(tmp / name, out / name)
    for old in out.iterdir():
        if OWNED.fullmatch(old.name) and old.name not in new:
            old.unlink()
    atomic_write(out / "partition.json", summary.encode())
