"""The embedded default data: each step built once, every input that changes a file in the split's name."""

import json
import shutil
from pathlib import Path

import pytest

from fedmpi.data import VolumeDataset
from preprocess.cohort import synthetic_cohort
from preprocess.outputs import OutputError


def test_synthetic_cohort_reuses_finished_steps(cohort):
    stamps = {
        p: p.stat().st_mtime_ns for p in (cohort.h5, cohort.split / "partition.json", cohort.bids / "participants.tsv")
    }
    again = synthetic_cohort(cohort.root, subjects=cohort.subjects, seed=cohort.seed, learners=4)
    assert again == cohort.split
    assert all(p.stat().st_mtime_ns == t for p, t in stamps.items())
    other = synthetic_cohort(
        cohort.root, subjects=cohort.subjects, seed=cohort.seed, learners=2, distribution="uniform-noniid"
    )
    assert other.name == "split-uniform-noniid-2-4mm" and other.parent == cohort.split.parent
    assert cohort.h5.stat().st_mtime_ns == stamps[cohort.h5]
    summary = json.loads((other / "partition.json").read_text())
    assert [e["size"] for e in summary["per_learner"]] == [
        len(VolumeDataset(other / f"learner_{k}.h5")) for k in (1, 2)
    ]
    assert sorted(p.name for p in cohort.split.parent.iterdir()) == [
        ".build.lock",  # one builder at a time
        ".split-uniform-iid-4-4mm.lock",  # one split at a time per directory
        ".split-uniform-noniid-2-4mm.lock",
        ".v4.h5.lock",  # one nifti run at a time
        "bids",
        "split-uniform-iid-4-4mm",
        "split-uniform-noniid-2-4mm",
        "v4.h5",
    ]


def test_another_voxel_size_gets_its_own_split(cohort, tmp_path):
    """The 4 mm split already exists; asking for 6 mm must cut a split from the 6 mm volumes, not reuse it."""
    base = tmp_path / cohort.root.name / cohort.bids.parent.name
    shutil.copytree(cohort.bids, base / "bids")
    shutil.copy(cohort.h5, base / "v4.h5")
    four = synthetic_cohort(tmp_path / cohort.root.name, subjects=cohort.subjects, seed=cohort.seed, learners=2)
    six = synthetic_cohort(tmp_path / cohort.root.name, subjects=cohort.subjects, seed=cohort.seed, learners=2, voxel=6)
    assert six != four
    assert VolumeDataset(four / "learner_1.h5").voxel_size == 4.0
    assert VolumeDataset(six / "learner_1.h5").voxel_size == 6.0
    assert json.loads((six / "partition.json").read_text())["source"].endswith("v6.h5")


def test_synthetic_cohort_validates_before_generating(tmp_path):
    with pytest.raises(ValueError, match="must be even"):
        synthetic_cohort(tmp_path, subjects=10, learners=3, distribution="uniform-noniid")
    with pytest.raises(ValueError, match="training subjects cannot give each of 20 learners"):
        synthetic_cohort(tmp_path, subjects=240, learners=20, distribution="skewed-noniid")
    with pytest.raises(ValueError, match="holds out no subject"):
        synthetic_cohort(tmp_path, subjects=20, learners=2, test_fraction=0.01)
    assert list(tmp_path.iterdir()) == []


def test_a_cohort_the_disk_cannot_hold_is_refused_before_its_subjects_are_drawn(cohort, tmp_path, monkeypatch):
    """`fedmpi train --set data.subjects=1e12` died in a MemoryError drawing 7 TiB of ages on rank 0."""
    with pytest.raises(OutputError, match=r"^the synthetic cohort .*/synth-s1000000000000-seed0/bids needs at least "):
        synthetic_cohort(tmp_path, subjects=10**12)
    assert list(tmp_path.iterdir()) == []
    monkeypatch.setattr(
        "preprocess.outputs.shutil.disk_usage", lambda path: shutil._ntuple_diskusage(10**12, 10**12, 0)
    )
    again = synthetic_cohort(cohort.root, subjects=cohort.subjects, seed=cohort.seed, learners=4)
    assert again == cohort.split  # a cohort already built needs no room


def test_a_second_builder_waits_for_the_first(cohort):
    """Two jobs sharing a cache directory, or ranks of several nodes: each built the cohort at once in the same
    place, removing the other's temporaries; now one builds and the others wait, then find it built."""
    import fcntl
    import threading
    import time

    base = Path(cohort.root) / f"synth-s{cohort.subjects}-seed{cohort.seed}"
    got = []
    with open(base / ".build.lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        other = threading.Thread(
            target=lambda: got.append(
                synthetic_cohort(cohort.root, subjects=cohort.subjects, seed=cohort.seed, learners=4)
            )
        )
        other.start()
        time.sleep(1.5)
        assert other.is_alive() and not got
    other.join(60)
    assert got and (got[0] / "partition.json").is_file()
