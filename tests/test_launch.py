"""`python -m fedmpi train`'s start-up before MPI traffic: the rank count and configuration errors."""

from __future__ import annotations

import os
import signal
import socket
import sys
import time

import pytest

from fedmpi import hostmemory, launch
from fedmpi.config import load_config
from fedmpi.errors import EXIT_FAILURE, EXIT_USAGE, ConfigError, PayloadError
from fedmpi.launch import check_ranks, check_start, train
from fedmpi.sentinel import RANK_VARIABLES, SIZE_VARIABLES


def _cfg(tmp_path, *sets):
    return load_config(overrides=[f"run.dir={tmp_path}", "federation.learners=2", *sets])


def test_rank_count_must_match_learners(tmp_path):
    check_ranks(_cfg(tmp_path), 3)
    with pytest.raises(
        ConfigError,
        match=r"has 4 MPI ranks but federation.learners = 2 needs 3 \(1 server \+ 2.*--ntasks=3 under SLURM$",
    ):
        check_ranks(_cfg(tmp_path), 4)
    with pytest.raises(ConfigError, match="runs in one process"):
        check_ranks(_cfg(tmp_path, "federation.algorithm=centralized"), 3)
    check_ranks(_cfg(tmp_path, "federation.algorithm=centralized"), 1)


def test_tasks_each_alone_in_mpi_are_named_a_launcher_mismatch(tmp_path):
    """srun with the wrong PMI plugin (or another MPI's mpirun) starts N tasks that each see a world of 1 rank:
    the rank count alone would tell them to start N ranks, which they did."""
    with pytest.raises(ConfigError, match=r"world of 1 rank, but the launcher's step has 3 tasks: .*\(Open MPI"):
        check_ranks(_cfg(tmp_path), 1, launched=3, library="Open MPI v4.1.4")
    # the baseline alone in a step of several: a task farm under srun --mpi=none
    check_ranks(_cfg(tmp_path, "federation.algorithm=centralized"), 1, launched=3)
    check_ranks(_cfg(tmp_path), 3, launched=3)
    with pytest.raises(ConfigError, match="has 1 MPI ranks but"):  # started without a launcher: the count
        check_ranks(_cfg(tmp_path), 1, launched=None)


def test_a_launch_that_mpi_would_wait_on_for_ever_is_refused_before_mpi_starts(tmp_path):
    """A shell inside a multi-task srun step hands every command its step's MPI set-up: a baseline run there
    would wait in MPI_Init for the step's other tasks (checked under a real srun: until run.startup_timeout)."""
    baseline = _cfg(tmp_path, "federation.algorithm=centralized")
    with pytest.raises(ConfigError, match=r"one process, but MPI is set up for a job of 2 processes .*srun --mpi=none"):
        check_start(baseline, 2)
    check_start(baseline, 1)  # srun -n 1, or a one-task shell's step
    check_start(baseline, None)  # no launcher, or srun --mpi=none
    check_start(_cfg(tmp_path), 3)
    check_start(_cfg(tmp_path), None)
    with pytest.raises(ConfigError, match=r"a job of 2 processes \(.*\) but federation.learners = 2 needs 3"):
        check_start(_cfg(tmp_path), 2, step="27.0")  # srun -n 2 itself: no word of shells in steps
    with pytest.raises(ConfigError, match=r"a job of 1 process \(.*srun --overlap -n 3"):
        check_start(_cfg(tmp_path), 1, step="27.0")


def test_a_rank_count_said_inside_a_slurm_step_points_to_srun_overlap(tmp_path):
    """From srun --pty bash, a nested srun or MPICH's mpirun waits for CPUs the shell's step holds (seen under a
    real SLURM: 'step creation temporarily disabled' and no end); srun --overlap shares them."""
    with pytest.raises(ConfigError, match=r"needs 3 .*--ntasks=3 under SLURM\. .*step 27\.0.*srun --overlap -n 3 "):
        check_ranks(_cfg(tmp_path), 1, step="27.0")
    with pytest.raises(ConfigError, match=r"--ntasks=3 under SLURM$"):
        check_ranks(_cfg(tmp_path), 1, step=None)


@pytest.fixture
def no_launcher(monkeypatch):
    for name in (*RANK_VARIABLES, *SIZE_VARIABLES, "PMIX_NAMESPACE", "SLURM_STEP_ID", "SLURM_JOB_ID"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(launch, "init_mpi", lambda timeout: pytest.fail("MPI was started"))


def _mpi(rank: int, size: int = 1):
    """A stand-in for mpi4py's MPI after MPI_Init, as train() uses it."""
    world = type("World", (), {"Get_rank": lambda self: rank, "Get_size": lambda self: size})()
    return type("MPI", (), {"COMM_WORLD": world, "Get_library_version": staticmethod(lambda: "MPICH 4")})


def test_the_baseline_in_an_inherited_mpi_job_never_starts_mpi(monkeypatch, capsys, tmp_path, no_launcher):
    monkeypatch.setenv("PMI_SIZE", "2")
    monkeypatch.setenv("PMI_RANK", "0")
    assert train(None, [f"run.dir={tmp_path}", "federation.algorithm=centralized"]) == EXIT_USAGE
    assert "a job of 2 processes" in capsys.readouterr().err


def test_a_federation_typed_in_a_one_task_step_shell_is_told_srun_overlap(monkeypatch, capsys, tmp_path, no_launcher):
    """What srun -n 1 --pty bash (pmi2) leaves every command typed there, end to end through train()."""
    monkeypatch.setenv("PMI_SIZE", "1")
    monkeypatch.setenv("PMI_RANK", "0")
    monkeypatch.setenv("SLURM_JOB_ID", "41")
    monkeypatch.setenv("SLURM_STEP_ID", "0")
    assert train(None, [f"run.dir={tmp_path}", "federation.learners=2"]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert "step 41.0" in err and "srun --overlap -n 3 python -m fedmpi train" in err


def test_each_rank_tells_its_sentinel_its_mpi_rank_once_mpi_is_up(monkeypatch, capsys, tmp_path, no_launcher):
    """The sentinel names a rank killed by a signal; the launcher's variables may be a step's, left in a shell."""
    told = []
    monkeypatch.setattr(launch, "init_mpi", lambda timeout: _mpi(2))
    monkeypatch.setattr(launch, "tell_rank", told.append)
    assert train(None, [f"run.dir={tmp_path}", "federation.learners=2"]) == EXIT_USAGE  # 1 rank of 3: refused
    assert told == [2]


@pytest.mark.parametrize(("mpi_rank", "ompi_rank", "lines"), [(0, "0", 1), (2, "2", 0), (0, "2", 0)])
def test_an_error_line_is_said_once_under_a_stale_launcher_rank(
    monkeypatch, capsys, tmp_path, no_launcher, mpi_rank, ompi_rank, lines
):
    """Open MPI's mpirun started from a shell of a pmi2 step: every rank inherits PMI_RANK=0. The rank-count line
    is said by MPI's rank 0 that no launcher variable calls another task; the last case is a task that is MPI's
    rank 0 only because its MPI does not talk to this launcher."""
    monkeypatch.setenv("PMI_RANK", "0")
    monkeypatch.setenv("OMPI_COMM_WORLD_RANK", ompi_rank)
    monkeypatch.setattr(launch, "init_mpi", lambda timeout: _mpi(mpi_rank))
    assert train(None, [f"run.dir={tmp_path}", "federation.learners=2"]) == EXIT_USAGE
    assert capsys.readouterr().err.count("fedmpi: error:") == lines
    assert train(None, ["federation.target=1.5"]) == EXIT_USAGE  # before MPI: the launcher variables alone
    assert capsys.readouterr().err.count("fedmpi: error:") == (ompi_rank == "0")


@pytest.mark.parametrize("procid", ["0", "1"])
def test_the_mismatch_is_said_once_by_the_launchers_first_task(monkeypatch, capsys, tmp_path, procid):
    """Every task of such a job is rank 0 to MPI; only the launcher's task 0 prints the line."""
    for name in ("PMI_RANK", "PMI_SIZE", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "PMIX_RANK", "PMIX_NAMESPACE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("SLURM_STEP_NUM_TASKS", "3")
    monkeypatch.setenv("SLURM_PROCID", procid)
    assert train(None, [f"run.dir={tmp_path}", "federation.learners=2"]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert err.count("the launcher's step has 3 tasks") == (1 if procid == "0" else 0)


@pytest.mark.parametrize(("local_rank", "lines"), [("0", 1), ("1", 0)])
def test_a_config_file_another_node_cannot_read_is_said_by_its_first_task(
    monkeypatch, capsys, tmp_path, no_launcher, local_rank, lines
):
    """The configuration file is read from each node's file system: a task that alone cannot read it (a path only
    the submit node has) was silent, and the tasks that read it waited in MPI_Init until the start-up alarm, whose
    line blames a rank that has not started. The first task on each host says it; a setting's error, the same on
    every task, is still said once."""
    for name in ("OMPI_COMM_WORLD_LOCAL_RANK", "SLURM_LOCALID"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("PMI_RANK", "5")
    monkeypatch.setenv("MPI_LOCALRANKID", local_rank)
    missing = tmp_path / "only-on-the-submit-node.yaml"
    assert train(str(missing), []) == EXIT_USAGE
    err = capsys.readouterr().err
    assert err.count("fedmpi: error:") == lines
    if lines:
        assert err.strip() == f"fedmpi: error: task 5 on {socket.gethostname()}: config file not found: {missing}"
    assert train(None, ["federation.target=1.5"]) == EXIT_USAGE
    assert capsys.readouterr().err == ""


def test_config_errors_are_one_clear_line(capsys):
    assert train(None, ["federation.target=1.5"]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert err.strip() == "fedmpi: error: federation.target must be in [0, 1), got 1.5"


def test_torch_threads_come_from_the_option_the_batch_script_or_the_share_of_cores(monkeypatch):
    from fedmpi.launch import torch_threads

    monkeypatch.delenv("SLURM_CPUS_PER_TASK", raising=False)
    monkeypatch.setenv("OMP_NUM_THREADS", "4")  # jobs/fedsparsify.slurm: the cores srun gave each task
    assert torch_threads(3, local_size=5) == 3 and torch_threads(0, local_size=5) == 4
    monkeypatch.setenv("OMP_NUM_THREADS", "4,2")  # nested parallelism: the outer level's count
    assert torch_threads(0, local_size=5) == 4
    cores = len(os.sched_getaffinity(0))
    for unset in ("", "abc", "0", "2147483648", ",4"):  # 2**31: torch.set_num_threads raised once MPI had started
        monkeypatch.setenv("OMP_NUM_THREADS", unset)
        assert torch_threads(0, local_size=1) == cores and torch_threads(0, local_size=10 * cores) == 1


def test_torch_threads_under_a_sites_own_srun_line_are_the_tasks_cores(monkeypatch):
    """`srun -c 4 --cpu-bind=cores` without OMP_NUM_THREADS: each rank may use its own 4 cores; dividing them by
    the node's 8 ranks gave each one thread. SLURM_CPUS_PER_TASK says 4, never more than the rank may use."""
    from fedmpi.launch import torch_threads

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(4)))
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "4")
    assert torch_threads(0, local_size=8) == 4
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "16")
    assert torch_threads(0, local_size=8) == 4
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert torch_threads(0, local_size=8) == 2
    monkeypatch.delenv("OMP_NUM_THREADS")
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "")
    assert torch_threads(0, local_size=2) == 2


def test_a_ranks_share_of_the_cores_is_a_whole_number(monkeypatch):
    """torch.set_num_threads takes an int: 8 cores over 3 ranks on the host give each rank 2 threads."""
    from fedmpi.launch import torch_threads

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("SLURM_CPUS_PER_TASK", raising=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)))
    threads = torch_threads(0, local_size=3)
    assert threads == 2 and isinstance(threads, int)


def test_learners_wait_longer_on_the_server_at_start_up_than_it_waits_on_them():
    """The server, which sees every rank, must name a silent learner before any learner blames the server."""
    from fedmpi.launch import learner_startup_patience

    for startup in (1.0, 10.0, 60.0, 600.0):
        assert learner_startup_patience(startup) > startup


class _Comm:
    """MPI's world as learner 2 of the default configuration's 9 ranks sees it; Abort is noted."""

    aborted = None

    def Get_rank(self):
        return 2

    def Get_size(self):
        return 9

    def Abort(self, code):
        self.aborted = code


def _learner_of_nine(monkeypatch, run) -> tuple[_Comm, list]:
    """train() as that learner, MPI and the start-up checks stood in for, `run` its federation: the world and the
    codes os._exit was called with (recorded: MPI_Abort returning under srun's pmi2 must still end the rank)."""
    import types

    comm = _Comm()
    fake_mpi = types.SimpleNamespace(COMM_WORLD=comm, Get_library_version=lambda: "a fake MPI")
    monkeypatch.setattr(launch, "init_mpi", lambda timeout: fake_mpi)
    monkeypatch.setattr(launch, "check_start", lambda *args: None)
    monkeypatch.setattr(launch, "launcher_size", lambda: None)
    monkeypatch.setattr(launch, "_run", run)
    exited: list = []
    monkeypatch.setattr(launch.os, "_exit", exited.append)
    return comm, exited


def test_an_error_raised_by_a_signal_handler_in_the_failure_path_does_not_escape_it(monkeypatch, capsys):
    """torch's DataLoader handler raises its error on each SIGCHLD in whatever code runs: one landed while the
    traceback printed (a worker killed, its queue's ConnectionResetError first), the error left the failure path,
    and the rank waited in MPI_Finalize with the job until the server's round watchdog (30 minutes)."""

    def worker_killed(signum, frame):
        raise RuntimeError("DataLoader worker (pid 4321) is killed by signal: Killed. ")

    def lose_a_worker(*args):
        signal.signal(signal.SIGCHLD, worker_killed)  # as a DataLoader with workers installs it
        raise ConnectionResetError(104, "Connection reset by peer")

    def print_exc():
        os.kill(os.getpid(), signal.SIGCHLD)  # the dead worker's SIGCHLD, while the traceback prints
        time.sleep(0.1)

    comm, exited = _learner_of_nine(monkeypatch, lose_a_worker)
    monkeypatch.setattr(launch.traceback, "print_exc", print_exc)
    assert train(None, []) == EXIT_FAILURE
    assert comm.aborted == EXIT_FAILURE and exited == [EXIT_FAILURE]
    assert "fedmpi: rank 2 (learner 2) failed: ConnectionResetError: [Errno 104] Connection reset by peer" in (
        capsys.readouterr().err
    )


def test_a_dataloader_worker_killed_by_sigkill_is_said_to_be_or_not_the_kernels_oom_kill(monkeypatch):
    """torch names the dead worker and the signal, not who sent it: the kernel's counts since the rank started do."""
    killed = RuntimeError("DataLoader worker (pid 4321) is killed by signal: Killed. ")
    monkeypatch.setattr(launch, "oom_kills", lambda: None)
    monkeypatch.setattr(launch, "killed_for_memory", lambda before, after: True)
    monkeypatch.setattr(hostmemory, "memory_limit", lambda: None)  # no cgroup limit: the host's memory ran out
    assert launch._worker_kill_hint(killed, None) == (
        " (by the kernel's out-of-memory killer: the processes here asked for more memory than the host had; set "
        "data.workers lower, or give the job more memory)"
    )
    monkeypatch.setattr(launch, "killed_for_memory", lambda before, after: False)
    assert launch._worker_kill_hint(killed, None) == (
        " (not by the kernel's out-of-memory killer: by the scheduler, a user or another process)"
    )
    monkeypatch.setattr(launch, "killed_for_memory", lambda before, after: None)  # the kernel keeps no count
    assert launch._worker_kill_hint(killed, None) == ""
    monkeypatch.setattr(launch, "killed_for_memory", lambda before, after: True)
    assert (
        launch._worker_kill_hint(
            RuntimeError("DataLoader worker (pid 4321) is killed by signal: Segmentation fault. "), None
        )
        == ""
    )
    assert launch._worker_kill_hint(ValueError("a bad volume"), None) == ""


def test_a_stop_while_mpi_starts_ends_the_rank_and_the_handlers_come_back(monkeypatch):
    """MPI_Init holds the interpreter: a stop request's handler only noted SIGTERM there, and a rank waiting for a
    task that had failed outlived srun's SIGTERM until SLURM's SIGKILL (46 s, exit 137 on the real SLURM)."""
    import types

    from fedmpi.launch import ENDING_IN_MPI_INIT, init_mpi

    during = {}

    def mpi_starts(name):  # `from mpi4py import MPI`, which starts MPI
        during.update({sig: signal.getsignal(sig) for sig in (*ENDING_IN_MPI_INIT, signal.SIGUSR1)})
        return types.SimpleNamespace(COMM_WORLD=types.SimpleNamespace(Get_rank=lambda: 0))

    fake = types.ModuleType("mpi4py")
    fake.__getattr__ = mpi_starts  # type: ignore[method-assign]
    monkeypatch.setitem(sys.modules, "mpi4py", fake)

    def noted(signum, frame):
        pass

    previous = {sig: signal.signal(sig, noted) for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)}
    try:
        init_mpi(30.0)
        assert {sig: during[sig] for sig in (signal.SIGTERM, signal.SIGINT)} == {
            signal.SIGTERM: signal.SIG_DFL,
            signal.SIGINT: signal.SIG_DFL,
        }
        assert during[signal.SIGUSR1] is noted  # the time-limit warning still asks for a checkpoint after round 1
        assert all(signal.getsignal(sig) is noted for sig in previous)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def test_mpi_start_up_leaves_no_alarm_behind_and_restores_the_handler():
    """The start-up alarm must end with MPI_Init: a pending alarm would kill the rank mid-training."""
    from fedmpi.launch import init_mpi

    def handler(signum, frame):
        raise AssertionError("the start-up alarm fired")

    previous = signal.signal(signal.SIGALRM, handler)
    try:
        assert init_mpi(30.0).COMM_WORLD.Get_size() >= 1
        assert signal.getsignal(signal.SIGALRM) is handler
        assert signal.alarm(0) == 0, "an alarm is still pending"
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


@pytest.mark.parametrize(
    "error,traceback", [(RuntimeError("boom"), True), (ConfigError("boom"), False)], ids=["bug", "user error"]
)
def test_a_failure_on_a_lone_rank_is_one_line_naming_the_rank_and_a_bug_shows_its_traceback(
    tmp_path, monkeypatch, capsys, error, traceback
):
    """The centralized baseline runs alone: its failure returns exit 1 (there is no job to abort), and the line
    names the rank and the error; only an error that is not the user's shows a traceback."""
    import fedmpi.launch

    def fail(*args):
        raise error

    monkeypatch.setattr(fedmpi.launch, "_run", fail)
    code = train(None, [f"run.dir={tmp_path}", "federation.algorithm=centralized"])
    err = capsys.readouterr().err
    assert code == EXIT_FAILURE
    assert f"fedmpi: rank 0 (server) failed: {type(error).__name__}: boom" in err
    assert ("Traceback" in err) == traceback


def test_a_rank_that_exits_mid_federation_ends_the_job_naming_itself(monkeypatch, capsys):
    """sys.exit on one rank of a federation (a library's, a stray one) left that rank alive in MPI_Finalize: the
    others saw nothing wrong and waited for it until a round deadline (30 minutes by default). It aborts the job
    now, naming the rank, as any other failure does."""

    def leave(*args):
        sys.exit(0)

    comm, exited = _learner_of_nine(monkeypatch, leave)
    assert train(None, []) == EXIT_FAILURE
    assert comm.aborted == EXIT_FAILURE
    # an MPI_Abort that returns (MPICH 5 under srun's pmi2) must not lead to MPI_Finalize, which waited for ever
    assert exited == [EXIT_FAILURE]
    err = capsys.readouterr().err
    assert "fedmpi: rank 2 (learner 2) exited (SystemExit: 0) before the federation ended" in err
    assert "Traceback" not in err

    # alone (the centralized baseline), an exit is the process's own business
    monkeypatch.setattr(_Comm, "Get_size", lambda self: 1)
    monkeypatch.setattr(_Comm, "Get_rank", lambda self: 0)
    with pytest.raises(SystemExit):
        train(None, ["federation.algorithm=centralized"])


@pytest.mark.mpi(min_size=3)
def test_the_rank_table_names_every_rank_and_each_rank_watches_the_others_on_its_host(monkeypatch):
    """announce_ranks: every rank learns each rank's pid and host; a rank watches only the other ranks on its own
    host, and its local rank counts the ranks on that host (here rank 0 alone on host a, the learners on b)."""
    import socket

    import numpy as np
    from mpi4py import MPI

    from fedmpi.launch import announce_ranks
    from fedmpi.wire import Wire

    comm = MPI.COMM_WORLD
    pids_buffer = np.zeros(comm.Get_size(), np.int64)
    comm.Allgather(np.array([os.getpid()], np.int64), pids_buffer)
    pids = pids_buffer.tolist()
    hosts = ["a" if r == 0 else "b" for r in range(comm.Get_size())]
    monkeypatch.setattr(socket, "gethostname", lambda: hosts[comm.Get_rank()])
    wire = Wire(comm)
    local_rank, local_size = announce_ranks(wire)
    assert [(t["rank"], t["pid"], t["host"]) for t in wire.table] == list(zip(range(comm.Get_size()), pids, hosts))
    if wire.is_server:
        assert (local_rank, local_size, wire.peers) == (0, 1, {})
    else:
        others = {r: pids[r] for r in range(1, comm.Get_size()) if r != wire.rank}
        assert (local_rank, local_size, wire.peers) == (wire.rank - 1, comm.Get_size() - 1, others)
    comm.Barrier()


def test_each_learner_weighs_its_model_by_its_own_share_of_the_samples(tmp_path, monkeypatch):
    """The session broadcast gives every learner's sample count; learner k takes the k-th share (unequal counts
    here, so that a learner taking another's share is seen)."""
    import numpy as np

    import fedmpi.data
    import fedmpi.learner
    from fedmpi.launch import _learn, learner_startup_patience
    from fedmpi.startup import StartClock

    class LearnerStandIn:
        def __init__(self, cfg, wire, data, device):
            self.ran = False
            learners.append(self)

        def run(self):
            self.ran = True

        def warm_up(self):
            self.warmed = True

    class Volumes:
        def warm(self):
            return self

    class SessionStandIn:
        learners, next_patience, size, is_server = 2, None, 3, False

        def __init__(self, rank):
            self.rank = rank

        def bcast(self, buf, what="", patience=None):
            self.session_patience = patience
            return np.array([0.0, 10.0, 30.0])  # start round, learner 1's and learner 2's samples

        def gather(self, buf, out, what="", patience=None):
            self.gathered = (buf, out, what)

        def end_learner(self):
            self.ended = True  # the farewell and the server's final word, after the rounds

    learners: list = []
    monkeypatch.setattr(fedmpi.learner, "Learner", LearnerStandIn)
    monkeypatch.setattr(fedmpi.data, "open_volumes", lambda *args: Volumes())
    cfg = _cfg(tmp_path, "federation.algorithm=fedavg")
    for rank, share in ((1, 0.25), (2, 0.75)):
        wire = SessionStandIn(rank)
        assert _learn(cfg, wire, tmp_path, "cpu", StartClock()) == 0
        assert learners[-1].weight == pytest.approx(share) and learners[-1].ran and wire.ended
        assert learners[-1].warmed and wire.gathered[1:] == (None, "the start-up times")
        assert wire.next_patience == cfg.run.round_timeout + learner_startup_patience(cfg.run.startup_timeout)
        assert wire.session_patience == wire.next_patience  # the session comes once the slowest learner is ready


def test_the_synthetic_cohorts_split_problems_name_this_configurations_options(tmp_path, capsys):
    """They named preprocess's flags (--test-fraction, --learners), and the learner-count rule came only after
    MPI had started, from rank 0's cohort build."""
    import types

    with pytest.raises(ConfigError, match=r"federation\.learners must be even \(got 3\)"):
        load_config(overrides=["data.distribution=uniform-noniid", "federation.learners=3"])
    assert load_config(overrides=["data.distribution=uniform-noniid", "federation.learners=3", "data.dir=/x"])
    cfg = load_config(
        overrides=[f"data.cache_dir={tmp_path}", "data.subjects=20", "data.test_fraction=0.01", "data.voxel=6"]
    )
    assert launch.prepare_data(cfg, types.SimpleNamespace(rank=0, size=1)) is None
    assert capsys.readouterr().err.startswith(
        "fedmpi: error: the synthetic cohort (data.dir empty): data.test_fraction 0.01 holds out no subject"
    )


def test_a_data_cache_dir_under_a_file_is_one_line_not_a_traceback(tmp_path, capsys):
    """make_dirs' NotADirectoryError went up as rank 0's `failed:` with a traceback, exit 1."""
    import types

    (tmp_path / "afile").touch()
    cfg = load_config(overrides=[f"data.cache_dir={tmp_path / 'afile'}", "data.subjects=20", "data.voxel=6"])
    assert launch.prepare_data(cfg, types.SimpleNamespace(rank=0, size=1)) is None
    err = capsys.readouterr().err
    assert err.startswith("fedmpi: error: data.cache_dir: cannot write the synthetic cohort ") and err.count("\n") == 1
    assert "afile is a file, not a directory" in err


def test_the_launcher_is_the_venvs_mpirun_else_the_one_on_path(tmp_path, monkeypatch):
    (tmp_path / "bin").mkdir()
    monkeypatch.setattr(sys, "executable", str(tmp_path / "bin" / "python"))
    assert launch.default_mpirun() == "mpirun"  # a venv set up for the site's MPI has none of its own
    (tmp_path / "bin" / "mpirun").touch()
    assert launch.default_mpirun() == str(tmp_path / "bin" / "mpirun")


@pytest.mark.slow
def test_a_synthetic_cohort_the_configuration_cannot_give_is_a_usage_error_on_every_rank(tmp_path):
    """The test fraction's check needs the cohort's ages, so it comes after MPI has started: it was rank 0's
    `failed: ConfigError` and an MPI Abort, exit 1, where a bad configuration value exits 2 (README)."""
    from fedtools import run_fedmpi

    cohort = ["data.dir=", f"data.cache_dir={tmp_path / 'data'}", "data.subjects=20", "data.voxel=6"]
    for launched, sets in ((True, ()), (False, ("federation.algorithm=centralized",))):
        proc = run_fedmpi(tmp_path, tmp_path / "runs", *cohort, "data.test_fraction=0.01", *sets, mpirun=launched)
        assert proc.returncode == EXIT_USAGE, proc.stdout + proc.stderr
        said = "fedmpi: error: the synthetic cohort (data.dir empty): data.test_fraction 0.01 holds out no subject"
        ours = [line for line in proc.stderr.splitlines() if line.startswith("fedmpi")]  # Open MPI's mpirun adds more
        assert proc.stderr.startswith(said) and len(ours) == 1, proc.stderr


class TableWire:
    """Plays the rank table's exchange for one rank of three: the server's gathers bring `pids` and `hosts`, a
    learner's broadcasts do; the broadcasts are noted."""

    size = 3

    def __init__(self, rank, pids, hosts):
        self.rank, self.is_server, self.pids, self.hosts = rank, rank == 0, pids, hosts
        self.peers, self.table, self.sent = {}, [], []

    def _fill(self, buf):
        from fedmpi.messages import text_row

        buf[:] = self.pids if buf.ndim == 1 else [text_row(h, buf.shape[1]) for h in self.hosts]

    def gather(self, buf, out, what=""):
        if out is not None:
            self._fill(out)

    def bcast(self, buf, what=""):
        if self.is_server:
            self.sent.append(what)
        else:
            self._fill(buf)
        return buf


@pytest.mark.parametrize("rank", [0, 1])
@pytest.mark.parametrize("pid", [0, -1, 2**22 + 1, 2**63 - 1])
def test_a_pid_no_process_can_have_in_the_rank_table_is_refused_naming_its_rank(monkeypatch, rank, pid):
    """The liveness check signals the pids of the ranks on its host: 2**63 - 1 was an OverflowError there (os.kill),
    0 or -1 would signal a process group. The server refuses the table before it goes out; a learner refuses one
    the server sent."""
    from fedmpi.launch import announce_ranks

    monkeypatch.setattr(socket, "gethostname", lambda: "a")
    wire = TableWire(rank, [os.getpid(), os.getpid() + 1, pid], ["a", "a", "a"])
    with pytest.raises(PayloadError, match=rf"^rank 2 \(learner 2\) announced pid {pid} in the rank table: "):
        announce_ranks(wire)
    assert wire.sent == [] and wire.peers == {}
    wire = TableWire(rank, [os.getpid(), os.getpid() + 1, launch.PID_MAX], ["a", "a", "a"])
    announce_ranks(wire)
    assert wire.peers[2] == launch.PID_MAX  # the largest pid Linux gives is one


def test_the_server_keeps_every_ranks_start_up_and_waits_for_the_learners_a_rounds_time(tmp_path, capsys, monkeypatch):
    """all_ready: the learners' phases reach ranks.json beside the rank table, the last rank's in one line, and the
    server waits for them with the patience it is given (run.round_timeout: decoding and cuDNN's search can take
    longer than run.startup_timeout)."""
    import json

    import fedmpi.startup
    from fedmpi.launch import all_ready
    from fedmpi.startup import StartClock

    class ServerStandIn:
        size, is_server = 3, True

        def __init__(self):
            roles = ["server", "learner 1", "learner 2"]
            self.table = [{"rank": r, "role": role, "pid": 100 + r, "host": "h"} for r, role in enumerate(roles)]

        def gather(self, buf, out, what="", patience=None):
            self.waited = (what, patience)
            out[0] = buf
            out[1] = [0.5, 0.5, 0.5, 0.25, 2.0, 0.25, 4.0]
            out[2] = [0.5, 0.5, 0.5, 0.25, 1.0, 0.25, 1.0]
            return out

    wire = ServerStandIn()
    monkeypatch.setattr(fedmpi.startup, "process_age", lambda: 0.0)  # the server ready at once, before learner 1
    clock = StartClock()
    clock.mark("imports")
    assert all_ready(wire, clock, 1800.0, tmp_path) == 8.0
    assert wire.waited == ("the start-up times", 1800.0)
    ranks = json.loads((tmp_path / "ranks.json").read_text())
    assert [r["pid"] for r in ranks] == [100, 101, 102]
    assert ranks[1]["startup"] == {
        "imports": 0.5, "mpi": 0.5, "prepare": 0.5, "preflight": 0.25, "volumes": 2.0, "model": 0.25, "warm_up": 4.0,
        "ready": 8.0,
    }  # fmt: skip
    assert ranks[0]["startup"]["warm_up"] == 0.0 and ranks[0]["startup"]["ready"] < 1
    assert capsys.readouterr().out == (
        "fedmpi: every rank ready after 8.0 s; the last, learner 1: imports 0.5, mpi 0.5, prepare 0.5, preflight 0.2, "
        "volumes 2.0, model 0.2, warm_up 4.0 s\n"
    )
