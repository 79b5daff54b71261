"""`python -m fedmpi train`'s start-up before MPI traffic: the rank count and configuration errors."""

from __future__ import annotations

import os

import pytest

from fedmpi.config import load_config
from fedmpi.errors import EXIT_USAGE, ConfigError
from fedmpi.launch import check_ranks, train


def _cfg(tmp_path, *sets):
    return load_config(overrides=[f"run.dir={tmp_path}", "federation.learners=2", *sets])


def test_rank_count_must_match_learners(tmp_path):
    check_ranks(_cfg(tmp_path), 3)
    with pytest.raises(ConfigError, match=r"has 4 MPI ranks but federation.learners = 2 needs 3 \(1 server \+ 2"):
        check_ranks(_cfg(tmp_path), 4)
    with pytest.raises(ConfigError, match="runs in one process"):
        check_ranks(_cfg(tmp_path, "federation.algorithm=centralized"), 3)
    check_ranks(_cfg(tmp_path, "federation.algorithm=centralized"), 1)


def test_config_errors_are_one_clear_line(capsys):
    assert train(None, ["federation.target=1.5"]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert err.strip() == "fedmpi: error: federation.target must be in [0, 1), got 1.5"


def test_torch_threads_come_from_the_option_the_batch_script_or_the_share_of_cores(monkeypatch):
    from fedmpi.launch import torch_threads

    monkeypatch.setenv("OMP_NUM_THREADS", "4")  # jobs/fedsparsify.slurm: the cores srun gave each task
    assert torch_threads(3, local_size=5) == 3 and torch_threads(0, local_size=5) == 4
    cores = len(os.sched_getaffinity(0))
    for unset in ("", "abc", "0"):
        monkeypatch.setenv("OMP_NUM_THREADS", unset)
        assert torch_threads(0, local_size=1) == cores and torch_threads(0, local_size=10 * cores) == 1
