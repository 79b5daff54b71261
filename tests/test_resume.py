"""What the trainer checks of a run directory before resuming (resume.resume_point, setting_changes,
split_problems)."""

from __future__ import annotations

import numpy as np
import pytest

from fedmpi.checkpoint import Checkpoints
from fedmpi.config import load_config, setting_changes
from fedmpi.errors import ConfigError
from fedmpi.resume import resume_key, resume_point, split_problems
from fedmpi.runlog import RunLog


def test_split_problems_name_the_changed_files():
    before = {"test.h5": "x", "learner_1.h5": "y"}
    assert split_problems(None, before) == [] and split_problems(before, dict(before)) == []
    (problem,) = split_problems(before, {"test.h5": "x", "learner_1.h5": "z"})
    assert "learner_1.h5 changed since" in problem


def test_setting_changes_name_each_option():
    a = resume_key(load_config(overrides=["federation.target=0.9"]))
    b = resume_key(load_config(overrides=["federation.target=0.95", "train.lr=0.01"]))
    assert setting_changes(a, b) == ["federation.target: 0.9 -> 0.95", "train.lr: 0.005 -> 0.01"]


def _run_with_checkpoints(tmp_path, rounds_checkpointed, rows, **overrides):
    cfg = load_config(overrides=[f"run.dir={tmp_path}", "run.name=r", *[f"{k}={v}" for k, v in overrides.items()]])
    ckpts = Checkpoints(cfg.run_dir / "checkpoints", keep=10)
    for t in rounds_checkpointed:
        ckpts.save(t, np.full(4, t, np.float32), np.ones(4, bool), {"config": resume_key(cfg), "split": {}})
    log = RunLog(cfg.run_dir)
    for t in range(1, rows + 1):
        log.append({"round": t})
    return cfg


def test_resume_never_passes_the_last_recorded_round(tmp_path):
    cfg = _run_with_checkpoints(tmp_path, [1, 2, 3], rows=2)  # round 3's row was lost with a crash
    values, _, meta = resume_point(cfg, resume=True, overwrite=False)
    assert meta["round"] == 2 and values[0] == 2


def test_a_checkpoint_without_any_row_is_not_resumed_past_the_missing_rows(tmp_path, capsys):
    """A crash between round 1's checkpoint and its row leaves a checkpoint and no metrics.jsonl: the resume went on
    after round 1, and the run's metrics (and its byte totals) never had round 1."""
    cfg = _run_with_checkpoints(tmp_path, [1], rows=0)
    assert resume_point(cfg, resume=True, overwrite=False) is None
    assert "no usable checkpoint" in capsys.readouterr().out


def test_a_run_with_rows_and_no_checkpoint_is_not_silently_replaced(tmp_path):
    """run.checkpoint_every=0 (or a crash before the first checkpoint): the unfinished run's metrics.jsonl was
    deleted by a plain start without a word."""
    cfg = _run_with_checkpoints(tmp_path, [], rows=3)
    with pytest.raises(ConfigError, match="unfinished run; pass --resume"):
        resume_point(cfg, resume=False, overwrite=False)
    assert resume_point(cfg, resume=False, overwrite=True) is None


def test_damaged_metrics_before_the_last_line_stop_a_resume_instead_of_starting_afresh(tmp_path, capsys):
    """One damaged line among the rows hid every round after it: no checkpoint was at or before the rounds left,
    so the resume started afresh and removed the good checkpoints."""
    from fedmpi.errors import CheckpointError

    cfg = _run_with_checkpoints(tmp_path, [2, 3], rows=3)
    lines = (cfg.run_dir / "metrics.jsonl").read_text().splitlines()
    (cfg.run_dir / "metrics.jsonl").write_text("\n".join([lines[0], "{not json", lines[2]]) + "\n")
    with pytest.raises(CheckpointError, match=r"damaged line\(s\) before the last \(2 of 3\).*--resume cannot tell"):
        resume_point(cfg, resume=True, overwrite=False)
    assert len(list((cfg.run_dir / "checkpoints").glob("round-*.npz"))) == 2
    # a last line cut short by a crash is the usual case: skipped with a note, the resume goes on
    (cfg.run_dir / "metrics.jsonl").write_text("\n".join([*lines[:2], lines[2][:5]]))
    assert resume_point(cfg, resume=True, overwrite=False)[2]["round"] == 2
    assert "line 3 is cut short" in capsys.readouterr().err


def test_a_line_that_is_json_but_not_a_rounds_row_stops_a_resume_with_one_line(tmp_path):
    """A hand-edited row without an integer round parsed as JSON and ended the resume in a KeyError traceback."""
    from fedmpi.errors import CheckpointError

    cfg = _run_with_checkpoints(tmp_path, [2, 3], rows=3)
    lines = (cfg.run_dir / "metrics.jsonl").read_text().splitlines()
    for other in ('{"bytes_up": 5}', '{"round": "3"}', '{"round": true}', "[3]"):
        (cfg.run_dir / "metrics.jsonl").write_text("\n".join([*lines[:2], other]) + "\n")
        with pytest.raises(CheckpointError, match=r"line 3 is not a round's row .*--resume cannot tell"):
            resume_point(cfg, resume=True, overwrite=False)
    assert len(list((cfg.run_dir / "checkpoints").glob("round-*.npz"))) == 2


def test_resume_with_other_settings_names_them(tmp_path):
    _run_with_checkpoints(tmp_path, [1], rows=1)
    cfg = load_config(overrides=[f"run.dir={tmp_path}", "run.name=r", "train.epochs=5"])
    with pytest.raises(ConfigError, match=r"other settings \(train.epochs: 3 -> 5\)"):
        resume_point(cfg, resume=True, overwrite=False)


def test_a_resume_with_another_seed_is_refused(tmp_path):
    """run.seed draws the data order, dropout and random pruning: a resume under another seed finished as a model
    of neither seed, recorded under the new one (run.* was left out of the comparison whole)."""
    _run_with_checkpoints(tmp_path, [1], rows=1)
    cfg = load_config(overrides=[f"run.dir={tmp_path}", "run.name=r", "run.seed=5"])
    with pytest.raises(ConfigError, match=r"other settings \(run.seed: 0 -> 5\)"):
        resume_point(cfg, resume=True, overwrite=False)
    cfg = load_config(overrides=[f"run.dir={tmp_path}", "run.name=r", "run.keep_checkpoints=5", "eval.every=3"])
    assert resume_point(cfg, resume=True, overwrite=False)[2]["round"] == 1


def test_a_checkpoint_from_before_the_seed_was_compared_resumes_under_any_seed(tmp_path):
    from fedmpi.checkpoint import load_arrays, save_arrays

    cfg = _run_with_checkpoints(tmp_path, [1], rows=1, **{"run.seed": 3})
    path = cfg.run_dir / "checkpoints" / "round-000001.npz"
    arrays, meta = load_arrays(path)
    del meta["config"]["run"]  # as written before run.seed was kept
    save_arrays(path, arrays, meta)
    assert resume_point(cfg, resume=True, overwrite=False)[2]["round"] == 1


def test_the_split_may_move_and_the_synthetic_options_count_only_for_the_synthetic_cohort(tmp_path):
    """A job that stages the split to node-local disk resumes from another path (the files' digests say whether
    the data are the same); the synthetic cohort's options are not read then, so they may differ too."""
    _run_with_checkpoints(tmp_path, [1], rows=1, **{"data.dir": "/scratch/split"})
    moved = ["data.dir=/tmp/job42/split/", "data.subjects=99", "data.distribution=skewed-noniid"]
    cfg = load_config(overrides=[f"run.dir={tmp_path}", "run.name=r", *moved])
    assert resume_point(cfg, resume=True, overwrite=False)[2]["round"] == 1
    synthetic = tmp_path / "synthetic"
    _run_with_checkpoints(synthetic, [1], rows=1)
    cfg = load_config(overrides=[f"run.dir={synthetic}", "run.name=r", "data.subjects=99"])
    with pytest.raises(ConfigError, match=r"data.subjects: 240 -> 99"):
        resume_point(cfg, resume=True, overwrite=False)


def test_a_resume_that_changes_the_order_of_the_arithmetic_says_so(tmp_path, capsys):
    import torch

    _run_with_checkpoints(tmp_path, [1], rows=1)
    cfg = load_config(overrides=[f"run.dir={tmp_path}", "run.name=r"])
    path = cfg.run_dir / "checkpoints" / "round-000001.npz"
    from fedmpi.checkpoint import load_arrays, save_arrays

    arrays, meta = load_arrays(path)
    save_arrays(path, arrays, {**meta, "threads": torch.get_num_threads() + 1, "channels_last": False})
    assert resume_point(cfg, resume=True, overwrite=False)[2]["round"] == 1
    out = capsys.readouterr().out
    assert f"note: resuming with threads {torch.get_num_threads() + 1} -> {torch.get_num_threads()}" in out
    assert "channels_last" not in out and "last bits" in out


def test_an_option_the_algorithm_never_reads_may_change_on_resume(tmp_path):
    _run_with_checkpoints(tmp_path, [1], rows=1)  # fedsparsify-global: no vote, no oneshot round
    cfg = load_config(
        overrides=[f"run.dir={tmp_path}", "run.name=r", "federation.merge=kept", "federation.oneshot_round=3"]
    )
    assert resume_point(cfg, resume=True, overwrite=False)[2]["round"] == 1
    cfg = load_config(overrides=[f"run.dir={tmp_path}", "run.name=r", "federation.exponent=2"])  # the schedule reads it
    with pytest.raises(ConfigError, match=r"other settings \(federation.exponent: 3.0 -> 2.0\)"):
        resume_point(cfg, resume=True, overwrite=False)


@pytest.mark.parametrize("stored", [["a", "list"], "text", 7])
def test_a_checkpoint_whose_settings_are_not_an_object_is_refused_in_one_line(tmp_path, stored):
    """The checksum covers the arrays, not the metadata: settings that are not a JSON object must be a
    CheckpointError naming the directory, not a traceback from comparing them."""
    from fedmpi.checkpoint import load_arrays, save_arrays
    from fedmpi.errors import CheckpointError

    cfg = _run_with_checkpoints(tmp_path, [1], rows=1)
    path = cfg.run_dir / "checkpoints" / "round-000001.npz"
    arrays, meta = load_arrays(path)
    save_arrays(path, arrays, {**meta, "config": stored})
    with pytest.raises(CheckpointError, match="settings are not a JSON object"):
        resume_point(cfg, resume=True, overwrite=False)


def test_a_checkpoint_from_before_an_option_existed_still_resumes(tmp_path):
    cfg = _run_with_checkpoints(tmp_path, [1], rows=1)
    path = cfg.run_dir / "checkpoints" / "round-000001.npz"
    from fedmpi.checkpoint import load_arrays, save_arrays

    arrays, meta = load_arrays(path)
    del meta["config"]["federation"]["exponent"]  # as written by a version without the option
    save_arrays(path, arrays, meta)
    assert resume_point(cfg, resume=True, overwrite=False)[2]["round"] == 1
