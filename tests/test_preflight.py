"""The preflight without mpirun: each rank's checks (its data file, its device, the run directory) and
rank 0's verdict over every rank's record. One end-to-end test in
test_reliability.py checks that the verdict travels through MPI."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from fedtools import SHAPE, unreadable, write_split

from fedmpi import device
from fedmpi.config import load_config
from fedmpi.data import file_digest
from fedmpi.errors import ConfigError, DataError, DeviceError
from fedmpi.messages import PREFLIGHT, row_text, text_row
from fedmpi.preflight import (
    DIGEST_BYTES,
    ERROR_BYTES,
    PIPELINE_BYTES,
    PLACE_BYTES,
    cache_place,
    cache_problems,
    check_rank,
    pipeline_notes,
    preflight,
    preflight_problems,
)


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


def test_a_split_for_more_learners_than_the_federation_has_is_refused(tmp_path):
    """Two learners on a split for three trained on two thirds of it without a word, while the centralized
    baseline pooled all three files."""
    data = write_split(tmp_path / "split3", learners=3, per_learner=6, test=6)
    with pytest.raises(
        ConfigError, match=r"holds 3 learner files, but federation.learners = 2 leaves out learner_3.h5"
    ):
        check_rank(_cfg(tmp_path, f"data.dir={data}"), 0, data, 0, False, False)
    assert not (tmp_path / "demo" / ".lock").exists()  # refused before the run directory is touched
    check_rank(_cfg(tmp_path, f"data.dir={data}", "federation.learners=3"), 0, data, 0, False, False).lock.release()
    # the centralized baseline pools every learner file, whatever federation.learners says
    pooled = _cfg(tmp_path, f"data.dir={data}", "federation.algorithm=centralized")
    check_rank(pooled, 0, data, 0, False, False).lock.release()


def test_a_schedule_that_ends_short_of_the_target_is_noted(split, tmp_path, capsys):
    fraction = ["federation.schedule=fraction", "federation.fraction=0.04", "federation.target=0.95"]
    check_rank(_cfg(tmp_path, f"data.dir={split}", *fraction), 0, split, 0, False, False).lock.release()
    assert "note: the fraction schedule reaches sparsity 0.6" in capsys.readouterr().err
    check_rank(_cfg(tmp_path, f"data.dir={split}"), 0, split, 0, False, False).lock.release()  # cubic: reaches it
    check_rank(
        _cfg(tmp_path, f"data.dir={split}", "federation.algorithm=fedavg"), 0, split, 0, False, False
    ).lock.release()
    assert "note:" not in capsys.readouterr().err


def test_pooling_that_does_not_fit_the_volumes_is_refused_before_training(split, tmp_path):
    with pytest.raises(ConfigError, match=r"model.pools = 4 does not fit test.h5's volumes \(16, 20, 16\): at most 3"):
        check_rank(_cfg(tmp_path, f"data.dir={split}", "model.pools=4"), 0, split, 0, False, False)
    check_rank(_cfg(tmp_path, f"data.dir={split}", "model.pools=3"), 0, split, 0, False, False).lock.release()


def test_a_model_wider_than_a_model_file_holds_is_refused_before_torch_allocates_it(split, tmp_path):
    """model.width=1000 was torch's "can't allocate memory" traceback on every rank, exit 1."""
    with pytest.raises(ConfigError, match=r"model.width = 1000 gives a model of 2,9\d\d,\d{3},\d{3},\d{3} parameters"):
        check_rank(_cfg(tmp_path, f"data.dir={split}", "model.width=1000"), 0, split, 0, False, False)
    check_rank(_cfg(tmp_path, f"data.dir={split}", "model.width=2"), 0, split, 0, False, False).lock.release()


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


def test_mixed_precision_that_computes_wrong_on_this_device_is_refused(split, tmp_path, monkeypatch):
    probed = []

    def wrong(device, dtype):
        probed.append(dtype)
        return float("nan")

    monkeypatch.setattr(device, "autocast_weight_grad_error", wrong)
    check_rank(_cfg(tmp_path, "train.device=cpu"), 1, split, 0, False, False)  # float32 needs no probe
    assert probed == []
    with pytest.raises(DeviceError, match=r"train.amp=bf16: on this cpu .* gradient in bf16 is wrong \(nan relative"):
        check_rank(_cfg(tmp_path, "train.device=cpu", "train.amp=bf16"), 1, split, 0, False, False)
    assert probed == [torch.bfloat16]
    monkeypatch.setattr(device, "autocast_weight_grad_error", lambda device, dtype: 0.003)  # rounding only
    assert (
        check_rank(_cfg(tmp_path, "train.device=cpu", "train.amp=bf16"), 1, split, 0, False, False).device.type == "cpu"
    )


def test_the_bf16_probe_runs_on_the_ranks_that_train_not_on_a_federations_server(split, tmp_path, monkeypatch):
    """The probe's defect is in a weight gradient; a federation's server only runs the model forward (its
    evaluation), which is right there, so a server on such a CPU must not stop learners that train elsewhere.
    The centralized baseline trains on rank 0 and is probed."""
    probed = []

    def wrong(device, dtype):
        probed.append(dtype)
        return float("nan")

    monkeypatch.setattr(device, "autocast_weight_grad_error", wrong)
    server = check_rank(_cfg(tmp_path, f"data.dir={split}", "train.amp=bf16"), 0, split, 0, False, False)
    assert probed == [] and server.lock is not None
    server.lock.release()
    centralized = _cfg(tmp_path, f"data.dir={split}", "train.amp=bf16", "federation.algorithm=centralized")
    with pytest.raises(DeviceError, match=r"^train.amp=bf16: on this cpu"):
        check_rank(centralized, 0, split, 0, False, False)
    assert probed == [torch.bfloat16]


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


@pytest.mark.parametrize(
    "samples,mean_age,shape",
    [
        (0, 60.0, (16, 20, 16)),
        (-3, 60.0, (16, 20, 16)),
        (2.5, 60.0, (16, 20, 16)),
        (1e308, 60.0, (16, 20, 16)),
        (np.nan, 60.0, (16, 20, 16)),
        (6, np.nan, (16, 20, 16)),
        (6, 60.0, (16, np.nan, 16)),
        (6, 60.0, (16, 0, 16)),
        (6, 1e300, (16, 20, 16)),
        (6, -30.0, (16, 20, 16)),
        (6, 150.5, (16, 20, 16)),
    ],
    ids=[
        "no samples",
        "negative",
        "fraction",
        "huge",
        "NaN samples",
        "NaN age",
        "NaN shape",
        "empty axis",
        "huge age",
        "negative age",
        "no human's age",
    ],
)
def test_a_record_no_volume_file_gives_is_named_not_a_traceback(tmp_path, samples, mean_age, shape):
    """A learner's preflight record decides its weight and the model's shape: one that no file can give (a
    broken or hostile learner) is named before anything uses it, with the field (it was a ZeroDivisionError, a
    ValueError, or a weight of 0 taken silently; two counts of 1e308 summed to inf: every share 0, the mean age
    NaN; a mean age of 1e300, the model's first output bias, a RuntimeError overflowing float32 on the server)."""
    infos = _records([(6, (16, 20, 16)), (6, (16, 20, 16)), (6, (16, 20, 16))])
    infos["samples"][2], infos["mean_age"][2] = samples, mean_age
    infos["x"][2], infos["y"][2], infos["z"][2] = shape
    (problem,) = preflight_problems(infos, [], tmp_path)
    assert problem.startswith("rank 2: sent a preflight record that no volume file gives (samples ")
    field = "samples" if samples != 6 else "mean_age" if mean_age != 60 else "y"
    assert problem.endswith(
        f"): {field} is not " + ("-1 to 150 years" if field == "mean_age" else "a whole number from 1 to 2**53")
    )


def test_a_mean_age_any_human_cohort_can_have_is_taken(tmp_path):
    """Infants with ages relative to term (docs/data.md) may average below 0; the bounds themselves are taken."""
    for age in (-1.0, -0.4, 150.0):
        infos = _records([(6, (16, 20, 16)), (6, (16, 20, 16))])
        infos["mean_age"][1] = age
        assert preflight_problems(infos, [], tmp_path) == []


def test_unfinished_run_is_not_silently_replaced(split, tmp_path):
    cfg = _cfg(tmp_path, f"data.dir={split}", "run.name=u")
    ckpt = cfg.run_dir / "checkpoints" / "round-000001.npz"
    ckpt.parent.mkdir(parents=True)
    ckpt.write_bytes(b"x")
    with pytest.raises(ConfigError, match="unfinished run; pass --resume"):
        check_rank(cfg, 0, split, 0, resume=False, overwrite=False)
    check_rank(cfg, 0, split, 0, resume=False, overwrite=True).lock.release()  # the lock was released above
    # finished after 25 rounds, asked for 40: not "unfinished, pass --resume" (which would refuse the rounds)
    (cfg.run_dir / "summary.json").write_text('{"rounds": 25, "preempted": false}')
    more = _cfg(tmp_path, f"data.dir={split}", "run.name=u", "federation.rounds=40")
    with pytest.raises(ConfigError, match="holds a finished run of 25 rounds; a run of 40 is another run"):
        check_rank(more, 0, split, 0, resume=False, overwrite=False)


def test_a_finished_run_is_replaced_by_the_same_run_only(split, tmp_path):
    """Re-running a command replaces its finished run (make demo twice); a run of other settings under the same
    run.name (a centralized baseline over a federation) is refused, naming what differs, unless --overwrite."""
    cfg = _cfg(tmp_path, f"data.dir={split}", "run.name=f", "federation.rounds=3")
    cfg.run_dir.mkdir(parents=True)
    (cfg.run_dir / "metrics.jsonl").write_text('{"round": 3}\n')
    (cfg.run_dir / "summary.json").write_text('{"rounds": 3, "preempted": false}')
    (cfg.run_dir / "config.json").write_text(cfg.to_json())
    check_rank(cfg, 0, split, 0, resume=False, overwrite=False).lock.release()
    other = _cfg(tmp_path, f"data.dir={split}", "run.name=f", "federation.rounds=3", "federation.algorithm=fedavg")
    assert other.federation.algorithm != cfg.federation.algorithm
    with pytest.raises(
        ConfigError, match=r"settings \(federation.algorithm: 'fedsparsify-global' -> 'fedavg'\): choose"
    ):
        check_rank(other, 0, split, 0, resume=False, overwrite=False)
    check_rank(other, 0, split, 0, resume=False, overwrite=True).lock.release()


def test_verdict_names_every_learner_whose_shape_differs(tmp_path):
    """The first learner is checked like the others, and a problem of rank 10 does not hide learner 1's."""
    good, odd = (16, 20, 16), (12, 14, 12)
    (problem,) = preflight_problems(_records([(6, good), (6, odd), (6, good)]), [], tmp_path)
    assert problem.startswith("learner 1 (") and "learner_1.h5" in problem
    infos = _records([(6, good), (6, odd)] + [(6, good)] * 9)
    out = preflight_problems(infos, ["rank 10: file missing"], tmp_path)
    assert out[0] == "rank 10: file missing" and len(out) == 2 and out[1].startswith("learner 1 (")


class JobStandIn:
    """Plays the rest of a 3-rank job for one rank's preflight: the server gets the learners' rows as given,
    a learner gets the verdict as given; what the rank gathers is kept."""

    size = 3

    def __init__(self, rank, learner_rows=(), verdict=0, hosts=("node",) * 3):
        self.rank, self.is_server = rank, rank == 0
        self.learner_rows, self.verdict, self.sent = list(learner_rows), verdict, []
        self.table = [{"rank": r, "host": h} for r, h in enumerate(hosts)]

    def gather(self, buf, out, what=""):
        self.sent.append(buf.copy())
        if out is not None:
            out[0] = buf.reshape(out[0].shape)
            out[1:] = self.learner_rows.pop(0)

    def bcast(self, buf, what=""):
        return buf if self.is_server else np.array([self.verdict], np.int64)


def _learner_rows(
    split, texts=("", ""), digests=None, places=("host", "host"), rooms=(1 << 40, 1 << 40), pipelines=("{}", "{}")
):
    """What learners 1 and 2 gather to the server: their PREFLIGHT records, messages, data digests (by default
    those of the split's own files, as learners reading them send), where their caches are and the room left
    there, and their files' preprocessing pipelines (the test files record none)."""
    records = np.array([[6, 60.0, *SHAPE]] * 2, np.float64)
    digests = digests or _digests(split)
    texts_ = [text_row(t, ERROR_BYTES) for t in texts]
    steps = [text_row(p, PIPELINE_BYTES) for p in pipelines]
    where = [text_row(p, PLACE_BYTES) for p in places]
    return [records, texts_, [text_row(d, DIGEST_BYTES) for d in digests], where, np.array(rooms, np.int64), steps]


def _digests(split):
    return tuple(file_digest(split / f"learner_{k}.h5") for k in (1, 2))


def test_the_server_keeps_every_ranks_record_the_split_digests_and_the_lock(split, tmp_path):
    cfg = _cfg(tmp_path, f"data.dir={split}")
    checked = preflight(cfg, JobStandIn(0, _learner_rows(split)), split, 0, False, False)
    assert checked is not None and checked.lock is not None
    checked.lock.release()
    assert checked.infos["samples"].tolist() == [6, 6, 6] and checked.infos["z"].tolist() == [SHAPE[2]] * 3
    assert (checked.split["learner_1.h5"], checked.split["learner_2.h5"]) == _digests(split)
    assert len(checked.split["test.h5"]) == 64


def test_a_learner_whose_copy_of_the_split_differs_from_the_servers_is_refused(split, tmp_path, capsys):
    """A node that staged another split (or this one before it was remade) to its local disk trained on other
    subjects without a word; where rank 0 holds the same learner file, their digests must agree."""
    cfg = _cfg(tmp_path, f"data.dir={split}")
    stale = file_digest(split / "test.h5")  # any other file's digest
    assert (
        preflight(cfg, JobStandIn(0, _learner_rows(split, digests=(_digests(split)[0], stale))), split, 0, False, False)
        is None
    )
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(
        "fedmpi: error: rank 2: its learner_2.h5 is not the copy in rank 0's"
    )
    assert (
        f"digest {stale[:12]} against {_digests(split)[1][:12]}" in err and "stage the same split on every node" in err
    )
    assert not cfg.run_dir.exists()


def test_a_sites_own_file_that_the_server_does_not_hold_is_not_compared(split, tmp_path):
    """The real-site layout: rank 0's data.dir holds test.h5 alone, so the learners' files have nothing to agree
    with; a damaged copy on rank 0 is not compared either (no rank reads it)."""
    server = tmp_path / "server"
    server.mkdir()
    (server / "test.h5").write_bytes((split / "test.h5").read_bytes())
    (server / "learner_1.h5").write_bytes(b"not hdf5")
    cfg = _cfg(tmp_path, f"data.dir={server}", "run.name=sites")
    checked = preflight(cfg, JobStandIn(0, _learner_rows(split, digests=("a" * 64, "b" * 64))), server, 0, False, False)
    assert checked is not None and checked.split["learner_2.h5"] == "b" * 64
    checked.lock.release()


def test_a_learners_problem_stops_every_rank_in_one_line_and_frees_the_run_directory(split, tmp_path, capsys):
    """One learner's problem: the server prints it once (and nothing for the learner that had none), returns
    None and gives up the run directory it had made and locked."""
    from fedmpi.runlog import RunLock

    cfg = _cfg(tmp_path, f"data.dir={split}")
    rows = _learner_rows(split, texts=("", "rank 2: learner_2.h5 is missing"))
    assert preflight(cfg, JobStandIn(0, rows), split, 0, False, False) is None
    assert capsys.readouterr().err == "fedmpi: error: rank 2: learner_2.h5 is missing\n"
    assert not cfg.run_dir.exists()  # the refused start leaves no empty run directory with a .lock in it
    RunLock(cfg.run_dir).acquire().release()  # free again


def test_a_learner_names_its_problem_by_its_mpi_rank_and_leaves_the_printing_to_the_server(tmp_path, capsys):
    """Learner 2 is the first rank on its host (local rank 0); its message must still say rank 2."""
    cfg = _cfg(tmp_path)
    job = JobStandIn(2, verdict=1)
    assert preflight(cfg, job, tmp_path, 0, False, False) is None  # tmp_path holds no learner_2.h5
    assert row_text(job.sent[1]).startswith("rank 2: ") and "learner_2.h5" in row_text(job.sent[1])
    assert capsys.readouterr().err == ""


def test_a_resume_on_re_split_data_is_refused_naming_the_changed_files(split, tmp_path, capsys):
    """The server's checkpoint records each rank's file digest: a --resume of a federation whose learner file was
    re-split or re-preprocessed since (its digest differs) stops every rank in the preflight, naming the file."""
    from fedmpi.checkpoint import Checkpoints
    from fedmpi.resume import resume_key
    from fedmpi.runlog import RunLog

    server = tmp_path / "server"  # test.h5 alone, as on a server whose learners hold their files on their nodes
    server.mkdir()
    (server / "test.h5").write_bytes((split / "test.h5").read_bytes())
    cfg = _cfg(tmp_path, f"data.dir={server}", "run.name=r")
    first = preflight(cfg, JobStandIn(0, _learner_rows(split)), server, 0, False, False)
    first.lock.release()
    Checkpoints(cfg.run_dir / "checkpoints").save(
        1, np.zeros(4, np.float32), np.ones(4, bool), {"config": resume_key(cfg), "split": first.split}
    )
    RunLog(cfg.run_dir).append({"round": 1})
    same = preflight(cfg, JobStandIn(0, _learner_rows(split)), server, 0, True, False)
    assert same is not None and same.resume[2]["round"] == 1
    same.lock.release()
    capsys.readouterr()
    assert (
        preflight(
            cfg, JobStandIn(0, _learner_rows(split, digests=(_digests(split)[0], "re-split"))), server, 0, True, False
        )
        is None
    )
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "the data differ from what the checkpoint was trained on (learner_2.h5 " in err


def test_a_checkpoint_the_file_system_will_not_give_back_stops_the_resume_in_one_line(
    split, tmp_path, capsys, monkeypatch
):
    """An I/O error reading the newest checkpoint stops the --resume in the preflight, one line naming the file:
    neither the older checkpoint nor a fresh start (which would clear the rows) replaces rounds that may be whole."""

    from fedmpi.checkpoint import Checkpoints
    from fedmpi.resume import resume_key
    from fedmpi.runlog import RunLog

    cfg = _cfg(tmp_path, f"data.dir={split}", "run.name=r")
    ckpts = Checkpoints(cfg.run_dir / "checkpoints", keep=3)
    for t in (1, 2):
        ckpts.save(t, np.full(4, t, np.float32), np.ones(4, bool), {"config": resume_key(cfg), "split": {}})
        RunLog(cfg.run_dir).append({"round": t})
    before = {p.name: p.read_bytes() for p in cfg.run_dir.rglob("*") if p.is_file() and p.name != ".lock"}
    unreadable(monkeypatch, "round-000002.npz")
    assert preflight(cfg, JobStandIn(0, _learner_rows(split)), split, 0, True, False) is None
    captured = capsys.readouterr()
    assert captured.err.count("\n") == 1 and captured.err.startswith("fedmpi: error: rank 0: ")
    assert "round-000002.npz: cannot be read (Input/output error)" in captured.err
    assert "starting fresh" not in captured.out and "skipping" not in captured.err
    assert {p.name: p.read_bytes() for p in cfg.run_dir.rglob("*") if p.is_file() and p.name != ".lock"} == before


GRID = (91, 109, 91)  # the paper's 2 mm grid: 3.61 MB a volume as float32


def _paper_records(*samples):
    out = np.zeros(len(samples), PREFLIGHT)
    out["samples"], out["mean_age"] = samples, 60.0
    out["x"], out["y"], out["z"] = GRID
    return out


def test_a_hosts_caches_that_exceed_the_memory_left_there_are_refused_naming_its_ranks():
    infos = _paper_records(10, 100, 100)  # 210 volumes x 3,610,276 bytes = 758 MB
    rooms = np.array([10**9, 5 * 10**8, -1], np.int64)  # the least that a rank could tell
    host = ["host"] * 3
    (line,) = cache_problems("memory", host, infos, rooms, ["a", "a", "a"])
    assert line.startswith("host a: data.cache=memory would keep 758 MB of decoded volumes (ranks 0, 1, 2: 210 ")
    assert "500 MB is left there: set data.cache=off" in line and line.endswith("or place fewer ranks on a host")
    assert cache_problems("memory", host, infos, np.array([10**9, 8 * 10**8, -1]), ["a", "a", "a"]) == []
    # the same ranks on two hosts: each host holds its own ranks' caches
    apart = cache_problems("memory", host, infos, np.array([10**9, 5 * 10**8, 5 * 10**8]), ["a", "b", "b"])
    assert (
        len(apart) == 1
        and apart[0].startswith("host b: data.cache=memory would keep 722 MB")
        and "ranks 1, 2:" in apart[0]
    )
    # data.cache=device on a rank without a GPU keeps its volumes in memory too, and says which setting does
    (line,) = cache_problems("device", host, infos, rooms, ["a", "a", "a"])
    assert line.startswith("host a: data.cache=device would keep 758 MB of decoded volumes (ranks 0, 1, 2: ")


def test_caches_on_a_gpu_are_weighed_against_its_free_memory_per_gpu_shared_by_its_ranks():
    """data.cache=device keeps a learner's volumes on its GPU (the paper's learner: about 2k volumes, 7 GB in
    float32): ranks sharing a GPU add theirs up, and each GPU is weighed against what its driver says is free, by
    its UUID, since ranks that each see one GPU of their own all call it cuda:0. Before, nothing weighed them: the
    job learnt of it from CUDA's out-of-memory error once the volumes were being decoded."""
    infos = _paper_records(10, 100, 100, 100)  # 310 volumes x 3.61 MB
    a, b = "GPU-aaaa", "GPU-bbbb"
    rooms = np.array([10**10, 5 * 10**8, 6 * 10**8, 10**10], np.int64)
    (line,) = cache_problems("device", [a, a, a, b], infos, rooms, ["n"] * 4)
    assert line == (
        "host n: data.cache=device would keep 758 MB of decoded volumes (ranks 0, 1, 2: 210 volumes, float32) on "
        "GPU-aaaa, and 500 MB of it is free: set data.cache=memory (the volumes then go to the GPU batch by "
        "batch), or place fewer ranks on a GPU"
    )
    eight = np.full(4, 8 * 10**8, np.int64)
    assert cache_problems("device", [a, b, a, b], infos, eight, ["n"] * 4) == []  # 397 MB and 722 MB
    assert "(ranks 0, 1, 2, 3: 310 volumes" in cache_problems("device", [a] * 4, infos, eight, ["n"] * 4)[0]
    assert cache_problems("device", [a] * 4, infos, eight, ["n", "n", "m", "m"]) == []  # one such GPU per host
    # the server on its host's memory, the learners on their GPUs: each place weighed by itself
    mixed = cache_problems("device", ["host", a, b, ""], infos, np.array([10**7, 10**9, 10**9, -1]), ["n"] * 4)
    assert len(mixed) == 1 and mixed[0].startswith("host n: data.cache=device would keep 36.1 MB of decoded volumes")


def test_the_gpu_a_cache_is_on_is_named_with_its_free_memory(monkeypatch):
    """cache_place asks the driver (torch.cuda.mem_get_info) and names the GPU by its UUID where torch gives it;
    with no cache, or no device (a rank with a problem of its own), there is nothing to weigh."""
    import torch

    class Properties:
        uuid = "1234-abcd"

    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (7 * 2**30, 80 * 2**30))
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: Properties())
    cuda = torch.device("cuda", 1)
    assert cache_place("device", cuda) == ("GPU-1234-abcd", 7 * 2**30)  # whichever index a rank calls it by
    assert cache_place("memory", cuda)[0] == "host" and cache_place("device", torch.device("cpu"))[0] == "host"
    assert cache_place("off", cuda) == ("", -1) and cache_place("device", None) == ("", -1)
    assert cache_place("device", torch.device("meta")) == ("", -1)

    def silent(device):
        raise RuntimeError("CUDA error: unknown error")

    monkeypatch.setattr(torch.cuda, "mem_get_info", silent)
    assert cache_place("device", cuda) == ("cuda:1", -1)  # not weighed, as where a host cannot tell


def test_caches_are_not_weighed_when_off_or_where_no_rank_can_tell():
    infos = _paper_records(10**4, 10**4, 10**4)
    assert cache_problems("off", ["", "", ""], infos, np.zeros(3, np.int64), ["a"] * 3) == []
    assert cache_problems("memory", ["host"] * 3, infos, np.full(3, -1, np.int64), ["a"] * 3) == []
    assert cache_problems("device", ["cuda:0"] * 3, infos, np.full(3, -1, np.int64), ["a"] * 3) == []


def test_a_cache_that_cannot_fit_stops_every_rank_before_any_volume_is_decoded(split, tmp_path, capsys):
    cfg = _cfg(tmp_path, f"data.dir={split}")
    job = JobStandIn(0, _learner_rows(split, rooms=(1 << 40, 1000)))
    assert preflight(cfg, job, split, 0, False, False) is None
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("fedmpi: error: host node: data.cache=memory would keep")
    assert not cfg.run_dir.exists()
    # the learners' caches on the GPU they share, the server's (on a CPU) in memory
    cfg = _cfg(tmp_path, f"data.dir={split}", "data.cache=device")
    gpu = "GPU-aaaa"
    job = JobStandIn(0, _learner_rows(split, places=(gpu, gpu), rooms=(1 << 40, 1000)))
    assert preflight(cfg, job, split, 0, False, False) is None
    err = capsys.readouterr().err
    assert err.startswith(
        "fedmpi: error: host node: data.cache=device would keep 0.246 MB of decoded volumes (ranks 1, 2: 12 volumes, "
        f"float32) on {gpu}"
    ), err
    assert row_text(job.sent[3]) == "host"  # what the server said of its own cache


def test_a_learner_file_preprocessed_otherwise_is_noted_naming_what_differs():
    ours = json.dumps({"voxel_mm": 2, "dtype": "float16", "normalisation": "z-score"}, sort_keys=True)
    theirs = json.dumps({"voxel_mm": 2, "dtype": "float32", "normalisation": "z-score", "register": "affine"})
    (note,) = pipeline_notes([ours, ours, theirs, ""])  # learner 3 had a problem of its own: nothing to compare
    assert note.startswith("learner 2's volumes were preprocessed otherwise than test.h5's (test.h5's -> its own: ")
    assert "dtype: 'float16' -> 'float32'; register: None -> 'affine'" in note
    assert pipeline_notes([ours, "{" + "x" * 10]) == [
        "learner 1's volumes were preprocessed otherwise than test.h5's (test.h5's -> its own: its record does not "
        "read as JSON): preprocess every site's scans alike unless a site needs a step of its own"
    ]


def test_the_note_is_printed_and_the_run_starts(split, tmp_path, capsys):
    cfg = _cfg(tmp_path, f"data.dir={split}")
    rows = _learner_rows(split, pipelines=("{}", json.dumps({"register": "affine"})))
    checked = preflight(cfg, JobStandIn(0, rows), split, 0, False, False)
    assert checked is not None
    checked.lock.release()
    assert capsys.readouterr().err == (
        "fedmpi: note: learner 2's volumes were preprocessed otherwise than test.h5's (test.h5's -> its own: "
        "register: None -> 'affine'): preprocess every site's scans alike unless a site needs a step of its own\n"
    )
