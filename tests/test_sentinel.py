"""The per-rank supervisor: names the rank that a signal killed, passes exit codes and signals through."""

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from fedtools import memory_cgroup, remove_cgroup

from fedmpi import hostmemory, sentinel
from fedmpi.hostmemory import oom_kills
from fedmpi.sentinel import (
    RANK_VARIABLES,
    SIZE_VARIABLES,
    first_task,
    launcher_rank,
    launcher_size,
    mpi_world,
    slurm_step,
    supervise,
)

HYDRA = "MPI_LOCALNRANKS"  # set by hydra's proxy for its tasks, and by no other launcher
linux = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the supervisor forks on Linux only")


@pytest.fixture
def no_rank(monkeypatch):
    for name in RANK_VARIABLES + SIZE_VARIABLES + ("SLURM_NTASKS", "PMIX_NAMESPACE", "SLURM_STEP_ID", HYDRA):
        monkeypatch.delenv(name, raising=False)


@pytest.mark.parametrize("name", ["PMI_RANK", "OMPI_COMM_WORLD_RANK", "PMIX_RANK", "SLURM_PROCID"])
def test_launcher_rank_reads_each_variable(monkeypatch, no_rank, name):
    monkeypatch.setenv(name, "4")
    assert launcher_rank() == "4"


def test_launcher_rank_none_without_variables(no_rank):
    assert launcher_rank() is None


def test_launcher_rank_prefers_the_mpi_variable(monkeypatch, no_rank):
    """Under srun + MPI both are set; the MPI rank is the one the job reports."""
    monkeypatch.setenv("SLURM_PROCID", "0")
    monkeypatch.setenv("PMI_RANK", "2")
    assert launcher_rank() == "2"


@pytest.mark.parametrize("name", ["PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "SLURM_STEP_NUM_TASKS"])
def test_launcher_size_reads_each_variable(monkeypatch, no_rank, name):
    monkeypatch.setenv(name, "9")
    assert launcher_size() == 9


def test_launcher_size_is_a_steps_not_the_batch_scripts(monkeypatch, no_rank):
    """A batch script's environment holds the allocation's SLURM_NTASKS (and SLURM_PROCID=0) but no step's
    size: the centralized baseline started there without srun is alone by design."""
    monkeypatch.setenv("SLURM_NTASKS", "9")
    monkeypatch.setenv("SLURM_PROCID", "0")
    assert launcher_size() is None
    monkeypatch.setenv("SLURM_STEP_NUM_TASKS", "9")
    monkeypatch.setenv("PMI_SIZE", "3")  # an mpirun inside the step: its own count
    assert launcher_size() == 3


@pytest.mark.parametrize("name", ["PMI_SIZE", "OMPI_COMM_WORLD_SIZE"])
def test_the_mpi_world_is_what_the_launcher_set_up_for_mpi(monkeypatch, no_rank, name):
    monkeypatch.setenv(name, "3")
    assert mpi_world() == 3


def test_the_mpi_world_under_pmix_is_the_steps_and_none_without_an_mpi_plugin(monkeypatch, no_rank):
    """srun --mpi=pmix names no size (the step's tasks are it); srun --mpi=none sets up no MPI job at all, so each
    task's MPI starts alone, as does any command run with no launcher."""
    assert mpi_world() is None
    monkeypatch.setenv("SLURM_STEP_NUM_TASKS", "4")
    assert mpi_world() is None
    monkeypatch.setenv("PMIX_NAMESPACE", "slurm.pmix.32.0")
    assert mpi_world() == 4


def test_counts_that_disagree_say_nothing(monkeypatch, no_rank):
    """Open MPI's mpirun, or srun --mpi=pmix, started from a shell of a one-task pmi2 step: PMI_SIZE=1 is that
    step's, left behind; the job's MPI forms a world of 9."""
    monkeypatch.setenv("PMI_SIZE", "1")
    monkeypatch.setenv("OMPI_COMM_WORLD_SIZE", "9")
    assert mpi_world() is None
    monkeypatch.delenv("OMPI_COMM_WORLD_SIZE")
    monkeypatch.setenv("PMIX_NAMESPACE", "slurm.pmix.40.0")
    monkeypatch.setenv("SLURM_STEP_NUM_TASKS", "9")
    assert mpi_world() is None
    monkeypatch.setenv("PMI_SIZE", "9")
    assert mpi_world() == 9


def test_the_slurm_step_is_named_only_inside_one_that_holds_cpus(monkeypatch, no_rank):
    monkeypatch.setenv("SLURM_JOB_ID", "27")  # a batch script or salloc's shell: a job, no step
    assert slurm_step() is None
    monkeypatch.setenv("SLURM_STEP_ID", "0")
    assert slurm_step() == "27.0"
    monkeypatch.setenv("SLURM_STEP_ID", "4294967290")  # salloc's shell as the interactive step (use_interactive_step)
    assert slurm_step() is None


def test_a_task_that_hydra_started_inside_slurm_is_in_no_step_of_its_own(monkeypatch, no_rank):
    """mpirun in a batch script starts its proxies with srun: its tasks inherit the proxies' step (SLURM_STEP_ID=0,
    SLURM_PROCID=0 for every task on the node, seen with MPICH 5.0), but MPI is set up by hydra, for all its ranks."""
    monkeypatch.setenv("SLURM_JOB_ID", "27")
    monkeypatch.setenv("SLURM_STEP_ID", "0")
    monkeypatch.setenv(HYDRA, "3")
    assert slurm_step() is None


def test_the_first_task_is_the_one_no_launcher_variable_says_otherwise_of(monkeypatch, no_rank):
    assert first_task()  # no launcher: a lone process
    monkeypatch.setenv("PMI_RANK", "0")  # a pmi2 step's, left in its shell
    monkeypatch.setenv("OMPI_COMM_WORLD_RANK", "2")  # Open MPI's mpirun started from there
    assert not first_task()
    monkeypatch.setenv("OMPI_COMM_WORLD_RANK", "0")
    assert first_task()
    monkeypatch.setenv("SLURM_PROCID", "1")
    assert not first_task()


def test_supervise_leaves_a_rank_it_cannot_read_alone(monkeypatch, no_rank):
    monkeypatch.setenv("PMI_RANK", "x")
    monkeypatch.setattr(sentinel.os, "fork", refuse_fork)
    assert supervise() is None


def refuse_fork():
    raise AssertionError("supervise() forked")


def test_supervise_returns_without_rank(monkeypatch, no_rank):
    monkeypatch.setattr(sentinel.os, "fork", refuse_fork)
    pid = os.getpid()
    assert supervise() is None
    assert os.getpid() == pid


def test_supervise_can_be_turned_off(monkeypatch):
    monkeypatch.setenv("PMI_RANK", "2")
    monkeypatch.setenv("FEDMPI_SENTINEL", "0")
    monkeypatch.setattr(sentinel.os, "fork", refuse_fork)
    pid = os.getpid()
    sentinel.supervise()
    assert os.getpid() == pid


def test_supervise_returns_off_linux(monkeypatch, no_rank):
    monkeypatch.setenv("PMI_RANK", "1")
    monkeypatch.setattr(sentinel.os, "fork", refuse_fork)
    monkeypatch.setattr(sentinel.sys, "platform", "darwin")
    assert supervise() is None


def run_supervised(code, rank, *args, timeout=30, preexec_fn=None, **env):
    """`code` run as the rank under its sentinel; `env` adds variables (None removes one); `preexec_fn` runs in
    the child before Python starts (to place it in a cgroup)."""
    env = {k: v for k, v in {**rank_env(rank), **env}.items() if v is not None}
    return subprocess.run(
        [sys.executable, "-c", "from fedmpi.sentinel import supervise; supervise()\n" + code, *map(str, args)],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        preexec_fn=preexec_fn,
    )


def rank_env(rank):
    env = {k: v for k, v in os.environ.items() if k not in (*RANK_VARIABLES, HYDRA)}
    env["PMI_RANK"] = str(rank)
    return env


def _pmi_env(rank, fd: socket.socket) -> dict:
    """A task's environment as hydra gives it, its PMI connection on `fd`, outside any SLURM step."""
    env = {**rank_env(rank), "PMI_FD": str(fd.fileno())}
    return {k: v for k, v in env.items() if k not in ("SLURM_STEP_ID", "SLURM_JOB_ID")}


def _supervised_with_pmi(rank: int, code: str, stderr=subprocess.DEVNULL, **env):
    """`code` as task `rank` under its sentinel, its PMI connection a socketpair whose other end is returned; `env`
    adds variables."""
    ours, theirs = socket.socketpair()
    proc = subprocess.Popen(
        [sys.executable, "-c", "from fedmpi.sentinel import supervise; supervise()\n" + code],
        env={**_pmi_env(rank, theirs), **env},
        pass_fds=(theirs.fileno(),),
        stderr=stderr,
        text=True,
    )
    theirs.close()
    ours.settimeout(60)
    return proc, ours


def _ends_as_asked(
    proc, ours: socket.socket, code: int, reply=b"cmd=response_to_init rc=0 pmi_version=1 pmi_subversion=2\n"
):
    """The stand-in PMI server answers the sentinel's init with `reply` (hydra 5.0.2's by default) and is asked to
    end the job with the task's exit code, which the task then ends with."""
    assert ours.recv(256).startswith(b"cmd=init")
    ours.sendall(reply)
    assert ours.recv(256) == f"cmd=abort exitcode={code}\n".encode()
    assert proc.wait(timeout=30) == code


@linux
def test_killed_rank_is_named():
    out = run_supervised("import os, signal; os.kill(os.getpid(), signal.SIGKILL)", 3)
    assert out.returncode == 128 + 9
    assert "fedmpi: rank 3 (learner 3, pid " in out.stderr
    assert "was killed by SIGKILL" in out.stderr
    if oom_kills() == (None, None):  # the kernel says nothing of its out-of-memory killer: the generic hint
        assert "(out of memory, or killed by the scheduler or a user)" in out.stderr
    else:  # killed by a signal, not for memory
        assert "(not by the kernel's out-of-memory killer: by the scheduler, a user or another process)" in out.stderr


def test_a_kill_hint_says_what_the_kernels_counts_tell(monkeypatch):
    assert sentinel._kill_hint(None) == sentinel.HINTS[signal.SIGKILL]
    assert sentinel._kill_hint(False).startswith(" (not by the kernel's out-of-memory killer")
    monkeypatch.setattr(hostmemory, "memory_limit", lambda: 4 * 10**9)
    hint = sentinel._kill_hint(True)
    assert hint.startswith(" (by the kernel's out-of-memory killer: the processes here asked for more memory than its ")
    assert "memory cgroup's limit of 4 GB = 3,815 MiB (a SLURM job's --mem, a container's) allowed; set data." in hint
    monkeypatch.setattr(hostmemory, "memory_limit", lambda: None)
    assert "more memory than the host had; set data.cache=off" in sentinel._kill_hint(True)


@linux
def test_a_rank_the_kernel_kills_for_memory_is_named_so(tmp_path):
    """A rank in a memory cgroup of 300 MB (as a SLURM job's --mem makes) that allocates 1 GB: the OOM killer's
    SIGKILL, told from a scheduler's or a user's by the kernel's counts. Needs a writable memory cgroup (root)."""
    group = memory_cgroup(tmp_path, 300 << 20)
    code = "import numpy as np; blocks = [np.ones(1 << 24) for _ in range(16)]"  # 16 x 128 MB, touched
    try:
        out = run_supervised(code, 2, preexec_fn=lambda: (group / "cgroup.procs").write_text(str(os.getpid())))
    finally:
        remove_cgroup(group)
    assert out.returncode == 128 + 9, out.stderr
    assert "fedmpi: rank 2 (learner 2, pid " in out.stderr
    assert (
        "by the kernel's out-of-memory killer: the processes here asked for more memory than its memory " in out.stderr
    )
    assert "cgroup's limit of 315 MB = 300 MiB" in out.stderr


@linux
def test_killed_server_is_named_with_child_pid():
    code = "import os, signal; print(os.getpid(), os.getppid(), flush=True); os.kill(os.getpid(), signal.SIGSEGV)"
    out = run_supervised(code, 0)
    assert out.returncode == 128 + signal.SIGSEGV
    child, parent = map(int, out.stdout.split())
    assert child != parent  # the code after supervise() ran in a forked child
    assert f"fedmpi: rank 0 (server, pid {child}) was killed by SIGSEGV (a crash in native code)" in out.stderr


@linux
def test_the_rank_mpi_numbers_names_the_dead_rank_over_a_stale_launcher_variable():
    """Open MPI's mpirun started from a shell of a pmi2 srun step: every rank inherits PMI_RANK=0."""
    code = (
        "import os, signal; from fedmpi.sentinel import tell_rank; tell_rank(2); os.kill(os.getpid(), signal.SIGKILL)"
    )
    out = run_supervised(code, 0)
    assert out.returncode == 128 + 9
    assert "fedmpi: rank 2 (learner 2, pid " in out.stderr


@linux
def test_a_rank_dead_before_mpi_is_named_by_the_launcher_even_if_a_fork_holds_the_pipe():
    """A fork of the rank (a data-loader worker) keeps the pipe open unwritten: the sentinel must not wait on it."""
    code = (
        "import os, signal, time\n"
        "if os.fork() == 0:\n    os.close(1)\n    os.close(2)\n    time.sleep(16)\n    os._exit(0)\n"
        "os.kill(os.getpid(), signal.SIGKILL)"
    )
    started = time.monotonic()
    out = run_supervised(code, 3, timeout=60)
    assert out.returncode == 128 + 9 and "fedmpi: rank 3 (learner 3, pid " in out.stderr
    assert time.monotonic() - started < 15  # named at once, not when the fork ends


@linux
def test_a_start_up_alarm_inside_a_slurm_step_names_the_inherited_set_up():
    """A federation typed in a shell of a multi-task srun step, with as many tasks as it needs ranks, passes the
    count checks and waits in MPI_Init for the step's other tasks (shells) until the start-up alarm."""
    code = "import os, signal; os.kill(os.getpid(), signal.SIGALRM)"
    out = run_supervised(code, 0, SLURM_JOB_ID="50", SLURM_STEP_ID="0")
    assert out.returncode == 128 + signal.SIGALRM
    assert "MPI start-up did not complete" in out.stderr and "(step 50.0)" in out.stderr
    assert "srun --overlap -n N" in out.stderr
    out = run_supervised(code, 0, SLURM_JOB_ID="50", SLURM_STEP_ID=None)  # a batch script: no word of steps
    assert "MPI start-up did not complete" in out.stderr and "srun --overlap" not in out.stderr
    out = run_supervised(code, 0, SLURM_JOB_ID="50", SLURM_STEP_ID="0", **{HYDRA: "3"})  # mpirun in a batch script
    assert "MPI start-up did not complete" in out.stderr and "srun --overlap" not in out.stderr
    # a task that refused a configuration of its own exits before MPI starts, and only the first task prints
    assert "refused its own configuration there, which only the launcher's first task prints" in out.stderr


@linux
def test_normal_exit_code_passes_through_silently():
    """A rank that ends once MPI is up (it told its sentinel its rank) ends as it says; MPI's launcher ends the job."""
    out = run_supervised(
        "import sys; from fedmpi.sentinel import tell_rank; tell_rank(2); print('done'); sys.exit(5)", 2
    )
    assert out.returncode == 5
    assert out.stdout == "done\n"
    assert out.stderr == ""


@linux
@pytest.mark.parametrize("rank", [0, 2])
def test_a_task_that_fails_before_mpi_asks_hydra_to_end_the_job(rank):
    """MPICH's hydra never tells tasks waiting in MPI_Init that another ended before it (pmodels/mpich#6124): the
    sentinel asks it to end the job over the task's PMI_FD, in PMI-1's text lines, here answered by a stand-in
    server. A task other than the first says why first: only the first prints a configuration error."""
    proc, ours = _supervised_with_pmi(rank, "import sys; sys.exit(5)", stderr=subprocess.PIPE)
    assert ours.recv(256) == b"cmd=init pmi_version=1 pmi_subversion=1\n"
    ours.sendall(b"cmd=response_to_init rc=0 pmi_version=1 pmi_subversion=1\n")
    assert ours.recv(256) == b"cmd=abort exitcode=5\n"
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 5
    if rank == 0:
        assert err == ""
    else:
        assert err.startswith(f"fedmpi: task {rank} (pid ") and "ended with exit code 5 before MPI started" in err


@linux
@pytest.mark.parametrize(
    "reply",
    [
        b"cmd=response_to_init pmi_version=1 pmi_subversion=1 rc=0\n",  # hydra before MPICH 4.1, gforker: rc last
        b"cmd=response_to_init rc=0 pmi_version=1 pmi_subversion=2\n",  # hydra 5.0.2, as seen with mpirun -v
    ],
)
def test_the_init_reply_is_read_by_its_fields(reply):
    """MPICH's PMI servers put rc=0 at either end of the reply: an older hydra's job was never asked to end."""
    proc, ours = _supervised_with_pmi(0, "import sys; sys.exit(4)")
    _ends_as_asked(proc, ours, 4, reply)


@linux
def test_a_reply_the_dead_rank_was_waiting_for_is_passed_over():
    """A rank killed inside MPI_Init between a PMI get and its result (hydra's -v trace shows such gets answered by
    mpiexec there) leaves the result unread: it came before the reply to the sentinel's init, and no end was asked
    (hydra then ended the job when the sentinel closed the connection, with exit code 9, not the task's)."""
    proc, ours = _supervised_with_pmi(0, "import sys; sys.exit(137)")
    ours.sendall(b"cmd=get_result rc=1\n")  # unread by the rank
    _ends_as_asked(proc, ours, 137)


@linux
def test_a_task_other_than_the_first_waits_longer_the_longer_its_own_start_took():
    """The first task does the same work before the same verdict, and may start later or import slower on its node:
    with a fixed 2 s, a first task 3 s behind was ended by this task's abort before it printed the real error, and
    this task's line wrongly blamed its own configuration (seen with `sleep 8` before the first task's command)."""
    start = time.monotonic()
    proc, ours = _supervised_with_pmi(2, "import sys, time\ntime.sleep(1.5); sys.exit(2)")
    assert ours.recv(256).startswith(b"cmd=init")
    assert time.monotonic() - start >= 1.5 + sentinel.OTHERS_GRACE + 2 * 1.5
    ours.close()
    assert proc.wait(timeout=30) == 2


@linux
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGUSR1])
def test_a_stop_request_during_the_grace_ends_the_job_at_once(sig):
    """mpirun's Ctrl-C reaches the sentinel while it waits its grace: it was forwarded to the reaped rank and the grace
    ran on (the job ended 15 s after a Ctrl-C, as the tasks in MPI_Init cannot act on it). It ends the grace, which
    here would last past 3 + 2 + 2 x 3 = 11 s, and the task's line is still said (SLURM's time-limit warning, too,
    is no sign that the first task said why)."""
    start = time.monotonic()
    proc, ours = _supervised_with_pmi(2, "import sys, time\ntime.sleep(3); sys.exit(2)", stderr=subprocess.PIPE)
    time.sleep(4)  # the rank has ended; its sentinel waits its grace
    proc.send_signal(sig)
    assert ours.recv(256).startswith(b"cmd=init")
    assert time.monotonic() - start < 9
    ours.sendall(b"cmd=response_to_init rc=0 pmi_version=1 pmi_subversion=1\n")
    assert ours.recv(256) == b"cmd=abort exitcode=2\n"
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 2 and "ended with exit code 2 before MPI started" in err


@linux
def test_a_step_ended_by_its_launcher_during_the_grace_blames_no_task():
    """srun --kill-on-bad-exit ends the step with SIGTERM once the first task has printed its configuration error
    (a config file name mistyped in a real sbatch): the other tasks, which failed alike, each said that their own
    configuration differed from the first's."""
    start = time.monotonic()
    proc, ours = _supervised_with_pmi(
        2, "import sys, time\ntime.sleep(3); sys.exit(2)", stderr=subprocess.PIPE, SLURM_JOB_ID="8", SLURM_STEP_ID="0"
    )
    time.sleep(4)  # the rank has ended; its sentinel waits its grace
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=30)
    assert (proc.returncode, err) == (2, "")
    assert time.monotonic() - start < 9
    assert ours.recv(256) == b""  # and nothing said to srun's pmi2


@linux
def test_a_task_that_said_why_it_ends_is_not_said_again():
    """A task that cannot read the configuration file says so itself (once per host) and tells its sentinel."""
    code = "import sys; from fedmpi.sentinel import tell_said; print('task 2 on vm: config file not found', "
    code += "file=sys.stderr); tell_said(); sys.exit(2)"
    out = run_supervised(code, 2, SLURM_STEP_ID="3")  # inside an srun step: no PMI-1 to speak
    assert out.returncode == 2 and out.stderr == "task 2 on vm: config file not found\n"


@linux
def test_a_task_of_mpirun_inside_a_slurm_job_asks_hydra_to_end_the_job():
    """mpirun in a batch script starts hydra's proxies with srun, so its tasks carry that step's variables, but their
    PMI_FD is hydra's: the job waited in MPI_Init for the start-up alarm (600 s in a real sbatch, a task of an MPMD
    launch refusing its own configuration; 10 s once asked)."""
    proc, ours = _supervised_with_pmi(0, "import sys; sys.exit(3)", SLURM_JOB_ID="8", SLURM_STEP_ID="0", **{HYDRA: "3"})
    _ends_as_asked(proc, ours, 3)


@linux
def test_nothing_is_said_to_the_pmi_of_an_srun_step():
    """srun --mpi=pmi2 sets PMI_FD too, for its own protocol; its --kill-on-bad-exit ends the step."""
    proc, ours = _supervised_with_pmi(0, "import sys; sys.exit(3)", SLURM_JOB_ID="8", SLURM_STEP_ID="1")
    assert proc.wait(timeout=30) == 3
    assert ours.recv(256) == b""  # closed with nothing sent


@linux
def test_no_end_is_asked_of_a_launcher_that_does_not_answer_as_pmi_1():
    """srun's pmi2 speaks another protocol: nothing but the init line goes out, and the exit code passes through."""
    proc, ours = _supervised_with_pmi(0, "import sys; sys.exit(7)")
    assert ours.recv(256).startswith(b"cmd=init")
    ours.sendall(b"000028cmd=response_to_init;rc=1;")
    assert proc.wait(timeout=30) == 7
    assert ours.recv(256) == b""  # closed, with no abort sent


@linux
def test_clean_exit_is_zero():
    out = run_supervised("pass", 1)
    assert (out.returncode, out.stderr) == (0, "")


def wait_for(predicate, timeout=15.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return False


def catches(pid, sig):
    """True once process `pid` has a Python handler installed for `sig` (SigCgt in /proc)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    caught = int(next(ln.split()[1] for ln in status.splitlines() if ln.startswith("SigCgt:")), 16)
    return bool(caught >> (sig - 1) & 1)


def gone(pid):
    """True once `pid` no longer exists or is a zombie nobody reaped yet."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return True
    return "\nState:\tZ" in status


CHILD_WAITS = """
import os, signal, sys, time
from pathlib import Path
def stop(signum, frame):
    Path(sys.argv[1]).write_text(signal.Signals(signum).name)
    os._exit(0)
signal.signal(signal.SIGTERM, stop)
signal.signal(signal.SIGUSR1, stop)
Path(sys.argv[2]).write_text(str(os.getpid()))
time.sleep(30)
"""


@linux
@pytest.mark.parametrize("sig, rank", [(signal.SIGTERM, 5), (signal.SIGUSR1, 0)])
def test_a_signal_is_forwarded_to_the_rank_as_itself(tmp_path, sig, rank):
    """SIGTERM ends a job; SIGUSR1 is SLURM's warning before the time limit, which asks the server to
    checkpoint: each must reach the rank as itself."""
    got, ready = tmp_path / "got", tmp_path / "ready"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "from fedmpi.sentinel import supervise; supervise()\n" + CHILD_WAITS,
            str(got),
            str(ready),
        ],
        env=rank_env(rank),
        stderr=subprocess.PIPE,
        text=True,
    )
    child = None
    try:
        assert wait_for(lambda: ready.exists() and ready.read_text() and catches(proc.pid, sig))
        child = int(ready.read_text())
        assert child != proc.pid
        proc.send_signal(sig)
        assert proc.wait(timeout=15) == 0
    finally:
        proc.kill()
        proc.wait()
        if child is not None and not gone(child):
            os.kill(child, signal.SIGKILL)
    assert got.read_text() == sig.name
    assert proc.stderr.read() == ""


CHILD_IN_MPI_INIT = """
import os, signal, sys, time
from pathlib import Path
signal.signal(signal.SIGTERM, signal.SIG_DFL)  # as launch.init_mpi leaves it while MPI starts
Path(sys.argv[1]).write_text(str(os.getpid()))
time.sleep(30)
"""


def _signalled_once_ready(child: str, sig: signal.Signals, ready: Path, env: dict, pass_fds=()) -> tuple[int, str]:
    """`child` (which writes its pid to `ready`) run as a rank under its sentinel and sent `sig` once the sentinel
    takes it: the sentinel's exit code and stderr."""
    proc = subprocess.Popen(
        [sys.executable, "-c", "from fedmpi.sentinel import supervise; supervise()\n" + child, str(ready)],
        env=env,
        pass_fds=pass_fds,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert wait_for(lambda: ready.exists() and ready.read_text() and catches(proc.pid, sig))
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=15)
    finally:
        proc.kill()
        proc.wait()
    return proc.returncode, err


@linux
def test_a_rank_ended_in_mpi_init_by_a_stop_passed_on_is_not_news(tmp_path):
    """srun --kill-on-bad-exit sends SIGTERM to every task once one has failed: the ranks waiting in MPI_Init end
    by it, and their sentinels said each "was killed by SIGTERM" after the real error (and asked hydra to end a job
    it was ending already)."""
    ours, theirs = socket.socketpair()
    env = {**_pmi_env(1, theirs), "SLURM_JOB_ID": "8", "SLURM_STEP_ID": "0", HYDRA: "3"}
    with theirs:
        got = _signalled_once_ready(CHILD_IN_MPI_INIT, signal.SIGTERM, tmp_path / "ready", env, (theirs.fileno(),))
    assert got == (128 + signal.SIGTERM, "")
    ours.settimeout(5)
    assert ours.recv(256) == b""  # nothing asked of the launcher


CHILD_PAST_MPI_INIT = """
import os, sys, time
from pathlib import Path
from fedmpi.sentinel import tell_rank
tell_rank(3)  # MPI is up: the stop signals are handled, SIGUSR2 keeps its default action
Path(sys.argv[1]).write_text(str(os.getpid()))
time.sleep(30)
"""


@linux
def test_a_rank_past_mpi_init_ended_by_a_signal_passed_on_is_named(tmp_path):
    """Only a rank still in MPI_Init is ended by a stop on purpose: one that MPI numbers, killed by a forwarded signal
    it does not handle (SIGUSR2: scancel --signal=USR2, kill -USR2 to mpirun), is named, as before."""
    ready = tmp_path / "ready"
    code, err = _signalled_once_ready(CHILD_PAST_MPI_INIT, signal.SIGUSR2, ready, rank_env(3))
    assert code == 128 + signal.SIGUSR2
    assert f"fedmpi: rank 3 (learner 3, pid {ready.read_text()}) was killed by SIGUSR2" in err


@linux
def test_rank_dies_with_its_supervisor(tmp_path):
    ready = tmp_path / "ready"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "from fedmpi.sentinel import supervise; supervise()\n" + CHILD_WAITS,
            str(tmp_path / "got"),
            str(ready),
        ],
        env=rank_env(1),
    )
    child = None
    try:
        assert wait_for(lambda: ready.exists() and ready.read_text())
        child = int(ready.read_text())
        proc.kill()  # SIGKILL cannot be forwarded: PR_SET_PDEATHSIG must take the rank down
        proc.wait(timeout=15)
        assert wait_for(lambda: gone(child))
    finally:
        proc.kill()
        proc.wait()
        if child is not None and not gone(child):
            os.kill(child, signal.SIGKILL)
