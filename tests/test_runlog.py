"""Run directory files: atomic whole-file writes, append-only metrics that survive a crash mid-line."""

import json
import os

import pytest

from fedmpi import files, runlog
from fedmpi.files import atomic_write
from fedmpi.runlog import RunLock, RunLog, dumps, finite_json, read_json, stopped_early


def listing(directory):
    return sorted(p.name for p in directory.iterdir())


def test_atomic_write_creates_parents_and_replaces(tmp_path):
    path = tmp_path / "a" / "b" / "f.txt"
    atomic_write(path, b"first version, longer")
    assert path.read_bytes() == b"first version, longer"
    atomic_write(path, b"second")
    assert path.read_bytes() == b"second"
    assert listing(path.parent) == ["f.txt"]


def test_atomic_write_failure_keeps_old_file_and_no_temp(tmp_path):
    path = tmp_path / "f.txt"
    atomic_write(path, b"old")
    with pytest.raises(TypeError):
        atomic_write(path, "not bytes")  # the write itself fails after the temp file is opened
    assert path.read_bytes() == b"old"
    assert listing(tmp_path) == ["f.txt"]


def test_append_and_rows(tmp_path):
    log = RunLog(tmp_path / "run")
    assert log.rows() == []
    log.append({"round": 1, "loss": 2.5})
    log.append({"round": 2, "loss": 1.5, "sparsity": 0.1})
    assert log.rows() == [{"round": 1, "loss": 2.5}, {"round": 2, "loss": 1.5, "sparsity": 0.1}]
    lines = log.metrics_path.read_text().splitlines()
    assert len(lines) == 2 and all(json.loads(ln) for ln in lines)


def test_the_metrics_file_and_its_run_directory_are_made_durable_once(tmp_path, monkeypatch):
    synced = []
    monkeypatch.setattr(runlog, "fsync_directory", synced.append)
    monkeypatch.setattr(files, "fsync_directory", synced.append)
    log = RunLog(tmp_path / "run")
    log.append({"round": 1})
    assert synced == [tmp_path, tmp_path / "run"]  # the new run directory in its parent, then metrics.jsonl's name
    log.append({"round": 2})
    assert synced == [tmp_path, tmp_path / "run"]  # appending to an existing file adds no name


def test_partial_last_line_is_ignored(tmp_path):
    log = RunLog(tmp_path)
    log.append({"round": 1, "loss": 2.5})
    log.append({"round": 2, "loss": 1.5})
    with open(log.metrics_path, "a") as fh:
        fh.write('{"loss": 0.9, "round"')  # a crash in the middle of a write
    assert [r["round"] for r in log.rows()] == [1, 2]


def test_keep_through_drops_later_rows_and_partial_line(tmp_path):
    log = RunLog(tmp_path)
    for r in range(1, 6):
        log.append({"round": r, "loss": 10.0 - r})
    with open(log.metrics_path, "a") as fh:
        fh.write('{"round": 6, "lo')
    kept = log.keep_through(3)
    assert [r["round"] for r in kept] == [1, 2, 3]
    assert log.metrics_path.read_text() == "".join(json.dumps(r, sort_keys=True) + "\n" for r in kept)
    log.append({"round": 4, "loss": 0.0})  # a resumed run appends after a clean line
    assert [r["round"] for r in log.rows()] == [1, 2, 3, 4]
    assert listing(tmp_path) == ["metrics.jsonl"]


def test_keep_through_zero_empties_the_log(tmp_path):
    log = RunLog(tmp_path)
    log.append({"round": 1})
    assert log.keep_through(0) == []
    assert log.metrics_path.read_text() == "" and log.rows() == []


def test_reset_removes_metrics(tmp_path):
    log = RunLog(tmp_path)
    log.reset()  # nothing to remove is fine
    log.append({"round": 1})
    log.write_summary({"rounds": 1})
    log.reset()
    assert not log.metrics_path.exists() and log.rows() == []
    assert not (tmp_path / "summary.json").exists()


def test_write_config_and_summary_are_json(tmp_path):
    log = RunLog(tmp_path / "run")
    log.write_config(json.dumps({"train": {"lr": 0.1}}))
    log.write_summary({"mae": 3.25, "rounds": 4, "name": "x"})
    assert json.loads((tmp_path / "run" / "config.json").read_text()) == {"train": {"lr": 0.1}}
    text = (tmp_path / "run" / "summary.json").read_text()
    assert json.loads(text) == {"mae": 3.25, "rounds": 4, "name": "x"}
    assert text.endswith("\n")
    log.write_summary({"mae": 1.0})
    assert json.loads((tmp_path / "run" / "summary.json").read_text()) == {"mae": 1.0}
    assert listing(tmp_path / "run") == ["config.json", "summary.json"]


def test_json_records_never_hold_nan(tmp_path):
    value = {"mae": float("nan"), "rows": [1.0, float("inf"), {"r": -float("inf")}], "ok": 2.5}
    assert finite_json(value) == {"mae": None, "rows": [1.0, None, {"r": None}], "ok": 2.5}
    json.loads(dumps(value))  # standard JSON
    log = RunLog(tmp_path)
    log.write_summary({"final_mae": float("nan")})
    log.append({"round": 1, "test_mae": float("nan")})
    text = (tmp_path / "summary.json").read_text() + log.metrics_path.read_text()
    assert "NaN" not in text and json.loads((tmp_path / "summary.json").read_text())["final_mae"] is None


def test_checked_rows_skip_a_cut_last_line_and_refuse_earlier_damage(tmp_path, capsys):
    from fedmpi.errors import ReportError

    log = RunLog(tmp_path)
    for t in (1, 2, 3):
        log.append({"round": t})
    with open(log.metrics_path, "a") as fh:
        fh.write('{"round": 4, "cut')
    assert [r["round"] for r in log.checked_rows()] == [1, 2, 3]
    assert "line 4 is cut short" in capsys.readouterr().err
    lines = log.metrics_path.read_text().splitlines()
    lines[1] = lines[1][:5]
    log.metrics_path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ReportError, match=r"2 damaged line\(s\) before the last \(2, 4 of 4\)"):
        log.checked_rows()
    assert log.read()[1] == [2, 4]


def test_run_lock_is_exclusive_names_the_holder_and_is_released(tmp_path):
    from fedmpi.errors import ConfigError

    held = RunLock(tmp_path / "run").acquire()
    with pytest.raises(ConfigError, match=r"is in use by a running job \(pid \d+ on .+, since "):
        RunLock(tmp_path / "run").acquire()
    held.release()
    again = RunLock(tmp_path / "run").acquire()  # free again, the stale holder line is replaced
    assert f"pid {__import__('os').getpid()}" in (tmp_path / "run" / ".lock").read_text()
    again.release()


def test_an_abandoned_lock_takes_away_what_it_made_and_nothing_else(tmp_path):
    """A start the preflight refuses (a mistyped data.dir) left runs/<name>/.lock behind, an empty run."""
    RunLock(tmp_path / "runs" / "new").acquire().abandon()
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "runs" / "old").mkdir(parents=True)
    (tmp_path / "runs" / "old" / "metrics.jsonl").write_text("{}\n")
    RunLock(tmp_path / "runs" / "old").acquire().abandon()
    assert sorted(p.name for p in (tmp_path / "runs" / "old").iterdir()) == ["metrics.jsonl"]
    RunLock(tmp_path / "runs" / "old").acquire().release()
    RunLock(tmp_path / "runs" / "old").acquire().abandon()  # a lock file it found stays, for the next run
    assert sorted(p.name for p in (tmp_path / "runs" / "old").iterdir()) == [".lock", "metrics.jsonl"]


def test_a_lock_file_taken_away_while_waiting_for_it_is_not_the_one_locked(tmp_path, monkeypatch):
    """A run that opened the lock file just before an abandoning run removed it would lock a file no one else can
    find, and a third run would lock a new one beside it: two runs in one directory."""
    from fedmpi import runlog
    from fedmpi.errors import ConfigError

    real, calls = runlog.fcntl.flock, []

    def flock(fd, op):
        calls.append(fd)
        if len(calls) == 1:  # the abandoning run removes the file between this run's open and its lock
            (tmp_path / "run" / ".lock").unlink()
        real(fd, op)

    monkeypatch.setattr(runlog.fcntl, "flock", flock)
    lock = RunLock(tmp_path / "run").acquire()
    monkeypatch.undo()
    assert len(calls) == 2 and f"pid {os.getpid()}" in (tmp_path / "run" / ".lock").read_text()
    with pytest.raises(ConfigError, match="is in use by a running job"):
        RunLock(tmp_path / "run").acquire()
    lock.release()


def test_a_file_system_without_locks_runs_unlocked_and_says_so(tmp_path, monkeypatch):
    """NFS without a lock daemon (ENOLCK), Lustre without flock (ENOSYS): the run goes on, and says why it is
    not locked; any other failure to lock is one line."""
    import errno

    from fedmpi import runlog
    from fedmpi.errors import ConfigError

    def refuse(code):
        def flock(fd, op):
            raise OSError(code, os.strerror(code))

        return flock

    monkeypatch.setattr(runlog.fcntl, "flock", refuse(errno.ENOLCK))
    lock = RunLock(tmp_path / "run").acquire()
    assert "takes no locks (No locks available), so a second run on this run.name would not be" in lock.unlocked
    assert f"pid {os.getpid()}" in (tmp_path / "run" / ".lock").read_text()
    lock.release()
    monkeypatch.setattr(runlog.fcntl, "flock", refuse(errno.EIO))
    with pytest.raises(ConfigError, match=r"cannot lock the run directory .*run: Input/output error"):
        RunLock(tmp_path / "run").acquire()
    monkeypatch.undo()
    assert RunLock(tmp_path / "run").acquire().unlocked == ""


def test_a_dead_holders_lock_is_taken_over(tmp_path):
    import subprocess
    import sys

    code = "import sys; from fedmpi.runlog import RunLock; RunLock(sys.argv[1]).acquire(); print('held', flush=True)"
    child = subprocess.Popen(
        [sys.executable, "-c", code + "; import time; time.sleep(60)", str(tmp_path)], stdout=subprocess.PIPE, text=True
    )
    assert child.stdout.readline().strip() == "held"
    from fedmpi.errors import ConfigError

    with pytest.raises(ConfigError, match=f"pid {child.pid}"):
        RunLock(tmp_path).acquire()
    child.kill()
    child.wait()
    RunLock(tmp_path).acquire().release()  # the kernel dropped the dead process's lock


def test_unwritable_run_directory_is_one_clear_error(tmp_path):
    from fedmpi.errors import ConfigError

    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match=r"cannot write the run directory .*file/run"):
        RunLock(tmp_path / "file" / "run").acquire()
    with pytest.raises(ConfigError, match="cannot write the run directory /proc/fedmpi-run"):
        RunLock("/proc/fedmpi-run").acquire()


class Bad(Exception):
    pass


def test_read_json_turns_every_bad_record_into_the_callers_error(tmp_path):
    path = tmp_path / "summary.json"
    path.write_text('{"rounds": 3}')
    assert read_json(path, Bad) == {"rounds": 3}
    for content, message in (("[]", "JSON list, not an object"), ("{", "not valid JSON"), ("7", "JSON int")):
        path.write_text(content)
        with pytest.raises(Bad, match=message):
            read_json(path, Bad)
    path.unlink()
    with pytest.raises(Bad, match="missing"):
        read_json(path, Bad)
    path.mkdir()
    with pytest.raises(Bad, match="cannot be read"):
        read_json(path, Bad)


def test_rows_stop_at_the_first_damaged_line(tmp_path):
    log = RunLog(tmp_path)
    for t in (1, 2, 3, 4):
        log.append({"round": t})
    lines = log.metrics_path.read_text().splitlines()
    lines[2] = lines[2][:5]  # round 3 damaged, round 4 intact after it
    log.metrics_path.write_text("\n".join(lines) + "\n")
    assert [r["round"] for r in log.rows()] == [1, 2]


def test_keep_through_replaces_the_file_whole(tmp_path):
    """A crash during keep_through leaves the old metrics or the new, never a truncated file: a hard link to
    the old file still holds every old row."""
    log = RunLog(tmp_path)
    for t in (1, 2, 3):
        log.append({"round": t})
    before = log.metrics_path.read_text()
    os.link(log.metrics_path, tmp_path / "old")
    assert [r["round"] for r in log.keep_through(1)] == [1]
    assert (tmp_path / "old").read_text() == before


def test_tuples_in_records_lose_their_nan_too():
    assert json.loads(dumps({"r": (1.0, float("nan")), "n": [(float("inf"),)]})) == {"r": [1.0, None], "n": [[None]]}


def test_the_lock_file_names_only_the_current_holder(tmp_path):
    (tmp_path / ".lock").write_text(
        "pid 1 on a-very-long-host-name-from-an-earlier-run, since 2020-01-01 00:00:00\n" * 3
    )
    lock = RunLock(tmp_path).acquire()
    text = (tmp_path / ".lock").read_text()
    lock.release()
    assert text.count("\n") == 1 and text.startswith(f"pid {os.getpid()} on ")


def test_each_metrics_row_is_fsynced(tmp_path, monkeypatch):
    synced = []
    real = os.fsync
    monkeypatch.setattr(runlog.os, "fsync", lambda fd: (synced.append(os.readlink(f"/proc/self/fd/{fd}")), real(fd)))
    log = RunLog(tmp_path)
    log.append({"round": 1})
    log.append({"round": 2})
    rows = str(log.metrics_path)
    assert synced == [rows, str(tmp_path), rows]  # each row; the new file's name once


@pytest.mark.parametrize(
    "summary,stopped",
    [
        ('{"preempted": true}', True),
        ('{"preempted": false}', False),
        ("{}", False),
        ('{"preempted": 1}', False),
        ("{not json", False),
        ("[true]", False),
        (None, False),
    ],
)
def test_a_run_stopped_early_is_one_whose_readable_summary_says_preempted(tmp_path, summary, stopped):
    """Report and sweep leave such runs out; an unreadable summary is left for whatever reads the run to name."""
    if summary is not None:
        (tmp_path / "summary.json").write_text(summary)
    assert stopped_early(tmp_path) is stopped
