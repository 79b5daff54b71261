"""The recorder's background thread: lower priority than the training it overlaps, and nothing else."""

import os
import threading

import pytest

from fedmpi.recorder import RECORDER_NICENESS, background_thread


def _own_niceness() -> int:
    return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())


@pytest.mark.skipif(not hasattr(threading, "get_native_id") or os.uname().sysname != "Linux", reason="per-thread nice")
def test_records_run_at_a_lower_priority_than_the_caller():
    caller = _own_niceness()
    with background_thread() as recorder:
        inside = recorder.submit(_own_niceness).result()
    assert inside == min(19, caller + RECORDER_NICENESS)
    assert _own_niceness() == caller  # the calling (round loop's) thread keeps its priority


def test_an_error_in_a_record_reaches_the_round_loop():
    def fails():
        raise OSError("disk full")

    with background_thread() as recorder, pytest.raises(OSError, match="disk full"):
        recorder.submit(fails).result()
