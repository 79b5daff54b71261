"""Directories written whole or not at all (fedmpi.files.atomic_dir)."""

import errno
import os
from pathlib import Path

import pytest

from fedmpi import files
from fedmpi.files import atomic_dir, atomic_write, write_output


def test_a_finished_directory_replaces_the_old_one(tmp_path):
    out = tmp_path / "report"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with atomic_dir(out) as tmp:
        assert tmp.parent == tmp_path and tmp != out
        (tmp / "new.txt").write_text("new")
        assert (out / "old.txt").exists()  # readers see the old directory until the block succeeds
    assert sorted(p.name for p in out.iterdir()) == ["new.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report"]  # nothing left beside it


def test_a_failed_directory_leaves_the_old_one_and_no_trace(tmp_path):
    out = tmp_path / "report"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(RuntimeError), atomic_dir(out) as tmp:
        (tmp / "half.txt").write_text("half")
        raise RuntimeError("worker died")
    assert sorted(p.name for p in out.iterdir()) == ["old.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report"]


def test_a_finished_directory_is_on_disk_before_it_takes_the_name(tmp_path, monkeypatch):
    """Every file and directory in it is fsynced before the rename, the parent after: a power loss cannot
    leave truncated files under the real name."""
    events = []
    monkeypatch.setattr(files, "_fsync", lambda path, directory=False: events.append(("fsync", Path(path))))
    real_replace = files.replace_dir
    monkeypatch.setattr(
        files, "replace_dir", lambda tmp, out: (events.append(("rename", Path(out))), real_replace(tmp, out))
    )
    out = tmp_path / "bids"
    with atomic_dir(out) as tmp:
        (tmp / "sub-01" / "anat").mkdir(parents=True)
        (tmp / "sub-01" / "anat" / "t1.nii.gz").write_bytes(b"x")
        (tmp / "participants.tsv").write_text("id\n")
    rename = events.index(("rename", out))
    synced = {p.relative_to(tmp) for _, p in events[:rename]}
    assert synced == {
        Path("."),
        Path("sub-01"),
        Path("sub-01/anat"),
        Path("sub-01/anat/t1.nii.gz"),
        Path("participants.tsv"),
    }
    assert events[rename + 1 :] == [("fsync", tmp_path)]


def test_temporaries_of_dead_processes_on_this_host_go_with_the_next_write(tmp_path):
    """kill -9 leaves a temporary behind; the next write of the same output removes it, but never one of a
    live process or of another host (a shared file system)."""
    import socket
    import subprocess
    import sys

    from fedmpi.files import atomic_write

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)
    host = socket.gethostname()
    left = {
        "dead": tmp_path / f".out.h5.tmp-{host}-{dead_pid}-abc.tmp",
        "dead_dir": tmp_path / f".report.tmp-{host}-{dead_pid}-xyz",
        "dead_old_dir": tmp_path / f".report.tmp-{host}-{dead_pid}-old",  # replace_dir's, killed between its renames
        "live": tmp_path / f".out.h5.tmp-{host}-{os.getpid()}-def.tmp",
        "other_host": tmp_path / f".out.h5.tmp-elsewhere-{dead_pid}-ghi.tmp",
        "other_output": tmp_path / f".other.h5.tmp-{host}-{dead_pid}-jkl.tmp",
    }
    for name, path in left.items():
        if name.endswith("_dir"):
            (path / "sub").mkdir(parents=True)
            (path / "sub" / "f").write_text("half")
        else:
            path.write_text("half")
    atomic_write(tmp_path / "out.h5", b"whole")
    with atomic_dir(tmp_path / "report") as tmp:
        (tmp / "a.md").write_text("x")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["out.h5", "report", left["live"].name, left["other_host"].name, left["other_output"].name]
    )


def test_a_written_file_is_on_disk_before_it_takes_the_name(tmp_path, monkeypatch):
    events = []
    monkeypatch.setattr(files, "_fsync", lambda path, directory=False: events.append(("fsync", Path(path))))
    real_replace = os.replace
    monkeypatch.setattr(files.os, "replace", lambda a, b: (events.append(("rename", Path(b))), real_replace(a, b)))
    out = tmp_path / "out.bin"
    atomic_write(out, b"whole")
    assert [e[0] for e in events] == ["fsync", "rename", "fsync"]
    assert events[0][1].parent == tmp_path and events[0][1] != out  # the temporary, before the rename
    assert events[1:] == [("rename", out), ("fsync", tmp_path)]
    assert out.read_bytes() == b"whole"


def test_directories_a_write_creates_are_on_disk_in_their_parents(tmp_path, monkeypatch):
    """A file fsynced and renamed into a directory created for it is lost with the directory unless the new
    directory's name reaches its parent on disk too."""
    synced = []
    monkeypatch.setattr(files, "_fsync", lambda path, directory=False: synced.append(Path(path)) if directory else None)
    atomic_write(tmp_path / "run" / "checkpoints" / "round-1.npz", b"x")
    assert synced == [tmp_path, tmp_path / "run", tmp_path / "run" / "checkpoints"]
    synced.clear()
    atomic_write(tmp_path / "run" / "checkpoints" / "round-2.npz", b"y")
    assert synced == [tmp_path / "run" / "checkpoints"]  # nothing new to make durable above it


def test_a_parent_that_cannot_be_read_still_takes_a_new_directory(tmp_path, monkeypatch):
    """A drop-box parent (mode 0o733: written and searched, not read) cannot be opened to fsync; mkdir -p works
    there, so the durability of that one name is given up rather than the write."""

    def unreadable(path, directory=False):
        if directory and Path(path) == tmp_path:
            raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(files, "_fsync", unreadable)
    atomic_write(tmp_path / "run" / "summary.json", b"{}")
    assert (tmp_path / "run" / "summary.json").read_bytes() == b"{}"


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def test_outputs_get_the_permissions_a_plain_open_would_give(tmp_path, umask_022):
    """tempfile makes private files (0600) and directories (0700); outputs are shared like any other file."""
    atomic_write(tmp_path / "f.txt", b"x")
    assert (tmp_path / "f.txt").stat().st_mode & 0o777 == 0o644
    with atomic_dir(tmp_path / "report") as tmp:
        (tmp / "a.md").write_text("x")
    assert (tmp_path / "report").stat().st_mode & 0o777 == 0o755


def test_temporaries_of_another_users_live_process_stay(tmp_path, monkeypatch):
    import socket

    def not_permitted(pid, sig):
        raise PermissionError(1, "Operation not permitted")

    other = tmp_path / f".out.h5.tmp-{socket.gethostname()}-4242-abc.tmp"
    other.write_text("being written")
    monkeypatch.setattr(files.os, "kill", not_permitted)
    atomic_write(tmp_path / "out.h5", b"whole")
    assert other.exists()


def test_a_full_disk_names_the_output_and_is_the_users_to_fix(tmp_path, monkeypatch):
    """A write's ENOSPC names no file, and it printed a traceback as a bug would: the error now says which output
    did not fit, is one line (is_user_error), and leaves neither a temporary nor a half file."""
    import errno

    from fedmpi.errors import is_user_error

    def full(self, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Path, "write_bytes", full)
    target = tmp_path / "checkpoints" / "round-000002.npz"
    with pytest.raises(OSError, match=rf"No space left on device \(writing {target}\)") as caught:
        atomic_write(target, b"x")
    assert caught.value.errno == errno.ENOSPC and is_user_error(caught.value)
    assert list(target.parent.iterdir()) == []
    assert not is_user_error(OSError(errno.EIO, "I/O error"))  # a failing disk is not a setting to fix


def test_an_old_directory_left_by_a_crash_between_the_renames_goes_with_the_next_write(tmp_path, monkeypatch):
    out = tmp_path / "report"
    with atomic_dir(out) as tmp:
        (tmp / "a.md").write_text("first")
    real_replace = os.replace
    calls = []

    def crash_on_second(a, b):
        calls.append(b)
        if len(calls) == 2:
            raise KeyboardInterrupt  # killed after moving the old directory aside
        real_replace(a, b)

    monkeypatch.setattr(files.os, "replace", crash_on_second)
    with pytest.raises(KeyboardInterrupt), atomic_dir(out) as tmp:
        (tmp / "a.md").write_text("second")
    monkeypatch.setattr(files.os, "replace", real_replace)
    left = [p.name for p in tmp_path.iterdir()]
    assert len(left) == 1 and left[0].startswith(files._temporary_prefix(out))
    monkeypatch.setattr(files, "_alive", lambda pid: False)  # the crashed writer is gone
    with atomic_dir(out) as tmp:
        (tmp / "a.md").write_text("third")
    assert [p.name for p in tmp_path.iterdir()] == ["report"] and (out / "a.md").read_text() == "third"


def test_a_file_where_a_directory_belongs_is_not_a_directory_not_an_existing_one(tmp_path):
    """make_dirs said 'File exists' for run.dir=FILE/run (mkdir of FILE itself), as if FILE/run were there; mkdir -p,
    which it replaced, says 'Not a directory' naming the path asked for."""
    (tmp_path / "file").write_text("x")
    for asked in (tmp_path / "file" / "run", tmp_path / "file" / "a" / "b"):
        with pytest.raises(NotADirectoryError) as caught:
            files.make_dirs(asked)
        assert caught.value.errno == errno.ENOTDIR and caught.value.filename == str(asked)
    with pytest.raises(FileExistsError):  # the path itself a file: as mkdir(exist_ok=True) says
        files.make_dirs(tmp_path / "file")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG])
@pytest.mark.parametrize("where", ["write", "create"])
def test_a_quota_a_read_only_remount_or_a_size_limit_names_the_output_too(tmp_path, monkeypatch, code, where):
    """A quota, a read-only remount and a file size limit are the user's to fix like a full disk: one line naming
    the output. A read-only file system already refuses the temporary's creation, before any write."""
    import tempfile

    from fedmpi.errors import is_user_error

    def refuse(*args, **kwargs):
        raise OSError(code, os.strerror(code))

    if where == "write":
        monkeypatch.setattr(Path, "write_bytes", refuse)
    else:
        monkeypatch.setattr(tempfile, "mkstemp", refuse)
    target = tmp_path / "checkpoints" / "round-000002.npz"
    with pytest.raises(OSError) as caught:
        atomic_write(target, b"x")
    assert str(caught.value) == f"[Errno {code}] {os.strerror(code)} (writing {target})"
    assert caught.value.errno == code and is_user_error(caught.value)
    assert list(target.parent.iterdir()) == []


@pytest.mark.parametrize("where", ["fill", "create"])
def test_a_directory_output_that_does_not_fit_names_the_output(tmp_path, monkeypatch, where):
    """synth's BIDS tree and qc's folder go through atomic_dir: a full disk there said only 'No space left on
    device', and a read-only parent named the temporary directory."""
    import tempfile

    out = tmp_path / "cohort"
    if where == "create":

        def refuse(*args, **kwargs):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS))

        monkeypatch.setattr(tempfile, "mkdtemp", refuse)
    with pytest.raises(OSError) as caught, files.atomic_dir(out):
        if where == "fill":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    code = errno.ENOSPC if where == "fill" else errno.EROFS
    assert str(caught.value) == f"[Errno {code}] {os.strerror(code)} (writing {out})"
    assert list(tmp_path.iterdir()) == []
    monkeypatch.undo()
    with pytest.raises(OSError, match=r"^\[Errno 2\]"), files.atomic_dir(out):  # not a storage error: as it is
        raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT))


def test_a_commands_output_the_file_system_refuses_is_the_commands_error_naming_it(tmp_path):
    class CommandError(Exception):
        pass

    (tmp_path / "a-file").write_text("x")
    out = tmp_path / "a-file" / "out.csv"
    with pytest.raises(CommandError, match=r"^--out .*a-file/out.csv: cannot write there"):
        write_output(out, b"data", CommandError)
    write_output(tmp_path / "ok.csv", b"data", CommandError)
    assert (tmp_path / "ok.csv").read_bytes() == b"data"
