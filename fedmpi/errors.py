"""The errors a user can fix, and the process exit codes.

This module imports nothing from the package (as Horovod's common/exceptions.py), so every module
can raise these without an import circle. "Is this the user's to fix?" is `is_user_error`: such
errors are reported as one line naming what is wrong; anything else is a bug and shows a traceback.
"""

from __future__ import annotations

import errno

EXIT_FAILURE = 1  # an unexpected failure (a bug: a traceback is printed)
EXIT_USAGE = 2  # bad configuration, command line or input: one line, nothing written
EXIT_PREEMPTED = 75  # EX_TEMPFAIL: stopped at a checkpoint on request; continue with --resume
EXIT_SIGNAL_BASE = 128  # a process killed by signal N exits 128 + N (shell convention)
EXIT_INTERRUPTED = EXIT_SIGNAL_BASE + 2  # Ctrl-C


class UserError(Exception):
    """Something the user can fix: a setting, an input file, a missing device, a lost peer."""


class ConfigError(UserError, ValueError):
    """A configuration problem, reported on rank 0 before training starts."""


class ConfigFileError(ConfigError):
    """The configuration file cannot be read (missing, unreadable, not UTF-8, not YAML): what the file system of
    the task's node says, so the tasks of one job may not agree on it."""


class DataError(UserError):
    """A volume file that is missing, damaged or not in the documented layout (names the file)."""


class EncodingError(UserError, ValueError):
    """A sparse-model buffer that does not decode (truncated, inconsistent or hostile)."""


class PayloadError(UserError):
    """A learner sent a model the server refuses; the global model is left untouched."""


class DivergedError(UserError):
    """Training left non-finite model values (a learning rate too high, an overflow); nothing of it is recorded."""


class DeviceError(UserError):
    """The requested compute device is not available on this node."""


class RoundTimeout(UserError):
    """A rank waited past its deadline for the others."""


class PeerLost(UserError):
    """A rank on this host has vanished (killed or crashed) while the launcher has not yet ended the job."""


class CheckpointError(UserError):
    """A checkpoint or model file that cannot be used."""


class CheckpointUnreadable(CheckpointError):
    """A checkpoint the file system would not give back (permissions, an I/O error): unlike a damaged one, it may
    be whole, so a resume must not pass over it to an older one or start afresh."""


class AttackError(UserError):
    """The run directory or data cannot support a membership attack."""


class PredictError(UserError):
    """A run or volume file that cannot give brain-age predictions (another grid, a file that is no file)."""


class ReportError(UserError):
    """A run directory that cannot be reported (missing or unreadable files)."""


class MissingExtra(UserError, RuntimeError):
    """An option needs a package of an optional extra that is not installed; the message names the package
    and the install command."""


class Terminated(BaseException):
    """SIGTERM came again while the run was stopping: it ends at once rather than after the round in flight, which
    may never finish (a stalled peer), as a second Ctrl-C does. Like KeyboardInterrupt it is no Exception, so no
    `except Exception` takes it for the failure of the code it lands in (a checkpoint being read taken for a
    damaged one)."""


# A full disk, an exhausted quota, a file system remounted read-only, a file size limit (`ulimit -f`, a file
# system's largest file): the user's to fix, not a bug.
STORAGE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG)


def is_user_error(exc: BaseException) -> bool:
    """The user's to fix (a UserError, a full disk or quota, a read-only file system) or a stop asked twice (Ctrl-C,
    SIGTERM): reported as one line, without a traceback."""
    if isinstance(exc, OSError) and exc.errno in STORAGE_ERRNOS:
        return True
    return isinstance(exc, (UserError, KeyboardInterrupt, Terminated))


WORKER_TRACEBACK = "\nOriginal Traceback (most recent call last):\n"  # torch's re-raise of a DataLoader worker's error


def user_message(exc: BaseException) -> str:
    """str(exc), except for a user error raised in a DataLoader worker process: torch raises it again in the rank as
    its type with "Caught X in DataLoader worker process 0." and the worker's traceback for message; that is
    the worker's own message, the last line of that traceback."""
    text = str(exc)
    head, found, worker = text.partition(WORKER_TRACEBACK)
    prefix = f"\n{type(exc).__module__}.{type(exc).__qualname__}: "
    if not (found and head.startswith("Caught ") and is_user_error(exc)) or prefix not in "\n" + worker:
        return text
    return ("\n" + worker).rsplit(prefix, 1)[1].strip()
