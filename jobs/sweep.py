"""Run a study: every configuration of a grid, then the membership attacks, then one report.

    python jobs/sweep.py jobs/studies/cpu.yaml                 # local, mpirun; resumable
    python jobs/sweep.py jobs/studies/cpu.yaml --list          # the runs and their state, nothing run
    python jobs/sweep.py --paper original --slurm --out runs/paper-original   # SLURM job array
    python jobs/sweep.py --paper original --slurm --array-limit 4              # at most 4 at once
    python jobs/sweep.py --paper original --collect --out runs/paper-original --report docs/paper

A study file (jobs/studies/*.yaml) names a base config, the groups of runs (each with its own --set overrides,
distributions, algorithms with targets, seeds, and whether to attack them) and where finished runs' small
records go; a key the sweep does not read (seed: for seeds) is refused, and so is a run name that two entries
would give (runs: [fedavg, fedavg]). The sweep can be stopped at any time and started again: a finished run is
skipped, an unfinished one continues from its last checkpoint (--resume), and a run whose finished config
differs from the study's is refused rather than silently reused (`--list` shows it as `differs`, with the
state of every other run). Ctrl-C, a `kill` or a hangup (the terminal closed; not under nohup) of the sweep is
passed on to the run in flight once, which stops at a checkpoint after its round, and the sweep then ends
(exit 130, 143 or 129); a sweep killed outright (SIGKILL) stops it the same way, on Linux. A file named STOP
in the runs' directory stops the sweep between two runs (for a quiet machine, say). After each run its records
(config.json, metrics.jsonl, summary.json, test_predictions.csv, attack.json) are copied to the study's records
directory, which is what gets committed and reported.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import functools
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT))
from make_configs import FAMILIES, configs  # noqa: E402

from fedmpi.algorithms import ALGORITHMS, processes  # noqa: E402
from fedmpi.cli import stdout_closed  # noqa: E402
from fedmpi.config import (  # noqa: E402
    Config,
    TextKeepingDumper,
    TextKeepingLoader,
    integer,
    load_config,
    unknown,
    yaml_problem,
    yaml_value,
)
from fedmpi.errors import EXIT_INTERRUPTED, EXIT_PREEMPTED, EXIT_USAGE, ConfigError  # noqa: E402
from fedmpi.launch import default_mpirun  # noqa: E402
from fedmpi.resume import completed_rounds, recorded_key, resume_key  # noqa: E402
from fedmpi.runlog import read_json, stopped_early  # noqa: E402

RECORDS = ("config.json", "metrics.jsonl", "summary.json", "test_predictions.csv", "attack.json")


# Every key the sweep reads: the study's (read_study, study_paths) and a group's (read_study, study_runs).
STUDY_KEYS = ("base", "out", "records", "report", "groups")
GROUP_KEYS = ("name", "priority", "set", "distributions", "runs", "seeds", "attack")


class StudyError(Exception):
    """A study file the sweep cannot run (unreadable, a key missing, an unknown algorithm, a run whose settings
    do not validate): one line and exit 2, before any run is trained."""


def read_study(path: Path) -> dict:
    """The study file, checked as far as its shape and algorithms go (each run's settings: run_study). Its words are
    read as written (name: 010 stays "010", not YAML 1.1's octal 8); its numbers, priority and seeds, as YAML
    reads them, and refused where YAML 1.1 reads an octal or base-60 number (seeds: [010] was seed 8)."""
    try:
        spec = yaml.load(path.read_text(encoding="utf-8"), Loader=TextKeepingLoader)  # a SafeLoader
    except OSError as e:
        raise StudyError(f"study file {path} cannot be read ({e.strerror})") from None
    except UnicodeDecodeError as e:
        raise StudyError(f"study file {path} is not a YAML text file ({e})") from None
    except yaml.YAMLError as e:
        raise StudyError(f"study file {path} is not a YAML text file ({yaml_problem(e)})") from None
    keys = ("base", "out", "records", "groups")
    if isinstance(spec, dict):
        _check_keys(spec, STUDY_KEYS, f"study file {path}")
    if not isinstance(spec, dict) or any(k not in spec for k in keys) or not isinstance(spec["groups"], list):
        raise StudyError(f"study file {path} must hold {', '.join(keys)} (a list of groups); see jobs/studies/cpu.yaml")
    if not spec["groups"]:  # a sweep of nothing that exits 0 reads as a study done
        raise StudyError(f"study file {path}: groups is empty, so there is nothing to run")
    for i, group in enumerate(spec["groups"]):
        if isinstance(group, dict):
            _check_keys(group, GROUP_KEYS, f"study file {path}, group {group.get('name', f'groups[{i}]')}")
        if not isinstance(group, dict) or any(k not in group for k in ("name", "distributions", "runs")):
            raise StudyError(f"study file {path}: every group needs name, distributions and runs, got {group!r}")
        if not str(group["name"]).strip():  # its runs' names would start with "-"
            raise StudyError(f"study file {path}: groups[{i}] has an empty name")
        # a string where a list belongs would be taken letter by letter (set: train.lr=0.1 as --set t, --set r, ...)
        for key in ("distributions", "runs", "set", "seeds", "attack"):
            if key in group and not isinstance(group[key], list):
                raise StudyError(f"study file {path}, group {group['name']}: {key} must be a list, got {group[key]!r}")
        for key in ("priority", "seeds"):
            if key in group:
                group[key] = _typed(path, group, key)
        _check_seeds(path, group)
        if "attack" in group:
            _check_attack(path, group)
        priority = group.get("priority", 0)
        if isinstance(priority, bool) or not isinstance(priority, (int, float)):
            raise StudyError(f"study file {path}, group {group['name']}: priority must be a number, got {priority!r}")
        for entry in group["runs"]:
            algo, *target = str(entry).split()
            if algo not in ALGORITHMS or len(target) > 1:
                raise StudyError(
                    f"study file {path}, group {group['name']}: {entry!r} is not ALGORITHM [TARGET]; algorithms: "
                    f"{', '.join(ALGORITHMS)}"
                )
            try:
                float(target[0]) if target else 0.0
            except ValueError:
                raise StudyError(
                    f"study file {path}, group {group['name']}: {entry!r}: the target is not a number"
                ) from None
            if target and float(target[0]) and ALGORITHMS[algo].sparsity == "none":  # a name promising a sparsity
                raise StudyError(f"study file {path}, group {group['name']}: {entry!r}: {algo} does not prune")
    _check_names(path, spec)
    return spec


def _check_names(path: Path, spec: dict) -> None:
    """No two entries may give one run name, its directory: runs: [fedavg, fedavg], a distribution listed twice,
    two groups of one name listing one run, or targets that print alike (0.95, 0.9500001) trained the first and
    found the second finished (or `differs`). Groups of one name that give different runs are fine (cpu.yaml's
    three acc groups)."""

    def source(run: Run) -> str:
        gi, ri, di = run.order[2:]
        group = spec["groups"][gi]
        entry = group["runs"][ri]
        dist = entry_distributions(group, str(entry).split()[0])[di]
        return f"groups[{gi}] ({group['name']}) runs[{ri}] {entry!r} on distributions[{di}] {dist!r}"

    first: dict[str, Run] = {}
    for run in sorted(study_runs(spec), key=lambda r: r.order[2:]):  # in the file's order
        if run.name in first:
            raise StudyError(
                f"study file {path}: run {run.name} would come from {source(first[run.name])} and from "
                f"{source(run)}; each run needs a name of its own"
            )
        first[run.name] = run


class _AttackArguments(argparse.ArgumentParser):
    """`fedmpi attack`'s parser, its usage errors raised rather than printed with an exit."""

    def error(self, message):
        raise StudyError(message)


def _check_attack(path: Path, group: dict) -> None:
    """A group's attack arguments parse as `fedmpi attack`'s: the attacks come after every run is trained, and a
    misspelt option (--max-per-klass) failed only then, hours later."""
    from fedmpi import attack  # torch: only for a study that attacks

    parser = _AttackArguments(prog="python -m fedmpi attack", add_help=False)
    attack.add_arguments(parser)
    try:
        parser.parse_args(["--run", "RUN", *map(str, group["attack"])])
    except StudyError as e:
        raise StudyError(f"study file {path}, group {group['name']}: attack: {e}") from None


def _check_keys(mapping: dict, known: tuple[str, ...], where: str) -> None:
    """StudyError for a key the sweep does not read, a misspelling above all: seed: [0, 1] for seeds trained seed 0
    alone, without a word."""
    for key in mapping:
        if key not in known:
            raise StudyError(f"{where}: {unknown(str(key), str(key), list(known), kind='key')}")


def _typed(path: Path, group: dict, key: str):
    """A group's number (or list of numbers) as YAML reads it: StudyError where that is YAML 1.1's octal or base 60."""
    value = group[key]
    try:
        return [yaml_value(v, key) for v in value] if isinstance(value, list) else yaml_value(value, key)
    except ConfigError as e:
        raise StudyError(f"study file {path}, group {group['name']}: {e}") from None


def _check_seeds(path: Path, group: dict) -> None:
    """Each seed an integer (run.seed's rule), none listed twice: seeds: [0, 0] listed every run of the group twice,
    and the sweep found the second finished. The group's seeds become those integers, so that a run's name says the
    seed it trains (seeds: [1.0] was named -s1.0 and trained run.seed=1)."""
    seen: list[int] = []
    for seed in group.get("seeds", []):
        try:
            value = integer(seed)
        except ValueError:
            raise StudyError(
                f"study file {path}, group {group['name']}: seeds: expected an integer, got {seed!r}"
            ) from None
        if value in seen:
            raise StudyError(f"study file {path}, group {group['name']}: seed {value} is listed twice")
        seen.append(value)
    if "seeds" in group:
        group["seeds"] = seen


@dataclass
class Run:
    name: str
    group: str
    sets: list[str]
    attack: list[str] | None  # extra `fedmpi attack` arguments, None = not attacked
    order: tuple = field(default=())


def study_runs(spec: dict) -> list[Run]:
    """Every run of a study file, in the order they are trained: by group priority, then seed, so
    that a partial study already holds one complete seed of its most important groups."""
    runs = []
    for gi, group in enumerate(spec["groups"]):
        for ri, entry in enumerate(group["runs"]):
            algo, *target = str(entry).split()
            target = float(target[0]) if target else 0.0
            for di, dist in enumerate(entry_distributions(group, algo)):
                for seed in group.get("seeds", [0]):
                    name = f"{group['name']}-{dist}-{algo}" + (f"-{target:g}" if target else "") + f"-s{seed}"
                    sets = [
                        *group.get("set", []),
                        f"data.distribution={dist}",
                        f"federation.algorithm={algo}",
                        f"federation.target={target}",
                        f"run.seed={seed}",
                        f"run.name={name}",
                    ]
                    attack = group.get("attack")
                    runs.append(
                        Run(
                            name,
                            group["name"],
                            sets,
                            None if attack is None else list(attack),
                            (group.get("priority", 0), seed, gi, ri, di),
                        )
                    )
    return sorted(runs, key=lambda r: r.order)


def entry_distributions(group: dict, algo: str) -> list[str]:
    """A centralized run pools every learner's data: one distribution stands for all."""
    dists = group["distributions"]
    return dists[:1] if ALGORITHMS[algo].trains_centrally else dists


def state(cfg) -> str:
    """'finished', 'partial' (resumable), 'new', or 'differs' (finished with other settings than the study's, or
    with no readable config.json to show its settings) for the run cfg describes."""
    run_dir = cfg.run_dir
    done = completed_rounds(cfg)
    if done is not None:  # finished, perhaps under another federation.rounds: that differs
        try:
            recorded = read_json(run_dir / "config.json", ValueError)
        except ValueError:
            return "differs"  # its settings cannot be shown to be the study's
        same = done == cfg.federation.rounds and recorded_key(recorded) == resume_key(cfg)
        return "finished" if same else "differs"
    return "partial" if (run_dir / "metrics.jsonl").exists() else "new"


PR_SET_PDEATHSIG = 1  # linux/prctl.h


def stop_with_parent(parent: int) -> None:
    """In a step, between fork and exec (Linux): the kernel sends it SIGTERM when the sweep dies, however it dies
    (SIGKILL, the OOM killer), so the run stops at a checkpoint as on a `kill` of the sweep. Before, a killed
    sweep left its federation running on, unseen. A sweep that died before the call is caught by its pid."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(AttributeError, OSError):  # no prctl to be found: the step runs as before
            ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent:
        os.kill(os.getpid(), signal.SIGTERM)


def run_step(cmd: list[str], log=None, cwd: Path | None = None) -> tuple[int, int | None]:
    """Run a step to its end: (its exit code, the stop signal the sweep got meanwhile, or None).

    The step runs in a session of its own, and each SIGINT or SIGTERM the sweep gets is passed on to it once and
    waited for: a federation stops at a checkpoint after its round (exit 75) on the first, and mpirun aborts the
    ranks at once on a second. Before, Ctrl-C reached the sweep and mpirun both and subprocess.run killed mpirun
    a quarter of a second later, before that checkpoint; a `kill` of the sweep left the federation running unseen.
    A sweep killed outright (SIGKILL) stops the step the same way, through stop_with_parent."""
    output = {} if log is None else {"stdout": log, "stderr": subprocess.STDOUT}  # log: an open file
    proc = subprocess.Popen(
        cmd,
        cwd=cwd,
        stdin=subprocess.DEVNULL,
        start_new_session=True,
        preexec_fn=functools.partial(stop_with_parent, os.getpid()),
        **output,
    )
    got: list[int] = []

    def forward(signum, _frame) -> None:
        got.append(signum)
        if proc.returncode is None:  # a hangup (the terminal closed) stops the step as a kill does
            proc.send_signal(signal.SIGTERM if signum == signal.SIGHUP else signum)

    stops = [signal.SIGINT, signal.SIGTERM]
    if signal.getsignal(signal.SIGHUP) is not signal.SIG_IGN:  # under nohup the hangup stays ignored
        stops.append(signal.SIGHUP)  # in its own session the step no longer gets the terminal's hangup itself
    before = {sig: signal.signal(sig, forward) for sig in stops}
    try:
        code = proc.wait()
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler)
    return code, got[0] if got else None


def call(cmd: list[str], log: Path | None = None, cwd: Path | None = None) -> None:
    """Run a step of the sweep; a failure ends the sweep with one line (and the log's last lines), and so does a stop
    asked of the sweep (SIGINT, SIGTERM) once the step has ended on it, with exit 128 + the signal."""
    print("+", " ".join(cmd), flush=True)
    if shutil.which(cmd[0]) is None:
        raise SystemExit(f"sweep: no {cmd[0]} here (give --mpirun, or load the module that has it)")
    if log is None:
        code, stop = run_step(cmd, cwd=cwd)
    else:
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "a") as fh:
            code, stop = run_step(cmd, fh)
    if stop is not None:
        with contextlib.suppress(OSError):  # after a hangup the terminal may be gone
            print(
                f"sweep: stopped by {signal.Signals(stop).name} (the step ended with exit {code}); run the sweep "
                "again to continue: a stopped run resumes from its last checkpoint",
                file=sys.stderr,
                flush=True,
            )
        raise SystemExit(128 + stop)
    if code == EXIT_PREEMPTED:  # a stop sent to the run itself (its mpirun, its ranks, a scheduler's warning)
        name = f"{log.name.removesuffix('.log')} " if log is not None else ""
        print(
            f"sweep: the run {name}stopped at a checkpoint (exit {code}); run the sweep again to continue it",
            file=sys.stderr,
            flush=True,
        )
        raise SystemExit(EXIT_PREEMPTED)
    if code and log is None:
        raise SystemExit(f"sweep: {' '.join(cmd[:6])} ... failed (exit {code}); its output is above")
    if code and log is not None:
        tail = "".join(log.read_text().splitlines(keepends=True)[-15:])
        # the log is the run's (NAME.log, NAME.attack.log): the command's last word is a --set
        raise SystemExit(f"sweep: {log.name.removesuffix('.log')} failed (exit {code}); last lines of {log}:\n{tail}")


def attack_is_current(run_dir: Path) -> bool:
    """True when the run's attack.json attacked its final model: the model digests that attack.json and
    summary.json record agree (a finished run resumed again, as the SLURM script and --paper always do, rewrites
    model.npz with the same model, which is not attacked again; a model trained again is). Records without a
    digest (an earlier fedmpi's) count as current when attack.json was written after model.npz."""
    attack, model = run_dir / "attack.json", run_dir / "model.npz"
    if not (attack.exists() and model.exists()):
        return False
    try:
        attacked = read_json(attack, ValueError).get("model_sha256")
        final = read_json(run_dir / "summary.json", ValueError).get("model_sha256")
    except ValueError:
        attacked = final = None
    if attacked and final:
        return attacked == final
    return attack.stat().st_mtime >= model.stat().st_mtime


def study_paths(args, spec: dict) -> tuple[Path, Path, Path, Path]:
    """base, out, records, report: paths in the study file are the repository's, from wherever the sweep
    is started; paths given on the command line are the caller's."""

    def path(given, in_spec) -> Path:
        return Path(given).resolve() if given else (ROOT / in_spec).resolve()

    out = path(args.out, spec["out"])
    return (
        (ROOT / spec["base"]).resolve(),
        out,
        path(args.records, spec["records"]),
        path(args.report, spec.get("report", out / "report")),
    )


def copy_records(run_dir: Path, records: Path) -> None:
    """The run's records as they are now: one it no longer has (attack.json of a model since retrained)
    goes from the copy too."""
    dest = records / run_dir.name
    dest.mkdir(parents=True, exist_ok=True)
    for name in RECORDS:
        if (run_dir / name).exists():
            shutil.copy2(run_dir / name, dest / name)
        else:
            (dest / name).unlink(missing_ok=True)


def launcher(mpirun: str, cfg: Config) -> list[str]:
    """What starts the run cfg describes: mpirun with its ranks, or nothing for one that runs alone."""
    return [] if processes(cfg) == 1 else [mpirun, "-n", str(processes(cfg))]


def train_cmd(args, base: Path, run: Run, out: Path) -> list[str]:
    cfg = load_config(base, [*run.sets, f"run.dir={out}"])
    cmd = [*launcher(args.mpirun, cfg), sys.executable, "-m", "fedmpi", "train", "--config", str(base), "--resume"]
    for s in [*run.sets, f"run.dir={out}"]:
        cmd += ["--set", s]
    return cmd


def run_study(args) -> int:
    spec_path = Path(args.study)
    spec = read_study(spec_path)
    base, out, records, report = study_paths(args, spec)
    runs = study_runs(spec)
    for run in runs:  # every run's settings before the first is trained, not hours later when its turn comes
        try:
            load_config(base, [*run.sets, f"run.dir={out}"])
        except ConfigError as e:
            raise StudyError(f"study file {spec_path}, run {run.name}: {e}") from None
    began = time.time()
    stop_file = out / "STOP"
    for i, run in enumerate(runs, 1):
        cfg = load_config(base, [*run.sets, f"run.dir={out}"])
        status = state(cfg)
        if args.list:
            print(f"{i:3d}/{len(runs)} {status:9s} {run.name}")
            continue
        if status == "differs":
            raise SystemExit(
                f"sweep: {out / run.name} finished with other settings than the study's (or without a readable "
                f"config.json); remove it to rerun"
            )
        if status != "finished" and stop_file.exists():
            print(f"sweep: {stop_file} exists: stopping before {run.name}; remove it and run again to continue")
            return 0
        if status != "finished":
            t0 = time.time()
            print(f"sweep: [{i}/{len(runs)}] {run.name} ({status})", flush=True)
            call(train_cmd(args, base, run, out), out / "logs" / f"{run.name}.log")
            print(f"sweep: {run.name} done in {(time.time() - t0) / 60:.1f} min", flush=True)
        copy_records(out / run.name, records)
    if args.list:
        return 0
    for run in runs:
        if run.attack is None or args.no_attack:
            continue
        run_dir = out / run.name
        if not attack_is_current(run_dir):
            call(
                [sys.executable, "-m", "fedmpi", "attack", "--run", str(run_dir), *run.attack],
                out / "logs" / f"{run.name}.attack.log",
            )
        copy_records(run_dir, records)
    call([sys.executable, "-m", "fedmpi", "report", str(records), "--out", str(report)])
    print(f"sweep: study done in {(time.time() - began) / 60:.1f} minutes; report in {report}")
    return 0


def paper_config(family: str, name: str) -> Path:
    """A paper run's config file, jobs/configs/paper/<family>/<name>.yaml (written by make_configs.py)."""
    return HERE / "configs" / "paper" / family / f"{name}.yaml"


def paper_runs(family: str, out: Path) -> list[tuple[str, Path, Config]]:
    """(run name, config file, its Config under run.dir=out) for each paper run of the family: the committed file as
    it is now (README has users point its data.dir at their split), not make_configs.py's dict. Every file is
    checked before the first run is trained or submitted, not by its run once its turn comes."""
    runs = []
    for each, name, _ in configs():
        if each != family:
            continue
        source = paper_config(family, name)
        if not source.is_file():
            raise StudyError(f"{source} is missing: python jobs/make_configs.py writes the paper configs")
        try:
            runs.append((name, source, load_config(source, [f"run.dir={out}"])))
        except ConfigError as e:
            raise StudyError(f"{source}: {e}") from None
    return runs


def run_paper(args) -> int:
    out = Path(args.out or f"runs/paper-{args.paper}").resolve()  # the array's tasks start in the checkout
    if args.slurm:
        chosen = paper_runs(args.paper, out)
        out.mkdir(parents=True, exist_ok=True)
        by_tasks: dict[int, list[str]] = {}  # one array per rank count: a site's split may have other than 8 learners
        for name, source, run_cfg in chosen:
            # read and written keeping each unquoted word as written: safe_load and safe_dump wrote dir: 010 as 8
            cfg = yaml.load(source.read_text(encoding="utf-8"), Loader=TextKeepingLoader) or {}  # empty: defaults
            cfg["run"] = {**(cfg.get("run") or {}), "dir": str(out)}  # `run:` alone is null
            path = out / "configs" / f"{name}.yaml"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(yaml.dump(cfg, Dumper=TextKeepingDumper, sort_keys=False))
            by_tasks.setdefault(processes(run_cfg), []).append(str(path))
        limit = f"%{args.array_limit}" if args.array_limit else ""
        for tasks, paths in sorted(by_tasks.items()):
            listing = out / ("configs.txt" if len(by_tasks) == 1 else f"configs-{tasks}-tasks.txt")
            listing.write_text("\n".join(paths) + "\n")
            # --ntasks over sweep.slurm's own: each array's tasks are its configs' learners + 1 (1 when central).
            # From the checkout: each task finds jobs/fedsparsify.slurm, the venv and data/ from its submit directory
            array = [f"--array=1-{len(paths)}{limit}", f"--ntasks={tasks}"]
            call(["sbatch", *array, str(HERE / "sweep.slurm"), str(listing)], cwd=HERE.parent)
        print(
            f"submitted {len(chosen)} runs; when they are done: python jobs/sweep.py --paper {args.paper} "
            f"--collect --out {out}"
        )
        return 0
    if not args.collect:
        for _, source, cfg in paper_runs(args.paper, out):
            train = [sys.executable, "-m", "fedmpi", "train", "--config", str(source), "--set", f"run.dir={out}"]
            call([*launcher(args.mpirun, cfg), *train, "--resume"])
    for summary in sorted(out.glob("*/summary.json")):
        if stopped_early(summary.parent):
            print(f"sweep: {summary.parent} stopped before its last round; resume it, then collect again")
            continue
        if not attack_is_current(summary.parent):
            call([sys.executable, "-m", "fedmpi", "attack", "--run", str(summary.parent)])
    call([sys.executable, "-m", "fedmpi", "report", str(out), "--out", str(args.report or out / "report")])
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("study", nargs="?", help="study file (jobs/studies/*.yaml)")
    ap.add_argument("--paper", choices=sorted(FAMILIES), help="run the paper configs of this family instead")
    ap.add_argument("--out", help="parent directory of the runs (default: the study's `out`)")
    ap.add_argument("--report", help="write the report here (default: the study's `report`)")
    ap.add_argument("--records", help="study: copy the runs' records here (default: the study's `records`)")
    ap.add_argument("--list", action="store_true", help="study: list the runs and their state; run nothing")
    ap.add_argument("--no-attack", action="store_true", help="study: train only")
    ap.add_argument("--slurm", action="store_true", help="--paper: write the config list and submit an array")
    ap.add_argument("--collect", action="store_true", help="--paper: skip training; attack and report")
    ap.add_argument(
        "--array-limit",
        type=int,
        metavar="K",
        help="--paper --slurm: at most K federations at once (sbatch --array=1-N%%K); default: as the queue allows",
    )
    ap.add_argument("--mpirun", default=default_mpirun(), help="launcher for local runs (default: %(default)s)")
    args = ap.parse_args(argv)
    if bool(args.study) == bool(args.paper):
        ap.error("give a study file or --paper FAMILY")
    # an option of the other mode would be silently ignored (--list starting 87 federations)
    other = ("slurm", "collect", "array_limit") if args.study else ("list", "no_attack", "records")
    given = [f"--{name.replace('_', '-')}" for name in other if getattr(args, name)]
    if given:
        ap.error(
            f"{', '.join(given)} {'apply' if len(given) > 1 else 'applies'} only with "
            f"{'--paper' if args.study else 'a study file'}"
        )
    if args.array_limit is not None and (args.array_limit < 1 or not args.slurm):
        ap.error("--array-limit takes K >= 1, with --paper --slurm")
    try:
        return run_paper(args) if args.paper else run_study(args)
    except StudyError as e:
        print(f"sweep: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except BrokenPipeError:  # `--list | head`
        return stdout_closed()
    except KeyboardInterrupt:  # between two steps (a step in flight hears it through run_step): nothing is running
        print("sweep: interrupted between runs; run the sweep again to continue", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
