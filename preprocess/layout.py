"""A split directory's file names, in one place: preprocess.split writes them, and the trainer, the attack
and the report read them. Nothing heavy is imported, so every reader can use it."""

from __future__ import annotations

import re
from pathlib import Path

TEST_FILE = "test.h5"  # the held-out subjects: the server's evaluation set
PARTITION_FILE = "partition.json"  # what the split was made from, written last: its presence marks a complete split
_LEARNER = re.compile(r"learner_([1-9][0-9]*)\.h5")
# The files a split owns in its directory; anything else there is left alone.
OWNED = re.compile(rf"{_LEARNER.pattern}|{re.escape(TEST_FILE)}|{re.escape(PARTITION_FILE)}")


def learner_file(k: int) -> str:
    """The file of learner k (1-based, as the rank that trains on it)."""
    return f"learner_{k}.h5"


def is_learner_file(name: str) -> bool:
    """Whether `name` is a learner file's name (learner_<k>.h5, k >= 1)."""
    return _LEARNER.fullmatch(name) is not None


def learner_files(directory: Path) -> dict[int, Path]:
    """Every learner file in `directory` by learner number, in learner order (learner_10.h5 after
    learner_9.h5); names that only look alike (learner_old.h5, learner_1.h5.bak) are not learner files."""
    if not Path(directory).is_dir():
        return {}
    found = {int(m.group(1)): p for p in Path(directory).iterdir() if (m := _LEARNER.fullmatch(p.name))}
    return dict(sorted(found.items()))
