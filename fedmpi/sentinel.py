"""Name the rank that died.

A rank killed by SIGKILL (the OOM killer, a scheduler, a user) or crashed by SIGSEGV cannot say
so itself, and MPI launchers report at best a pid (MPICH's hydra may even name a process it killed
during clean-up). So before MPI starts, each rank forks: the child becomes the MPI rank and the
parent only waits for it. When the child dies by a signal, the parent prints which rank it was and
exits with 128 + signal, so the launcher ends the job. The child dies with its parent
(PR_SET_PDEATHSIG), so a launcher's clean-up of the parent never leaves an orphan rank behind.
FEDMPI_SENTINEL=0 turns it off, for a launcher that insists the process it started is the MPI rank.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import socket
import sys
import time

from .errors import EXIT_SIGNAL_BASE
from .hostmemory import OomKills, kill_cause, killed_for_memory, oom_kills

RANK_VARIABLES = ("PMI_RANK", "OMPI_COMM_WORLD_RANK", "PMIX_RANK", "SLURM_PROCID")
LOCAL_RANK_VARIABLES = ("MPI_LOCALRANKID", "OMPI_COMM_WORLD_LOCAL_RANK", "SLURM_LOCALID")  # hydra, Open MPI, srun
SIZE_VARIABLES = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "SLURM_STEP_NUM_TASKS")
FORWARDED = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2, signal.SIGINT)
PR_SET_PDEATHSIG = 1
PMI_PATIENCE = 5.0  # seconds the launcher's PMI server has to answer the sentinel's init
# A task other than the first that failed before MPI waits this many seconds, plus twice as long as its own start took,
# before it says so and ends the job (end_launch): the first task reaches the same verdict after the same work, but may
# start later or import slower on its node, and its own end (with the real error) must come first.
OTHERS_GRACE = 2.0
HINTS = {
    signal.SIGKILL: " (out of memory, or killed by the scheduler or a user)",
    signal.SIGSEGV: " (a crash in native code)",
    signal.SIGBUS: " (a crash in native code, or a file truncated under a memory map)",
    signal.SIGALRM: " (MPI start-up did not complete within run.startup_timeout: another rank of the job has not "
    "started, is stuck before MPI initialisation, or refused its own configuration there, which only the "
    "launcher's first task prints: a node that read another configuration file, other --set options in an MPMD "
    "launch; the launcher's output may name it)",
}


def role(rank: int) -> str:
    """What a rank is, in messages: rank 0 is the server, the others are learners."""
    return "server" if rank == 0 else f"learner {rank}"


def launcher_rank() -> str | None:
    """This task's rank as its launcher's environment says (before MPI starts), or None without a launcher: then
    no sentinel is forked."""
    for name in RANK_VARIABLES:
        if name in os.environ:
            return os.environ[name]
    return None


def first_task() -> bool:
    """Whether no launcher variable names another task than the first: the task that prints a job-wide error
    line. All must agree, because a launcher started from a shell inside an srun step replaces only its own and
    leaves the step's (PMI_RANK=0 for every rank under Open MPI's mpirun there)."""
    return all(os.environ.get(name, "0") == "0" for name in RANK_VARIABLES)


def first_on_host() -> bool:
    """Whether no launcher variable names another task than the first on this host (as first_task, per host)."""
    return all(os.environ.get(name, "0") == "0" for name in LOCAL_RANK_VARIABLES)


def launcher_size() -> int | None:
    """How many tasks the launcher started in this job step (hydra, Open MPI's mpirun, srun), or None when no
    launcher says so: a batch script's own environment names the allocation's tasks, not a step's."""
    for name in SIZE_VARIABLES:
        value = os.environ.get(name, "")
        if value.isdigit():
            return int(value)
    return None


def mpi_world() -> int | None:
    """How many processes this process's MPI will wait for in MPI_Init, as a launcher set it up: PMI_SIZE (hydra,
    srun's pmi2), OMPI_COMM_WORLD_SIZE (Open MPI's mpirun), or under srun's PMIx, which names no size, the step's
    tasks. None: MPI starts alone, or the counts disagree. A command run from a shell that srun started inherits
    that step's variables, and a launcher started from there replaces only its own (Open MPI's mpirun leaves
    PMI_SIZE as it was): a count that others contradict is stale, so nothing is said."""
    pmix = ("SLURM_STEP_NUM_TASKS",) if "PMIX_NAMESPACE" in os.environ else ()
    counts = {
        int(v) for name in ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", *pmix) if (v := os.environ.get(name, "")).isdigit()
    }
    return counts.pop() if len(counts) == 1 else None


SPECIAL_STEPS = 0xFFFFFFFA  # SLURM's interactive (salloc's shell), pending, batch and extern step ids, and above


def hydra_task() -> bool:
    """Whether MPICH's launcher (hydra, or Intel MPI's) started this task: its proxy sets MPI_LOCALNRANKS, srun does
    not. Inside a SLURM allocation hydra starts its proxies with srun, so its tasks inherit that step's variables
    (seen with MPICH 5.0's mpirun in sbatch), but their MPI is set up by hydra."""
    return "MPI_LOCALNRANKS" in os.environ


def slurm_step() -> str | None:
    """The SLURM job step whose MPI set-up this process uses ("job.step"), or None: a batch script or salloc's shell
    is in no step that holds CPUs of its own, and a task that hydra started runs in its proxies' step but uses
    hydra's."""
    step = os.environ.get("SLURM_STEP_ID", "")
    if not step.isdigit() or int(step) >= SPECIAL_STEPS or hydra_task():
        return None
    return f"{os.environ.get('SLURM_JOB_ID', '?')}.{step}"


_to_sentinel: int | None = None  # in a supervised rank: the pipe to its sentinel, until it has been told once
SAID = "said"  # told by a task that printed why it ends before MPI starts


def tell_rank(rank: int) -> None:
    """Tell the sentinel the rank as MPI numbers it (called once MPI is up). The launcher's variables can be stale:
    a launcher started from a shell inside an srun step replaces only its own (Open MPI's mpirun there leaves the
    step's PMI_RANK=0 to every rank), and the sentinel would name the wrong rank."""
    _tell(str(rank))


def tell_said() -> None:
    """Tell the sentinel that this task, ending before MPI starts, printed why: the sentinel's own line would
    repeat it less well."""
    _tell(SAID)


def _tell(word: str) -> None:
    global _to_sentinel
    if _to_sentinel is None:
        return
    with contextlib.suppress(OSError):
        os.write(_to_sentinel, word.encode())
    os.close(_to_sentinel)
    _to_sentinel = None


def _told(pipe: int) -> str:
    """What the rank told its sentinel: its MPI rank once MPI was up, SAID, or nothing."""
    os.set_blocking(pipe, False)
    try:
        return os.read(pipe, 16).decode()
    except (BlockingIOError, UnicodeDecodeError):  # a fork of the rank may hold the pipe open, unwritten
        return ""


def end_launch(code: int) -> bool:
    """Ask MPICH's launcher (hydra) to end the job for a task that ended before MPI started: its other tasks, in
    MPI_Init, wait for every task and are never told that one will not come (pmodels/mpich#6124, "wontfix") until
    run.startup_timeout's alarm. The sentinel speaks hydra's PMI-1 wire protocol on the task's PMI_FD, a line of
    text each: init, then abort with the task's exit code, which mpirun then exits with; also where hydra runs inside
    a SLURM allocation. Nowhere else: srun's pmi2 speaks another protocol (and the SLURM script's --kill-on-bad-exit
    ends the step), and Open MPI's launcher ends a job whose task failed. False where nothing was asked."""
    fd = os.environ.get("PMI_FD", "")
    if not fd.isdigit() or ("SLURM_STEP_ID" in os.environ and not hydra_task()):  # any srun step, the batch's too
        return False
    try:
        with socket.socket(fileno=os.dup(int(fd))) as pmi:
            pmi.settimeout(PMI_PATIENCE)
            pmi.sendall(b"cmd=init pmi_version=1 pmi_subversion=1\n")
            if not _init_accepted(pmi, time.monotonic() + PMI_PATIENCE):
                return False
            pmi.sendall(f"cmd=abort exitcode={code}\n".encode())
    except OSError:  # not a socket, closed, no answer
        return False
    return True


def _init_accepted(pmi: socket.socket, deadline: float) -> bool:
    """Whether the reply to init is PMI-1's, with rc=0, read by its fields: MPICH's hydra before 4.1 (and gforker)
    put rc last. A reply the rank was still waiting for when it died comes first, and is passed over. Bytes that
    cannot start a PMI-1 line (pmi2's length prefix) end the wait at once."""
    pending = b""
    for _ in range(64):
        pmi.settimeout(max(deadline - time.monotonic(), 0.001))
        chunk = pmi.recv(4096)
        *lines, pending = (pending + chunk).split(b"\n")
        for line in lines:
            if not line.startswith(b"cmd="):
                return False
            fields = dict(field.split(b"=", 1) for field in line.split() if b"=" in field)
            if fields[b"cmd"] == b"response_to_init":
                return fields.get(b"rc") == b"0"
        if not chunk or not b"cmd=".startswith(pending[:4]):
            return False
    return False


def _hint(sig: signal.Signals, before: OomKills | None = None) -> str:
    """What a death by `sig` most likely means; inside a SLURM step, a start-up that never completed may also be a
    command typed in a shell that srun started, which inherits that step's MPI set-up and waits for its tasks. For
    SIGKILL, the kernel's out-of-memory counts since `before` tell whether it killed the rank for memory."""
    if sig == signal.SIGKILL and before is not None:
        return _kill_hint(killed_for_memory(before, oom_kills()))
    step = slurm_step() if sig == signal.SIGALRM else None
    if step is None:
        return HINTS.get(sig, "")
    return (
        f"{HINTS[sig]}. If this was typed in a shell that srun started (step {step}), MPI waited for that step's "
        "other tasks: start the ranks from there with srun --overlap -n N"
    )


def _kill_hint(for_memory: bool | None) -> str:
    """SIGKILL's hint once the kernel's counts have said whether it killed for memory (None: they could not), and
    what to do about it."""
    if for_memory is None:
        return HINTS[signal.SIGKILL]
    return (
        f" ({kill_cause(for_memory, 'set data.cache=off, place fewer ranks on a host, or give the job more memory')})"
    )


def supervise() -> None:
    """Return in the child (the real rank); the parent never returns."""
    global _to_sentinel
    rank = launcher_rank()
    if rank is None or not rank.isdigit() or not sys.platform.startswith("linux"):
        return
    if os.environ.get("FEDMPI_SENTINEL") == "0":
        return
    parent = os.getpid()
    told, tell = os.pipe()
    started = time.monotonic()
    child = os.fork()
    if child == 0:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != parent:  # the parent died before prctl took effect
            os._exit(1)
        os.close(told)
        _to_sentinel = tell
        return
    os.close(tell)

    forwarded: set[int] = set()

    def forward(signum, frame):
        forwarded.add(signum)
        with contextlib.suppress(ProcessLookupError):  # the rank has just ended and been reaped
            os.kill(child, signum)

    for sig in FORWARDED:
        signal.signal(sig, forward)
    before = oom_kills()
    _, status = os.waitpid(child, 0)
    took = time.monotonic() - started
    # The rank is gone: a stop request now ends the grace below (it was forwarded to the reaped pid, and the grace ran
    # on while the tasks in MPI_Init, which cannot act on it, waited with the launcher).
    signal.pthread_sigmask(signal.SIG_BLOCK, FORWARDED)
    said = _told(told)
    mpi_rank = said if said.isdigit() else ""  # empty: the rank ended before MPI was up
    code = os.waitstatus_to_exitcode(status)
    # A signal passed on from the launcher or a user that ended the rank before MPI was up (a stop while it was in
    # MPI_Init) was asked for: the launcher is ending the job, and its own report says so. Once MPI is up the stops
    # are handled, so a rank a forwarded signal still ends (SIGUSR2's default action) is named as any other.
    asked = os.WIFSIGNALED(status) and os.WTERMSIG(status) in forwarded and not mpi_rank
    if os.WIFSIGNALED(status):
        sig = signal.Signals(os.WTERMSIG(status))
        if not asked:
            print(
                f"fedmpi: rank {mpi_rank or rank} ({role(int(mpi_rank or rank))}, pid {child}) was killed by "
                f"{sig.name}{_hint(sig, before)}",
                file=sys.stderr,
                flush=True,
            )
        code = EXIT_SIGNAL_BASE + sig
    elif code and not mpi_rank and not first_task() and said != SAID:
        # The first task prints an error of its own and ends the job at once: given that time, this task's line is
        # printed only where it alone failed (its own configuration, its node), which nothing else would say. A
        # launcher that ends the step meanwhile (SIGTERM: srun's --kill-on-bad-exit, scancel) ends it for an error
        # already said, which this line would blame on this task; another signal (a Ctrl-C, SLURM's time-limit
        # warning) only cuts the wait short.
        stopped = signal.sigtimedwait(FORWARDED, OTHERS_GRACE + 2 * took)
        if stopped is None or stopped.si_signo != signal.SIGTERM:
            print(
                f"fedmpi: task {rank} (pid {child}) ended with exit code {code} before MPI started; only the "
                "launcher's first task prints a configuration error, so this task's own configuration or --set "
                "options, or its node's installation, differ from the first's",
                file=sys.stderr,
                flush=True,
            )
    if code and not mpi_rank and not asked:
        end_launch(code)
    os._exit(code)
