"""fedmpi.errors: which failures are the user's to fix, and the one line a DataLoader worker's re-raise gives."""

import errno
import os
import traceback

import pytest

from fedmpi import errors
from fedmpi.errors import STORAGE_ERRNOS, DataError, UserError, is_user_error, user_message

USER_ERRORS = [c for c in vars(errors).values() if isinstance(c, type) and issubclass(c, UserError)]


class WorkerError(UserError):
    """A user error defined outside fedmpi.errors: its traceback line names this module."""


class Bug(Exception):
    """Not a user error; its traceback line names its module, as a user error's does."""


def reraised(exc: BaseException) -> BaseException:
    """`exc` raised in a DataLoader worker as the training process sees it: torch's ExceptionWrapper.reraise makes
    a new exception of its type whose message is a 'Caught' line and the worker's formatted traceback."""
    try:
        raise exc
    except BaseException as caught:
        worker = "".join(traceback.format_exception(type(caught), caught, caught.__traceback__))
    return type(exc)(f"Caught {type(exc).__name__} in DataLoader worker process 0.\nOriginal {worker}")


@pytest.mark.parametrize("code", STORAGE_ERRNOS, ids=[errno.errorcode[c] for c in STORAGE_ERRNOS])
def test_a_full_disk_a_quota_a_read_only_file_system_or_a_size_limit_is_the_users_to_fix(code):
    assert is_user_error(OSError(code, os.strerror(code)))


def test_an_io_error_or_an_errno_less_os_error_is_not():
    """A failing disk is not a setting to fix: it shows a traceback like a bug."""
    assert not is_user_error(OSError(errno.EIO, os.strerror(errno.EIO)))
    assert not is_user_error(OSError("no errno"))


def test_ctrl_c_is_one_line_and_a_plain_exception_is_a_bug():
    assert is_user_error(KeyboardInterrupt())
    assert not is_user_error(ValueError("a bug"))
    assert not is_user_error(RuntimeError("a bug"))


@pytest.mark.parametrize("cls", USER_ERRORS, ids=[c.__name__ for c in USER_ERRORS])
def test_every_user_error_is_the_users_to_fix(cls):
    assert is_user_error(cls("x"))


def test_the_user_errors_include_the_subclasses_of_subclasses():
    names = {c.__name__ for c in USER_ERRORS}
    assert {"UserError", "ConfigError", "ConfigFileError", "CheckpointUnreadable", "MissingExtra"} <= names


def test_a_user_error_re_raised_from_a_dataloader_worker_is_the_workers_last_line():
    exc = reraised(DataError("volume file x.h5: cannot read volume 3"))
    assert str(exc).startswith("Caught DataError in DataLoader worker process 0.\nOriginal Traceback")
    assert user_message(exc) == "volume file x.h5: cannot read volume 3"
    assert user_message(reraised(WorkerError("a: b"))) == "a: b"  # a user error of another module


def test_a_chained_worker_traceback_gives_its_last_exception():
    """A worker's traceback can show an earlier exception of the same type first ('The above exception was the
    direct cause'): the last line is the one raised."""
    try:
        try:
            raise DataError("first")
        except DataError as first:
            raise DataError("second: the one raised") from first
    except DataError as second:
        exc = second
    assert "first" in str(reraised(exc))
    assert user_message(reraised(exc)) == "second: the one raised"


def test_the_handwritten_torch_text_unwraps():
    text = (
        "Caught DataError in DataLoader worker process 0.\n"
        "Original Traceback (most recent call last):\n"
        '  File "/site-packages/torch/utils/data/_utils/worker.py", line 349, in _worker_loop\n'
        "    data = fetcher.fetch(index)\n"
        '  File "/fedmpi/data.py", line 120, in __getitem__\n'
        '    raise DataError(f"volume file {self.path}: cannot read volume {i}: {exc}") from None\n'
        "fedmpi.errors.DataError: volume file /d/learner_1.h5: cannot read volume 3: Error -3\n"
    )
    assert user_message(DataError(text)) == "volume file /d/learner_1.h5: cannot read volume 3: Error -3"


def test_a_message_that_only_contains_the_marker_is_returned_whole():
    """Only a user error whose message is torch's re-raise is unwrapped; anything else is its own message."""
    for bug in (reraised(Bug("a bug")), reraised(ValueError("a bug"))):
        assert user_message(bug) == str(bug)  # not a user error: its traceback is what the report needs
    quoted = DataError(f"a file named{errors.WORKER_TRACEBACK}fedmpi.errors.DataError: x")  # no 'Caught' head
    assert user_message(quoted) == str(quoted)
    other = DataError(
        f"Caught DataError in DataLoader worker process 0.{errors.WORKER_TRACEBACK}  File ...\nsomething else\n"
    )
    assert user_message(other) == str(other)  # the worker's traceback lacks the type's prefix
    assert user_message(DataError("x: y")) == "x: y"
