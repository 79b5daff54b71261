"""`python -m preprocess synth|nifti|split|qc`: command-line front end.

Exit codes: 0 success (or output already up to date), 2 usage or bad input (a message on
stderr, never a traceback, nothing written; nifti keeps its good subjects staged for the
re-run), also a worker process that died (finished subjects stay staged), 130 interrupted
(finished subjects stay staged and a re-run resumes).
"""

from __future__ import annotations

import argparse
import math
import signal
import sys
from pathlib import Path

from fedmpi.cli import stdout_closed
from fedmpi.config import MAX_WORKERS, integer
from fedmpi.errors import EXIT_INTERRUPTED, EXIT_USAGE, STORAGE_ERRNOS, UserError
from preprocess import bids, convert, distributions, grid, h5io, nifti, parallel, qc, register, split, synth

WORKERS_HELP = f"processes (default: the CPUs this process may use; at most {MAX_WORKERS})"


class _Parser(argparse.ArgumentParser):
    """argparse that reports errors in the same form as the rest of the CLI (exit 2)."""

    def error(self, message):
        self.print_usage(sys.stderr)
        raise SystemExit(_fail(message))


def _whole(text: str) -> int:
    """An integer by fedmpi's rule for its integer options (1e3 and 1000.0 are 1000; 1.5 is refused, in its words);
    every refusal is an ArgumentTypeError, whose message argparse prints as it is (for a ValueError it would print
    the private type function's name: "invalid _positive value")."""
    try:
        return integer(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None


def _integer(text: str, low: int) -> int:
    """An integer >= low."""
    value = _whole(text)
    if value < low:
        raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
    return value


def _positive(text: str) -> int:
    return _integer(text, 1)


def _nonnegative(text: str) -> int:
    return _integer(text, 0)


def _workers(text: str) -> int:
    """1..MAX_WORKERS (fedmpi's bound for data.workers): each worker is a process holding its own imports and a
    subject's volumes, and `--workers 10000` would try to start one per subject."""
    value = _integer(text, 1)
    if value > MAX_WORKERS:
        raise argparse.ArgumentTypeError(f"must be <= {MAX_WORKERS}, got {value}")
    return value


def _megabytes(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a positive number of MB, got {text}")
    return value


class _AgeRange(argparse.Action):
    """MIN MAX as a tuple; refused unless both are finite, MIN < MAX, and both within bids.HUMAN_AGES."""

    def __call__(self, parser, namespace, values, option_string=None):
        low, high = values
        if not (math.isfinite(low) and math.isfinite(high) and low < high):
            parser.error(f"argument --age-range: needs finite MIN < MAX, got {low:g} {high:g}")
        least, most = bids.HUMAN_AGES
        if low < least or high > most:
            parser.error(
                f"argument --age-range: ages are in years, from {least:g} (counted from term) to {most:g}, "
                f"got {low:g} {high:g}"
            )
        setattr(namespace, self.dest, (low, high))


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not -1.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be a correlation in [-1, 1], got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """Every subcommand's arguments; a usage error is reported like the commands' own errors (exit 2)."""
    parser = _Parser(prog="python -m preprocess", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("synth", help="write the synthetic BIDS-like T1 cohort")
    p.add_argument("--out", required=True, type=Path, help="output directory (created)")
    p.add_argument("--subjects", type=_positive, default=200)
    p.add_argument("--seed", type=_nonnegative, default=0)
    p.add_argument(
        "--space",
        choices=synth.SPACES,
        default="mni",
        help="mni: heads where the template is; native: random rigid head pose plus ground truth "
        "under derivatives/synth-truth/ (to exercise nifti --register)",
    )
    p.add_argument("--workers", type=_workers, default=None, help=WORKERS_HELP)
    p.add_argument("--quiet", action="store_true", help="no progress bar")

    p = sub.add_parser("nifti", help="preprocess a BIDS dataset into one HDF5 file")
    p.add_argument("--bids", required=True, type=Path, help="dataset root with participants.tsv")
    p.add_argument("--out", required=True, type=Path, help="output FILE.h5")
    p.add_argument("--voxel", type=_whole, choices=sorted(grid.GRIDS), default=4, help="MNI grid spacing in mm")
    p.add_argument("--dtype", choices=tuple(h5io.DTYPES), default="float16")
    p.add_argument("--workers", type=_workers, default=None, help=WORKERS_HELP)
    p.add_argument(
        "--skip-bad", action="store_true", help="write the good subjects and FILE.skipped.tsv instead of failing"
    )
    (low, high), (least, most) = bids.DEFAULT_AGE_RANGE, bids.HUMAN_AGES
    p.add_argument(
        "--age-range",
        nargs=2,
        type=float,
        metavar=("MIN", "MAX"),
        action=_AgeRange,
        default=bids.DEFAULT_AGE_RANGE,
        help=f"plausible ages in years, MIN < age <= MAX, within {least:g}..{most:g}; others are bad input "
        f"(default: {low:g} {high:g})",
    )
    p.add_argument(
        "--max-image-mb",
        type=_megabytes,
        default=nifti.DEFAULT_MAX_IMAGE_MB,
        metavar="MB",
        help="largest image as float32, in MB, checked from the header before reading "
        f"(default: {nifti.DEFAULT_MAX_IMAGE_MB:g})",
    )
    p.add_argument(
        "--register",
        choices=register.METHODS,
        default="none",
        help="register each image to the MNI152 template first (ANTs; needs the register extra); "
        "none: images are already in MNI world coordinates",
    )
    p.add_argument(
        "--skull-strip",
        dest="skull_strip",
        choices=register.SKULL_STRIP,
        default="none",
        help="brain extraction before registration (deepbet needs the register extra); "
        "none: input is already skull-stripped, or whole-head",
    )
    p.add_argument(
        "--min-ncc",
        type=_fraction,
        default=None,
        help=f"with --register: subjects whose template correlation is below this are bad input "
        f"(default {qc.DEFAULT_MIN_NCC})",
    )
    p.add_argument(
        "--select",
        action="append",
        type=_entity,
        default=[],
        metavar="KEY-VALUE",
        help="keep the T1w images whose names hold this BIDS entity (repeatable: --select ses-2 --select run-1; "
        "a name without ses- is of its ses-* folder's session); a subject must end with one image",
    )
    p.add_argument(
        "--ages-optional",
        action="store_true",
        help="keep subjects whose age is missing (no participants.tsv, no age column, n/a) with age n/a, for "
        "python -m fedmpi predict (training and split need every age); an age that is given must be plausible",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")

    p = sub.add_parser("split", help="test set + per-learner files from a preprocessed file")
    p.add_argument("--h5", required=True, type=Path, help="preprocessed FILE.h5")
    p.add_argument("--out", required=True, type=Path, help="output directory")
    p.add_argument("--learners", type=_whole, default=8)
    p.add_argument("--distribution", choices=distributions.DISTRIBUTIONS, default="uniform-iid")
    p.add_argument("--test-fraction", type=float, default=distributions.TEST_FRACTION)
    p.add_argument("--seed", type=_nonnegative, default=0)

    p = sub.add_parser("qc", help="registration quality report: qc.tsv and slice mosaics (needs the report extra)")
    p.add_argument("--h5", required=True, type=Path, help="preprocessed FILE.h5 (any version)")
    p.add_argument("--out", required=True, type=Path, help="report directory (replaced if it is one)")
    p.add_argument(
        "--min-ncc",
        type=_fraction,
        default=None,
        help="flag subjects below this template correlation (default: the file's own --min-ncc, "
        f"else {qc.DEFAULT_MIN_NCC})",
    )
    return parser


def _fail(message: str) -> int:
    print(f"preprocess: error: {message}", file=sys.stderr)
    return EXIT_USAGE


def _entity(text: str) -> str:
    if not bids.ENTITY.match(text):
        raise argparse.ArgumentTypeError(f"{text!r} is not a BIDS entity KEY-VALUE, e.g. ses-2 or run-1")
    return text


def _bad_list(bad: dict[str, str]) -> str:
    return "".join(f"\n  {pid}: {reason}" for pid, reason in sorted(bad.items()))


def _synth(args) -> int:
    out = synth.write_cohort(
        args.out, args.subjects, args.seed, args.workers, progress=not args.quiet, space=args.space
    )
    print(f"wrote {args.subjects} subjects ({args.space} space) to {out}")
    return 0


def _registration(args) -> register.Options | None:
    """The --register/--skull-strip/--min-ncc choice, checked before any work (exit 2 when unusable)."""
    if args.register == "none":
        return None
    register.require_extra(args.register, args.skull_strip)
    min_ncc = qc.DEFAULT_MIN_NCC if args.min_ncc is None else args.min_ncc
    return register.Options(args.register, args.skull_strip, min_ncc)


def _nifti(args) -> int:
    registration = _registration(args)
    try:
        res = convert.convert(
            args.bids,
            args.out,
            voxel=args.voxel,
            dtype=args.dtype,
            workers=args.workers,
            skip_bad=args.skip_bad,
            progress=not args.quiet,
            age_range=args.age_range,
            max_image_mb=args.max_image_mb,
            registration=registration,
            select=tuple(args.select),
            ages_required=not args.ages_optional,
        )
    except convert.BadInput as exc:
        return _fail(f"{exc}:{_bad_list(exc.bad)}")
    if res.up_to_date:
        print(f"{res.path} is up to date")
        return 0
    if res.skipped:
        report = convert.skipped_report_path(res.path)
        print(
            f"warning: skipped {len(res.skipped)} bad subject(s), listed in {report}:{_bad_list(res.skipped)}",
            file=sys.stderr,
        )
    if res.unavailable:
        print(
            f"warning: {len(res.unavailable)} of them ({bids.first_names(res.unavailable)}) failed for want of "
            "memory or an I/O error, not for their image: the output is not up to date until a re-run gets them, "
            f"and the written subjects stay staged in {convert.parts_dir(res.path)} for it",
            file=sys.stderr,
        )
    reused = f" ({res.reused} reused from an earlier run)" if res.reused else ""
    print(f"wrote {res.written} subjects to {res.path}{reused}")
    if res.misplaced:
        worst = sorted(res.misplaced.items(), key=lambda item: item[1])
        print(
            f"warning: {len(worst)} subject(s) correlate with the MNI152 template below {convert.PLACEMENT_NCC} "
            "(heads in MNI space score about 0.5-0.9): are they in MNI space? --register affine registers "
            f"scanner-space images; python -m preprocess qc --h5 {res.path} --out DIR shows them:"
            + "".join(f"\n  {pid}: {r:.2f}" for pid, r in worst),
            file=sys.stderr,
        )
    if res.session_ages_assumed:
        print(_session_ages_note(res.session_ages_assumed), file=sys.stderr)
    if res.ageless:
        print(
            f"note: {len(res.ageless)} of the {res.written} subjects have no age ({bids.first_names(res.ageless)}), "
            "stored as n/a: the file is for python -m fedmpi predict, which leaves their gap n/a; training and split "
            "need every age",
            file=sys.stderr,
        )
    return 0


def _session_ages_note(subjects: list[str]) -> str:
    """One note for all the subjects, not a line each: a UK Biobank run can have tens of thousands."""
    return (
        f"note: {len(subjects)} subject(s) with their image in a session (ses-*) have participants.tsv's age, as no "
        "sub-X/sub-X_sessions.tsv gives one for that session: often the first visit's, not the age at the scan "
        f"({bids.first_names(subjects)}); for per-session ages add sub-X/sub-X_sessions.tsv with columns "
        "session_id and age, as BIDS specifies"
    )


def _split(args) -> int:
    out = split.write_split(
        args.h5,
        args.out,
        learners=args.learners,
        distribution=args.distribution,
        test_fraction=args.test_fraction,
        seed=args.seed,
    )
    print(f"wrote {args.learners} learner files, test.h5 and partition.json to {out}")
    return 0


def _qc(args) -> int:
    out, n, below = qc.write_report(args.h5, args.out, min_ncc=args.min_ncc)
    print(f"wrote qc.tsv and mosaics of {n} subjects to {out}; {below} below the threshold")
    return 0


def main(argv=None) -> int:
    """Run one command; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    registration_only = args.command == "nifti" and (args.skull_strip != "none" or args.min_ncc is not None)
    if registration_only and args.register == "none":
        parser.error("--skull-strip and --min-ncc apply to registration: add --register affine or rigid")
    cpus = parallel.default_workers()
    if getattr(args, "workers", None) and args.workers > cpus:
        extra = "s take" if args.workers - cpus > 1 else " takes"
        plural = "s" if cpus > 1 else ""
        print(
            f"note: --workers {args.workers} on {cpus} CPU{plural}: the extra worker{extra} memory, not time",
            file=sys.stderr,
        )
    # kill/SIGTERM (a job manager, docker stop, a parent's terminate()) stops like Ctrl-C: the worker pool is shut
    # down; left to the default action, the parent dies at once and its spawned workers stay blocked forever on
    # the pool's pipe (holding the terminal's or a pipeline's stdout open)
    previous = signal.signal(signal.SIGTERM, _terminated)
    try:
        return {"synth": _synth, "nifti": _nifti, "split": _split, "qc": _qc}[args.command](args)
    except (UserError, FileExistsError) as exc:
        return _fail(str(exc))
    except KeyboardInterrupt:
        staged = ""
        if args.command == "nifti":
            staged = f"; finished subjects stay in {convert.parts_dir(args.out)} and a re-run resumes"
        print(f"interrupted{staged}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        return stdout_closed()
    except OSError as exc:
        if exc.errno not in STORAGE_ERRNOS:
            raise
        # a full disk, a quota, a read-only remount: the user's to fix; atomic_path's message names the output
        staged = f"; finished subjects stay in {convert.parts_dir(args.out)}" if args.command == "nifti" else ""
        return _fail(f"{exc.strerror or exc}{staged}")
    finally:
        signal.signal(signal.SIGTERM, previous)


def _terminated(signum, frame):
    raise KeyboardInterrupt
