"""The run directory: resolved config, metrics.jsonl (one line per round), summary.json.

Whole files are written to a temporary name and renamed; metrics lines are appended and
fsynced, and a resumed run first drops the lines past its checkpoint so nothing is duplicated.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from .files import atomic_write


def read_json(path: Path, error: type[Exception]) -> dict:
    """A run's JSON file, or `error` with a message saying what is wrong with it."""
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise error(f"{path}: missing (is the run finished?)") from None
    except json.JSONDecodeError as e:
        raise error(f"{path}: not valid JSON ({e})") from None


class RunLog:
    def __init__(self, run_dir: Path):
        self.dir = Path(run_dir)
        self.metrics_path = self.dir / "metrics.jsonl"

    def write_config(self, config_json: str) -> None:
        atomic_write(self.dir / "config.json", config_json.encode())

    def write_summary(self, summary: dict) -> None:
        atomic_write(self.dir / "summary.json", (json.dumps(summary, indent=2, sort_keys=True) + "\n").encode())

    def append(self, row: dict) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        with open(self.metrics_path, "a") as fh:
            fh.write(json.dumps(row, sort_keys=True) + "\n")
            fh.flush()
            os.fsync(fh.fileno())

    def rows(self) -> list[dict]:
        if not self.metrics_path.exists():
            return []
        rows = []
        for line in self.metrics_path.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                break  # a line cut by a crash ends the valid part
        return rows

    def keep_through(self, round_: int) -> list[dict]:
        """Keep the rows of rounds <= round_ (resume): returns them."""
        rows = [r for r in self.rows() if r["round"] <= round_]
        atomic_write(self.metrics_path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows).encode())
        return rows

    def reset(self) -> None:
        if self.metrics_path.exists():
            self.metrics_path.unlink()
