"""Shared fixtures: one tiny synthetic cohort per test session (36 subjects, 4 mm), a
scanner-space one (4 subjects, one per site, with ground truth) for the registration tests, and
two finished runs' records for the report's tests."""

from __future__ import annotations

import dataclasses
import signal
from pathlib import Path

import pytest

from fedmpi import preemption

COHORT_SUBJECTS = 36
COHORT_SEED = 1


@dataclasses.dataclass(frozen=True)
class Cohort:
    root: Path  # the synthetic_cohort root
    bids: Path  # BIDS-like NIfTI dataset
    h5: Path  # preprocessed 4 mm volumes
    split: Path  # uniform-iid split over 4 learners
    subjects: int = COHORT_SUBJECTS
    seed: int = COHORT_SEED


@pytest.fixture
def runs(tmp_path) -> tuple[Path, Path]:
    """Two finished runs' directories (runrecords.two_runs), for the tests of reading and reporting records."""
    from runrecords import two_runs

    return two_runs(tmp_path)


@pytest.fixture(scope="session")
def cohort(tmp_path_factory) -> Cohort:
    """Built through the trainer's own entry point, so every test file exercises the same path."""
    from preprocess.cohort import synthetic_cohort

    root = tmp_path_factory.mktemp("cohort")
    out = synthetic_cohort(
        root, subjects=COHORT_SUBJECTS, voxel=4, learners=4, distribution="uniform-iid", seed=COHORT_SEED, workers=2
    )
    base = out.parent
    return Cohort(root, base / "bids", base / "v4.h5", out)


def pytest_collection_modifyitems(items):
    """Tests that need the session's synthetic cohort (a minute to build on 2 cores) are marked `cohort`,
    so that `make test-fast` can leave them out."""
    for item in items:
        if "cohort" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.cohort)


def pytest_sessionfinish(session, exitstatus):
    """Under mpirun each rank is a pytest session and the launcher ORs their exit codes (MPICH's hydra: 1 and 4
    give 5), so a Makefile that let pytest's "no tests" (5) pass would let some failures pass too. With
    --with-mpi an empty selection exits 0 itself, and `make test-mpi` takes every other code as a failure."""
    if exitstatus == pytest.ExitCode.NO_TESTS_COLLECTED and session.config.getoption("--with-mpi", default=False):
        session.exitstatus = pytest.ExitCode.OK


NATIVE_SUBJECTS = 4


@pytest.fixture(scope="session")
def native_cohort(tmp_path_factory) -> Path:
    """BIDS-like cohort with heads in random rigid poses and derivatives/synth-truth/."""
    from preprocess import synth

    root = tmp_path_factory.mktemp("native") / "bids"
    return synth.write_cohort(root, NATIVE_SUBJECTS, seed=COHORT_SEED, workers=2, space="native")


@pytest.fixture(autouse=True)
def _preemption_signals_restored():
    """`python -m fedmpi train` (fedmpi.preemption), which some tests run in this process, leaves SIGTERM,
    SIGUSR1 and SIGINT ignored, as a finished rank must: the next test starts with this process's own
    dispositions again (Ctrl-C ends pytest). A rank's failure path (launch._failing) leaves them, and SIGCHLD,
    so too."""
    saved = {sig: signal.getsignal(sig) for sig in (*preemption.SIGNALS, signal.SIGCHLD)}
    yield
    for sig, handler in saved.items():
        signal.signal(sig, handler)
