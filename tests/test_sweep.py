"""jobs/sweep.py: the order and names of a study's runs, each run's state, where a study's files go, and how
a failed step ends the sweep. Nothing here trains: the steps it launches are stand-ins or are not reached."""

import contextlib
import dataclasses
import importlib.util
import json
import os
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from fedmpi.config import load_config

ROOT = Path(__file__).resolve().parents[1]
BASE = "jobs/configs/study-cpu.yaml"
_spec = importlib.util.spec_from_file_location("sweep", ROOT / "jobs" / "sweep.py")
assert _spec is not None and _spec.loader is not None
sweep = sys.modules["sweep"] = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(sweep)


def _study(**extra) -> dict:
    return {
        "base": BASE,
        "out": "runs/study",
        "records": "docs/results/runs",
        "groups": [
            {
                "name": "extra",
                "priority": 2,
                "distributions": ["uniform-iid", "skewed-noniid"],
                "runs": ["centralized", "fedsparsify-global 0.99"],
                "seeds": [0],
            },
            {
                "name": "acc",
                "distributions": ["uniform-iid", "skewed-noniid"],
                "runs": ["fedavg", "fedsparsify-local 0.95"],
                "seeds": [0, 1],
            },
        ],
        **extra,
    }


def test_runs_are_ordered_by_priority_then_seed_and_named_by_their_settings():
    """A partial study already holds one whole seed of its first-priority groups; a centralized run pools every
    learner's data, so one distribution stands for all."""
    runs = sweep.study_runs(_study())
    names = [r.name for r in runs]
    assert names[:4] == [
        "acc-uniform-iid-fedavg-s0",
        "acc-skewed-noniid-fedavg-s0",
        "acc-uniform-iid-fedsparsify-local-0.95-s0",
        "acc-skewed-noniid-fedsparsify-local-0.95-s0",
    ]
    assert names[4].endswith("-s1") and names[7].endswith("-s1")
    assert names[8:] == [
        "extra-uniform-iid-centralized-s0",
        "extra-uniform-iid-fedsparsify-global-0.99-s0",
        "extra-skewed-noniid-fedsparsify-global-0.99-s0",
    ]
    local = runs[2].sets
    assert "federation.target=0.95" in local and "run.name=acc-uniform-iid-fedsparsify-local-0.95-s0" in local


def _finish(run_dir: Path, cfg, **summary) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.json").write_text(cfg.to_json())
    (run_dir / "metrics.jsonl").write_text('{"round": 1}\n')
    (run_dir / "summary.json").write_text(json.dumps({"rounds": cfg.federation.rounds, "preempted": False, **summary}))


def test_a_runs_state_is_new_partial_finished_or_differs(tmp_path):
    cfg = load_config(ROOT / BASE, [f"run.dir={tmp_path}", "run.name=r"])
    run = tmp_path / "r"
    assert sweep.state(cfg) == "new"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"round": 1}\n')
    assert sweep.state(cfg) == "partial"
    _finish(run, cfg, preempted=True)
    assert sweep.state(cfg) == "partial"
    _finish(run, cfg)
    assert sweep.state(cfg) == "finished"
    other = load_config(ROOT / BASE, [f"run.dir={tmp_path}", "run.name=r", "train.lr=0.5"])
    assert sweep.state(other) == "differs"
    # eval and run options may change between a run and the study that lists it
    assert sweep.state(load_config(ROOT / BASE, [f"run.dir={tmp_path}", "run.name=r", "eval.every=3"])) == "finished"
    # a finished run whose settings cannot be read is not taken for the study's
    (run / "config.json").write_text("{cut")
    assert sweep.state(cfg) == "differs"
    (run / "config.json").unlink()
    assert sweep.state(cfg) == "differs"


def test_a_finished_run_of_other_rounds_differs_not_partial(tmp_path):
    """A study whose federation.rounds changed after a run finished: that run is finished with other settings
    (`differs`, and the sweep says to remove it), not `partial`: --resume would refuse it (its schedule depends
    on the rounds), and the sweep used to start mpirun to be told so."""
    cfg = load_config(ROOT / BASE, [f"run.dir={tmp_path}", "run.name=r"])
    _finish(tmp_path / "r", cfg)
    more = load_config(
        ROOT / BASE, [f"run.dir={tmp_path}", "run.name=r", f"federation.rounds={cfg.federation.rounds + 1}"]
    )
    assert sweep.state(more) == "differs"


def test_list_into_a_pipe_its_reader_closed_ends_quietly_like_a_unix_tool(tmp_path):
    """`sweep.py study --list | head -1`: the status SIGPIPE would give, no BrokenPipeError traceback."""
    import subprocess

    study = tmp_path / "study.yaml"
    study.write_text(yaml.safe_dump(_study()))
    read_end, write_end = os.pipe()
    os.close(read_end)  # head has read its line and gone
    try:
        done = subprocess.run(
            [sys.executable, str(ROOT / "jobs" / "sweep.py"), str(study), "--out", str(tmp_path / "out"), "--list"],
            stdout=write_end,
            stderr=subprocess.PIPE,
            text=True,
            timeout=120,
        )
    finally:
        os.close(write_end)
    assert (done.returncode, done.stderr) == (141, "")


def test_list_shows_every_run_even_past_one_that_differs_and_a_sweep_refuses_it(tmp_path, capsys):
    study = tmp_path / "study.yaml"
    study.write_text(yaml.safe_dump(_study()))
    out = tmp_path / "out"
    first = sweep.study_runs(_study())[0]
    _finish(out / first.name, load_config(ROOT / BASE, [*first.sets, f"run.dir={out}", "train.lr=0.5"]))
    assert sweep.main([str(study), "--out", str(out), "--list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 11 and "differs" in lines[0] and first.name in lines[0]
    assert all(" new " in line for line in lines[1:])
    with pytest.raises(SystemExit, match=f"{first.name} finished with other settings than the study's"):
        sweep.main([str(study), "--out", str(out), "--no-attack"])


def test_a_study_files_paths_are_the_repositorys_and_the_command_lines_the_callers(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = SimpleNamespace(out=None, records=None, report=None)
    base, out, records, report = sweep.study_paths(args, _study(report="docs/results"))
    assert (base, out, records, report) == (
        ROOT / BASE,
        ROOT / "runs/study",
        ROOT / "docs/results/runs",
        ROOT / "docs/results",
    )
    assert sweep.study_paths(args, _study())[3] == ROOT / "runs/study/report"
    given = SimpleNamespace(out="o", records="r", report="p")
    assert sweep.study_paths(given, _study())[1:] == (tmp_path / "o", tmp_path / "r", tmp_path / "p")


def test_a_failed_step_ends_the_sweep_with_one_line(tmp_path):
    fail = [sys.executable, "-c", "import sys; print('step output'); sys.exit(3)"]
    with pytest.raises(SystemExit, match=r"failed \(exit 3\); its output is above") as raised:
        sweep.call(fail)
    assert isinstance(raised.value.code, str) and "\n" not in raised.value.code
    log = tmp_path / "logs" / "run.log"
    with pytest.raises(SystemExit, match=rf"^sweep: run failed \(exit 3\); last lines of {log}:\nstep output"):
        sweep.call(fail, log)
    sweep.call([sys.executable, "-c", "pass"], log)  # a step that succeeds returns


def test_a_run_stopped_at_a_checkpoint_is_said_so_not_failed(tmp_path, capsys):
    """SIGUSR1 to the run's mpirun (or a scheduler's warning to its ranks) stops it at a checkpoint, exit 75: the sweep
    ends with the same code and says how to continue, not `failed`."""
    log = tmp_path / "logs" / "acc-x.log"
    with pytest.raises(SystemExit) as raised:
        sweep.call([sys.executable, "-c", "import sys; sys.exit(75)"], log)
    assert raised.value.code == 75
    err = capsys.readouterr().err
    assert err == "sweep: the run acc-x stopped at a checkpoint (exit 75); run the sweep again to continue it\n"


def test_an_attack_is_current_only_when_written_after_the_final_model(tmp_path):
    assert not sweep.attack_is_current(tmp_path)
    (tmp_path / "model.npz").write_bytes(b"m")
    assert not sweep.attack_is_current(tmp_path)
    (tmp_path / "attack.json").write_text("{}")
    os.utime(tmp_path / "model.npz", (1_000, 1_000))
    os.utime(tmp_path / "attack.json", (2_000, 2_000))
    assert sweep.attack_is_current(tmp_path)
    os.utime(tmp_path / "model.npz", (3_000, 3_000))  # the model was trained again since
    assert not sweep.attack_is_current(tmp_path)


def _one_run_study(**group) -> dict:
    return _study(
        groups=[{"name": "g", "distributions": ["uniform-iid"], "runs": ["fedavg", "fedsparsify-global 0.9"], **group}]
    )


def test_a_stop_file_stops_before_the_next_unfinished_run_after_copying_the_finished(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(sweep, "call", lambda cmd, log=None: calls.append(cmd))
    study, out, records = tmp_path / "study.yaml", tmp_path / "out", tmp_path / "records"
    spec = _one_run_study()
    study.write_text(yaml.safe_dump(spec))
    first, second = sweep.study_runs(spec)
    _finish(out / first.name, load_config(ROOT / BASE, [*first.sets, f"run.dir={out}"]))
    (out / "STOP").write_text("")
    assert sweep.main([str(study), "--out", str(out), "--records", str(records), "--no-attack"]) == 0
    assert calls == []  # nothing trained, no report
    assert (records / first.name / "summary.json").exists() and not (records / second.name).exists()


def test_no_attack_skips_every_attack(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(sweep, "call", lambda cmd, log=None: calls.append(cmd))
    study, out, records = tmp_path / "study.yaml", tmp_path / "out", tmp_path / "records"
    spec = _one_run_study(attack=["--max-per-class", "5"])
    study.write_text(yaml.safe_dump(spec))
    for run in sweep.study_runs(spec):
        _finish(out / run.name, load_config(ROOT / BASE, [*run.sets, f"run.dir={out}"]))
    assert sweep.main([str(study), "--out", str(out), "--records", str(records), "--no-attack"]) == 0
    assert [cmd[3] for cmd in calls] == ["report"]
    calls.clear()
    assert sweep.main([str(study), "--out", str(out), "--records", str(records)]) == 0
    assert [cmd[3] for cmd in calls] == ["attack", "attack", "report"]


def test_records_copy_the_small_files_only(tmp_path):
    run = tmp_path / "runs" / "r"
    run.mkdir(parents=True)
    for name in (*sweep.RECORDS, "model.npz", ".lock"):
        (run / name).write_text(name)
    sweep.copy_records(run, tmp_path / "records")
    assert sorted(p.name for p in (tmp_path / "records" / "r").iterdir()) == sorted(
        ["config.json", "metrics.jsonl", "summary.json", "test_predictions.csv", "attack.json"]
    )
    # trained again and not attacked yet: the old model's attack.json goes from the records too
    (run / "attack.json").unlink()
    sweep.copy_records(run, tmp_path / "records")
    assert not (tmp_path / "records" / "r" / "attack.json").exists()
    assert (tmp_path / "records" / "r" / "summary.json").read_text() == "summary.json"


def test_a_federated_run_starts_learners_plus_one_ranks_and_resumes(tmp_path):
    args = SimpleNamespace(mpirun="/x/mpirun")
    central, fed = (r for r in sweep.study_runs(_study()) if r.name.startswith("extra-uniform-iid"))
    cmd = sweep.train_cmd(args, ROOT / BASE, central, tmp_path)
    assert cmd[:4] == [sys.executable, "-m", "fedmpi", "train"] and "--resume" in cmd
    learners = load_config(ROOT / BASE).federation.learners
    cmd = sweep.train_cmd(args, ROOT / BASE, fed, tmp_path)
    assert cmd[:6] == ["/x/mpirun", "-n", str(learners + 1), sys.executable, "-m", "fedmpi"] and "--resume" in cmd
    assert f"run.dir={tmp_path}" in cmd and f"run.name={fed.name}" in cmd


@pytest.mark.parametrize("flag", ["--collect", "--slurm"])
def test_a_paper_only_option_with_a_study_is_refused(tmp_path, capsys, monkeypatch, flag):
    def never(cmd, log=None):
        raise AssertionError(f"the sweep ran {cmd}")

    monkeypatch.setattr(sweep, "call", never)  # a sweep that ignored the flag would start training
    study = tmp_path / "study.yaml"
    study.write_text(yaml.safe_dump(_study()))
    with pytest.raises(SystemExit) as raised:
        sweep.main([str(study), "--out", str(tmp_path / "out"), "--records", str(tmp_path / "rec"), flag])
    assert raised.value.code == 2
    assert f"{flag} applies only with --paper" in capsys.readouterr().err


def test_an_attack_written_in_the_same_instant_as_the_model_is_current(tmp_path):
    import os

    (tmp_path / "model.npz").write_bytes(b"m")
    (tmp_path / "attack.json").write_text("{}")
    for name in ("model.npz", "attack.json"):
        os.utime(tmp_path / name, (2_000, 2_000))
    assert sweep.attack_is_current(tmp_path)


def test_groups_of_equal_priority_interleave_by_seed():
    spec = _study(
        groups=[
            {"name": "a", "distributions": ["uniform-iid"], "runs": ["fedavg"], "seeds": [0, 1]},
            {"name": "b", "distributions": ["uniform-iid"], "runs": ["fedavg"], "seeds": [0, 1]},
        ]
    )
    assert [r.name for r in sweep.study_runs(spec)] == [
        "a-uniform-iid-fedavg-s0",
        "b-uniform-iid-fedavg-s0",
        "a-uniform-iid-fedavg-s1",
        "b-uniform-iid-fedavg-s1",
    ]


def test_paper_collect_attacks_finished_runs_and_passes_over_runs_stopped_early(tmp_path, monkeypatch, capsys):
    """A run stopped early is named, not attacked; a summary that cannot be read is left for the attack to name
    (the sweep itself must not end in a traceback)."""
    calls = []
    monkeypatch.setattr(sweep, "call", lambda cmd, log=None: calls.append(cmd))
    out = tmp_path / "paper"
    for name, summary in [("done", '{"preempted": false}'), ("stopped", '{"preempted": true}'), ("cut", "{cut")]:
        (out / name).mkdir(parents=True)
        (out / name / "summary.json").write_text(summary)
    assert sweep.main(["--paper", "original", "--collect", "--out", str(out)]) == 0
    attacked = [cmd[cmd.index("--run") + 1] for cmd in calls if "attack" in cmd]
    assert attacked == [str(out / "cut"), str(out / "done")]
    assert calls[-1][3] == "report"
    assert f"{out / 'stopped'} stopped before its last round" in capsys.readouterr().out


def test_paper_slurm_submits_from_the_checkout_with_absolute_paths(tmp_path, monkeypatch):
    """sweep.slurm finds jobs/fedsparsify.slurm, the venv and data/ from its submit directory, so the array is
    submitted from the checkout whatever the caller's directory, and the listing names files by absolute path."""
    calls = []
    monkeypatch.setattr(sweep, "call", lambda cmd, log=None, cwd=None: calls.append((cmd, cwd)))
    monkeypatch.chdir(tmp_path)
    assert sweep.main(["--paper", "original", "--slurm", "--out", "paper"]) == 0
    ((cmd, cwd),) = calls
    assert cmd[0] == "sbatch" and cwd == ROOT
    listing = Path(cmd[-1])
    assert listing == tmp_path / "paper" / "configs.txt"
    paths = [Path(p) for p in listing.read_text().split()]
    assert paths and all(p.is_absolute() and p.exists() for p in paths)
    assert yaml.safe_load(paths[0].read_text())["run"]["dir"] == str(tmp_path / "paper")
    calls.clear()
    assert sweep.main(["--paper", "original", "--slurm", "--out", "paper", "--array-limit", "4"]) == 0
    assert calls[0][0][1] == f"--array=1-{len(paths)}%4"  # at most 4 federations (each 8 GPUs) at once


@pytest.mark.parametrize("flags", [["--array-limit", "0", "--slurm"], ["--array-limit", "2"]])
def test_an_array_limit_needs_slurm_and_a_positive_count(capsys, flags):
    with pytest.raises(SystemExit) as exited:
        sweep.main(["--paper", "original", *flags])
    assert exited.value.code == 2 and "--array-limit takes K >= 1, with --paper --slurm" in capsys.readouterr().err


def test_a_missing_launcher_is_one_line():
    with pytest.raises(SystemExit, match=r"^sweep: no /nonexistent/mpirun here \(give --mpirun"):
        sweep.call(["/nonexistent/mpirun", "-n", "3", "python"])


def test_an_attack_of_the_same_model_stays_current_when_a_resume_rewrites_the_model_file(tmp_path):
    """`train --resume` of a finished run (the SLURM script's every start, `--paper` on every rerun) writes model.npz
    again with the same model: its attack is not redone. A model trained again (another digest) is attacked again."""
    import os

    (tmp_path / "model.npz").write_bytes(b"m")
    (tmp_path / "attack.json").write_text('{"model_sha256": "aa"}')
    (tmp_path / "summary.json").write_text('{"model_sha256": "aa"}')
    os.utime(tmp_path / "attack.json", (1_000, 1_000))
    os.utime(tmp_path / "model.npz", (2_000, 2_000))  # rewritten by the resume, after the attack
    assert sweep.attack_is_current(tmp_path)
    (tmp_path / "summary.json").write_text('{"model_sha256": "bb"}')
    os.utime(tmp_path / "model.npz", (500, 500))
    assert not sweep.attack_is_current(tmp_path)
    (tmp_path / "summary.json").write_text("{cut")  # unreadable: the files' times decide
    assert sweep.attack_is_current(tmp_path)


def test_paper_slurm_submits_the_committed_configs_with_the_users_edits(tmp_path, monkeypatch):
    """README has users point the paper configs' data.dir at their split: the array's tasks train those files, as
    a local --paper run does, not make_configs.py's defaults."""
    import shutil

    jobs = tmp_path / "jobs"
    shutil.copytree(ROOT / "jobs" / "configs" / "paper" / "original", jobs / "configs" / "paper" / "original")
    edited = jobs / "configs" / "paper" / "original" / "fedavg-uniform-iid.yaml"
    cfg = yaml.safe_load(edited.read_text())
    cfg["data"]["dir"] = "/scratch/me/split-uniform-iid"
    edited.write_text(yaml.safe_dump(cfg))
    monkeypatch.setattr(sweep, "HERE", jobs)
    monkeypatch.setattr(sweep, "call", lambda cmd, log=None, cwd=None: None)
    assert sweep.main(["--paper", "original", "--slurm", "--out", str(tmp_path / "paper")]) == 0
    written = yaml.safe_load((tmp_path / "paper" / "configs" / "fedavg-uniform-iid.yaml").read_text())
    assert written["data"]["dir"] == "/scratch/me/split-uniform-iid"
    assert written["run"]["dir"] == str(tmp_path / "paper")


def test_paper_slurm_submits_one_array_per_rank_count_with_its_ntasks(tmp_path, monkeypatch):
    """sweep.slurm asks for 9 tasks: a paper config edited to a site's 4 learners got 9 ranks, and its run refused
    the rank count. Each rank count is its own array, with --ntasks set (one task for a baseline run alone)."""
    import shutil

    jobs = tmp_path / "jobs"
    shutil.copytree(ROOT / "jobs" / "configs" / "paper" / "original", jobs / "configs" / "paper" / "original")
    edited = jobs / "configs" / "paper" / "original" / "fedavg-uniform-iid.yaml"
    edited.write_text(edited.read_text().replace("learners: 8", "learners: 4"))
    calls = []
    monkeypatch.setattr(sweep, "HERE", jobs)
    monkeypatch.setattr(sweep, "call", lambda cmd, log=None, cwd=None: calls.append(cmd))
    assert sweep.main(["--paper", "original", "--slurm", "--out", str(tmp_path / "paper")]) == 0
    assert [cmd[2] for cmd in calls] == ["--ntasks=5", "--ntasks=9"]
    five, nine = (Path(cmd[-1]).read_text().split() for cmd in calls)
    assert five == [str(tmp_path / "paper" / "configs" / "fedavg-uniform-iid.yaml")]
    assert len(nine) == len(list(edited.parent.glob("*.yaml"))) - 1 and five[0] not in nine
    assert calls[1][1] == f"--array=1-{len(nine)}" and Path(calls[1][-1]).name == "configs-9-tasks.txt"


def test_paper_slurm_copies_a_paper_configs_words_as_written(tmp_path, monkeypatch):
    """The copy went through yaml.safe_load and safe_dump: a user's data.dir: 010 became 8, run.name: 1:30 became
    90 and yes became true (YAML 1.1's readings, written out); the array's task then trained other settings than
    the file that was checked."""
    import shutil

    jobs = tmp_path / "jobs"
    shutil.copytree(ROOT / "jobs" / "configs" / "paper" / "original", jobs / "configs" / "paper" / "original")
    edited = jobs / "configs" / "paper" / "original" / "fedavg-uniform-iid.yaml"
    text = edited.read_text().replace("dir: data/ukbb/split-uniform-iid", "dir: 010\n  cache_dir: yes")
    edited.write_text(text.replace("name: fedavg-uniform-iid", "name: 1:30"))
    monkeypatch.setattr(sweep, "HERE", jobs)
    monkeypatch.setattr(sweep, "call", lambda cmd, log=None, cwd=None: None)
    out = tmp_path / "paper"
    assert sweep.main(["--paper", "original", "--slurm", "--out", str(out)]) == 0
    written = load_config(out / "configs" / "fedavg-uniform-iid.yaml")
    assert (written.data.dir, written.data.cache_dir, written.run.name) == ("010", "yes", "1:30")
    assert written.run.dir == str(out)
    assert written.to_dict() == load_config(edited, [f"run.dir={out}"]).to_dict()
    for source in sorted((jobs / "configs" / "paper" / "original").glob("*.yaml")):  # the others read as before
        copy = out / "configs" / source.name
        assert load_config(copy).to_dict() == load_config(source, [f"run.dir={out}"]).to_dict(), source.name


def test_a_study_files_words_are_read_as_written_and_its_numbers_refused_where_yaml_misreads_them(
    tmp_path, monkeypatch, capsys
):
    """A group named 010 made runs named 8-... and --max-per-class 240 unquoted reached the attack as an int (a
    TypeError's traceback at attack time); seeds: [010] trained seed 8."""
    study = tmp_path / "study.yaml"
    group = "{name: 010, distributions: [uniform-iid], runs: [fedavg], attack: [--max-per-class, 240]"
    study.write_text(f"base: {BASE}\nout: o\nrecords: r\ngroups:\n  - {group}}}\n")
    (run,) = sweep.study_runs(sweep.read_study(study))
    assert run.name == "010-uniform-iid-fedavg-s0" and run.attack == ["--max-per-class", "240"]
    monkeypatch.setattr(sweep, "call", lambda cmd, log=None: None)
    for field, said in [
        ("seeds: [1, 010]", "seeds: YAML 1.1 reads the unquoted 010 as 8, an octal number"),
        ("priority: 1:30", "priority: YAML 1.1 reads the unquoted 1:30 as 90, a base-60 number"),
    ]:
        study.write_text(f"base: {BASE}\nout: o\nrecords: r\ngroups:\n  - {group}, {field}}}\n")
        assert sweep.main([str(study), "--list", "--out", str(tmp_path / "out")]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"sweep: error: study file {study}, group 010: {said}") and err.count("\n") == 1, err


@pytest.mark.parametrize("path", sorted((ROOT / "jobs" / "studies").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_study_reads_as_pyyaml_reads_it(path):
    """Reading words as written changes no run of a shipped study: the same names, settings, attacks and order."""
    as_read = [dataclasses.astuple(run) for run in sweep.study_runs(sweep.read_study(path))]
    assert as_read == [dataclasses.astuple(run) for run in sweep.study_runs(yaml.safe_load(path.read_text()))]


@pytest.mark.parametrize("edit", ["run:\n", "# emptied: the defaults\n"])
def test_paper_slurm_writes_run_dir_into_a_paper_config_without_a_run_section(tmp_path, monkeypatch, edit):
    """A config that load_config accepts (a run: section with its options commented out, an empty file) was a
    TypeError's or AttributeError's traceback once --slurm wrote its copy with run.dir."""
    import shutil

    jobs = tmp_path / "jobs"
    shutil.copytree(ROOT / "jobs" / "configs" / "paper" / "original", jobs / "configs" / "paper" / "original")
    edited = jobs / "configs" / "paper" / "original" / "fedavg-uniform-iid.yaml"
    text = edited.read_text()
    edited.write_text(text[: text.index("run:")] + edit if edit.startswith("run") else edit)
    monkeypatch.setattr(sweep, "HERE", jobs)
    monkeypatch.setattr(sweep, "call", lambda cmd, log=None, cwd=None: None)
    assert sweep.main(["--paper", "original", "--slurm", "--out", str(tmp_path / "paper")]) == 0
    written = tmp_path / "paper" / "configs" / "fedavg-uniform-iid.yaml"
    assert load_config(written).run.dir == str(tmp_path / "paper")


def test_paper_slurm_refuses_a_missing_or_invalid_paper_config_before_submitting(tmp_path, monkeypatch, capsys):
    import shutil

    jobs = tmp_path / "jobs"
    family = jobs / "configs" / "paper" / "original"
    shutil.copytree(ROOT / "jobs" / "configs" / "paper" / "original", family)
    submitted = []
    monkeypatch.setattr(sweep, "HERE", jobs)
    monkeypatch.setattr(sweep, "call", lambda cmd, log=None, cwd=None: submitted.append(cmd))
    edited = family / "fedavg-uniform-iid.yaml"
    cfg = yaml.safe_load(edited.read_text())
    cfg["train"]["lr"] = -1
    edited.write_text(yaml.safe_dump(cfg))
    assert sweep.main(["--paper", "original", "--slurm", "--out", str(tmp_path / "paper")]) == 2
    assert "fedavg-uniform-iid.yaml: " in capsys.readouterr().err
    edited.unlink()
    assert sweep.main(["--paper", "original", "--slurm", "--out", str(tmp_path / "paper")]) == 2
    assert "fedavg-uniform-iid.yaml is missing: python jobs/make_configs.py" in capsys.readouterr().err
    assert submitted == []


@pytest.mark.parametrize(
    "field, said",
    [
        ("seeds: 0", "group g: seeds must be a list, got 0"),  # a TypeError's traceback
        ("set: train.lr=0.1", "group g: set must be a list, got 'train.lr=0.1'"),  # "got 't'"
        ("attack: --max-per-class", "group g: attack must be a list, got '--max-per-class'"),  # spelt out, unchecked
        ("runs: fedavg, distributions: [uniform-iid]", "group g: runs must be a list, got 'fedavg'"),  # "'f' is not"
        ("distributions: uniform-iid, runs: [fedavg]", "group g: distributions must be a list, got 'uniform-iid'"),
        ("priority: high", "group g: priority must be a number, got 'high'"),
    ],
)
def test_a_study_group_field_of_the_wrong_kind_is_named_not_spelt_out(tmp_path, monkeypatch, capsys, field, said):
    """A string where a list belongs was iterated letter by letter (set: train.lr=0.1 became --set t, --set r, ...),
    and seeds: 0 was a traceback."""
    calls = []
    monkeypatch.setattr(sweep, "call", lambda cmd, log=None: calls.append(cmd))
    study = tmp_path / "study.yaml"
    lists = "" if "runs:" in field or "distributions:" in field else "distributions: [uniform-iid], runs: [fedavg], "
    study.write_text(f"base: b\nout: o\nrecords: r\ngroups:\n  - {{name: g, {lists}{field}}}")
    assert sweep.main([str(study), "--out", str(tmp_path / "out"), "--records", str(tmp_path / "rec")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("sweep: error: ") and said in err and err.count("\n") == 1, err
    assert calls == []


@pytest.mark.parametrize(
    "seeds, said",
    [
        ("[0, 1, 0]", "group g: seed 0 is listed twice"),
        ("[1, '1', 1.0]", "group g: seed 1 is listed twice"),  # all three run.seed=1
        ("[0, x]", "group g: seeds: expected an integer, got 'x'"),
    ],
)
def test_a_seed_listed_twice_is_refused_before_any_run(tmp_path, capsys, seeds, said):
    """seeds: [0, 0] listed each of the group's runs twice (`--list` showed them twice; the sweep trained the first
    and found the second finished)."""
    study = tmp_path / "study.yaml"
    study.write_text(
        f"base: {BASE}\nout: o\nrecords: r\ngroups:\n"
        f"  - {{name: g, distributions: [uniform-iid], runs: [fedavg], seeds: {seeds}}}\n"
    )
    assert sweep.main([str(study), "--list", "--out", str(tmp_path / "out")]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err == f"sweep: error: study file {study}, {said}\n"


def test_a_seed_written_as_a_float_names_its_run_by_the_integer_it_trains(tmp_path, capsys):
    """seeds: [1.0, 2e0] train run.seed=1 and 2; their runs were named -s1.0 and -s2.0, so a group listing [1] beside
    one listing [1.0] made two directories of one run."""
    study = tmp_path / "study.yaml"
    study.write_text(
        f"base: {BASE}\nout: o\nrecords: r\ngroups:\n"
        "  - {name: g, distributions: [uniform-iid], runs: [fedavg], seeds: [1.0, 2e0]}\n"
    )
    runs = sweep.study_runs(sweep.read_study(study))
    assert [r.name for r in runs] == ["g-uniform-iid-fedavg-s1", "g-uniform-iid-fedavg-s2"]
    assert [[s for s in r.sets if s.startswith("run.seed=")] for r in runs] == [["run.seed=1"], ["run.seed=2"]]
    study.write_text(
        f"base: {BASE}\nout: o\nrecords: r\ngroups:\n"
        "  - {name: g, distributions: [uniform-iid], runs: [fedavg], seeds: [1]}\n"
        "  - {name: g, distributions: [uniform-iid], runs: [fedavg], seeds: [1.0]}\n"
    )
    assert sweep.main([str(study), "--list", "--out", str(tmp_path / "out")]) == 2
    assert "run g-uniform-iid-fedavg-s1 would come from groups[0]" in capsys.readouterr().err


def test_a_key_given_twice_in_a_study_file_is_refused_not_the_last_taken(tmp_path, monkeypatch, capsys):
    """A second `set:` in a group (or a second group list) silently replaced the first, as PyYAML keeps the last."""
    monkeypatch.setattr(sweep, "call", lambda cmd, log=None: None)
    study = tmp_path / "study.yaml"
    study.write_text(
        f"base: {BASE}\nout: o\nrecords: r\ngroups:\n  - name: g\n    distributions: [uniform-iid]\n"
        "    runs: [fedavg]\n    set: [train.lr=0.1]\n    set: [train.epochs=1]\n"
    )
    assert sweep.main([str(study), "--list", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("sweep: error: ") and err.count("\n") == 1, err
    assert "(line 9, column 5: found duplicate key 'set' (while constructing a mapping from line 5))" in err, err


@pytest.mark.parametrize(
    "text, said",
    [
        (None, "cannot be read (No such file or directory)"),
        ("groups: [", "is not a YAML text file"),
        ("- a list", "must hold base, out, records, groups"),
        ("base: b\nout: o\nrecords: r\ngroups: []", "groups is empty, so there is nothing to run"),
        (
            "base: b\nout: o\nrecords: r\ngroups:\n  - {name: '', distributions: [uniform-iid], runs: [fedavg]}",
            "groups[0] has an empty name",
        ),
        (
            "base: b\nout: o\nrecords: r\ngroups:\n  - {name: g, distributions: [uniform-iid], runs: [fedavgx]}",
            "group g: 'fedavgx' is not ALGORITHM [TARGET]",
        ),
        (
            "base: b\nout: o\nrecords: r\ngroups:\n  - {name: g, distributions: [uniform-iid], runs: [grasp high]}",
            "'grasp high': the target is not a number",
        ),
        (
            "base: b\nout: o\nrecords: r\ngroups:\n  - {name: g, distributions: [uniform-iid], runs: [fedavg 0.9]}",
            "group g: 'fedavg 0.9': fedavg does not prune",
        ),
        (
            f"base: {BASE}\nout: o\nrecords: r\ngroups:\n  - {{name: g, distributions: [uniform-iid], runs: [fedavg,"
            " fedsparsify-global 0.9], set: [train.lr=-1]}",
            "run g-uniform-iid-fedavg-s0: train.lr must be > 0",
        ),
        (  # the attacks come after every run is trained: a misspelt option failed there
            f"base: {BASE}\nout: o\nrecords: r\ngroups:\n  - {{name: g, distributions: [uniform-iid], runs: [fedavg],"
            " attack: [--max-per-klass, 240]}",
            "group g: attack: unrecognized arguments: --max-per-klass 240",
        ),
        (
            f"base: {BASE}\nout: o\nrecords: r\ngroups:\n  - {{name: g, distributions: [uniform-iid], runs: [fedavg],"
            " attack: [--max-per-class, lots]}",
            "group g: attack: argument --max-per-class: invalid int value: 'lots'",
        ),
    ],
)
def test_a_study_file_the_sweep_cannot_run_is_one_line_and_exit_2_before_any_run(
    tmp_path, monkeypatch, capsys, text, said
):
    """It was a traceback (FileNotFoundError, KeyError, ConfigError), and a run's bad setting surfaced only when the
    runs before it had been trained."""
    calls = []
    monkeypatch.setattr(sweep, "call", lambda cmd, log=None: calls.append(cmd))
    study = tmp_path / "study.yaml"
    if text is not None:
        study.write_text(text)
    assert sweep.main([str(study), "--out", str(tmp_path / "out"), "--records", str(tmp_path / "rec")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("sweep: error: ") and said in err and err.count("\n") == 1, err
    assert calls == []


# A step that stops as a federation does when asked: on each SIGINT/SIGTERM it notes the signal, finishes its round
# (a second), checkpoints and exits 75. It writes its pid first, so the test can end it if the sweep left it running.
_STOPPABLE_STEP = """
import os, signal, sys, time
out = sys.argv[1]
def note(line):
    with open(out, "a") as fh:
        fh.write(line + "\\n")
asked = []
def ask(signum, _frame):
    asked.append(signum)
    note(f"signal {signal.Signals(signum).name}")
signal.signal(signal.SIGINT, ask)
signal.signal(signal.SIGTERM, ask)
note(f"pid {os.getpid()}")
while not asked:
    time.sleep(0.02)
time.sleep(1.0)
note("checkpointed")
sys.exit(75)
"""


@contextlib.contextmanager
def _sweep_running_a_step(tmp_path, prelude: str = ""):
    """A sweep (its own session) calling _STOPPABLE_STEP, once the step has started: (the sweep's Popen, the step's
    marks file, the step's pid). Whatever still runs afterwards is killed."""
    import signal
    import subprocess
    import time

    marks = tmp_path / "step.out"
    (tmp_path / "step.py").write_text(_STOPPABLE_STEP)
    driver = (
        f"import sys; {prelude}\n"
        f"sys.path.insert(0, {str(ROOT)!r}); sys.path.insert(0, {str(ROOT / 'jobs')!r})\n"
        "import sweep\n"
        f"sweep.call([sys.executable, {str(tmp_path / 'step.py')!r}, {str(marks)!r}], "
        f"__import__('pathlib').Path({str(tmp_path / 'logs' / 'run.log')!r}))\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", driver], start_new_session=True, stderr=subprocess.PIPE, text=True)
    step_pid = None
    try:
        deadline = time.monotonic() + 60
        while not (marks.exists() and marks.read_text().startswith("pid ")):
            assert time.monotonic() < deadline and proc.poll() is None, "the step did not start"
            time.sleep(0.05)
        step_pid = int(marks.read_text().split()[1])
        yield proc, marks, step_pid
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if step_pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(step_pid, signal.SIGKILL)


@pytest.mark.parametrize("how", ["SIGTERM to the sweep", "Ctrl-C to the sweep's process group", "SIGHUP to the sweep"])
def test_a_stopped_sweep_lets_the_run_in_flight_reach_its_checkpoint_and_leaves_nothing_running(tmp_path, how):
    """`kill SWEEP` used to end the sweep at once and leave its federation running on, unseen (a sweep started
    again then found the run directory in use); Ctrl-C reached both, and subprocess.run killed mpirun 0.25 s
    later, before the ranks' checkpoint after the current round. The step must hear the stop exactly once (a
    second SIGINT makes mpirun abort the ranks at once) and the sweep must wait for it."""
    import signal

    # SIGINT as an interactive shell leaves it (a background job of a script would inherit it ignored), and SIGHUP
    # as a terminal's shell does: a test suite run under nohup would hand the sweep an ignored hangup, which it keeps
    prelude = (
        "import signal; signal.signal(signal.SIGINT, signal.default_int_handler); "
        "signal.signal(signal.SIGHUP, signal.SIG_DFL)"
    )
    with _sweep_running_a_step(tmp_path, prelude) as (proc, marks, step_pid):
        if how.startswith("SIGTERM"):
            proc.send_signal(signal.SIGTERM)
            sig = signal.SIGTERM
        elif how.startswith("SIGHUP"):  # the terminal closed: the step, in its own session, hears it as a SIGTERM
            proc.send_signal(signal.SIGHUP)
            sig = signal.SIGHUP
        else:
            os.killpg(proc.pid, signal.SIGINT)
            sig = signal.SIGINT
        _, err = proc.communicate(timeout=60)
        lines = marks.read_text().splitlines()
        assert lines[1:] == [f"signal {'SIGTERM' if sig == signal.SIGHUP else sig.name}", "checkpointed"], lines
        assert proc.returncode == 128 + sig, (proc.returncode, err)
        assert "Traceback" not in err and "run the sweep again" in err, err
        with pytest.raises(ProcessLookupError):
            os.kill(step_pid, 0)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the parent-death signal is Linux's prctl")
def test_a_sweep_killed_outright_stops_its_step_at_a_checkpoint(tmp_path):
    """A SIGKILL (or the OOM killer) gives the sweep no chance to pass the stop on: its step, in a session of its
    own, trained on unseen. The kernel now sends the step SIGTERM when the sweep dies, as a `kill` of it would."""
    import time

    with _sweep_running_a_step(tmp_path) as (proc, marks, step_pid):
        proc.kill()
        proc.communicate(timeout=60)
        deadline = time.monotonic() + 60
        while "checkpointed" not in marks.read_text():
            assert time.monotonic() < deadline, marks.read_text()
            time.sleep(0.05)
        assert marks.read_text().splitlines()[1:] == ["signal SIGTERM", "checkpointed"]
        while True:  # the step exits after its checkpoint (reaped by init: poll its pid)
            try:
                os.kill(step_pid, 0)
            except ProcessLookupError:
                break
            assert time.monotonic() < deadline, "the step did not exit"
            time.sleep(0.05)


def test_stop_with_parent_stops_a_step_whose_sweep_died_before_it_could_ask(monkeypatch):
    """The sweep may die between the fork and the prctl call: the step then has another parent already."""
    import signal

    sent = []
    monkeypatch.setattr(sweep.os, "kill", lambda pid, sig: sent.append((pid, sig)))
    sweep.stop_with_parent(os.getppid())
    assert sent == []
    sweep.stop_with_parent(-1)  # no process has that pid: this one's parent is another
    assert sent == [(os.getpid(), signal.SIGTERM)]


def test_ctrl_c_between_runs_is_one_line(tmp_path, monkeypatch, capsys):
    """No step in flight (copying records, choosing the next run): Ctrl-C ends the sweep with one line, exit 130."""

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(sweep, "run_study", interrupted)
    study = tmp_path / "study.yaml"
    study.write_text("{}")
    assert sweep.main([str(study)]) == 130
    assert capsys.readouterr().err == "sweep: interrupted between runs; run the sweep again to continue\n"


@pytest.mark.parametrize(
    "top, group, said",
    [
        ("", "seed: [0, 1]", "group g: unknown key 'seed'; did you mean 'seeds'?"),  # trained seed 0 alone
        ("", "atack: [--max-per-class, '5']", "group g: unknown key 'atack'; did you mean 'attack'?"),  # no attack
        ("", "sets: [train.lr=0.1]", "group g: unknown key 'sets'; did you mean 'set'?"),
        ("", "weight: 2", "group g: unknown key 'weight'; known: name, priority, set, distributions, runs, seeds"),
        ("reports: x\n", "", "study file {study}: unknown key 'reports'; did you mean 'report'?"),
        ("colour: x\n", "", "study file {study}: unknown key 'colour'; known: base, out, records, report, groups"),
    ],
)
def test_an_unknown_key_in_a_study_file_is_refused_with_the_key_it_is_close_to(tmp_path, capsys, top, group, said):
    """A misspelt key was ignored without a word: seed: [0, 1] for seeds trained seed 0 only, atack: ran no attack."""
    study = tmp_path / "study.yaml"
    extra = f", {group}" if group else ""
    study.write_text(
        f"base: {BASE}\nout: o\nrecords: r\n{top}groups:\n"
        f"  - {{name: g, distributions: [uniform-iid], runs: [fedavg]{extra}}}\n"
    )
    assert sweep.main([str(study), "--list", "--out", str(tmp_path / "out")]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.startswith("sweep: error: ") and err.count("\n") == 1, err
    assert said.format(study=study) in err, err


@pytest.mark.parametrize(
    "text, said",
    [
        ("group:\n  - {name: g, distributions: [uniform-iid], runs: [fedavg]}", ": unknown key 'group'; did you mean"),
        ("groups:\n  - {name: g, distributions: [uniform-iid], run: [fedavg]}", "g: unknown key 'run'; did you mean"),
        # a group without a name is called by its place, as the run-name check calls every group
        ("groups:\n  - {nam: g, distributions: [uniform-iid], runs: [fedavg]}", "group groups[0]: unknown key 'nam'"),
    ],
)
def test_a_misspelt_required_key_of_a_study_file_is_named_not_called_missing(tmp_path, capsys, text, said):
    study = tmp_path / "study.yaml"
    study.write_text(f"base: {BASE}\nout: o\nrecords: r\n{text}\n")
    assert sweep.main([str(study), "--list", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert said in err and err.count("\n") == 1, err


_G = "distributions: [uniform-iid, skewed-noniid], runs: [fedavg]"


@pytest.mark.parametrize(
    "groups, said",
    [
        (
            ["{name: g, distributions: [uniform-iid], runs: [fedavg, fedavg]}"],
            "run g-uniform-iid-fedavg-s0 would come from groups[0] (g) runs[0] 'fedavg' on distributions[0] "
            "'uniform-iid' and from groups[0] (g) runs[1] 'fedavg' on distributions[0] 'uniform-iid'",
        ),
        (  # target 0 is no target: the same name
            ["{name: g, distributions: [uniform-iid], runs: [fedavg, fedavg 0]}"],
            "from groups[0] (g) runs[0] 'fedavg' on distributions[0] 'uniform-iid' and from groups[0] (g) runs[1] "
            "'fedavg 0' on",
        ),
        (  # different targets, one name: the second would have found the first finished, or differs
            ["{name: g, distributions: [uniform-iid], runs: [fedsparsify-global 0.95, fedsparsify-global 0.9500001]}"],
            "run g-uniform-iid-fedsparsify-global-0.95-s0 would come from groups[0] (g) runs[0]",
        ),
        (
            ["{name: g, distributions: [uniform-iid, skewed-noniid, uniform-iid], runs: [fedavg]}"],
            "from groups[0] (g) runs[0] 'fedavg' on distributions[0] 'uniform-iid' and from groups[0] (g) runs[0] "
            "'fedavg' on distributions[2] 'uniform-iid'",
        ),
        (
            [
                f"{{name: g, {_G}, seeds: [0, 1]}}",
                "{name: h, distributions: [uniform-iid], runs: [fedavg]}",
                f"{{name: g, priority: 1, {_G}, seeds: [1], set: [train.lr=0.1]}}",
            ],
            "run g-uniform-iid-fedavg-s1 would come from groups[0] (g) runs[0] 'fedavg' on distributions[0] "
            "'uniform-iid' and from groups[2] (g) runs[0] 'fedavg' on distributions[0] 'uniform-iid'",
        ),
    ],
)
def test_a_run_name_two_entries_of_a_study_would_give_is_refused_naming_both(tmp_path, capsys, groups, said):
    """runs: [fedavg, fedavg], a distribution listed twice or two groups of one name listing one run gave one run
    directory twice: the sweep trained the first and found the second finished (or `differs`, hours later)."""
    study = tmp_path / "study.yaml"
    study.write_text(f"base: {BASE}\nout: o\nrecords: r\ngroups:\n" + "".join(f"  - {g}\n" for g in groups))
    assert sweep.main([str(study), "--list", "--out", str(tmp_path / "out")]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.startswith(f"sweep: error: study file {study}: ") and err.count("\n") == 1, err
    assert said in err, err


def test_groups_of_one_name_that_give_different_runs_stay_one_group_as_the_cpu_study_has_them():
    """jobs/studies/cpu.yaml lists its accuracy runs in three groups named acc (priorities 0, 2 and 1): their runs
    differ, and the study still reads to the 45 runs whose records are committed."""
    path = ROOT / "jobs" / "studies" / "cpu.yaml"
    spec = sweep.read_study(path)
    acc = [i for i, group in enumerate(spec["groups"]) if group["name"] == "acc"]
    runs = sweep.study_runs(spec)
    by_group = [{r.name for r in runs if r.order[2] == i} for i in acc]
    assert len(acc) == 3 and all(by_group) and sum(map(len, by_group)) == len(set().union(*by_group))
    assert sorted(r.name for r in runs) == sorted(p.name for p in (ROOT / "docs" / "results" / "runs").iterdir())


def test_paper_local_starts_each_run_with_the_ranks_of_the_config_file_it_trains(tmp_path, monkeypatch, capsys):
    """A local --paper run took `mpirun -n` from make_configs.py's 8 learners, not from the committed file it trains,
    which README has users edit: federation.learners: 4 there started 9 ranks, and the run refused the count. A
    file that does not validate is refused before the first run is trained, as --slurm does."""
    import shutil

    jobs = tmp_path / "jobs"
    family = jobs / "configs" / "paper" / "original"
    shutil.copytree(ROOT / "jobs" / "configs" / "paper" / "original", family)
    edited = family / "fedavg-uniform-iid.yaml"
    cfg = yaml.safe_load(edited.read_text())
    cfg["federation"]["learners"] = 4
    edited.write_text(yaml.safe_dump(cfg))
    central = family / "fedavg-skewed-noniid.yaml"
    cfg = yaml.safe_load(central.read_text())
    cfg["federation"]["algorithm"] = "centralized"
    central.write_text(yaml.safe_dump(cfg))
    calls = []
    monkeypatch.setattr(sweep, "HERE", jobs)
    monkeypatch.setattr(sweep, "call", lambda cmd, log=None, cwd=None: calls.append(cmd))
    out = tmp_path / "paper"
    assert sweep.main(["--paper", "original", "--out", str(out), "--mpirun", "/x/mpirun"]) == 0
    trained = {cmd[cmd.index("--config") + 1]: cmd for cmd in calls if "train" in cmd}
    assert len(trained) == len(list(family.glob("*.yaml")))
    assert trained[str(edited)][:3] == ["/x/mpirun", "-n", "5"]
    assert trained[str(central)][:4] == [sys.executable, "-m", "fedmpi", "train"]  # the baseline runs alone
    assert trained[str(family / "fedavg-uniform-noniid.yaml")][:3] == ["/x/mpirun", "-n", "9"]
    calls.clear()
    cfg["train"]["lr"] = -1
    central.write_text(yaml.safe_dump(cfg))
    assert sweep.main(["--paper", "original", "--out", str(out), "--mpirun", "/x/mpirun"]) == 2
    assert f"sweep: error: {central}: train.lr must be > 0" in capsys.readouterr().err
    assert calls == []
