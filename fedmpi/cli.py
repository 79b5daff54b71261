"""`python -m fedmpi train|attack|report`.

`train` runs under MPI: rank 0 is the server, ranks 1..N the learners. Any exception on any rank
ends the whole job at once through MPI Abort, with a message naming the rank and the error.
"""
from __future__ import annotations

import argparse
import os
import signal
import sys
import time
import traceback
from pathlib import Path

import numpy as np

from .config import ConfigError, describe, load_config
from .sentinel import role

USAGE_ERROR = 2
ERROR_BYTES = 512  # room for one rank's preflight message


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m fedmpi", description="Federated brain-age training with FedSparsify.")
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser(
        "train", formatter_class=argparse.RawDescriptionHelpFormatter,
        help="run a federation (under mpirun: 1 server + N learners) or the centralized baseline",
        description="Run a federation: mpirun -n <learners+1> python -m fedmpi train [--config FILE] [--set k=v ...]\n"
                    "With no data.dir it runs on the embedded synthetic cohort (generated once, cached).",
        epilog="options (section.option = default):\n" + describe())
    t.add_argument("--config", help="YAML file with sections data, model, train, federation, eval, run")
    t.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override one option, repeatable")
    t.add_argument("--resume", action="store_true",
                   help="continue run.name from its last good checkpoint (starts fresh if there is none)")
    t.add_argument("--overwrite", action="store_true", help="replace an unfinished run of the same name")
    t.set_defaults(func=train)
    from . import attack, report

    a = sub.add_parser("attack", help="membership inference against a finished run's model",
                       description="Membership inference: can an attacker tell a run's training subjects from "
                                   "held-out ones?")
    attack.add_arguments(a)
    a.set_defaults(func=attack.run)
    r = sub.add_parser("report", help="plots and a results table (markdown, CSV) from run directories",
                       description="Plots and a results table from one or more run directories (or directories "
                                   "of runs).")
    report.add_arguments(r)
    r.set_defaults(func=report.run)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["train"]:  # fork the rank's sentinel first, while the process is small
        from .sentinel import supervise

        supervise()
    args = _parser().parse_args(argv)
    return args.func(args)


def _say(rank: int, message: str) -> None:
    if rank == 0:
        print(f"fedmpi: error: {message}", file=sys.stderr, flush=True)


def train(args) -> int:
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    try:  # every rank parses the same arguments, so every rank reaches the same verdict without MPI traffic
        cfg = load_config(args.config, args.set)
        if cfg.federation.algorithm == "centralized":
            if size != 1:
                raise ConfigError("the centralized baseline runs in one process: python -m fedmpi train "
                                  "--set federation.algorithm=centralized (without mpirun)")
        elif size != cfg.federation.learners + 1:
            raise ConfigError(f"this job has {size} MPI ranks but federation.learners = {cfg.federation.learners} "
                              f"needs {cfg.federation.learners + 1} (1 server + {cfg.federation.learners} learners): "
                              f"mpirun -n {cfg.federation.learners + 1} python -m fedmpi train ...")
    except ConfigError as e:
        _say(rank, str(e))
        return USAGE_ERROR
    try:
        return _train(cfg, args, comm)
    except SystemExit:
        raise
    except BaseException as e:  # noqa: BLE001 - any failure must end the whole job, not hang it
        from .errors import is_user_error

        if not is_user_error(e):
            traceback.print_exc()
        print(f"fedmpi: rank {rank} ({role(rank)}) failed: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
        if size == 1:
            return 1
        time.sleep(0.2)  # let the message reach the launcher before the job is torn down
        comm.Abort(1)
        return 1


def _train(cfg, args, comm) -> int:
    import torch

    from . import server as srv
    from .data import VolumeDataset
    from .learner import Learner
    from .wire import Wire, node_layout

    wire = Wire(comm)
    rank = wire.rank
    local_rank, local_size = node_layout(comm)
    torch.set_num_threads(cfg.train.threads or max(1, len(os.sched_getaffinity(0)) // local_size))
    stop = _install_preemption_handlers()
    data_dir = _data_dir(cfg, wire)
    if cfg.federation.algorithm == "centralized":
        from .centralized import run_centralized

        return run_centralized(cfg, data_dir, args)
    checked = _preflight(cfg, args, wire, data_dir, local_rank)
    if checked is None:
        return USAGE_ERROR
    infos, device, resume = checked
    _announce_ranks(wire, cfg)

    session = np.zeros(1 + wire.learners, np.float64)  # start round, then sample counts
    if rank == 0:
        counts = infos[1:, 0]
        mean_age = float(np.average(infos[1:, 1], weights=counts))
        torch.manual_seed(cfg.run.seed)
        model = srv.build_model(cfg, tuple(int(v) for v in infos[0, 2:]), mean_age).to(device)
        test = VolumeDataset(data_dir / "test.h5", cache=cfg.data.cache)
        baseline = float(np.mean(np.abs(test.ages - mean_age)))
        rec = srv.Recorder(cfg, model, test, device, baseline, data_dir)
        state = _start_state(cfg, resume, rec, model)
        rec.log.write_config(cfg.to_json())
        session[:] = [state.round, *counts]
    wire.bcast(session, "session")
    start_round, counts = int(session[0]), session[1:]

    if rank == 0:
        server = srv.Server(cfg, wire, rec, counts)
        if cfg.federation.algorithm == "snip" and start_round == 0:
            server.receive_snip_mask(state)
        began = time.perf_counter()
        state, preempted = server.run(state, should_stop=stop)
        summary = rec.finish(state, time.perf_counter() - began, preempted)
        srv.print_summary(summary)
        if preempted:
            print(f"fedmpi: stopped at round {state.round} on request; continue with --resume", flush=True)
            return srv.EXIT_PREEMPTED
        return 0
    learner = Learner(cfg, wire, VolumeDataset(data_dir / f"learner_{rank}.h5", cache=cfg.data.cache), device,
                      weight=counts[rank - 1] / counts.sum())
    if cfg.federation.algorithm == "snip" and start_round == 0 and rank == 1:
        learner.send_snip_mask()
    learner.run()
    return 0


def _data_dir(cfg, wire) -> Path:
    """data.dir, or the embedded synthetic cohort: rank 0 builds it once, the others wait without spinning
    and then find it built."""
    from .data import synthetic_cohort

    if cfg.data.dir:
        return Path(cfg.data.dir)
    kwargs = dict(subjects=cfg.data.subjects, voxel=cfg.data.voxel, learners=cfg.federation.learners,
                  distribution=cfg.data.distribution, seed=cfg.data.seed, test_fraction=cfg.data.test_fraction)
    if wire.rank == 0:
        print(f"fedmpi: synthetic cohort ({cfg.data.subjects} subjects, {cfg.data.voxel} mm, "
              f"{cfg.data.distribution}) under {cfg.data.cache_dir}/", flush=True)
        data_dir = synthetic_cohort(cfg.data.cache_dir, **kwargs)
    if wire.size > 1:
        wire.barrier("synthetic cohort")
    if wire.rank != 0:
        data_dir = synthetic_cohort(cfg.data.cache_dir, **kwargs)
    return data_dir


def _preflight(cfg, args, wire, data_dir: Path, local_rank: int):
    """Every rank checks what it will use (its data file, its device; rank 0 also the run directory);
    rank 0 prints every problem and all ranks return None together. Otherwise (rank 0's table of
    samples, mean age and volume shape per rank, this rank's device, rank 0's resume point)."""
    from .data import read_header
    from .training import select_device

    info = np.zeros(5, np.float64)  # samples, mean age, X, Y, Z
    problem = ""
    device = resume = None
    try:
        head = read_header(data_dir / ("test.h5" if wire.rank == 0 else f"learner_{wire.rank}.h5"))
        info[:] = [head["n"], head["mean_age"], *head["shape"]]
        device = select_device(cfg.train.device, local_rank)
        if wire.rank == 0:
            resume = _resume_point(cfg, args)
    except Exception as e:  # noqa: BLE001 - reported collectively below
        problem = f"rank {wire.rank}: {e}"
    infos, problems = _gather_preflight(wire, info, problem)
    if wire.is_server:
        shapes = infos[:, 2:]
        problems += [f"learner {k} ({data_dir / f'learner_{k}.h5'}): volume shape {tuple(int(v) for v in shapes[k])}"
                     f" differs from test.h5 {tuple(int(v) for v in shapes[0])}"
                     for k in range(1, wire.size) if infos[k, 0] and infos[0, 0] and (shapes[k] != shapes[0]).any()]
        problems += [f"learner {k}: no training samples" for k in range(1, wire.size)
                     if infos[k, 0] == 0 and not any(p.startswith(f"rank {k}:") for p in problems)]
    verdict = wire.bcast(np.array([len(problems) if wire.is_server else 0], np.int64), "preflight verdict")
    if verdict[0]:
        for p in problems:
            _say(wire.rank, p)
        return None
    return infos, device, resume


def _text_row(text: str, width: int) -> np.ndarray:
    """Text in a fixed-width uint8 buffer (cut to fit, zero-padded), for fixed-size gathers."""
    row = np.zeros(width, np.uint8)
    raw = text.encode()[:width]
    row[:len(raw)] = np.frombuffer(raw, np.uint8)
    return row


def _row_text(row: np.ndarray) -> str:
    return bytes(row).rstrip(b"\0").decode(errors="replace")


def _gather_preflight(wire, info: np.ndarray, problem: str) -> tuple[np.ndarray, list[str]]:
    text = _text_row(problem, ERROR_BYTES)
    infos = np.zeros((wire.size, info.size), np.float64) if wire.is_server else None
    texts = np.zeros((wire.size, ERROR_BYTES), np.uint8) if wire.is_server else None
    wire.gather(info, infos, "preflight")
    wire.gather(text, texts, "preflight messages")
    if not wire.is_server:
        return info[None], []
    problems = [_row_text(row) for row in texts]
    return infos, [p for p in problems if p]


def _announce_ranks(wire, cfg) -> None:
    """Share the rank -> pid@host table: rank 0 prints it and keeps runs/<name>/ranks.json, and every
    rank watches the other ranks on its host while it waits (Wire.peers)."""
    import json
    import socket

    from .runlog import atomic_write

    host = _text_row(socket.gethostname(), 64)
    pids = np.zeros(wire.size, np.int64)
    hosts = np.zeros((wire.size, 64), np.uint8)
    wire.gather(np.array([os.getpid()], np.int64), pids if wire.is_server else None, "rank table")
    wire.gather(host, hosts if wire.is_server else None, "rank table")
    wire.bcast(pids, "rank table")
    wire.bcast(hosts, "rank table")
    names = [_row_text(h) for h in hosts]
    wire.peers = {r: int(pids[r]) for r in range(wire.size) if r != wire.rank and names[r] == names[wire.rank]}
    if wire.is_server:
        table = [{"rank": r, "role": role(r), "pid": int(pids[r]), "host": names[r]}
                 for r in range(wire.size)]
        atomic_write(cfg.run_dir / "ranks.json", json.dumps(table, indent=1).encode())
        print("fedmpi: ranks " + ", ".join(f"{t['rank']}={t['pid']}@{t['host']}" for t in table), flush=True)
    wire.reset_counters()


def _resume_point(cfg, args):
    """Rank 0, before training: the checkpoint to continue from (or None), refusing to silently
    replace an unfinished run or to resume one made with other settings."""
    from .checkpoint import Checkpoints
    from .server import resume_key

    checkpoints = Checkpoints(cfg.run_dir / "checkpoints")
    if not args.resume:
        if checkpoints.paths() and not args.overwrite and not _finished(cfg):
            raise ConfigError(f"{cfg.run_dir} holds an unfinished run; pass --resume to continue it or --overwrite "
                              f"to replace it (or choose another run.name)")
        return None
    found = checkpoints.latest()
    if found is None:
        print(f"fedmpi: no usable checkpoint in {checkpoints.dir}; starting fresh", flush=True)
        return None
    if found[2].get("config") != resume_key(cfg):
        raise ConfigError(f"{checkpoints.dir} was written with different settings; resume with the same config "
                          f"(only run.*, eval.*, devices and data loading may change)")
    return found


def _start_state(cfg, resume, rec, model):
    """The state to start from: the resume point, or a fresh model (clearing an old run's files)."""
    from .server import State, initial_state

    if resume is not None:
        values, mask, meta = resume
        if values.size != sum(p.numel() for p in model.parameters()):
            raise ConfigError(f"{rec.checkpoints.dir}: checkpoint does not fit the model")
        rec.log.keep_through(int(meta["round"]))
        print(f"fedmpi: resuming {cfg.run_dir} after round {meta['round']}", flush=True)
        return State(int(meta["round"]), values, mask)
    for p in rec.checkpoints.paths():
        p.unlink()
    rec.log.reset()
    return initial_state(cfg, model)


def _finished(cfg) -> bool:
    import json

    try:
        summary = json.loads((cfg.run_dir / "summary.json").read_text())
    except (OSError, ValueError):
        return False
    return not summary.get("preempted") and summary.get("rounds") == cfg.federation.rounds


def _install_preemption_handlers():
    """SIGTERM / SIGUSR1 (SLURM's warning before the time limit) ask the server to checkpoint and stop
    after the current round; learners ignore them and follow the server."""
    requested = {"stop": False}

    def handler(signum, frame):
        requested["stop"] = True

    for sig in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, handler)
    return lambda: requested["stop"]
