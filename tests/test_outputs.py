"""preprocess.outputs: an output path refused before any work, the lock that keeps two writers of one --out apart."""

import errno
import fcntl
import os
import shutil

import pytest

from fedmpi.files import NO_LOCKS
from preprocess import outputs
from preprocess.outputs import OutputError, check_dir, check_file, exclusive


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_a_directory_is_refused_as_a_file(tmp_path):
    with pytest.raises(OutputError, match=rf"^--out {tmp_path} is an existing directory; it must name a file$"):
        check_file(tmp_path, "--out")


def test_a_device_is_refused_as_a_file():
    """Renaming the output onto /dev/null would replace the device with a regular file (run as root)."""
    with pytest.raises(OutputError, match=r"^--out /dev/null exists and is not a regular file \(a device"):
        check_file("/dev/null", "--out")


def test_a_path_under_a_file_names_the_file(tmp_path):
    (tmp_path / "file").write_text("x")
    for asked in (tmp_path / "file" / "out.h5", tmp_path / "file" / "a" / "out.h5"):
        want = rf"^cannot write --out {asked}: {tmp_path / 'file'} is a file, not a directory$"
        with pytest.raises(OutputError, match=want):
            check_file(asked, "--out")


def test_a_fine_path_passes_and_nothing_is_left_behind(tmp_path):
    (tmp_path / "old.h5").write_text("replaced later")
    for asked in (tmp_path / "new.h5", tmp_path / "old.h5", tmp_path / "a" / "b" / "new.h5"):
        check_file(asked, "--out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old.h5"]  # no directory made, no probe file left


def test_a_directory_the_process_cannot_write_in_is_named_with_the_reason(tmp_path, monkeypatch):
    """Root may write anywhere, so the refusal is stood in for: what creating the probe file raised is said."""

    def refuse(directory):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))

    monkeypatch.setattr(outputs, "probe_directory", refuse)
    asked = tmp_path / "a" / "out.h5"  # the nearest existing ancestor is the one probed
    want = rf"^cannot write --out {asked}: cannot create files in {tmp_path} \(Permission denied\)$"
    with pytest.raises(OutputError, match=want):
        check_file(asked, "--out")
    with pytest.raises(OutputError, match=want.replace("--out", "the cohort")):
        check_dir(asked, "the cohort")


def test_check_dir_takes_a_directory_or_a_new_one_and_refuses_a_file(tmp_path):
    (tmp_path / "file").write_text("x")
    check_dir(tmp_path, "the cohort")
    check_dir(tmp_path / "new" / "deeper", "the cohort")
    with pytest.raises(OutputError, match=rf"^the cohort {tmp_path / 'file'} exists and is not a directory$"):
        check_dir(tmp_path / "file", "the cohort")
    with pytest.raises(OutputError, match=rf"^cannot write the cohort {tmp_path / 'file' / 'd'}: .* is a file"):
        check_dir(tmp_path / "file" / "d", "the cohort")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


def test_check_space_refuses_what_cannot_fit_naming_the_nearest_existing_directory(tmp_path, monkeypatch):
    seen = []

    def usage(path):
        seen.append(path)
        return shutil._ntuple_diskusage(total=10**12, used=10**12 - 5 * 10**9, free=5 * 10**9)

    monkeypatch.setattr(outputs.shutil, "disk_usage", usage)
    outputs.check_space(tmp_path / "new" / "c", 5 * 10**9, "--out")  # exactly what is free fits
    want = f"^--out {tmp_path / 'new' / 'c'} needs at least 5.01 GB and {tmp_path} has 5 GB free; free space"
    with pytest.raises(OutputError, match=want):
        outputs.check_space(tmp_path / "new" / "c", 5 * 10**9 + 10**7, "--out")
    assert seen == [tmp_path, tmp_path] and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "nbytes, text",
    [
        (0, "0 MB"),
        (1_594_000, "1.59 MB"),
        (999_499_999, "999 MB"),
        (999_999_999, "1 GB"),
        (7.28e12, "7.28 TB"),
        (1.5e18, "1,500,000 TB"),
    ],
)
def test_size_text_by_hand(nbytes, text):
    assert outputs.size_text(nbytes) == text


def test_a_second_writer_that_does_not_wait_is_refused_naming_the_lock_and_the_out(tmp_path):
    lock, out = tmp_path / "made" / ".out.h5.lock", tmp_path / "made" / "out.h5"
    with exclusive(lock, f"--out {out}", wait=False):
        assert lock.exists()  # created, with its directory
        want = rf"^another process is writing --out {out} \({lock} is locked\); .* another --out$"
        with pytest.raises(OutputError, match=want), exclusive(lock, f"--out {out}", wait=False):
            pytest.fail("the second writer ran")


def test_the_lock_is_released_after_the_block_even_when_it_fails(tmp_path):
    lock = tmp_path / ".out.h5.lock"
    fds = _open_fds()
    with exclusive(lock, "--out out.h5", wait=False):
        pass
    with pytest.raises(KeyError), exclusive(lock, "--out out.h5", wait=False):
        raise KeyError("the work failed")
    assert _open_fds() == fds
    fd = os.open(lock, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # BlockingIOError if the lock were still held
    finally:
        os.close(fd)


@pytest.mark.parametrize("code", NO_LOCKS, ids=[errno.errorcode[c] for c in NO_LOCKS])
def test_a_file_system_without_locks_goes_without(tmp_path, monkeypatch, code):
    """NFS without a lock daemon, Lustre without flock: the command runs unlocked, as before the lock."""

    def refuse(fd, op):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(outputs.fcntl, "flock", refuse)
    ran = []
    with exclusive(tmp_path / ".lock", "--out out.h5", wait=True):
        ran.append(True)
    assert ran == [True]


def test_another_failure_to_lock_is_raised_and_the_block_does_not_run(tmp_path, monkeypatch):
    def fail(fd, op):
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(outputs.fcntl, "flock", fail)
    fds = _open_fds()
    with pytest.raises(OSError) as caught, exclusive(tmp_path / ".lock", "--out out.h5", wait=False):
        pytest.fail("the block ran unlocked")
    assert caught.value.errno == errno.EIO and not isinstance(caught.value, OutputError)
    assert _open_fds() == fds
