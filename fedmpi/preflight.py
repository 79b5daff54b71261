"""The preflight: before any training, every rank checks what it will use (its data file, its device; on rank
0 the run directory, its lock and the resume point), and rank 0 decides for all. A problem is one line and
exit 2 on every rank together, before anything is written. The centralized baseline runs the same checks.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np

from preprocess import bids
from preprocess.layout import TEST_FILE, learner_file, learner_files
from preprocess.outputs import size_text

from .algorithms import algorithm, schedule, target_sparsity
from .config import Config, setting_changes
from .errors import ConfigError, DeviceError
from .hostmemory import available_memory
from .messages import PREFLIGHT, brief, fields_of, records, row_text, shown, text_row, width

if TYPE_CHECKING:
    from .runlog import RunLock

ERROR_BYTES = 512  # room for one rank's preflight message
DIGEST_BYTES = 64  # a SHA-256 in hex
PLACE_BYTES = 128  # where a rank's cache is: "host", or its GPU's UUID
PIPELINE_BYTES = 4096  # a file's preprocessing record as JSON: about 800 bytes (more with registration's options)
# The largest sample count or volume axis a preflight record may hold: above 2**53 a float64 is always "whole",
# and two counts near float64's limit sum to inf (every FedAvg share 0, the mean age NaN).
MAX_COUNT = 2**53
# The mean age in years a learner's preflight record may hold: the widest --age-range preprocessing takes. The server
# starts the model's output bias at the learners' mean age: one of 1e300 overflowed float32 there (a traceback).
MEAN_AGE_RANGE = bids.HUMAN_AGES


def say(rank: int, message: str) -> None:
    """An error line, printed once (by rank 0)."""
    if rank == 0:
        print(f"fedmpi: error: {message}", file=sys.stderr, flush=True)


class RankCheck(NamedTuple):
    """One rank's preflight: its PREFLIGHT record, its data file's digest and its device; on rank 0 also the
    run directory's lock (held to the end of the run) and the checkpoint to resume from (or None); its file's
    preprocessing pipeline as JSON."""

    info: np.ndarray
    digest: str
    device: Any
    lock: RunLock | None = None
    resume: tuple | None = None
    pipeline: str = ""


class Preflight(NamedTuple):
    """The preflight's outcome on a rank: on rank 0 every rank's PREFLIGHT records, the lock, the resume point
    and the split's digests (data file -> digest); elsewhere its own record and device."""

    infos: np.ndarray
    device: Any
    lock: RunLock | None = None
    resume: tuple | None = None
    split: dict | None = None


def check_rank(cfg: Config, rank: int, data_dir: Path, local_rank: int, resume: bool, overwrite: bool) -> RankCheck:
    """What one rank checks before training, without MPI: its data file (header, ages, a sample of its
    volumes), its device (and, on a rank that trains, that train.amp computes right there) and, on rank 0,
    the run directory: its lock (held from here to the end of the run), whether it can be written, and the
    resume point. Raises with the reason."""
    from .data import check_volumes
    from .device import autocast_problem, select_device
    from .model import auto_pools
    from .resume import resume_point
    from .runlog import RunLock

    head = check_volumes(data_dir / rank_file(rank))
    if rank == 0:
        check_model_size(cfg)
        if not algorithm(cfg).trains_centrally:  # the centralized baseline pools every learner file there is
            check_learner_count(cfg, data_dir)
        note_unreached_target(cfg)
    if rank == 0 and cfg.model.pools > auto_pools(head["shape"]):  # the learners' shapes must equal this one
        raise ConfigError(
            f"model.pools = {cfg.model.pools} does not fit test.h5's volumes {tuple(head['shape'])}: at most "
            f"{auto_pools(head['shape'])} keep every axis >= 2 for instance norm (0 picks that)"
        )
    info = np.zeros(1, PREFLIGHT)
    info["samples"], info["mean_age"] = head["n"], head["mean_age"]
    info["x"], info["y"], info["z"] = head["shape"]
    device = select_device(cfg.train.device, local_rank)
    # only a rank that trains takes gradients: a federation's server runs the model forward alone, which the
    # probe's defect leaves right, so a server on such a CPU serves GPU learners
    trains = rank != 0 or algorithm(cfg).trains_centrally
    problem = autocast_problem(device, cfg.train.amp) if trains else ""
    if problem:
        raise DeviceError(problem)
    steps = json.dumps(head["pipeline"], sort_keys=True)
    if rank != 0:
        return RankCheck(info, head["digest"], device, pipeline=steps)
    lock = RunLock(cfg.run_dir).acquire()
    if lock.unlocked:
        print(f"fedmpi: note: {lock.unlocked}", file=sys.stderr, flush=True)
    try:
        return RankCheck(info, head["digest"], device, lock, resume_point(cfg, resume, overwrite), steps)
    except BaseException:
        lock.abandon()
        raise


def check_model_size(cfg: Config) -> None:
    """A model.width whose model no model file could hold (width 1000) is refused here, on the server: torch's
    failure to allocate it was a traceback on every rank."""
    from .encoding import MAX_N
    from .model import parameter_count

    parameters = parameter_count(cfg.model.width)
    if parameters > MAX_N:
        raise ConfigError(
            f"model.width = {cfg.model.width:g} gives a model of {parameters:,} parameters, more than the {MAX_N:,} "
            "a model file holds (the paper's model is width 1: 2,948,801)"
        )


def check_learner_count(cfg: Config, data_dir: Path) -> None:
    """A split made for more learners than the federation has would be trained on in part, without a word (and
    the centralized baseline pools every learner file: its upper bound would see more data)."""
    found = list(learner_files(data_dir))
    left_out = [k for k in found if k > cfg.federation.learners]
    if left_out:
        n = cfg.federation.learners
        raise ConfigError(
            f"{data_dir} holds {len(found)} learner files, but federation.learners = {n} leaves out "
            f"{', '.join(learner_file(k) for k in left_out)}: run federation.learners={max(found)} on "
            f"{max(found) + 1} ranks, or split the data for {n} learners"
        )


def note_unreached_target(cfg: Config) -> None:
    """A schedule that ends short of federation.target (the fraction schedule with few pruning rounds) is legal
    but rarely meant: say so before the run, not in its summary."""
    f = cfg.federation
    reached = schedule(cfg)(f.rounds)
    if reached < target_sparsity(cfg) - 1e-6:
        print(
            f"fedmpi: note: the {f.schedule} schedule reaches sparsity {reached:.3f} by round {f.rounds}, short of "
            f"federation.target {f.target}",
            file=sys.stderr,
            flush=True,
        )


def rank_file(rank: int) -> str:
    """The volume file a rank reads: the test set on the server, its own learner file on a learner."""
    return TEST_FILE if rank == 0 else learner_file(rank)


def preflight_problems(infos: np.ndarray, problems: list[str], data_dir: Path) -> list[str]:
    """Rank 0's verdict over every rank's PREFLIGHT record: the ranks' own problems, records that no
    volume file gives (record_problems), and volume shapes that differ from test.h5's."""
    out = list(problems)
    shape = volume_shape(infos[0])
    for k in range(1, len(infos)):
        if any(p.startswith(f"rank {k}:") for p in problems):
            continue
        fields = fields_of(infos[k], PREFLIGHT)
        if bad := record_problems(fields):
            out.append(
                f"rank {k}: sent a preflight record that no volume file gives ({shown(fields)}): {'; '.join(bad)}"
            )
        elif (theirs := volume_shape(infos[k])) != shape and not any(p.startswith("rank 0:") for p in problems):
            out.append(
                f"learner {k} ({data_dir / learner_file(k)}): volume shape {theirs} differs from {TEST_FILE} {shape}"
            )
    return out


def copy_problems(split: dict[str, str], data_dir: Path) -> list[str]:
    """Learner files that are not rank 0's own copy of the same name. A job may stage the split to each node's local
    disk; a node that kept a copy of another split, or of this one before it was remade, would train on other
    subjects without a word. Rank 0 can tell only where its data.dir holds that learner's file too (a whole split
    staged everywhere, or one shared directory: then always equal); a site's own file, which the server does not
    hold, is not compared. A copy rank 0 cannot read is not its problem: it trains on none of them."""
    from .data import file_digest

    out = []
    for k in range(1, len(split)):
        name = learner_file(k)
        theirs, here = split.get(name, ""), data_dir / name
        if not theirs or not here.is_file():
            continue
        try:
            ours = file_digest(here)
        except Exception:  # damaged or being replaced: nothing to compare with
            continue
        if ours != theirs:
            out.append(
                f"rank {k}: its {name} is not the copy in rank 0's {data_dir} (digest {theirs[:12]} against "
                f"{ours[:12]}): its node holds another split's file, or one from before the split was remade; "
                "stage the same split on every node"
            )
    return out


def cache_place(cache: str, device) -> tuple[str, int]:
    """Where this rank's data.cache keeps its decoded volumes, "host" or its GPU's name ("" with no cache, or no
    device: the rank has a problem of its own), and the room left there (-1 where the rank cannot tell)."""
    if cache == "off" or device is None:
        return "", -1
    if cache == "device" and device.type == "cuda":
        from .device import gpu_room

        try:
            return gpu_room(device)
        except RuntimeError:  # a driver that will not say: nothing to weigh, as where a host cannot tell
            return str(device), -1
    if cache == "device" and device.type != "cpu":  # another accelerator: no free memory to ask it for
        return "", -1
    room = available_memory()
    return "host", -1 if room is None else room


def cache_problems(cache: str, places: list[str], infos: np.ndarray, rooms: np.ndarray, hosts: list[str]) -> list[str]:
    """Hosts, and GPUs, whose ranks' caches would hold more decoded volumes than the room left there (cache_place):
    the smallest room that any of its ranks reported (a rank in a cgroup of its own may have less), -1 where a rank
    could not tell. One line per host or GPU; its ranks are named, as ranks sharing a node or a GPU add theirs up.
    Only the caches are weighed: what a training step takes besides is not known before it runs."""
    out = []
    for host, place in dict.fromkeys(zip(hosts, places)):
        if not place:
            continue
        ranks = [r for r, here in enumerate(zip(hosts, places)) if here == (host, place)]
        known = [int(rooms[r]) for r in ranks if rooms[r] >= 0]
        volumes = sum(int(infos["samples"][r]) for r in ranks)
        need = sum(int(infos["samples"][r]) * volume_bytes(infos[r]) for r in ranks)
        if not known or need <= min(known):
            continue
        whose = f"ranks {', '.join(map(str, ranks))}: {volumes} volumes"
        fewer = "a host" if place == "host" else "a GPU"
        refusal = cache_refusal(cache, place, need, min(known), whose)
        out.append(f"host {host}: {refusal}, or place fewer ranks on {fewer}")
    return out


def cache_refusal(cache: str, place: str, need: int, room: int, whose: str) -> str:
    """Why decoded volumes cannot be cached at `place` (cache_place), and what to do instead."""
    if place == "host":
        return (
            f"data.cache={cache} would keep {size_text(need)} of decoded volumes ({whose}, float32) in memory, and "
            f"{size_text(room)} is left there: set data.cache=off (each epoch then reads its volumes from the file)"
        )
    return (
        f"data.cache={cache} would keep {size_text(need)} of decoded volumes ({whose}, float32) on {place}, and "
        f"{size_text(room)} of it is free: set data.cache=memory (the volumes then go to the GPU batch by batch)"
    )


def volume_bytes(info: np.ndarray) -> int:
    """One decoded volume's size in a rank's cache: float32 of its record's shape."""
    return 4 * int(np.prod(volume_shape(info)))


def record_problems(fields: dict[str, float]) -> list[str]:
    """The fields of a learner's PREFLIGHT record that no volume file gives, each with the rule it breaks: the
    sample count and the shape whole numbers from 1 to MAX_COUNT, the mean age in MEAN_AGE_RANGE."""
    low, high = MEAN_AGE_RANGE
    out = [
        f"{name} is not a whole number from 1 to 2**53"
        for name, v in fields.items()
        if name != "mean_age" and not (v.is_integer() and 1 <= v <= MAX_COUNT)
    ]
    if not low <= fields["mean_age"] <= high:  # NaN too
        out.append(f"mean_age is not {low:g} to {high:g} years")
    return out


def volume_shape(info: np.ndarray) -> tuple[int, ...]:
    """A PREFLIGHT record's volume shape (checked to be whole numbers first, or the server's own)."""
    return tuple(int(info[axis]) for axis in ("x", "y", "z"))


def preflight(cfg: Config, wire, data_dir: Path, local_rank: int, resume: bool, overwrite: bool) -> Preflight | None:
    """Every rank checks what it will use; rank 0 prints every problem and all ranks return None together."""
    mine = RankCheck(np.zeros(1, PREFLIGHT), "", None)
    problem = ""
    try:
        mine = check_rank(cfg, wire.rank, data_dir, local_rank, resume, overwrite)
    except Exception as e:
        problem = f"rank {wire.rank}: {e}"
    rows = np.zeros((wire.size, width(PREFLIGHT)), np.float64)  # filled on the server only
    texts = np.zeros((wire.size, ERROR_BYTES), np.uint8)
    digests = np.zeros((wire.size, DIGEST_BYTES), np.uint8)
    places = np.zeros((wire.size, PLACE_BYTES), np.uint8)
    rooms = np.zeros(wire.size, np.int64)
    pipelines = np.zeros((wire.size, PIPELINE_BYTES), np.uint8)
    here = wire.is_server
    wire.gather(mine.info.view(np.float64), rows if here else None, "the preflight records")
    wire.gather(text_row(problem, ERROR_BYTES), texts if here else None, "the preflight messages")
    wire.gather(text_row(mine.digest, DIGEST_BYTES), digests if here else None, "the data digests")
    place, room = cache_place(cfg.data.cache, mine.device)  # before any rank decodes: once the preflight has passed
    wire.gather(text_row(place, PLACE_BYTES), places if here else None, "the caches' places")
    wire.gather(np.array([room], np.int64), rooms if here else None, "the free memory")
    wire.gather(text_row(mine.pipeline, PIPELINE_BYTES), pipelines if here else None, "the preprocessing records")
    notes: list[str] = []
    problems: list[str] = []
    if not here:
        outcome = Preflight(mine.info, mine.device)
    else:
        infos = records(rows, PREFLIGHT)
        problems = preflight_problems(infos, [t for t in map(row_text, texts) if t], data_dir)
        split = {rank_file(k): row_text(d) for k, d in enumerate(digests)}
        problems += copy_problems(split, data_dir)
        if not problems:  # every record is one a volume file gives
            hosts = [t["host"] for t in wire.table]
            problems += cache_problems(cfg.data.cache, [row_text(p) for p in places], infos, rooms, hosts)
            notes = pipeline_notes([row_text(p) for p in pipelines])
        if mine.resume is not None:
            from .resume import split_problems

            problems += split_problems(mine.resume[2].get("split"), split)
        outcome = Preflight(infos, mine.device, mine.lock, mine.resume, split)
    verdict = wire.bcast(np.array([len(problems)], np.int64), "the preflight verdict")
    if verdict[0]:
        if mine.lock is not None:
            mine.lock.abandon()
        for p in problems:
            say(wire.rank, p)
        return None
    for note in notes:
        print(f"fedmpi: note: {note}", file=sys.stderr, flush=True)
    return outcome


def pipeline_notes(pipelines: list[str]) -> list[str]:
    """Learner files preprocessed otherwise than test.h5 (pipelines as JSON, rank 0's first; empty for a rank with
    a problem of its own). Legal, since a site may need its own steps (registration for scanner-space scans), but
    a difference in the pipeline is one between sites the model learns: each note names what differs."""
    out = []
    for k, theirs in enumerate(pipelines[1:], start=1):
        if not theirs or theirs == pipelines[0]:
            continue
        try:
            changes = setting_changes(json.loads(pipelines[0]), json.loads(theirs), shown=brief)
        except (ValueError, RecursionError):  # another rank's record, cut at PIPELINE_BYTES or not JSON
            changes = ["its record does not read as JSON"]
        more = f"; and {len(changes) - 3} more" if len(changes) > 3 else ""
        out.append(
            f"learner {k}'s volumes were preprocessed otherwise than {TEST_FILE}'s ({TEST_FILE}'s -> its own: "
            f"{'; '.join(changes[:3])}{more}): preprocess every site's scans alike unless a site needs a step of "
            "its own"
        )
    return out
