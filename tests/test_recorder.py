"""The recorder's background thread (lower priority than the training it overlaps, and nothing else), and
how a run directory is started afresh."""

import json
import os
import threading
from types import SimpleNamespace

import numpy as np
import pytest
from fedtools import SHAPE

from fedmpi.checkpoint import Checkpoints
from fedmpi.config import load_config
from fedmpi.errors import ConfigError
from fedmpi.model import build_model
from fedmpi.recorder import RECORDER_NICENESS, background_thread, initial_state, start_state
from fedmpi.resume import finished, resume_point
from fedmpi.runlog import RunLog


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


def test_a_fresh_start_forgets_the_finished_run_it_replaces(tmp_path):
    """Run A finished; run B starts over it and crashes after a checkpoint. B must read as unfinished (a plain
    start refuses to replace it), not as A, and A's model and predictions must not pass for B's."""
    cfg = load_config(overrides=[f"run.dir={tmp_path}", "run.name=r", "federation.rounds=3"])
    run = cfg.run_dir
    run.mkdir(parents=True)
    (run / "summary.json").write_text(json.dumps({"rounds": 3}))
    (run / "model.npz").write_bytes(b"A")
    (run / "test_predictions.csv").write_text("A")
    assert finished(cfg) and resume_point(cfg, resume=False, overwrite=False) is None
    rec = SimpleNamespace(checkpoints=Checkpoints(run / "checkpoints"), log=RunLog(run))
    state = start_state(cfg, None, rec, build_model(cfg, SHAPE))
    assert state.round == 0
    assert sorted(p.name for p in run.iterdir()) == []
    rec.checkpoints.save(1, state.values, state.mask, {})  # B's first round, then B crashes
    assert not finished(cfg)
    with pytest.raises(ConfigError, match="unfinished run; pass --resume"):
        resume_point(cfg, resume=False, overwrite=False)


def test_a_resumed_run_keeps_the_wall_time_of_its_earlier_sessions(tmp_path):
    """summary.json's wall_seconds is the run's, not the last session's: the clock goes on from the resumed
    round's row (rows past it, whose rounds are run again, do not count). Rows from before fedmpi kept the
    clock start it at 0."""
    cfg = load_config(overrides=[f"run.dir={tmp_path}", "run.name=r", "federation.rounds=5"])
    log = RunLog(cfg.run_dir)
    for r, wall in ((1, 10.0), (2, 20.0), (3, 30.0)):
        log.append({"round": r, "wall_seconds": wall})
    model = build_model(cfg, SHAPE)
    rec = SimpleNamespace(checkpoints=Checkpoints(cfg.run_dir / "checkpoints"), log=log, earlier_seconds=0.0)
    state = initial_state(model)
    start_state(cfg, (state.values, state.mask, {"round": 2}), rec, model)
    assert rec.earlier_seconds == 20.0 and [r["round"] for r in log.rows()] == [1, 2]
    log.reset()
    log.append({"round": 1})
    start_state(cfg, (state.values, state.mask, {"round": 1}), rec, model)
    assert rec.earlier_seconds == 0.0


def test_a_plain_start_may_replace_a_finished_run_but_not_one_with_other_rounds(tmp_path):
    cfg = load_config(overrides=[f"run.dir={tmp_path}", "run.name=r", "federation.rounds=3"])
    Checkpoints(cfg.run_dir / "checkpoints").save(3, np.zeros(4, np.float32), np.ones(4, bool), {})
    (cfg.run_dir / "summary.json").write_text(json.dumps({"rounds": 3, "preempted": False}))
    assert finished(cfg) and resume_point(cfg, resume=False, overwrite=False) is None
    longer = load_config(overrides=[f"run.dir={tmp_path}", "run.name=r", "federation.rounds=5"])
    assert not finished(longer)  # 3 of its 5 rounds
    # not "unfinished run; pass --resume": --resume would refuse the other federation.rounds
    with pytest.raises(ConfigError, match="holds a finished run of 3 rounds; a run of 5 is another run"):
        resume_point(longer, resume=False, overwrite=False)
    (cfg.run_dir / "summary.json").write_text(json.dumps({"rounds": 2, "preempted": True}))  # stopped early
    with pytest.raises(ConfigError, match="unfinished run; pass --resume"):
        resume_point(longer, resume=False, overwrite=False)


def test_a_checkpoint_that_does_not_fit_the_model_is_refused(tmp_path):
    cfg = load_config(overrides=[f"run.dir={tmp_path}", "run.name=r"])
    model = build_model(cfg, SHAPE)
    rec = SimpleNamespace(checkpoints=Checkpoints(cfg.run_dir / "checkpoints"), log=RunLog(cfg.run_dir))
    values = initial_state(model).values
    with pytest.raises(ConfigError, match="does not fit the model"):
        start_state(cfg, (values[:-1], np.ones(values.size - 1, bool), {"round": 1}), rec, model)


def test_a_fresh_start_removes_the_old_runs_checkpoints(tmp_path):
    """Otherwise a later --resume of the new run could continue the old one's model."""
    cfg = load_config(overrides=[f"run.dir={tmp_path}", "run.name=r"])
    ckpts = Checkpoints(cfg.run_dir / "checkpoints", keep=5)
    for t in (1, 2):
        ckpts.save(t, np.zeros(4, np.float32), np.ones(4, bool), {})
    rec = SimpleNamespace(checkpoints=ckpts, log=RunLog(cfg.run_dir))
    start_state(cfg, None, rec, build_model(cfg, SHAPE))
    assert ckpts.paths() == [] and ckpts.latest() is None


@pytest.mark.parametrize("text", ["[3]", "{cut", "\udcff"])
def test_a_summary_that_is_not_a_json_object_is_not_a_finished_run(tmp_path, text):
    """Damaged, or valid JSON of another shape (it raised AttributeError on .get): not finished, not a traceback."""
    cfg = load_config(overrides=[f"run.dir={tmp_path}", "run.name=r", "federation.rounds=3"])
    cfg.run_dir.mkdir(parents=True)
    (cfg.run_dir / "summary.json").write_text(text, errors="surrogateescape")
    assert not finished(cfg)


def test_evaluation_is_due_every_eval_every_rounds_and_at_the_last():
    from fedmpi.config import load_config
    from fedmpi.recorder import evaluation_due

    cfg = load_config(overrides=["eval.every=4", "federation.rounds=10"])
    assert [t for t in range(1, 11) if evaluation_due(cfg, t)] == [4, 8, 10]


def test_a_resume_removes_the_checkpoints_past_its_round_so_pruning_keeps_the_new_ones(tmp_path):
    """keep_checkpoints=1: round 4's checkpoint was written, then a crash came before its row; the resume goes on
    from round 2 and stops after round 3. Round 4's checkpoint, left, was the newest by name: pruning kept it and
    removed round 3's, and the next --resume found nothing at or before its rows and started afresh."""
    cfg = load_config(overrides=[f"run.dir={tmp_path}", "run.name=r", "federation.rounds=8", "run.keep_checkpoints=1"])
    model = build_model(cfg, SHAPE)
    state = initial_state(model)
    log = RunLog(cfg.run_dir)
    rec = SimpleNamespace(checkpoints=Checkpoints(cfg.run_dir / "checkpoints", keep=1), log=log, earlier_seconds=0.0)
    for t in (2, 4):
        rec.checkpoints.save(t, state.values, state.mask, {})
    for t in (1, 2, 3):
        log.append({"round": t})
    start_state(cfg, (state.values, state.mask, {"round": 2}), rec, model)
    rec.checkpoints.save(3, state.values, state.mask, {})  # round 3's record, then a stop (Recorder.stop_here)
    log.append({"round": 3})
    rec.checkpoints.prune()
    assert rec.checkpoints.latest(at_most=3)[2]["round"] == 3


def test_predictions_round_trip_through_the_report_whatever_the_subject_ids(tmp_path):
    """Ids from other tools' files may hold a comma or a quote: written unquoted, `sub-1,2` read as age 2."""
    from fedmpi.recorder import Recorder
    from fedmpi.records import read_predictions

    ids = ["sub-01", "sub-1,2", 'sub-"3"']
    rec = SimpleNamespace(
        test=SimpleNamespace(subject_ids=ids, ages=np.array([50.0, 61.25, 70.5])),
        last_predictions=np.array([51.0, 60.0, 71.123456]),
        cfg=SimpleNamespace(run_dir=tmp_path),
    )
    Recorder.write_predictions(rec)
    text = (tmp_path / "test_predictions.csv").read_text()
    assert text.splitlines()[:2] == ["subject_id,age,predicted", "sub-01,50.00,51.0000"]
    assert read_predictions(tmp_path / "test_predictions.csv") == {
        "sub-01": (50.0, 51.0),
        "sub-1,2": (61.25, 60.0),
        'sub-"3"': (70.5, 71.1235),
    }
