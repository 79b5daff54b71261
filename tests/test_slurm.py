"""jobs/fedsparsify.slurm, run by bash with stand-ins for srun (mpirun, which forwards SIGUSR1 to
every rank as srun does) and scontrol (records its arguments)."""

import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from fedtools import MPIRUN, MPIRUN_FLAGS, TINY, launcher_is_open_mpi, metrics, summary, wait_rows, write_split

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]


def _fake_slurm(tmp_path: Path) -> dict:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    launcher = shlex.join([MPIRUN, *MPIRUN_FLAGS])
    (bin_dir / "srun").write_text(f'#!/bin/bash\nwhile [[ "$1" == --* ]]; do shift; done\nexec {launcher} -n 3 "$@"\n')
    # SLURM cancels the running job it requeues: SIGTERM to the batch script, which is still running
    (bin_dir / "scontrol").write_text(
        f'#!/bin/bash\necho "$@" >> {tmp_path}/scontrol.log\n[ "$1" = requeue ] && kill -TERM $PPID\nexit 0\n'
    )
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)
    return dict(
        os.environ,
        PATH=f"{bin_dir}:{os.environ['PATH']}",
        FEDMPI_VENV=str(Path(sys.executable).parents[1]),
        SLURM_JOB_ID="4242",
        SLURM_CPUS_PER_TASK="1",
    )


def _config(tmp_path: Path) -> Path:
    cfg: dict = {}
    for item in [
        *TINY,
        f"data.dir={write_split(tmp_path / 'split')}",
        f"run.dir={tmp_path / 'runs'}",
        "run.name=job",
        "federation.learners=2",
        "federation.rounds=6",
        "federation.target=0.9",
    ]:
        key, value = item.split("=", 1)
        section, option = key.split(".")
        cfg.setdefault(section, {})[option] = yaml.safe_load(value)
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _submit(env: dict, config: Path) -> subprocess.Popen:
    """The batch script as sbatch starts it, in a session of its own (to kill it whole if it hangs)."""
    return subprocess.Popen(
        ["bash", "jobs/fedsparsify.slurm", str(config)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def _finish(job: subprocess.Popen) -> tuple[str, str]:
    try:
        return job.communicate(timeout=90)
    except subprocess.TimeoutExpired:
        os.killpg(job.pid, signal.SIGKILL)
        pytest.fail("the job did not stop after the signal")


def test_time_limit_signal_checkpoints_requeues_and_the_requeued_job_resumes(tmp_path):
    env, config = _fake_slurm(tmp_path), _config(tmp_path)
    run = tmp_path / "runs" / "job"
    job = _submit(env, config)
    wait_rows(run, 1, job)
    os.kill(job.pid, signal.SIGUSR1)  # what SLURM sends the batch script before the time limit
    out, err = _finish(job)
    assert job.returncode == 75, out + err
    assert (tmp_path / "scontrol.log").read_text().split() == ["requeue", "4242"]
    assert summary(run)["preempted"] is True and len(metrics(run)) < 6
    # the requeue's own SIGTERM was taken for a new stop: "SIGTERM (scancel or preemption), asking the federation to
    # checkpoint" and "kill: (PID) - No such process" closed every requeued job's log on the real SLURM
    assert "SIGTERM" not in out and "No such process" not in err, out + err

    again = subprocess.run(
        ["bash", "jobs/fedsparsify.slurm", str(config)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert again.returncode == 0, again.stdout + again.stderr
    assert "resuming" in again.stdout
    assert [r["round"] for r in metrics(run)] == list(range(1, 7))
    assert (tmp_path / "scontrol.log").read_text().split() == ["requeue", "4242"], "no second requeue"


def _stopped_without_requeue(job: subprocess.Popen, tmp_path: Path, run: Path) -> None:
    """The job checkpointed and exited 75, and the script said to submit again instead of requeueing."""
    out, err = _finish(job)
    assert job.returncode == 75, out + err
    assert "submit the same command again to continue" in out
    assert not (tmp_path / "scontrol.log").exists()
    assert summary(run)["preempted"] is True


def test_sigterm_checkpoints_without_a_requeue_and_a_second_signal_does_not_end_the_script_early(tmp_path):
    """scancel sends SIGTERM: requeueing a job being cancelled brings it back (seen on a real SLURM), so the
    script only checkpoints. A second signal during the checkpoint must not end the script (and so the step)
    before srun has ended."""
    env, config = _fake_slurm(tmp_path), _config(tmp_path)
    run = tmp_path / "runs" / "job"
    job = _submit(env, config)
    wait_rows(run, 1, job)
    os.kill(job.pid, signal.SIGTERM)
    time.sleep(0.5)
    os.kill(job.pid, signal.SIGUSR1)
    _stopped_without_requeue(job, tmp_path, run)


def test_a_stop_the_script_did_not_relay_is_not_requeued(tmp_path):
    """SIGINT straight to the step (scancel --signal=INT, Ctrl-C in srun) also checkpoints and exits 75; only the
    time-limit warning, which comes through the script, requeues."""
    if launcher_is_open_mpi():
        pytest.skip("the stand-in srun is Open MPI's mpirun, which ends the ranks on SIGINT where srun passes it on")
    env, config = _fake_slurm(tmp_path), _config(tmp_path)
    run = tmp_path / "runs" / "job"
    job = _submit(env, config)
    wait_rows(run, 1, job)
    subprocess.run(["pkill", "-INT", "-P", str(job.pid)], check=True)  # to srun (here mpirun), not the script
    _stopped_without_requeue(job, tmp_path, run)


def test_a_warning_before_the_federation_starts_requeues_without_starting_it(tmp_path):
    """Passed on to ranks still starting, the signal could kill them before their handlers are set: the job
    is requeued as it is (its last checkpoint stands) and srun never runs."""
    env = _fake_slurm(tmp_path)
    slow = tmp_path / "slowvenv" / "bin"
    slow.mkdir(parents=True)
    (slow / "activate").write_text(f"sleep 3\nsource {shlex.quote(env['FEDMPI_VENV'])}/bin/activate\n")
    env["FEDMPI_VENV"] = str(slow.parent)
    job = _submit(env, tmp_path / "never-read.yaml")
    time.sleep(1)
    os.kill(job.pid, signal.SIGUSR1)
    out, err = _finish(job)
    assert job.returncode == 75, out + err
    assert "stopped before the federation started" in out and "asking the federation" not in out
    assert (tmp_path / "scontrol.log").read_text().split() == ["requeue", "4242"]


def test_a_sweep_task_finds_the_job_script_from_the_submit_directory(tmp_path):
    """Under sbatch, $0 is slurmd's spool copy of sweep.slurm: the task must find jobs/fedsparsify.slurm from
    the submit directory (here it gets as far as the virtualenv, which it names)."""
    spool = tmp_path / "spool" / "job7"
    spool.mkdir(parents=True)
    (spool / "slurm_script").write_text((ROOT / "jobs" / "sweep.slurm").read_text())
    listing = tmp_path / "configs.txt"
    listing.write_text("a.yaml\nb.yaml\n")
    env = dict(os.environ, SLURM_SUBMIT_DIR=str(ROOT), SLURM_ARRAY_TASK_ID="2", FEDMPI_VENV=str(tmp_path / "none"))
    proc = subprocess.run(
        ["bash", str(spool / "slurm_script"), str(listing)], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert proc.returncode == 2 and f"no virtualenv at {tmp_path / 'none'}" in proc.stderr
    env["SLURM_SUBMIT_DIR"] = str(tmp_path)
    proc = subprocess.run(
        ["bash", str(spool / "slurm_script"), str(listing)], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert proc.returncode == 2 and "submit from the fedmpi checkout" in proc.stderr


def _fake_venv(tmp_path, python: str):
    """A venv for the job script to activate whose `python` is the shell script `python`: what a rank would run."""
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "activate").write_text(f'PATH="{venv / "bin"}:$PATH"\n')
    (venv / "bin" / "python").write_text(python)
    (venv / "bin" / "python").chmod(0o755)
    return venv


def test_the_ranks_start_with_the_stop_signals_blocked(tmp_path):
    """A warning relayed while a rank's Python starts (before fedmpi takes it) ended the rank with exit 138 on a
    real SLURM: the script starts each rank with SIGUSR1 and SIGTERM blocked, and fedmpi unblocks them."""
    if subprocess.run(["env", "--block-signal=USR1", "true"], capture_output=True).returncode:
        pytest.skip("env --block-signal needs GNU coreutils 8.31 or later")
    venv = _fake_venv(tmp_path, f"#!/bin/bash\ngrep SigBlk /proc/self/status > {tmp_path}/mask\n")
    env = dict(_fake_slurm(tmp_path), FEDMPI_VENV=str(venv))
    proc = subprocess.run(["bash", "jobs/fedsparsify.slurm", "x.yaml"], cwd=ROOT, env=env, capture_output=True)
    assert proc.returncode == 0, proc.stderr
    blocked = int((tmp_path / "mask").read_text().split()[1], 16)
    assert blocked & (1 << (signal.SIGUSR1 - 1)) and blocked & (1 << (signal.SIGTERM - 1)), hex(blocked)


def test_a_warning_while_the_script_probes_env_is_not_lost(tmp_path):
    """The probe for env --block-signal runs a program after the check for a signal come before the start: a
    warning taken during it had no srun to go to, and the federation then ran to the time limit unwarned."""
    env = _fake_slurm(tmp_path)
    slow_env = tmp_path / "bin" / "env"
    slow_env.write_text(
        f'#!/bin/bash\n[ "$*" = "--block-signal=USR1 true" ] && sleep 3\nexec {shutil.which("env")} "$@"\n'
    )
    slow_env.chmod(0o755)
    venv = _fake_venv(tmp_path, f"#!/bin/bash\ntouch {tmp_path}/started\n")
    job = _submit(dict(env, FEDMPI_VENV=str(venv)), tmp_path / "never-read.yaml")
    time.sleep(1)
    os.kill(job.pid, signal.SIGUSR1)
    out, err = _finish(job)
    assert job.returncode == 75, out + err
    assert "stopped before the federation started" in out and not (tmp_path / "started").exists()
    assert (tmp_path / "scontrol.log").read_text().split() == ["requeue", "4242"]


def test_an_option_where_the_config_belongs_is_the_scripts_usage_error(tmp_path):
    """`sbatch jobs/fedsparsify.slurm --set k=v` (the config forgotten) ran `train --config --set k=v` on every
    task and failed with argparse's 'argument --config: expected one argument': the script names its own usage."""
    venv = _fake_venv(tmp_path, f"#!/bin/bash\ntouch {tmp_path}/started\n")
    env = dict(_fake_slurm(tmp_path), FEDMPI_VENV=str(venv))
    for args in (["--set", "run.name=x"], ["--config", "a.yaml"], []):  # none at all: was bash's ${1:?} message, exit 1
        proc = subprocess.run(
            ["bash", "jobs/fedsparsify.slurm", *args], cwd=ROOT, env=env, capture_output=True, text=True
        )
        assert proc.returncode == 2 and "usage: sbatch jobs/fedsparsify.slurm CONFIG.yaml" in proc.stderr, proc.stderr
        assert (not args or args[0] in proc.stderr) and not (tmp_path / "started").exists()


def _fake_mpirun(tmp_path: Path, version: str) -> None:
    """An `mpirun` on the job's PATH that says `version` and otherwise records its arguments and runs the command
    after its options once."""
    mpirun = tmp_path / "bin" / "mpirun"
    mpirun.write_text(
        f'#!/bin/bash\n[ "$1" = --version ] && {{ echo "{version}"; exit 0; }}\necho "$@" > {tmp_path}/mpirun.args\n'
        'while [[ "$1" == --* ]]; do shift 2; done\nexec "$@"\n'
    )
    mpirun.chmod(0o755)


def test_open_mpis_mpirun_as_the_launcher_gives_each_rank_the_cpus_of_its_task(tmp_path):
    """FEDMPI_LAUNCHER=mpirun starts the ranks with Open MPI's mpirun (a SLURM without PMIx support). It reads the
    allocation's tasks but not their CPUs: under sbatch -c 2 on the real SLURM, Open MPI 5.0.11 bound each rank to
    one core, so the script asks for the task's CPUs."""
    venv = _fake_venv(tmp_path, f"#!/bin/bash\ntouch {tmp_path}/started\n")
    env = dict(_fake_slurm(tmp_path), FEDMPI_VENV=str(venv), FEDMPI_LAUNCHER="mpirun", SLURM_CPUS_PER_TASK="4")
    _fake_mpirun(tmp_path, "mpirun (Open MPI) 5.0.11")
    proc = subprocess.run(["bash", "jobs/fedsparsify.slurm", "x.yaml"], cwd=ROOT, env=env, capture_output=True)
    assert proc.returncode == 0, proc.stderr
    args = (tmp_path / "mpirun.args").read_text().split()
    assert args[:2] == ["--map-by", "slot:PE=4:hwtcpus"] and "python" in args, args
    assert (tmp_path / "started").exists()


def test_the_mpirun_launcher_refuses_an_mpirun_that_is_not_open_mpis(tmp_path):
    """MPICH's hydra does not take Open MPI's mapping options (and under SLURM starts its ranks through srun
    anyway): the script says so before starting anything. So does a launcher it does not know."""
    venv = _fake_venv(tmp_path, f"#!/bin/bash\ntouch {tmp_path}/started\n")
    env = dict(_fake_slurm(tmp_path), FEDMPI_VENV=str(venv), FEDMPI_LAUNCHER="mpirun")
    _fake_mpirun(tmp_path, "HYDRA build details:")
    script = ["bash", "jobs/fedsparsify.slurm", "x.yaml"]
    proc = subprocess.run(script, cwd=ROOT, env=env, capture_output=True, text=True)
    assert proc.returncode == 2 and "FEDMPI_LAUNCHER=mpirun is for Open MPI's mpirun" in proc.stderr, proc.stderr
    env["FEDMPI_LAUNCHER"] = "mpiexec"
    proc = subprocess.run(script, cwd=ROOT, env=env, capture_output=True, text=True)
    assert proc.returncode == 2 and "FEDMPI_LAUNCHER=mpiexec: srun (the default) or mpirun" in proc.stderr, proc.stderr
    assert not (tmp_path / "mpirun.args").exists() and not (tmp_path / "started").exists()
