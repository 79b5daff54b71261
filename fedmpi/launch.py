"""Start-up of `python -m fedmpi train` under MPI, kept apart from the roles it starts.

Every rank parses the configuration, learns the rank table, makes sure it runs the configuration and
code rank 0 runs (fedmpi.agreement), checks what it will use (fedmpi.preflight), and then becomes the
server (rank 0) or a learner; the centralized baseline runs in one process instead. Any exception on
any rank ends the whole job at once through MPI Abort, with a message naming the rank and the error: a
federation that hangs is the worst failure.
"""

from __future__ import annotations

import json
import math
import os
import signal
import socket
import sys
import time
import traceback
from pathlib import Path

import numpy as np

from preprocess.layout import TEST_FILE

from .agreement import agree
from .algorithms import algorithm, processes
from .config import MAX_THREADS, Config, load_config, split_error_text
from .errors import EXIT_FAILURE, EXIT_USAGE, ConfigError, ConfigFileError, PayloadError, is_user_error, user_message
from .hostmemory import OomKills, kill_cause, killed_for_memory, oom_kills
from .memory import keep_freed_memory
from .messages import STARTUP, row_text, text_row, width
from .metrics import mean_predictor_mae
from .preemption import SIGNALS as STOP_SIGNALS
from .preflight import preflight, rank_file, say, volume_shape
from .provenance import mpi_library
from .sentinel import (
    first_on_host,
    first_task,
    launcher_rank,
    launcher_size,
    mpi_world,
    role,
    slurm_step,
    tell_rank,
    tell_said,
)
from .startup import StartClock, say_ready

HOST_BYTES = 64
PID_MAX = 2**22  # Linux's PID_MAX_LIMIT: no host's pid_max is above it (os.kill of a larger one overflows pid_t)


def check_start(cfg: Config, world: int | None, step: str | None = None) -> None:
    """Before MPI starts: `world` is how many processes this process's MPI will wait for (sentinel.mpi_world). A
    baseline set up as one of several, or a federation set up with the wrong count, would otherwise wait there
    for processes that never come when the setting was inherited from a shell inside a multi-task srun step."""
    if world is None:
        return
    if algorithm(cfg).trains_centrally:
        if world > 1:
            raise ConfigError(_baseline_alone(cfg, _set_up(world)))
    elif world != processes(cfg):
        raise ConfigError(_rank_count(cfg, world, _set_up(world), step))


def check_ranks(
    cfg: Config, size: int, launched: int | None = None, library: str = "", step: str | None = None
) -> None:
    """The job's rank count must match the configuration (the centralized baseline runs alone). `launched`:
    the tasks the launcher's step says it has. A federation that sees a world of one rank in a step of several
    was most likely started by a launcher that mpi4py's MPI (`library`) cannot talk to, which the rank count
    alone would misreport. (A baseline alone in such a step is legitimate: a task farm under srun --mpi=none.)
    `step`: the SLURM step this runs in, if any."""
    if algorithm(cfg).trains_centrally:
        if size != 1:
            raise ConfigError(_baseline_alone(cfg, f"this job has {size} MPI ranks"))
    elif size == 1 and launched is not None and launched > 1:
        raise ConfigError(
            f"MPI sees a world of 1 rank, but the launcher's step has {launched} tasks: the MPI that mpi4py was "
            f"built against ({library or 'unknown'}) does not serve this launcher, so every task is alone. Under "
            "srun, choose your MPI's plugin: srun --mpi=pmix for Open MPI, --mpi=pmi2 for MPICH (or "
            "SLURM_MPI_TYPE; srun --mpi=list shows them); otherwise start the job with that MPI's own mpirun. "
            "(Or this command was started without a launcher from a shell inside a multi-task step.)"
        )
    elif size != processes(cfg):
        raise ConfigError(_rank_count(cfg, size, f"this job has {size} MPI ranks", step))


def _baseline_alone(cfg: Config, found: str) -> str:
    algo = cfg.federation.algorithm
    return (
        f"the {algo} baseline runs in one process, but {found}: python -m fedmpi train --set "
        f"federation.algorithm={algo} (without mpirun, or srun -n 1). A shell that a multi-task srun started hands "
        "its commands that step's MPI set-up, and a step started from it waits for the CPUs the shell's step holds: "
        "run the baseline from the batch script or salloc's shell instead (several side by side: srun --mpi=none "
        "-n K ...)"
    )


def _set_up(world: int) -> str:
    return (
        f"MPI is set up for a job of {world} process{'' if world == 1 else 'es'} (by the launcher, or inherited "
        "from the srun step of the shell this runs in)"
    )


def _rank_count(cfg: Config, size: int, found: str, step: str | None) -> str:
    """The rank-count line; a lone rank inside a SLURM step (typically a command typed in srun --pty bash) also
    learns how to start ranks from there."""
    ranks = processes(cfg)
    message = (
        f"{found} but federation.learners = {cfg.federation.learners} needs {ranks} (1 server + "
        f"{cfg.federation.learners} learners): mpirun -n {ranks} python -m fedmpi train ..., or --ntasks={ranks} "
        "under SLURM"
    )
    if step is None or size != 1:
        return message
    return (
        f"{message}. If you typed this in a shell that srun started (srun --pty bash; this is step {step}), that "
        f"step holds its CPUs and a plain srun or MPICH's mpirun waits for them for ever: srun --overlap -n {ranks} "
        "python -m fedmpi train ..."
    )


def say_config_error(e: ConfigError) -> None:
    """A configuration error before MPI starts, said once by the launcher's first task: every task parses the same
    arguments. The configuration file is read from each node's own file system (a path only the submit node has, a
    relative one under another working directory), so a task that cannot read it says so too, once per host: it
    alone may fail, and the tasks that read it wait in MPI_Init for it until run.startup_timeout."""
    if first_task():
        say(0, str(e))
    elif isinstance(e, ConfigFileError) and first_on_host():
        say(0, f"task {launcher_rank()} on {socket.gethostname()}: {e}")
        tell_said()


# Their default action while MPI_Init runs: a Python handler (the stop requests') can only note the signal there, and
# the rank waited on. A launcher ending the step (srun --kill-on-bad-exit after another task failed, a scancel, a
# Ctrl-C) then waited for SLURM's SIGKILL after KillWait: 46 s and exit 137 on the real SLURM. SIGUSR1, the time-limit
# warning, is still noted: the run stops after its first round with a checkpoint, to be requeued.
ENDING_IN_MPI_INIT = (signal.SIGALRM, signal.SIGTERM, signal.SIGINT)


def init_mpi(timeout: float):
    """Initialise MPI, or die by SIGALRM if that takes longer than `timeout` seconds. MPI_Init waits for
    every rank of the job (MPICH's start-up is collective) and holds the interpreter meanwhile, so a rank that
    is stopped or stuck before it would hang the whole job where no deadline of ours can run; the alarm's
    default action ends this process instead, the sentinel says why, and the launcher ends the job. SIGTERM and
    SIGINT end it there too (ENDING_IN_MPI_INIT)."""
    previous = {sig: signal.signal(sig, signal.SIG_DFL) for sig in ENDING_IN_MPI_INIT}
    signal.alarm(max(1, math.ceil(timeout)))
    from mpi4py import MPI

    MPI.COMM_WORLD.Get_rank()
    signal.alarm(0)
    for sig, handler in previous.items():
        signal.signal(sig, handler)
    return MPI


def train(
    config: str | None,
    overrides: list[str],
    resume: bool = False,
    overwrite: bool = False,
    stop=lambda: False,
    clock: StartClock | None = None,
) -> int:
    """The whole `train` command on this rank; returns its exit code (or aborts the job). `stop()`: was a
    checkpoint-and-stop asked (fedmpi.preemption, taken by the command line before anything else); `clock`: this
    process's start-up phases, from its start (the command line makes it before the sentinel's fork)."""
    clock = clock or StartClock()
    before = oom_kills()
    try:  # every rank parses the same arguments, so every rank reaches the same verdict without MPI traffic
        cfg = load_config(config, overrides)
        check_start(cfg, mpi_world(), slurm_step())
    except ConfigError as e:
        say_config_error(e)
        return EXIT_USAGE
    clock.mark("imports")
    mpi = init_mpi(cfg.run.startup_timeout)
    clock.mark("mpi")
    comm = mpi.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    try:  # from here on a Terminated (a second SIGTERM) must end the job through MPI_Abort, not in MPI_Finalize
        tell_rank(rank)
        try:
            check_ranks(cfg, size, launcher_size(), mpi_library(), slurm_step())
        except ConfigError as e:
            # once: by MPI's rank 0 that is also the launcher's first task (every task is MPI's rank 0 when the
            # launcher does not serve this MPI)
            say(0 if rank == 0 and first_task() else 1, str(e))
            return EXIT_USAGE
        return _run(cfg, comm, resume, overwrite, stop, clock)
    except SystemExit as e:
        if size == 1:
            raise
        _failing()
        # the others would wait for this rank until a deadline (it sits alive in MPI_Finalize): end the job
        failure = f"exited (SystemExit: {e.code}) before the federation ended"
    except BaseException as e:
        _failing()
        if not is_user_error(e):
            traceback.print_exc()
        failure = f"failed: {type(e).__name__}: {user_message(e)}{_worker_kill_hint(e, before)}"
    print(f"fedmpi: rank {rank} ({role(rank)}) {failure}", file=sys.stderr, flush=True)
    if size == 1:
        return EXIT_FAILURE
    time.sleep(0.2)  # let the message reach the launcher before the job is torn down
    comm.Abort(EXIT_FAILURE)
    # MPICH 5 under srun's pmi2 returns from MPI_Abort. Returning from here went on to Python's exit and mpi4py's
    # MPI_Finalize, which waits on the PMI server for ever; when the step was already being torn down (a learner
    # killed by SIGKILL, srun --kill-on-bad-exit) the rank, which takes SIGTERM as a stop request, sat there until
    # slurmstepd's SIGKILL after KillWait (30 s on the real SLURM). End this process now instead.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(EXIT_FAILURE)
    return EXIT_FAILURE  # only where os._exit is a test's stand-in


def _failing() -> None:
    """Let nothing raise into the failure path before it ends the job: torch's DataLoader handler raises its error
    on each SIGCHLD in whatever code runs, and one landed in the traceback's printing (a worker killed, its queue's
    ConnectionResetError first): the second error left this path, the rank waited in MPI_Finalize, and the server
    waited for it until its round watchdog, 30 minutes. A second Ctrl-C would raise KeyboardInterrupt there too."""
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


def _worker_kill_hint(e: BaseException, before: OomKills) -> str:
    """torch names a DataLoader worker (data.workers) that SIGKILL ended, not who sent it: the kernel's out-of-memory
    counts since this rank started say whether the kernel did ("" for any other error, or where they cannot tell)."""
    if not str(e).startswith("DataLoader worker (pid") or not str(e).rstrip().endswith("is killed by signal: Killed."):
        return ""
    for_memory = killed_for_memory(before, oom_kills())
    if for_memory is None:
        return ""
    return f" ({kill_cause(for_memory, 'set data.workers lower, or give the job more memory')})"


def _run(cfg: Config, comm, resume: bool, overwrite: bool, stop, clock: StartClock) -> int:
    import torch

    from .wire import Wire

    startup = cfg.run.startup_timeout
    wire = Wire(comm, patience=startup if comm.Get_rank() == 0 else learner_startup_patience(startup))
    local_rank, local_size = announce_ranks(wire)
    if not agree(cfg, wire):
        return EXIT_USAGE
    keep_freed_memory()
    torch.set_num_threads(torch_threads(cfg.train.threads, local_size))
    data_dir = prepare_data(cfg, wire)
    if data_dir is None:
        return EXIT_USAGE
    clock.mark("prepare")
    if algorithm(cfg).trains_centrally:
        from .centralized import run_centralized

        return run_centralized(cfg, data_dir, resume, overwrite, stop, clock)
    checked = preflight(cfg, wire, data_dir, local_rank, resume, overwrite)
    if checked is None:
        return EXIT_USAGE
    clock.mark("preflight")
    if not wire.is_server:
        return _learn(cfg, wire, data_dir, checked.device, clock)
    assert checked.lock is not None and checked.split is not None
    try:
        return _serve(cfg, wire, data_dir, checked, stop, clock)
    finally:
        checked.lock.release()


def _serve(cfg: Config, wire, data_dir: Path, checked, stop, clock: StartClock) -> int:
    import torch

    from .data import open_volumes
    from .device import prepare_model
    from .files import atomic_write
    from .model import build_model, flat_parameters
    from .recorder import Recorder, start_state
    from .server import Server

    infos, device = checked.infos, checked.device
    atomic_write(cfg.run_dir / "ranks.json", json.dumps(wire.table, indent=1).encode())
    counts = infos["samples"][1:]
    mean_age = float(np.average(infos["mean_age"][1:], weights=counts))
    test = open_volumes(data_dir / TEST_FILE, cfg, device).warm()
    clock.mark("volumes")
    torch.manual_seed(cfg.run.seed)
    model = prepare_model(build_model(cfg, volume_shape(infos[0]), mean_age), device, cfg.train)
    initial = flat_parameters(model)
    baseline = mean_predictor_mae(test.ages, mean_age)
    rec = Recorder(cfg, model, test, device, baseline, data_dir, checked.split, int(counts.sum()))
    state = start_state(cfg, checked.resume, rec, model)
    rec.log.write_config(cfg.to_json())
    clock.mark("model")
    rec.startup_seconds = all_ready(wire, clock, cfg.run.round_timeout, cfg.run_dir)
    wire.bcast(np.array([state.round, *counts], np.float64), "session")
    server = Server(cfg, wire, rec, counts, initial)
    rec.start_clock()  # the start mask (SNIP's, GraSP's scoring) is part of the run's time, as its bytes are
    if algorithm(cfg).start_mask and state.round == 0:
        server.receive_start_mask(state)
    state, preempted = server.run(state, should_stop=stop)
    code = rec.end(state, preempted, server.closing_bytes + wire.closing_nbytes())
    wire.end_server(state.round, cfg.run.round_timeout)  # a learner stuck after the last round is named, not waited on
    return code


def _learn(cfg: Config, wire, data_dir: Path, device, clock: StartClock) -> int:
    from .aggregation import fedavg_weights
    from .data import open_volumes
    from .learner import Learner

    # Decode the volumes while the server builds its model and test set: the first round then trains at the
    # speed of the others instead of filling the cache.
    volumes = open_volumes(data_dir / rank_file(wire.rank), cfg, device).warm()
    clock.mark("volumes")
    learner = Learner(cfg, wire, volumes, device)
    clock.mark("model")
    learner.warm_up()
    clock.mark("warm_up")
    all_ready(wire, clock)
    # start round, sample counts: once every learner is ready, so a learner waits here for the slowest one's start-up
    first_model = cfg.run.round_timeout + learner_startup_patience(cfg.run.startup_timeout)
    session = wire.bcast(np.zeros(1 + wire.learners, np.float64), "session", first_model)
    start_round, counts = int(session[0]), session[1:]
    learner.weight = fedavg_weights(counts)[wire.rank - 1]
    if algorithm(cfg).start_mask and start_round == 0 and wire.rank == 1:
        learner.send_start_mask()
    wire.next_patience = first_model
    learner.run()
    wire.end_learner()  # waits for the server's final save with the STOP header's patience, then leaves
    return 0


def all_ready(wire, clock: StartClock, patience: float | None = None, run_dir: Path | None = None) -> float | None:
    """Every rank's start-up phases to the server, once it is ready itself: the server prints the last rank's, adds
    each rank's to ranks.json in `run_dir` and returns when the last was ready (startup_seconds: from the first
    rank's start); the learners return None. Round 1 is then timed from the moment all are ready, not from the
    server's. The server waits `patience` seconds (run.round_timeout): a learner decoding many volumes, or searching
    cuDNN's algorithms while others share its GPU, may take longer than run.startup_timeout, as round 1's deadline
    allowed before."""
    rows = np.zeros((wire.size, width(STARTUP)), np.float64)
    wire.gather(clock.record(), rows if wire.is_server else None, "the start-up times", patience)
    if not wire.is_server:
        return None
    from .files import atomic_write

    assert run_dir is not None
    table, seconds = say_ready(rows, [role(r) for r in range(wire.size)])
    ranks = [{**entry, "startup": phases} for entry, phases in zip(wire.table, table)]
    atomic_write(run_dir / "ranks.json", json.dumps(ranks, indent=1).encode())
    return seconds


def prepare_data(cfg: Config, wire) -> Path | None:
    """data.dir, or the embedded synthetic cohort: rank 0 builds it once, the others wait without spinning
    and then find it built. None when the configuration cannot give the cohort (what only its ages can tell,
    such as a test fraction that holds out no one; a data.cache_dir under a file): rank 0 has said why, and every
    rank exits 2 (a bad configuration value), as a check before MPI would have."""
    if cfg.data.dir:  # before the cohort's imports: training a given split needs no nibabel or nilearn
        return Path(cfg.data.dir)
    from preprocess.cohort import synthetic_cohort
    from preprocess.distributions import SplitError
    from preprocess.outputs import OutputError

    d = cfg.data

    def cohort() -> Path:
        return synthetic_cohort(
            d.cache_dir,
            subjects=d.subjects,
            voxel=d.voxel,
            learners=cfg.federation.learners,
            distribution=d.distribution,
            seed=d.seed,
            test_fraction=d.test_fraction,
        )

    built = np.ones(1)  # rank 0's word to the others: 1 built, 0 refused
    if wire.rank == 0:
        print(
            f"fedmpi: synthetic cohort ({d.subjects} subjects, {d.voxel} mm, {d.distribution}) under {d.cache_dir}/",
            flush=True,
        )
        try:
            data_dir = cohort()
        except SplitError as e:  # what only the cohort's ages can tell (a test fraction that holds out no one)
            say(0, split_error_text(str(e)))
            built[0] = 0
        except OutputError as e:  # data.cache_dir under a file, or not writable
            say(0, f"data.cache_dir: {e}")
            built[0] = 0
    if wire.size > 1:  # generating a new cohort takes minutes: learners allow it a round's time
        wire.bcast(built, "the synthetic cohort (built by the server)", patience=cfg.run.round_timeout)
    if not built[0]:
        return None
    return data_dir if wire.rank == 0 else cohort()


def default_mpirun() -> str:
    """The venv's own mpirun (the mpich wheel's), else the one on PATH: a venv set up for the site's MPI
    (`make setup MPI=system`) has none, as the Makefile knows. For the tools that start federations."""
    own = Path(sys.executable).with_name("mpirun")
    return str(own) if own.exists() else "mpirun"


def torch_threads(configured: int, local_size: int) -> int:
    """train.threads; else OMP_NUM_THREADS (a nested list's first level, "4,2" -> 4, as OpenMP reads it), which
    a batch script sets to the cores it gave each task; else SLURM_CPUS_PER_TASK (a site's own srun line, whose
    `--cpu-bind` leaves each rank only its own cores: dividing those by the node's ranks gave one thread), at most
    the cores this rank may use; else, as under a workstation's mpirun where every rank may use every core, this
    rank's share of the cores on the node. A value train.threads would refuse counts as unset (torch raised
    after MPI had started)."""
    if configured:
        return configured
    cores = len(os.sched_getaffinity(0))
    given = _thread_count("OMP_NUM_THREADS")
    if not given:
        given = min(_thread_count("SLURM_CPUS_PER_TASK"), cores)
    return given or max(1, cores // local_size)


def _thread_count(variable: str) -> int:
    """The whole number in $variable (its first, comma-separated, element) in [1, MAX_THREADS], else 0."""
    try:
        given = int(os.environ.get(variable, "").split(",")[0])
    except ValueError:
        return 0
    return given if 0 < given <= MAX_THREADS else 0


def learner_startup_patience(startup: float) -> float:
    """How long learners wait on the server during start-up: a quarter longer than the server waits on them,
    so that the server, which sees every rank, names a silent learner before any learner blames the server."""
    return 1.25 * startup + 5


def announce_ranks(wire) -> tuple[int, int]:
    """Share the rank -> pid@host table, first of all (a silent rank is named here already); every rank
    watches the other ranks on its host while it waits (Wire.peers). Returns this rank's (local rank, ranks
    on its host), for GPU assignment and thread counts."""
    pids = np.zeros(wire.size, np.int64)
    hosts = np.zeros((wire.size, HOST_BYTES), np.uint8)
    wire.gather(np.array([os.getpid()], np.int64), pids if wire.is_server else None, "the rank table")
    wire.gather(text_row(socket.gethostname(), HOST_BYTES), hosts if wire.is_server else None, "the rank table")
    if wire.is_server:  # before the table goes out: one message, the server's
        check_pids(pids)
    wire.bcast(pids, "the rank table")
    wire.bcast(hosts, "the rank table")
    if not wire.is_server:
        check_pids(pids)
    names = [row_text(h) for h in hosts]
    wire.table = [{"rank": r, "role": role(r), "pid": int(pids[r]), "host": names[r]} for r in range(wire.size)]
    wire.peers = {r: int(pids[r]) for r in range(wire.size) if r != wire.rank and names[r] == names[wire.rank]}
    if wire.is_server:
        print("fedmpi: ranks " + ", ".join(f"{t['rank']}={t['pid']}@{t['host']}" for t in wire.table), flush=True)
    same_host = [r for r in range(wire.size) if names[r] == names[wire.rank]]
    return same_host.index(wire.rank), len(same_host)


def check_pids(pids: np.ndarray) -> None:
    """Every rank's pid in the rank table is a process id (1..PID_MAX): the liveness check signals those on its
    host, where 0 or a negative one would name a process group and a huge one raised an OverflowError."""
    for rank, pid in enumerate(pids.tolist()):
        if not 1 <= pid <= PID_MAX:
            raise PayloadError(f"rank {rank} ({role(rank)}) announced pid {pid} in the rank table: not 1..{PID_MAX}")
