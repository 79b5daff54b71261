"""The preflight without mpirun: each rank's checks (its data file, its device, the run directory) and
rank 0's verdict over every rank's record. One end-to-end test in
test_reliability.py checks that the verdict travels through MPI."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from fedtools import SHAPE, write_split

from fedmpi.config import load_config
from fedmpi.errors import ConfigError, DataError, DeviceError
from fedmpi.messages import PREFLIGHT
from fedmpi.preflight import check_rank, preflight_problems


@pytest.fixture(scope="module")
def split(tmp_path_factory):
    return write_split(tmp_path_factory.mktemp("split"), learners=2, per_learner=6, test=6)


def _cfg(tmp_path, *sets):
    return load_config(overrides=[f"run.dir={tmp_path}", "federation.learners=2", *sets])


def test_each_rank_checks_its_own_file(split, tmp_path):
    cfg = _cfg(tmp_path, f"data.dir={split}")
    learner = check_rank(cfg, 2, split, 0, resume=False, overwrite=False)
    info = learner.info
    assert info["samples"][0] == 6 and (info["x"][0], info["y"][0], info["z"][0]) == SHAPE
    assert learner.device == torch.device("cpu") and learner.lock is None and len(learner.digest) == 64
    assert 45 <= info["mean_age"][0] <= 80
    server = check_rank(cfg, 0, split, 0, resume=False, overwrite=False)
    assert server.info["samples"][0] == 6 and server.resume is None and (cfg.run_dir / ".lock").exists()
    assert server.lock is not None
    server.lock.release()


def test_pooling_that_does_not_fit_the_volumes_is_refused_before_training(split, tmp_path):
    with pytest.raises(ConfigError, match=r"model.pools = 4 does not fit test.h5's volumes \(16, 20, 16\): at most 3"):
        check_rank(_cfg(tmp_path, f"data.dir={split}", "model.pools=4"), 0, split, 0, False, False)
    check_rank(_cfg(tmp_path, f"data.dir={split}", "model.pools=3"), 0, split, 0, False, False).lock.release()


def test_missing_and_truncated_files_name_the_file(split, tmp_path):
    bad = write_split(tmp_path / "bad", learners=2, per_learner=6, test=6)
    (bad / "learner_2.h5").unlink()
    data = (bad / "learner_1.h5").read_bytes()
    (bad / "learner_1.h5").write_bytes(data[: len(data) // 3])
    cfg = _cfg(tmp_path, f"data.dir={bad}")
    with pytest.raises(DataError, match=r"learner_2.h5"):
        check_rank(cfg, 2, bad, 0, False, False)
    with pytest.raises(DataError, match=r"learner_1.h5"):
        check_rank(cfg, 1, bad, 0, False, False)


def test_gpu_requested_but_absent(split, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(DeviceError, match="no CUDA GPU"):
        check_rank(_cfg(tmp_path, "train.device=cuda"), 1, split, 0, False, False)


def _records(rows):
    out = np.zeros(len(rows), PREFLIGHT)
    for i, (n, shape) in enumerate(rows):
        out["samples"][i], out["mean_age"][i] = n, 60.0
        out["x"][i], out["y"][i], out["z"][i] = shape
    return out


def test_verdict_names_shape_mismatch(tmp_path):
    infos = _records([(6, (16, 20, 16)), (6, (16, 20, 16)), (6, (12, 14, 12))])
    (problem,) = preflight_problems(infos, [], tmp_path)
    assert "learner 2" in problem and "(12, 14, 12) differs from test.h5 (16, 20, 16)" in problem
    # when the server's own file failed, its shape is unknown: only its problem is reported
    assert preflight_problems(infos, ["rank 0: test.h5 missing"], tmp_path) == ["rank 0: test.h5 missing"]


def test_verdict_keeps_a_ranks_own_problem_without_piling_on(tmp_path):
    infos = _records([(6, (16, 20, 16)), (0, (0, 0, 0))])
    assert preflight_problems(infos, ["rank 1: file missing"], tmp_path) == ["rank 1: file missing"]
    assert preflight_problems(_records([(6, (16, 20, 16)), (6, (16, 20, 16))]), [], tmp_path) == []


def test_unfinished_run_is_not_silently_replaced(split, tmp_path):
    cfg = _cfg(tmp_path, f"data.dir={split}", "run.name=u")
    ckpt = cfg.run_dir / "checkpoints" / "round-000001.npz"
    ckpt.parent.mkdir(parents=True)
    ckpt.write_bytes(b"x")
    with pytest.raises(ConfigError, match="unfinished run; pass --resume"):
        check_rank(cfg, 0, split, 0, resume=False, overwrite=False)
    check_rank(cfg, 0, split, 0, resume=False, overwrite=True).lock.release()  # the lock was released above
