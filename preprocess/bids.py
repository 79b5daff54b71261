"""Find the subjects of a BIDS-like dataset and check participants.tsv against the images.

Pure bookkeeping, no image reading: every problem found here is reported per subject so
that one run lists all of them at once.
"""

from __future__ import annotations

import csv
import dataclasses
import math
import os
import re
import stat
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from fedmpi.errors import UserError

# The image files looked for: suffixes nibabel reads, longest first so ".nii.gz" wins over ".gz". Here, not in
# nifti.py: the trainer reads the age rules of this module, and must not need nibabel (a GPU image without it).
IMAGE_SUFFIXES = (".nii.gz", ".nii", ".mgz", ".hdr")
REQUIRED_COLUMNS = ("participant_id", "age")
MISSING = {"", "n/a", "na", "nan", "none", "null"}
# Plausible human ages in years, MIN < age <= MAX: 0 or a negative age is almost always a
# placeholder or a typo, and 300 is months or a slip of the keyboard, not a person.
DEFAULT_AGE_RANGE = (0.0, 120.0)
# The widest --age-range: ages in years of any human cohort, -1 for one counted from term (preterm infants), 150
# beyond any person. Ages in months or days would pass for years; the trainer holds a learner's mean age to it too.
HUMAN_AGES = (-1.0, 150.0)
ENTITY = re.compile(r"^[a-zA-Z0-9]+-[a-zA-Z0-9]+$")  # a BIDS key-value pair of a file name: ses-2, run-1


# A BIDS label (alphanumeric): a participant_id written without its sub- prefix
BARE_LABEL = re.compile(r"[A-Za-z0-9]+")


def unreadable(what, exc: OSError) -> str:
    """The one line for a file or folder the system will not read (permissions, a directory of that name, I/O)."""
    return f"{what} cannot be read: {exc.strerror or exc}"


class DatasetError(UserError, ValueError):
    """The dataset as a whole cannot be read (no directory, no or malformed participants.tsv)."""


@dataclasses.dataclass(frozen=True)
class Entry:
    """One usable-so-far subject: its row in participants.tsv and its image path."""

    participant_id: str
    age: float
    sex: str
    site: str
    image: Path
    # the image is of a session, but no sessions.tsv gave that session's age: participants.tsv's one age per
    # person stands in, often the first visit's (convert reports these subjects)
    session_age_assumed: bool = False


def _image_suffix(name: str) -> str | None:
    return next((s for s in IMAGE_SUFFIXES if name.endswith("_T1w" + s)), None)


def first_names(names: list[str], shown: int = 3) -> str:
    """ "a, b, c and N more": a message about many subjects names a few and counts the rest (a dataset can
    have tens of thousands, and one placeholder image can stand behind thousands of rows)."""
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return ", ".join(names[:shown]) + more


def find_images(root: Path) -> dict[str, list[Path]]:
    """participant_id -> T1w images under sub-*/anat/ or sub-*/ses-*/anat/ (links included, also those whose
    target is not here: a DataLad or git-annex file not fetched yet). Hidden files are not images: BIDS ignores
    names that start with a dot, and macOS leaves a ._sub-01_T1w.nii.gz (AppleDouble metadata, not a NIfTI)
    beside every file it copies to a network or exFAT disk; pathlib's glob matches them. A name in a folder that
    may be listed but not entered (r without x) counts: scan names the file and the reason (unavailable)."""
    found: dict[str, list[Path]] = {}
    for pattern in ("sub-*/anat/*", "sub-*/ses-*/anat/*"):
        for path in sorted(root.glob(pattern)):
            if path.name.startswith(".") or not _image_suffix(path.name):
                continue
            try:
                present = path.is_file() or path.is_symlink()
            except OSError:  # pathlib raises on EACCES: a traceback before
                present = True
            if present:
                found.setdefault(path.relative_to(root).parts[0], []).append(path)
    return found


def companions(image: Path) -> list[Path]:
    """The files beside `image` that hold part of it: a NIfTI pair's or Analyze image's voxels (.img) and SPM's
    orientation (.mat) beside its .hdr."""
    return [image.with_suffix(suffix) for suffix in (".img", ".mat")] if image.name.endswith(".hdr") else []


def special(path: Path) -> bool:
    """Whether `path` is neither a file nor a directory (a named pipe, a device, a socket): opening a named pipe for
    reading waits for a writer, and a scan would hang there. OSError as stat raises it."""
    mode = path.stat().st_mode
    return not (stat.S_ISREG(mode) or stat.S_ISDIR(mode))


def not_regular(what) -> str:
    return f"{what} is not a regular file (a named pipe, a device or a socket)"


def unavailable(root: Path, image: Path) -> str:
    """Why `image` cannot be opened, or "": a link to a file not here (a DataLad or git-annex file not fetched yet),
    a file or folder the system will not read (permission denied), an I/O error. Found here, as the dataset is
    scanned, the reason is part of the input's fingerprint: once it is fixed, an output that skipped the subject
    is not up to date (an image's own reasons are not, and a chmod leaves the image's size and mtime as they were).
    The files beside a .hdr (companions) too, when they are there."""
    for path in [image, *companions(image)]:
        try:
            if special(path):  # a directory goes on: open says so (unreadable)
                return not_regular(path.relative_to(root))
            with open(path, "rb"):
                pass
        except FileNotFoundError:
            if path != image:  # a .hdr without .mat is usual; nibabel names a missing .img
                continue
            return (
                f"{path.relative_to(root)} links to a file that is not here "
                "(an annexed file not fetched yet? datalad get / git annex get)"
            )
        except OSError as exc:
            return unreadable(path.relative_to(root), exc)
    return ""


def same_files(paths: list[Path]) -> list[list[Path]]:
    """The groups of `paths` that are one existing file, through symbolic or hard links (a DataLad or git-annex
    dataset also links identical files to one object). A link whose target is not here is in none: scan names
    it as not fetched."""
    groups: dict[tuple[int, int], list[Path]] = {}
    for path in paths:
        try:
            st = path.stat()
        except OSError:
            continue
        groups.setdefault((st.st_dev, st.st_ino), []).append(path)
    return [group for group in groups.values() if len(group) > 1]


def unreadable_folder(root: Path, pid: str) -> str:
    """Why a subject's folders cannot be listed (permission denied, an I/O error), or "": pathlib's glob skips
    such a folder without a word, and the subject would read as having no image."""
    todo = [root / pid]
    while todo:
        folder = todo.pop(0)
        try:
            with os.scandir(folder) as listing:
                names = [e.name for e in listing if e.is_dir()]
        except FileNotFoundError:
            continue
        except OSError as exc:
            return unreadable(folder.relative_to(root), exc)
        todo += [folder / n for n in sorted(names) if n == "anat" or n.startswith("ses-")]
    return ""


def entities(path: Path) -> set[str]:
    """The key-value pairs of a BIDS file name: sub-01_ses-2_run-1_T1w.nii.gz -> {sub-01, ses-2, run-1}."""
    return {part for part in path.name.split(".")[0].split("_") if ENTITY.match(part)}


def image_entities(root: Path, image: Path) -> set[str]:
    """The entities of an image's file name, and the ses-* folder it lies in when the name has no ses-: BIDS wants
    it in the name too, but datasets that leave it out exist, and pybids reads the session from the folder."""
    found = entities(image)
    folder = session_of(root, image)
    if folder is not None and not any(e.startswith("ses-") for e in found):
        found.add(folder)
    return found


def select_images(root: Path, paths: list[Path], select: tuple[str, ...]) -> list[Path]:
    """The images whose entities (image_entities) hold every one of `select` (all of them when it is empty)."""
    return [p for p in paths if set(select) <= image_entities(root, p)]


def session_of(root: Path, image: Path) -> str | None:
    """The ses-* folder the image lies in (ses-2), None outside one."""
    return next((part for part in image.relative_to(root).parts if part.startswith("ses-")), None)


def session_age(
    root: Path, pid: str, image: Path, age_range: tuple[float, float], ages_required: bool = True
) -> float | None:
    """The age at the image's session from sub-X/sub-X_sessions.tsv (BIDS: session_id, age), or None when the
    image has no session, or no sessions.tsv with an age column. In a longitudinal dataset participants.tsv
    holds one age per person, often the first visit's; the age at the scan is the one a brain-age model
    needs, so a sessions.tsv with ages must give this session's (ValueError otherwise; NaN, an unknown age, when
    ages are not required, as for a file to predict on)."""
    session = session_of(root, image)
    tsv = root / pid / f"{pid}_sessions.tsv"
    if session is None or not tsv.is_file():
        return None
    name = tsv.relative_to(root)
    try:
        with open(tsv, newline="", encoding="utf-8-sig") as f:
            table = tsv_rows(f, name)
            header = [column.strip() for column in next(table, [])]
            rows = [dict(zip(header, (cell.strip() for cell in cells))) for cells in table]
    except OSError as exc:
        raise ValueError(unreadable(name, exc)) from None
    except UnicodeDecodeError as exc:
        raise ValueError(not_utf8(name, tsv, exc)) from None
    if "session_id" not in header:
        raise ValueError(f"{name} has no session_id column (columns: {', '.join(header) or 'none'}; tab-separated?)")
    if "age" not in header:
        return None
    # BIDS writes ses-2; a bare 2 is taken to mean the same
    ages = [r.get("age", "") for r in rows if r.get("session_id") in (session, session.removeprefix("ses-"))]
    if not ages or ages[0].lower() in MISSING:
        if not ages_required:
            return math.nan  # unknown at this session: participants.tsv's age is often another visit's
        raise ValueError(f"{name} has an age column but no age for {session}")
    try:
        return parse_age(ages[0], age_range)
    except ValueError as exc:
        raise ValueError(f"{name}, {session}: {exc}") from None


def not_utf8(name, path: Path, exc: UnicodeDecodeError) -> str:
    """The reason a text file `path` (shown as `name`) is not UTF-8: the first bad byte and its offset in the
    file. A text stream decodes in chunks of some KiB, after its byte-order mark, and `exc` counts from the
    chunk: past the first chunk, or after a mark, its offset pointed at the wrong byte. The file is read again
    as bytes to find the right one (whole UTF-8, a mark included, decodes byte for byte)."""
    byte, offset = exc.object[exc.start], exc.start
    try:
        path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as whole:
        byte, offset = whole.object[whole.start], whole.start
    except OSError:
        pass  # the stream's own offset, as before
    return f"{name} is not UTF-8 text (byte 0x{byte:02x} at offset {offset}); save it as UTF-8"


def tsv_rows(f, name) -> Iterator[list[str]]:
    """The rows of a tab-separated file `f` (opened with newline=""), each from one line. BIDS TSV has no
    quoting, but csv reads a cell that starts with a double quote up to the next one, lines later: a site
    written "Oxford without its closing quote would take the rows after it into that cell without a word.
    ValueError naming `name` and the line where such a quote opens, or the line before a cell above csv's
    128 KiB limit."""
    reader = csv.reader(f, delimiter="\t")
    while True:
        start = reader.line_num + 1
        try:
            cells = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            if reader.line_num == start:  # a line of its own above the limit
                raise ValueError(f"{name} cannot be read past line {start - 1}: {exc}") from None
            cells = []  # the runaway cell passed the limit: the unclosed quote below is the reason
        if reader.line_num != start:
            raise ValueError(
                f"{name} line {start} has a double quote that does not close on that line, so the lines after it "
                "would be read into one cell; BIDS TSV has no quoting: remove the quote (or close it on that line)"
            )
        yield cells


def read_participants(root: Path, ages_required: bool = True) -> list[dict[str, str]]:
    """Rows of participants.tsv as dicts; DatasetError when missing, unreadable or lacking columns. Without
    `ages_required` (a file to predict on) the age column may be missing, and the file too: then every subject
    with an image is a row of its own, sex and site unknown."""
    if not root.exists():
        raise DatasetError(f"BIDS directory {root} does not exist")
    if not root.is_dir():
        raise DatasetError(f"--bids {root} is a file; give the dataset's directory")
    tsv = root / "participants.tsv"
    try:
        if special(tsv):
            raise DatasetError(not_regular(tsv))
        # utf-8-sig: spreadsheet programs often start the file with a byte-order mark, which
        # would otherwise become part of the first column's name.
        with open(tsv, newline="", encoding="utf-8-sig") as f:
            columns, *rows = list(tsv_rows(f, tsv)) or [[]]
    except FileNotFoundError:
        if not ages_required:
            return [{"participant_id": pid} for pid in sorted(find_images(root))]
        raise DatasetError(
            f"{tsv} is missing (needs columns participant_id, age[, sex, site]; scans to predict on need no "
            "ages: --ages-optional)"
        ) from None
    except UnicodeDecodeError as exc:
        raise DatasetError(not_utf8(tsv, tsv, exc)) from None
    except ValueError as exc:  # tsv_rows' reasons: an unclosed quote, a cell above csv's limit
        raise DatasetError(str(exc)) from None
    except OSError as exc:  # permission denied, a directory of that name, an I/O error
        raise DatasetError(unreadable(tsv, exc)) from None
    columns = [c.strip() for c in columns]  # as the cells ('participant_id ' from a spreadsheet), and sessions.tsv's
    repeated = sorted({c for c in columns if c and columns.count(c) > 1})  # not blank ones
    if repeated:  # a dict per row would keep the last one's values without a word
        raise DatasetError(f"{tsv} has column(s) {', '.join(repeated)} more than once; keep one")
    absent = [c for c in REQUIRED_COLUMNS if c not in columns and (ages_required or c != "age")]
    if absent == ["age"] and any(root.glob("sub-*/sub-*_sessions.tsv")):
        absent = []  # a longitudinal dataset may keep its ages per session only
    if absent:
        raise DatasetError(f"{tsv} lacks column(s) {', '.join(absent)} (has: {', '.join(columns) or 'none'})")
    # as csv.DictReader: blank lines skipped, cells past the header dropped, missing ones empty
    table = [{c: cells[i].strip() if i < len(cells) else "" for i, c in enumerate(columns)} for cells in rows if cells]
    for row in table:  # a bare label (01) names sub-01, as a sessions.tsv's bare 2 names ses-2
        pid = row["participant_id"]
        if BARE_LABEL.fullmatch(pid):  # not n/a or sub_01: a message would name a folder sub-n/a nobody wrote
            row["participant_id"] = f"sub-{pid}"
    return table


def age_range_text(age_range: tuple[float, float]) -> str:
    """The accepted interval as it appears in messages: (0, 120] years."""
    return f"({age_range[0]:g}, {age_range[1]:g}] years"


def bad_ages(ages, age_range: tuple[float, float] = DEFAULT_AGE_RANGE) -> np.ndarray:
    """Indices of the ages that are not finite or not in (MIN, MAX]: the rule parse_age applies to one."""
    ages = np.asarray(ages, dtype=np.float64)
    with np.errstate(invalid="ignore"):
        return np.flatnonzero(~(np.isfinite(ages) & (ages > age_range[0]) & (ages <= age_range[1])))


def unknown_ages_note(ages, bad, refused: str) -> str:
    """What a refusal of the ages at indices `bad` adds where one of them is unknown (NaN, as --ages-optional
    stores it): what such a subject is for, and what it is not (`refused`)."""
    if not np.isnan(np.asarray(ages, dtype=np.float64)[bad]).any():
        return ""
    return (
        f"; a subject of unknown age (preprocess nifti --ages-optional) can be dated by fedmpi predict, not {refused}"
    )


def stored_age_range(attrs) -> tuple[float, float]:
    """The (MIN, MAX] a volume file's ages were accepted in (its `age_range` attribute; files written
    before it was stored: the default). ValueError unless MIN < MAX within HUMAN_AGES, as --age-range takes it:
    a file made before that bound (--age-range 0 300, ages in months) passed split and the trainer's own age
    check, and the server then refused its learner's mean age as a record no volume file gives."""
    stored = attrs.get("age_range", DEFAULT_AGE_RANGE)
    try:
        values = np.asarray(stored, dtype=np.float64)
    except (TypeError, ValueError):
        values = np.zeros(0)
    if values.shape != (2,):
        raise ValueError(f"attribute age_range {stored!r} is not two numbers MIN MAX")
    low, high = float(values[0]), float(values[1])
    least, most = HUMAN_AGES
    if not least <= low < high <= most:  # NaN too
        raise ValueError(
            f"attribute age_range {age_range_text((low, high))} is not within {least:g} to {most:g} years, the "
            "widest --age-range (ages in months or days?); re-run preprocess nifti with --age-range in years"
        )
    return low, high


def parse_age(text: str, age_range: tuple[float, float] = DEFAULT_AGE_RANGE) -> float:
    """A finite age in years with MIN < age <= MAX, or ValueError with the reason."""
    if text.lower() in MISSING:
        raise ValueError("missing age")
    try:
        age = float(text)
    except ValueError:
        raise ValueError(f"non-numeric age {text!r}") from None
    if not math.isfinite(age):
        raise ValueError(f"age {text!r} is not a finite number")
    if not age_range[0] < age <= age_range[1]:
        raise ValueError(f"age {text} is outside the plausible range {age_range_text(age_range)} (--age-range)")
    return age


def scan(
    root, age_range: tuple[float, float] = DEFAULT_AGE_RANGE, select: tuple[str, ...] = (), ages_required: bool = True
) -> tuple[list[Entry], dict[str, str]]:
    """Match participants.tsv rows with images: (good entries in TSV order, {subject: reason}).

    `select` keeps the T1w images whose entities (image_entities: the name's, and the ses-* folder's for a name
    without ses-) hold all of its own (ses-2, run-1, acq-mprage, space-...):
    a subject must end with exactly one. An image in a session takes its age from the subject's sessions.tsv
    when that gives one, else from participants.tsv (marked Entry.session_age_assumed). Subjects whose images
    are one file, through links, are all bad: which subject the scan is of is unknown, and it must not count as
    several people. Without `ages_required` (scans to predict on) a subject whose age is missing keeps a NaN age;
    an age that is given must still be plausible."""
    root = Path(root)
    rows = read_participants(root, ages_required)
    images = find_images(root)
    bad: dict[str, str] = {}
    entries: list[Entry] = []
    counts: dict[str, int] = {}
    images_used: dict[Path, str] = {}  # image -> subject, for every image found and present
    for row in rows:
        counts[row["participant_id"]] = counts.get(row["participant_id"], 0) + 1
    for row in rows:
        pid = row["participant_id"]
        if not pid:
            bad["(blank participant_id)"] = "a participants.tsv row has an empty participant_id"
            continue
        if counts[pid] > 1:
            bad[pid] = f"listed {counts[pid]} times in participants.tsv"
            continue
        try:
            told = row.get("age", "")
            unknown = not ages_required and told.lower() in MISSING
            age: float | None = math.nan if unknown else parse_age(told, age_range)
            age_problem = ""
        except ValueError as exc:
            age, age_problem = None, str(exc)
        found = images.get(pid, [])
        paths = select_images(root, found, select)
        if not found:
            bad[pid] = unreadable_folder(root, pid) or f"in participants.tsv but no image {pid}/anat/{pid}_T1w.nii[.gz]"
            continue
        names = ", ".join(str(p.relative_to(root)) for p in found)
        if not paths:
            bad[pid] = f"no T1w image with {' '.join(select)} (--select); it has {names}"
            continue
        if len(paths) > 1:
            chosen = ", ".join(str(p.relative_to(root)) for p in paths)
            linked = "".join(
                f" ({' and '.join(str(p.relative_to(root)) for p in same)} are one file, through a link)"
                for same in same_files(paths)
            )
            bad[pid] = f"several T1w images (choose one with --select, e.g. --select ses-2): {chosen}{linked}"
            continue
        named = next((e for e in entities(paths[0]) if e.startswith("sub-")), pid)
        if named != pid:
            bad[pid] = f"{paths[0].relative_to(root)} is named for {named}, not {pid}: which subject is it?"
            continue
        folder = session_of(root, paths[0])
        in_name = next((e for e in entities(paths[0]) if e.startswith("ses-")), folder)
        # --select goes by the name, the session's age by the folder: another visit's age, unsaid
        if folder is not None and in_name != folder:
            bad[pid] = f"{paths[0].relative_to(root)} is named for {in_name} but lies in {folder}: which session is it?"
            continue
        problem = unavailable(root, paths[0])
        if problem:
            bad[pid] = problem
            continue
        images_used[paths[0]] = pid
        try:
            at_session = session_age(root, pid, paths[0], age_range, ages_required)
        except ValueError as exc:
            bad[pid] = str(exc)
            continue
        if at_session is not None:
            age = at_session
        if age is None:
            bad[pid] = age_problem
            continue
        sex = row.get("sex", "") or "n/a"
        site = row.get("site", "") or "n/a"
        assumed = at_session is None and session_of(root, paths[0]) is not None and math.isfinite(age)
        entries.append(Entry(pid, age, sex, site, paths[0], assumed))
    for pid, paths in images.items():
        if pid not in counts:
            bad[pid] = f"image {paths[0].relative_to(root)} has no row in participants.tsv"
    # one scan as two subjects would count twice and could land in a learner's training file and the test file
    for same in same_files(list(images_used)):
        for path in same:
            others = first_names(sorted(str(p.relative_to(root)) for p in same if p != path))
            reason = (
                f"{path.relative_to(root)} is the same file as {others} (through a link): "
                "one scan cannot be several subjects; which subject is it?"
            )
            pid = images_used[path]
            bad[pid] = f"{bad[pid]}; {reason}" if pid in bad else reason  # an age problem, say, stays said
    return [e for e in entries if e.participant_id not in bad], bad
