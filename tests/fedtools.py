"""Shared by the end-to-end tests: a tiny learnable split written in the documented HDF5 layout,
and a runner for the real CLI under the venv's mpirun."""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

from fedmpi.hostmemory import CGROUP_ROOT, _memory_cgroups
from fedmpi.launch import default_mpirun

SHAPE = (16, 20, 16)
# The launcher the tests start jobs with: FEDMPI_MPIRUN, flags allowed (the Makefile passes its MPIRUN), else
# the mpirun beside this Python (the mpich wheel's), else the one on PATH (a site's MPI module, mpi4py built
# against it). FEDMPI_MPIRUN_FLAGS adds flags, e.g. Open MPI's --oversubscribe (README, "Tests and CI").
MPIRUN, *_GIVEN_FLAGS = shlex.split(os.environ.get("FEDMPI_MPIRUN", "")) or [default_mpirun()]
MPIRUN = os.path.abspath(MPIRUN) if os.sep in MPIRUN else MPIRUN  # tests start jobs from other directories
MPIRUN_FLAGS = [*_GIVEN_FLAGS, *os.environ.get("FEDMPI_MPIRUN_FLAGS", "").split()]


def launcher_is_open_mpi() -> bool:
    """Whether the tests' launcher is Open MPI's mpirun (its `--version` says so; MPICH's hydra prints its build
    details): the launchers differ in the signals they pass on to the ranks."""
    global _OPEN_MPI
    if _OPEN_MPI is None:
        version = subprocess.run([MPIRUN, "--version"], capture_output=True, text=True, timeout=60)
        _OPEN_MPI = "Open MPI" in version.stdout + version.stderr
    return _OPEN_MPI


_OPEN_MPI: bool | None = None


def write_volumes(path: Path, ages: np.ndarray, rng: np.random.Generator, shape=SHAPE) -> None:
    """Age is learnable: a bright ball whose radius grows with age, plus noise."""
    grid = np.stack(np.meshgrid(*[np.arange(s) - s / 2 for s in shape], indexing="ij"))
    dist = np.sqrt((grid**2).sum(0))
    images = np.stack([(dist < 2 + (a - 45) / 7).astype(np.float32) + rng.normal(0, 0.3, shape) for a in ages])
    n = len(ages)
    with h5py.File(path, "w") as f:
        f.create_dataset(
            "images", data=images.astype(np.float16), chunks=(1, *shape), compression="gzip", compression_opts=1
        )
        f.create_dataset("age", data=ages.astype(np.float32))
        f.create_dataset("subject_id", data=np.array([f"sub-{i:04d}" for i in range(n)], dtype=h5py.string_dtype()))
        f.create_dataset("sex", data=np.array(["F"] * n, dtype=h5py.string_dtype()))
        f.create_dataset("site", data=np.array(["site-0"] * n, dtype=h5py.string_dtype()))
        f.attrs["voxel_size"] = 4.0
        f.attrs["shape"] = np.array(shape)
        f.attrs["affine"] = np.diag([4.0, 4.0, 4.0, 1.0])


def write_split(
    directory: Path, learners: int = 2, per_learner: int = 24, test: int = 24, seed: int = 0, shape=SHAPE
) -> Path:
    rng = np.random.default_rng(seed)
    directory.mkdir(parents=True, exist_ok=True)
    for k in range(1, learners + 1):
        write_volumes(directory / f"learner_{k}.h5", rng.uniform(45, 80, per_learner), rng, shape)
    write_volumes(directory / "test.h5", rng.uniform(45, 80, test), rng, shape)
    return directory


TINY = [
    "model.width=0.125",
    "model.dropout=0",
    "train.lr=0.02",
    "train.batch_size=4",
    "train.threads=1",
    "eval.batch_size=24",
]


def unreadable(monkeypatch, name: str) -> None:
    """np.load of a file whose name ends with `name` fails as a disk read error does (EIO); others load."""
    import errno

    real_load = np.load

    def flaky(path, *args, **kwargs):
        if str(path).endswith(name):
            raise OSError(errno.EIO, "Input/output error")
        return real_load(path, *args, **kwargs)

    monkeypatch.setattr(np, "load", flaky)


def train_command(data_dir: Path, run_dir: Path, sets, ranks: int = 3) -> list[str]:
    """`python -m fedmpi train` on data_dir with the tiny test settings, then `sets` (no launcher)."""
    args = [sys.executable, "-m", "fedmpi", "train", "--set", f"data.dir={data_dir}", "--set", f"run.dir={run_dir}"]
    for s in [f"federation.learners={ranks - 1}", *TINY, *sets]:
        args += ["--set", s]
    return args


def run_fedmpi(
    data_dir: Path, run_dir: Path, *sets: str, ranks: int = 3, extra=(), timeout: float = 240, mpirun: bool = True
) -> subprocess.CompletedProcess:
    args = train_command(data_dir, run_dir, sets, ranks)
    cmd = ([MPIRUN, *MPIRUN_FLAGS, "-n", str(ranks)] if mpirun else []) + args + list(extra)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def summary(run: Path) -> dict:
    return json.loads((run / "summary.json").read_text())


def start_fedmpi(data_dir: Path, run_dir: Path, *sets: str, ranks: int = 3, extra=()) -> subprocess.Popen:
    """Like run_fedmpi, in the background (for tests that kill or signal ranks)."""
    import uuid

    args = [MPIRUN, *MPIRUN_FLAGS, "-n", str(ranks), *train_command(data_dir, run_dir, sets, ranks)]
    marker = uuid.uuid4().hex  # marks this job's ranks in their environment (rank_process)
    env = dict(os.environ, OMP_NUM_THREADS="1", FEDMPI_TEST_JOB=marker)
    job = subprocess.Popen(
        args + list(extra), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, start_new_session=True
    )
    job.marker = marker  # type: ignore[attr-defined]
    return job


def wait_until(condition, proc: subprocess.Popen, what: str, timeout: float = 120) -> None:
    """Poll condition() until it holds. If the job ends or `timeout` passes first, kill what is left of the job
    (a test that gives up must not leave ranks running) and raise TimeoutError naming `what`."""
    import time

    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None or time.monotonic() > deadline:
            kill_job(proc)
            raise TimeoutError(f"the job ended or {timeout} s passed before {what}")
        time.sleep(0.05)


def wait_rows(run: Path, n: int, proc: subprocess.Popen, timeout: float = 120) -> None:
    """Wait until metrics.jsonl has n rows (or the job ended)."""
    path = run / "metrics.jsonl"
    wait_until(lambda: path.exists() and len(path.read_text().splitlines()) >= n, proc, f"{path} had {n} rows", timeout)


def rank_process(job: subprocess.Popen, rank: int, timeout: float = 30) -> int:
    """The pid of MPI rank `rank` of `job` (the sentinel's child, which is the rank itself), as soon as it
    exists: before it has imported anything or initialised MPI. Ranks are recognised by the job's
    FEDMPI_TEST_JOB marker in their environment (Open MPI's daemons, not mpirun, are their parents)."""
    import time

    marks = (f"PMI_RANK={rank}".encode(), f"OMPI_COMM_WORLD_RANK={rank}".encode())
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for pid, env in job_processes(job):
            try:
                if not any(m in env for m in marks):
                    continue
                with open(f"/proc/{pid}/stat") as fh:
                    parent = int(fh.read().rsplit(")", 1)[1].split()[1])
                if any(m in _environ(parent) for m in marks):
                    return pid
            except OSError:
                continue
        time.sleep(0.01)
    raise TimeoutError(f"rank {rank} of job {job.pid} did not appear")


def job_processes(job: subprocess.Popen):
    """(pid, environment) of every process carrying `job`'s FEDMPI_TEST_JOB marker (none for a job started
    without one)."""
    marker = getattr(job, "marker", None)
    if marker is None:
        return
    job_mark = f"FEDMPI_TEST_JOB={marker}".encode()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                env = _environ(int(entry))
            except OSError:
                continue
            if job_mark in env:
                yield int(entry), env


def kill_job(job: subprocess.Popen) -> None:
    """SIGKILL a test's job as a node failure would: the launcher, its process group (for a job started in a
    session of its own) and every process carrying the job's marker, since Open MPI's ranks are not in
    mpirun's group and outlive it, writing on."""
    import signal

    with contextlib.suppress(ProcessLookupError):
        os.killpg(job.pid, signal.SIGKILL)
    for pid, _env in job_processes(job):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    job.kill()  # the launcher itself, also when it is not the leader of a group of its own
    job.wait()


def _environ(pid: int) -> list[bytes]:
    with open(f"/proc/{pid}/environ", "rb") as fh:
        return fh.read().split(b"\0")


def memory_cgroup(tmp_path, limit: int) -> Path:
    """A new memory cgroup below this process's own (v1's memory controller, or v2) limited to `limit` bytes, or a
    skip where none can be made."""
    own = next(iter(_memory_cgroups(Path("/proc"), CGROUP_ROOT)), None)
    if own is None:
        pytest.skip("no memory cgroup")
    directory, files = own
    group = directory / f"fedmpi-test-{os.getpid()}-{tmp_path.name}"
    try:
        group.mkdir()
    except OSError as e:
        pytest.skip(f"cannot make a memory cgroup here: {e}")
    try:
        (group / files.limit).write_text(str(limit))
        if files.version == 1:
            with contextlib.suppress(OSError):  # without swap accounting the file is absent
                (group / "memory.memsw.limit_in_bytes").write_text(str(limit))
        else:
            (group / "memory.swap.max").write_text("0")
    except OSError as e:
        group.rmdir()
        pytest.skip(f"cannot limit a memory cgroup here: {e}")
    return group


def remove_cgroup(group: Path, patience: float = 10.0) -> None:
    """rmdir a test's memory cgroup once its last process is gone: killed workers of a parent that has exited are
    reaped by init a moment later, and the cgroup is busy until then."""
    deadline = time.monotonic() + patience
    while True:
        try:
            group.rmdir()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)
