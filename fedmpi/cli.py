"""`python -m fedmpi train|attack|predict|report`: argument parsing and dispatch only.

`train` takes the preemption signals (fedmpi.preemption) and forks the rank's sentinel (fedmpi.sentinel)
before anything else is imported, then hands over to fedmpi.launch; `attack`, `predict` and `report`
are plain one-process commands.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys

from .errors import EXIT_INTERRUPTED, EXIT_SIGNAL_BASE, Terminated


class _Once(argparse.Action):
    """An option given at most once: a second --config replaced the first without a word (a job script's own
    --config FILE, then the user's)."""

    def __call__(self, parser, namespace, values, option_string=None):
        given = getattr(namespace, self.dest, None)
        if given is not None:
            parser.error(f"{option_string} given twice ({given}, then {values}): give one, and --set for the changes")
        setattr(namespace, self.dest, values)


def _parser() -> argparse.ArgumentParser:
    from . import attack, predict, report
    from .config import describe  # numpy and more: not before `train` has taken the preemption signals

    p = argparse.ArgumentParser(prog="python -m fedmpi", description="Federated brain-age training with FedSparsify.")
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser(
        "train",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        help="run a federation (under mpirun: 1 server + N learners) or the centralized baseline",
        description="Run a federation: mpirun -n <learners+1> python -m fedmpi train [--config FILE] [--set k=v ...]\n"
        "With no data.dir it runs on the embedded synthetic cohort (generated once, cached).",
        epilog="options (section.option = default):\n" + describe(),
    )
    t.add_argument("--config", action=_Once, help="YAML file with sections data, model, train, federation, eval, run")
    t.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override one option, repeatable")
    t.add_argument(
        "--resume",
        action="store_true",
        help="continue run.name from its last good checkpoint (starts fresh if there is none)",
    )
    t.add_argument("--overwrite", action="store_true", help="replace an unfinished run of the same name")
    a = sub.add_parser(
        "attack",
        help="membership inference against a finished run's model",
        description="Membership inference: can an attacker tell a run's training subjects from held-out ones?",
    )
    attack.add_arguments(a)
    a.set_defaults(func=attack.run)
    pr = sub.add_parser(
        "predict",
        help="brain age of each subject of a preprocessed file under a finished run's model",
        description="Predicted age and brain-age gap (predicted minus chronological age) for each subject of a "
        "preprocessed volume file, under a finished run's model; written as CSV.",
    )
    predict.add_arguments(pr)
    pr.set_defaults(func=predict.run)
    r = sub.add_parser(
        "report",
        help="plots and a results table (markdown, CSV) from run directories",
        description="Plots and a results table from one or more run directories (or directories of runs).",
    )
    report.add_arguments(r)
    r.set_defaults(func=report.run)
    return p


def _train(argv: list[str]) -> int:
    """The preemption signals first (fedmpi.preemption: a warning may come while the imports below take
    seconds), then the rank's sentinel, forked while the process is small; the rank handles the rest."""
    from . import preemption
    from .sentinel import supervise, tell_said
    from .startup import StartClock

    with preemption.requests() as stop:
        clock = StartClock()  # in the process the launcher started: the rank, the sentinel's child, counts from it
        try:
            supervise()
            args = _parse_train(argv)
            from .launch import train

            return train(args.config, args.set, resume=args.resume, overwrite=args.overwrite, stop=stop, clock=clock)
        except Terminated as e:  # before the rank's failure path is in place (the imports, the configuration)
            print(f"fedmpi: {e}", file=sys.stderr)
            tell_said()  # the sentinel of a task other than the first would blame its configuration
            return EXIT_SIGNAL_BASE + signal.SIGTERM


def _parse_train(argv: list[str]) -> argparse.Namespace:
    """`train`'s arguments. Every task of the job parses the same ones and reaches the same verdict, so a usage
    error or --help is printed by the launcher's first task alone (not once per rank); each exits with its code."""
    from .sentinel import first_task

    parser = _parser()
    if first_task():
        return parser.parse_args(argv)
    with open(os.devnull, "w") as quiet, contextlib.redirect_stdout(quiet), contextlib.redirect_stderr(quiet):
        return parser.parse_args(argv)


def stdout_closed() -> int:
    """The exit code once stdout's reader has gone (`| head`): the status of a tool the kernel's SIGPIPE ends, and
    no traceback; stdout now points at /dev/null, so the interpreter's final flush has nothing to fail on."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)
    return 128 + signal.SIGPIPE


def main(argv: list[str] | None = None) -> int:
    """`python -m fedmpi`; returns the exit code. `train` goes to _train unparsed (the preemption signals come before
    the imports that parsing needs); `attack`, `predict` and `report` are parsed and run here."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["train"]:
        return _train(argv)
    args = _parser().parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:  # outputs are written whole or not at all: nothing to clean up
        print(f"fedmpi {args.command}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        return stdout_closed()
