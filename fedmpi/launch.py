"""Start-up of `python -m fedmpi train` under MPI, kept apart from the roles it starts.

Every rank parses the same configuration, checks what it will use (the preflight), learns the
rank table, and then becomes the server (rank 0) or a learner; the centralized baseline runs in
one process instead. Any exception on any rank ends the whole job at once through MPI Abort, with
a message naming the rank and the error: a federation that hangs is the worst failure.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import sys
import time
import traceback
from pathlib import Path

import numpy as np

from .algorithms import algorithm
from .config import Config, load_config
from .errors import EXIT_FAILURE, EXIT_PREEMPTED, EXIT_USAGE, ConfigError, is_user_error
from .messages import PREFLIGHT, records, row_text, text_row
from .sentinel import role

ERROR_BYTES = 512  # room for one rank's preflight message
HOST_BYTES = 64


def say(rank: int, message: str) -> None:
    """An error line, printed once (by rank 0)."""
    if rank == 0:
        print(f"fedmpi: error: {message}", file=sys.stderr, flush=True)


def check_ranks(cfg: Config, size: int) -> None:
    """The job's rank count must match the configuration (the centralized baseline runs alone)."""
    if algorithm(cfg).trains_centrally:
        if size != 1:
            raise ConfigError(f"the {cfg.federation.algorithm} baseline runs in one process: python -m fedmpi train "
                              f"--set federation.algorithm={cfg.federation.algorithm} (without mpirun)")
    elif size != cfg.federation.learners + 1:
        raise ConfigError(f"this job has {size} MPI ranks but federation.learners = {cfg.federation.learners} "
                          f"needs {cfg.federation.learners + 1} (1 server + {cfg.federation.learners} learners): "
                          f"mpirun -n {cfg.federation.learners + 1} python -m fedmpi train ...")


def train(config: str | None, overrides: list[str], resume: bool = False, overwrite: bool = False) -> int:
    """The whole `train` command on this rank; returns its exit code (or aborts the job)."""
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    try:  # every rank parses the same arguments, so every rank reaches the same verdict without MPI traffic
        cfg = load_config(config, overrides)
        check_ranks(cfg, size)
    except ConfigError as e:
        say(rank, str(e))
        return EXIT_USAGE
    try:
        return _run(cfg, comm, resume, overwrite)
    except SystemExit:
        raise
    except BaseException as e:  # noqa: BLE001 - any failure must end the whole job, not hang it
        if not is_user_error(e):
            traceback.print_exc()
        print(f"fedmpi: rank {rank} ({role(rank)}) failed: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
        if size == 1:
            return EXIT_FAILURE
        time.sleep(0.2)  # let the message reach the launcher before the job is torn down
        comm.Abort(EXIT_FAILURE)
        return EXIT_FAILURE


def _run(cfg: Config, comm, resume: bool, overwrite: bool) -> int:
    import torch

    from .wire import Wire, node_layout

    wire = Wire(comm)
    local_rank, local_size = node_layout(comm)
    torch.set_num_threads(cfg.train.threads or max(1, len(os.sched_getaffinity(0)) // local_size))
    stop = install_preemption_handlers()
    data_dir = prepare_data(cfg, wire)
    if algorithm(cfg).trains_centrally:
        from .centralized import run_centralized

        return run_centralized(cfg, data_dir, resume, overwrite)
    checked = preflight(cfg, wire, data_dir, local_rank, resume, overwrite)
    if checked is None:
        return EXIT_USAGE
    infos, device, resume_from = checked
    announce_ranks(wire, cfg)
    if wire.is_server:
        return _serve(cfg, wire, data_dir, infos, device, resume_from, stop)
    return _learn(cfg, wire, data_dir, device)


def _serve(cfg: Config, wire, data_dir: Path, infos: np.ndarray, device, resume_from, stop) -> int:
    import torch

    from .data import VolumeDataset
    from .model import build_model, flat_parameters
    from .recorder import Recorder, print_summary, start_state
    from .server import Server

    counts = infos["samples"][1:]
    mean_age = float(np.average(infos["mean_age"][1:], weights=counts))
    torch.manual_seed(cfg.run.seed)
    shape = tuple(int(infos[axis][0]) for axis in ("x", "y", "z"))
    model = build_model(cfg, shape, mean_age).to(device)
    initial = flat_parameters(model)
    test = VolumeDataset(data_dir / "test.h5", cache=cfg.data.cache)
    rec = Recorder(cfg, model, test, device, float(np.mean(np.abs(test.ages - mean_age))), data_dir)
    state = start_state(cfg, resume_from, rec, model)
    rec.log.write_config(cfg.to_json())
    wire.bcast(np.array([state.round, *counts], np.float64), "session")
    server = Server(cfg, wire, rec, counts, initial)
    if algorithm(cfg).start_mask and state.round == 0:
        server.receive_start_mask(state)
    began = time.perf_counter()
    state, preempted = server.run(state, should_stop=stop)
    print_summary(rec.finish(state, time.perf_counter() - began, preempted))
    if preempted:
        print(f"fedmpi: stopped at round {state.round} on request; continue with --resume", flush=True)
        return EXIT_PREEMPTED
    return 0


def _learn(cfg: Config, wire, data_dir: Path, device) -> int:
    from .data import VolumeDataset
    from .learner import Learner

    session = wire.bcast(np.zeros(1 + wire.learners, np.float64), "session")  # start round, sample counts
    start_round, counts = int(session[0]), session[1:]
    learner = Learner(cfg, wire, VolumeDataset(data_dir / f"learner_{wire.rank}.h5", cache=cfg.data.cache), device,
                      weight=counts[wire.rank - 1] / counts.sum())
    if algorithm(cfg).start_mask and start_round == 0 and wire.rank == 1:
        learner.send_start_mask()
    learner.run()
    return 0


def prepare_data(cfg: Config, wire) -> Path:
    """data.dir, or the embedded synthetic cohort: rank 0 builds it once, the others wait without spinning
    and then find it built."""
    from .data import synthetic_cohort

    if cfg.data.dir:
        return Path(cfg.data.dir)
    d = cfg.data
    kwargs = dict(subjects=d.subjects, voxel=d.voxel, learners=cfg.federation.learners, distribution=d.distribution,
                  seed=d.seed, test_fraction=d.test_fraction)
    if wire.rank == 0:
        print(f"fedmpi: synthetic cohort ({d.subjects} subjects, {d.voxel} mm, {d.distribution}) under {d.cache_dir}/",
              flush=True)
        data_dir = synthetic_cohort(d.cache_dir, **kwargs)
    if wire.size > 1:
        wire.barrier("synthetic cohort")
    if wire.rank != 0:
        data_dir = synthetic_cohort(d.cache_dir, **kwargs)
    return data_dir


def check_rank(cfg: Config, rank: int, data_dir: Path, local_rank: int, resume: bool, overwrite: bool):
    """What one rank checks before training, without MPI: its data file's header, its device and, on
    rank 0, the run directory's resume point. Returns (PREFLIGHT record, device, resume point); raises
    with the reason."""
    from .data import read_header
    from .recorder import resume_point
    from .training import select_device

    head = read_header(data_dir / ("test.h5" if rank == 0 else f"learner_{rank}.h5"))
    info = np.zeros(1, PREFLIGHT)
    info["samples"], info["mean_age"] = head["n"], head["mean_age"]
    info["x"], info["y"], info["z"] = head["shape"]
    device = select_device(cfg.train.device, local_rank)
    found = resume_point(cfg, resume, overwrite) if rank == 0 else None
    return info, device, found


def preflight_problems(infos: np.ndarray, problems: list[str], data_dir: Path) -> list[str]:
    """Rank 0's verdict over every rank's PREFLIGHT record: the ranks' own problems, volume shapes that
    differ from test.h5's, learners without samples."""
    shapes = [tuple(int(infos[axis][k]) for axis in ("x", "y", "z")) for k in range(len(infos))]
    out = list(problems)
    for k in range(1, len(infos)):
        if any(p.startswith(f"rank {k}:") for p in problems):
            continue
        if infos["samples"][k] and infos["samples"][0] and shapes[k] != shapes[0]:
            out.append(f"learner {k} ({data_dir / f'learner_{k}.h5'}): volume shape {shapes[k]} differs "
                       f"from test.h5 {shapes[0]}")
        elif infos["samples"][k] == 0:
            out.append(f"learner {k}: no training samples")
    return out


def preflight(cfg: Config, wire, data_dir: Path, local_rank: int, resume: bool, overwrite: bool):
    """Every rank checks what it will use; rank 0 prints every problem and all ranks return None together.
    Otherwise (rank 0's PREFLIGHT records of every rank, this rank's device, rank 0's resume point)."""
    info = np.zeros(1, PREFLIGHT)
    problem = ""
    device = found = None
    try:
        info, device, found = check_rank(cfg, wire.rank, data_dir, local_rank, resume, overwrite)
    except Exception as e:  # noqa: BLE001 - reported collectively below
        problem = f"rank {wire.rank}: {e}"
    rows = np.zeros((wire.size, len(PREFLIGHT.names)), np.float64) if wire.is_server else None
    texts = np.zeros((wire.size, ERROR_BYTES), np.uint8) if wire.is_server else None
    wire.gather(info.view(np.float64), rows, "preflight")
    wire.gather(text_row(problem, ERROR_BYTES), texts, "preflight messages")
    problems: list[str] = []
    infos = info
    if wire.is_server:
        infos = records(rows, PREFLIGHT)
        problems = preflight_problems(infos, [t for t in map(row_text, texts) if t], data_dir)
    verdict = wire.bcast(np.array([len(problems)], np.int64), "preflight verdict")
    if verdict[0]:
        for p in problems:
            say(wire.rank, p)
        return None
    return infos, device, found


def announce_ranks(wire, cfg: Config) -> None:
    """Share the rank -> pid@host table: rank 0 prints it and keeps runs/<name>/ranks.json, and every
    rank watches the other ranks on its host while it waits (Wire.peers)."""
    from .files import atomic_write

    pids = np.zeros(wire.size, np.int64)
    hosts = np.zeros((wire.size, HOST_BYTES), np.uint8)
    wire.gather(np.array([os.getpid()], np.int64), pids if wire.is_server else None, "rank table")
    wire.gather(text_row(socket.gethostname(), HOST_BYTES), hosts if wire.is_server else None, "rank table")
    wire.bcast(pids, "rank table")
    wire.bcast(hosts, "rank table")
    names = [row_text(h) for h in hosts]
    wire.peers = {r: int(pids[r]) for r in range(wire.size) if r != wire.rank and names[r] == names[wire.rank]}
    if wire.is_server:
        table = [{"rank": r, "role": role(r), "pid": int(pids[r]), "host": names[r]} for r in range(wire.size)]
        atomic_write(cfg.run_dir / "ranks.json", json.dumps(table, indent=1).encode())
        print("fedmpi: ranks " + ", ".join(f"{t['rank']}={t['pid']}@{t['host']}" for t in table), flush=True)
    wire.reset_counters()


def install_preemption_handlers():
    """SIGTERM / SIGUSR1 (SLURM's warning before the time limit) ask the server to checkpoint and stop
    after the current round; learners ignore them and follow the server."""
    requested = {"stop": False}

    def handler(signum, frame):
        requested["stop"] = True

    for sig in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, handler)
    return lambda: requested["stop"]
