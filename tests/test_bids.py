"""preprocess/bids.py: which T1w image and participants.tsv row each subject gets (bids.scan reads no image:
empty files stand in for them)."""

import errno
import os
import re

import pytest

from preprocess import bids, cli


def test_scan_matches_sessions_and_refuses_ambiguous_rows(tmp_path):
    root = tmp_path / "bids"
    for rel in (
        "sub-01/anat/sub-01_T1w.nii.gz",
        "sub-01/anat/sub-01_T2w.nii.gz",  # another modality: not a second T1
        "sub-02/ses-1/anat/sub-02_ses-1_T1w.nii",  # a session layout
        "sub-03/ses-1/anat/sub-03_ses-1_T1w.nii.gz",
        "sub-03/ses-2/anat/sub-03_ses-2_T1w.nii.gz",  # two sessions: which one?
        "sub-04/anat/sub-04_T1w.nii.gz",  # listed twice
    ):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(b"")
    (root / "participants.tsv").write_text(
        "participant_id\tage\tsex\tsite\n"
        "sub-01 \t 60.5\tF \tA\n"  # spaces a spreadsheet left around the cells
        "sub-02\t61\tM\tB\n"
        "sub-03\t62\tF\tC\n"
        "sub-04\t63\tF\tD\n"
        "sub-04\t63\tF\tD\n"
        "\t64\tM\tE\n"
    )
    entries, bad = bids.scan(root)
    assert [(e.participant_id, e.age, e.sex, e.site, e.image.relative_to(root).as_posix()) for e in entries] == [
        ("sub-01", 60.5, "F", "A", "sub-01/anat/sub-01_T1w.nii.gz"),
        ("sub-02", 61.0, "M", "B", "sub-02/ses-1/anat/sub-02_ses-1_T1w.nii"),
    ]
    assert bad == {
        "sub-03": "several T1w images (choose one with --select, e.g. --select ses-2): "
        "sub-03/ses-1/anat/sub-03_ses-1_T1w.nii.gz, sub-03/ses-2/anat/sub-03_ses-2_T1w.nii.gz",
        "sub-04": "listed 2 times in participants.tsv",
        "(blank participant_id)": "a participants.tsv row has an empty participant_id",
    }


def _dataset(root, files, participants):
    root.mkdir(parents=True)
    for rel in files:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(b"")
    (root / "participants.tsv").write_text("participant_id\tage\n" + participants)
    return root


def test_select_picks_one_image_by_its_entities_and_a_session_takes_its_own_age(tmp_path):
    """A longitudinal dataset (UK Biobank's imaging visits are ses-2 and ses-3): --select chooses the visit, and
    the age at that visit comes from sessions.tsv, since participants.tsv often holds the first visit's."""
    root = _dataset(
        tmp_path / "bids",
        [
            "sub-01/ses-2/anat/sub-01_ses-2_T1w.nii.gz",
            "sub-01/ses-3/anat/sub-01_ses-3_T1w.nii.gz",
            "sub-02/ses-2/anat/sub-02_ses-2_run-1_T1w.nii.gz",
            "sub-02/ses-2/anat/sub-02_ses-2_run-2_T1w.nii.gz",
            "sub-03/ses-3/anat/sub-03_ses-3_T1w.nii.gz",
            "sub-04/ses-2/anat/sub-04_ses-2_T1w.nii.gz",
            "sub-05/ses-2/anat/sub-05_ses-2_T1w.nii.gz",
        ],
        "sub-01\t55\nsub-02\t60\nsub-03\t61\nsub-04\tn/a\nsub-05\t50\n",
    )
    (root / "sub-01" / "sub-01_sessions.tsv").write_text("session_id\tage\nses-2\t57.5\nses-3\t59.25\n")
    (root / "sub-04" / "sub-04_sessions.tsv").write_text("session_id\tage\nses-2\t70\n")  # no age in participants
    (root / "sub-05" / "sub-05_sessions.tsv").write_text("session_id\tage\nses-2\t300\n")
    assert bids.entities(root / "sub-02/ses-2/anat/sub-02_ses-2_run-1_T1w.nii.gz") == {"sub-02", "ses-2", "run-1"}

    entries, bad = bids.scan(root, select=("ses-2",))
    assert [(e.participant_id, e.age, e.image.name) for e in entries] == [
        ("sub-01", 57.5, "sub-01_ses-2_T1w.nii.gz"),
        ("sub-04", 70.0, "sub-04_ses-2_T1w.nii.gz"),
    ]
    assert bad["sub-02"].startswith("several T1w images (choose one with --select")
    assert bad["sub-03"] == "no T1w image with ses-2 (--select); it has sub-03/ses-3/anat/sub-03_ses-3_T1w.nii.gz"
    assert bad["sub-05"] == (
        "sub-05/sub-05_sessions.tsv, ses-2: age 300 is outside the plausible range (0, 120] years (--age-range)"
    )

    entries, bad = bids.scan(root, select=("ses-2", "run-2"))
    assert [(e.participant_id, e.image.name) for e in entries] == [("sub-02", "sub-02_ses-2_run-2_T1w.nii.gz")]
    entries, _ = bids.scan(root, select=("ses-3",))
    assert [(e.participant_id, e.age) for e in entries] == [("sub-01", 59.25), ("sub-03", 61.0)]


@pytest.mark.parametrize(
    "sessions, expected",
    [
        ("\ufeffsession_id \t age \nses-3\t 62 \n", 62.0),  # a byte-order mark and padding are read through
        ("session_id\tage\n3\t62\n", 62.0),  # a bare session number means ses-3
        ("session_id\tacq_time\nses-3\t2019-01-01\n", 50.0),  # no age column: participants.tsv's
        ("session_id\tage\nses-2\t60\n", "has an age column but no age for ses-3"),
        ("session_id\tage\nses-3\tn/a\n", "has an age column but no age for ses-3"),
        ("session_id age\nses-3 62\n", "has no session_id column (columns: session_id age; tab-separated?)"),
    ],
)
def test_a_sessions_file_never_leaves_a_session_with_another_visits_age_unsaid(tmp_path, sessions, expected):
    root = _dataset(tmp_path / "bids", ["sub-01/ses-3/anat/sub-01_ses-3_T1w.nii.gz"], "sub-01\t50\n")
    (root / "sub-01" / "sub-01_sessions.tsv").write_text(sessions, encoding="utf-8")
    entries, bad = bids.scan(root)
    if isinstance(expected, float):
        assert [e.age for e in entries] == [expected] and bad == {}
    else:
        assert entries == [] and bad == {"sub-01": f"sub-01/sub-01_sessions.tsv {expected}"}


def test_a_sessions_file_that_cannot_be_read_is_the_subjects_bad_input_naming_it_once(tmp_path, monkeypatch):
    root = _dataset(tmp_path / "bids", ["sub-01/ses-3/anat/sub-01_ses-3_T1w.nii.gz"], "sub-01\t50\n")
    tsv = root / "sub-01" / "sub-01_sessions.tsv"
    tsv.write_bytes("session_id\tage\nses-3\t62 ans \u00e9t\u00e9\n".encode("latin-1"))
    entries, bad = bids.scan(root)
    assert entries == [] and bad == {
        "sub-01": "sub-01/sub-01_sessions.tsv is not UTF-8 text (byte 0xe9 at offset 28); save it as UTF-8"
    }
    real_open = open

    def denied(path, *args, **kwargs):
        if str(path) == str(tsv):
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(bids, "open", denied, raising=False)
    entries, bad = bids.scan(root)
    assert bad == {"sub-01": "sub-01/sub-01_sessions.tsv cannot be read: Permission denied"}


@pytest.mark.parametrize("bom", [b"", b"\xef\xbb\xbf"])
def test_a_tsv_that_is_not_utf8_names_the_bad_bytes_offset_in_the_file(tmp_path, bom):
    """A text stream decodes a few KiB at a time, after the byte-order mark, and counted its offset from there:
    a bad byte past the first 8 KiB, or after a mark, was named at an offset that holds another byte."""
    rows = "".join(f"sub-{i:05d}\t50\n" for i in range(1000))
    root = _dataset(tmp_path / "bids", ["sub-00000/ses-3/anat/sub-00000_ses-3_T1w.nii.gz"], rows)
    tsv = root / "participants.tsv"
    data = bom + tsv.read_bytes() + "sub-x\t5\u00e90\n".encode("latin-1")
    tsv.write_bytes(data)
    offset = data.index(b"\xe9")
    with pytest.raises(bids.DatasetError) as refused:
        bids.read_participants(root)
    assert str(refused.value) == f"{tsv} is not UTF-8 text (byte 0xe9 at offset {offset}); save it as UTF-8"
    tsv.write_text("participant_id\tage\nsub-00000\t50\n")
    sessions = root / "sub-00000" / "sub-00000_sessions.tsv"
    data = bom + ("session_id\tage\n" + "ses-1\t50\n" * 1000 + "ses-3\t6\u00e92\n").encode("latin-1")
    sessions.write_bytes(data)
    offset = data.index(b"\xe9")
    reason = f"sub-00000/sub-00000_sessions.tsv is not UTF-8 text (byte 0xe9 at offset {offset}); save it as UTF-8"
    assert bids.scan(root)[1] == {"sub-00000": reason}


def test_a_session_image_without_its_own_age_is_marked_as_taking_participants_age(tmp_path):
    """convert tells the user about these: participants.tsv's age may be another visit's than the scan's."""
    root = _dataset(
        tmp_path / "bids",
        [
            "sub-01/anat/sub-01_T1w.nii.gz",  # no session: participants.tsv's age is the only one
            "sub-02/ses-2/anat/sub-02_ses-2_T1w.nii.gz",  # sessions.tsv gives ses-2's age
            "sub-03/ses-2/anat/sub-03_ses-2_T1w.nii.gz",  # no sessions.tsv
            "sub-04/ses-2/anat/sub-04_ses-2_T1w.nii.gz",  # a sessions.tsv without ages
        ],
        "sub-01\t50\nsub-02\t50\nsub-03\t50\nsub-04\t50\n",
    )
    (root / "sub-02" / "sub-02_sessions.tsv").write_text("session_id\tage\nses-2\t53\n")
    (root / "sub-04" / "sub-04_sessions.tsv").write_text("session_id\tacq_time\nses-2\t2019-01-01\n")
    entries, bad = bids.scan(root)
    assert [(e.participant_id, e.age, e.session_age_assumed) for e in entries] == [
        ("sub-01", 50.0, False),
        ("sub-02", 53.0, False),
        ("sub-03", 50.0, True),
        ("sub-04", 50.0, True),
    ]
    assert bad == {}


def test_an_annexed_image_not_fetched_is_named_as_such(tmp_path):
    root = _dataset(tmp_path / "bids", [], "sub-01\t60\n")
    link = root / "sub-01" / "anat" / "sub-01_T1w.nii.gz"
    link.parent.mkdir(parents=True)
    link.symlink_to("../../.git/annex/objects/XX/YY/SHA256E-s1--abc.nii.gz/SHA256E-s1--abc.nii.gz")
    entries, bad = bids.scan(root)
    assert entries == [] and bad == {
        "sub-01": "sub-01/anat/sub-01_T1w.nii.gz links to a file that is not here "
        "(an annexed file not fetched yet? datalad get / git annex get)"
    }


@pytest.mark.parametrize("value", ["ses2", "ses-", "ses-2_run-1", "-2"])
def test_select_takes_bids_entities_only(tmp_path, capsys, value):
    with pytest.raises(SystemExit) as exited:
        cli.main(["nifti", "--bids", str(tmp_path), "--out", str(tmp_path / "v.h5"), "--select", value])
    assert exited.value.code == 2 and "is not a BIDS entity KEY-VALUE, e.g. ses-2 or run-1" in capsys.readouterr().err


def test_ages_may_live_in_sessions_files_only(tmp_path):
    """Without an age column in participants.tsv a longitudinal dataset is read when its sessions.tsv files
    give the ages; a subject they do not cover is bad input, and a dataset with neither is refused whole."""
    root = tmp_path / "bids"
    root.mkdir()
    for pid in ("sub-01", "sub-02"):
        image = root / pid / "ses-2" / "anat" / f"{pid}_ses-2_T1w.nii.gz"
        image.parent.mkdir(parents=True)
        image.write_bytes(b"")
    (root / "participants.tsv").write_text("participant_id\tsex\nsub-01\tF\nsub-02\tM\n")
    (root / "sub-01" / "sub-01_sessions.tsv").write_text("session_id\tage\nses-2\t64\n")
    entries, bad = bids.scan(root)
    assert [(e.participant_id, e.age) for e in entries] == [("sub-01", 64.0)] and bad == {"sub-02": "missing age"}
    (root / "sub-01" / "sub-01_sessions.tsv").unlink()
    with pytest.raises(bids.DatasetError, match="lacks column\\(s\\) age"):
        bids.scan(root)


def _denied(path, *args, **kwargs):
    raise PermissionError(errno.EACCES, "Permission denied", str(path))


def _io_error(path, *args, **kwargs):
    raise OSError(errno.EIO, "Input/output error", str(path))


@pytest.mark.parametrize(
    "unreadable, reason",
    [("directory", "Is a directory"), (_denied, "Permission denied"), (_io_error, "Input/output error")],
)
def test_an_unreadable_participants_tsv_is_one_line_naming_it_and_why(
    tmp_path, monkeypatch, capsys, unreadable, reason
):
    """A participants.tsv that cannot be opened or read ended in a traceback (a directory of that name was
    called missing). chmod 000 does not stop root, so a stand-in open() refuses it."""
    root = _dataset(tmp_path / "bids", ["sub-01/anat/sub-01_T1w.nii.gz"], "sub-01\t60\n")
    tsv = root / "participants.tsv"
    if unreadable == "directory":
        tsv.unlink()
        tsv.mkdir()
    else:
        monkeypatch.setattr(bids, "open", unreadable, raising=False)  # found before the builtin
    with pytest.raises(bids.DatasetError) as refused:
        bids.scan(root)
    assert str(refused.value) == f"{tsv} cannot be read: {reason}"
    out = tmp_path / "v.h5"
    assert cli.main(["nifti", "--bids", str(root), "--out", str(out), "--quiet"]) == 2
    assert capsys.readouterr().err == f"preprocess: error: {tsv} cannot be read: {reason}\n" and not out.exists()


def test_a_repeated_participants_column_is_refused_not_read_from_its_last_copy(tmp_path):
    root = _dataset(tmp_path / "bids", ["sub-01/anat/sub-01_T1w.nii.gz"], "")
    (root / "participants.tsv").write_text("participant_id\tage\tsex\tage\nsub-01\t50\tF\t70\n")
    with pytest.raises(bids.DatasetError, match=r"has column\(s\) age more than once; keep one"):
        bids.scan(root)


def test_an_image_named_for_another_subject_than_its_folder_is_bad_input(tmp_path):
    """A copy slip (sub-01/anat/sub-02_T1w.nii.gz) gave each image the other subject's age."""
    root = _dataset(
        tmp_path / "bids",
        ["sub-01/anat/sub-02_T1w.nii.gz", "sub-02/anat/sub-01_T1w.nii.gz", "sub-03/anat/sub-03_T1w.nii.gz"],
        "sub-01\t50\nsub-02\t70\nsub-03\t60\n",
    )
    entries, bad = bids.scan(root)
    assert [e.participant_id for e in entries] == ["sub-03"]
    assert bad["sub-01"] == "sub-01/anat/sub-02_T1w.nii.gz is named for sub-02, not sub-01: which subject is it?"


def test_blank_trailing_columns_are_not_repeated_columns(tmp_path):
    """Spreadsheet exports end rows with empty cells: a header with blank names is not a repeated column."""
    root = _dataset(tmp_path / "bids", ["sub-01/anat/sub-01_T1w.nii.gz"], "")
    (root / "participants.tsv").write_text("participant_id\tage\t\t\nsub-01\t50\t\t\n")
    entries, bad = bids.scan(root)
    assert [e.age for e in entries] == [50.0] and bad == {}


UNCLOSED = "has a double quote that does not close on that line, so the lines after it would be read into one cell"


def test_an_unclosed_quote_in_participants_tsv_is_refused_naming_its_line(tmp_path):
    """csv read "Oxford up to the next double quote, lines later: the rows after it became part of that site and
    were reported as images without a row (or vanished, without images). Past csv's 128 KiB cell limit the
    message was the limit's, not the quote's. A quote closed on its line is read as before."""
    files = [f"sub-0{i}/anat/sub-0{i}_T1w.nii.gz" for i in (1, 2, 3)]
    root = _dataset(tmp_path / "bids", files, "")
    tsv = root / "participants.tsv"
    tsv.write_text('participant_id\tage\tsite\nsub-01\t50\t"Oxford, UK"\nsub-02\t60\t"Oxford\nsub-03\t70\tLeeds\n')
    with pytest.raises(bids.DatasetError, match="^" + re.escape(f"{tsv} line 3 {UNCLOSED}; BIDS TSV has no quoting")):
        bids.scan(root)
    tsv.write_text(tsv.read_text() + "sub-04\t70\tYork\n" * 20_000)  # the runaway cell passes csv's limit
    with pytest.raises(bids.DatasetError, match="^" + re.escape(f"{tsv} line 3 {UNCLOSED}")):
        bids.scan(root)
    tsv.write_text('participant_id\tage\tsite\nsub-01\t50\t"Oxford, UK"\nsub-02\t60\tOx"ford\n\nsub-03\t70\n')
    entries, bad = bids.scan(root)
    assert [(e.participant_id, e.site) for e in entries] == [
        ("sub-01", "Oxford, UK"),
        ("sub-02", 'Ox"ford'),
        ("sub-03", "n/a"),
    ]
    assert bad == {}


def test_an_unclosed_quote_in_a_sessions_file_is_bad_input_naming_its_line(tmp_path):
    """The ses-2 row was read into ses-1's acquisition time, and sub-01 reported as having no age for ses-2."""
    root = _dataset(tmp_path / "bids", ["sub-01/ses-2/anat/sub-01_ses-2_T1w.nii.gz"], "sub-01\t50\n")
    sessions = root / "sub-01" / "sub-01_sessions.tsv"
    sessions.write_text('session_id\tacq_time\tage\nses-1\t"2019-01-01\t51\nses-2\t2021-01-01\t53\n')
    entries, bad = bids.scan(root)
    assert entries == [] and bad["sub-01"].startswith(f"sub-01/sub-01_sessions.tsv line 2 {UNCLOSED}; BIDS TSV")
    sessions.write_text('session_id\tacq_time\tage\nses-1\t"2019-01-01"\t51\nses-2\t2021-01-01\t53\n')
    entries, bad = bids.scan(root)
    assert [e.age for e in entries] == [53.0] and bad == {}


def test_one_scan_linked_under_two_subjects_is_bad_input_for_both(tmp_path):
    """sub-02's and sub-04's images are sub-01's file (a symbolic and a hard link): before, the one scan counted as
    three people and could land in a learner's training file and the test file. Which subject it belongs to is
    unknown, so all three are bad input; sub-05, a whole-folder link, was already refused by its file names."""
    root = _dataset(tmp_path / "bids", ["sub-01/anat/sub-01_T1w.nii.gz", "sub-03/anat/sub-03_T1w.nii.gz"], "")
    (root / "participants.tsv").write_text("participant_id\tage\n" + "".join(f"sub-0{i}\t6{i}\n" for i in range(1, 6)))
    for pid in ("sub-02", "sub-04"):
        (root / pid / "anat").mkdir(parents=True)
    (root / "sub-02/anat/sub-02_T1w.nii.gz").symlink_to("../../sub-01/anat/sub-01_T1w.nii.gz")
    (root / "sub-04/anat/sub-04_T1w.nii.gz").hardlink_to(root / "sub-01/anat/sub-01_T1w.nii.gz")
    (root / "sub-05").symlink_to("sub-03")
    entries, bad = bids.scan(root)
    assert [e.participant_id for e in entries] == ["sub-03"]
    assert bad["sub-02"] == (
        "sub-02/anat/sub-02_T1w.nii.gz is the same file as sub-01/anat/sub-01_T1w.nii.gz, "
        "sub-04/anat/sub-04_T1w.nii.gz (through a link): one scan cannot be several subjects; which subject is it?"
    )
    assert bad["sub-01"].startswith("sub-01/anat/sub-01_T1w.nii.gz is the same file as sub-02/anat/sub-02_T1w.nii.gz")
    assert bad["sub-04"].startswith("sub-04/anat/sub-04_T1w.nii.gz is the same file as sub-01/anat/sub-01_T1w.nii.gz")
    assert bad["sub-05"] == "sub-05/anat/sub-03_T1w.nii.gz is named for sub-03, not sub-05: which subject is it?"


def test_a_linked_subject_keeps_its_other_problem_said_and_many_links_are_counted(tmp_path):
    root = _dataset(tmp_path / "bids", ["sub-01/anat/sub-01_T1w.nii.gz"], "")
    ids = [f"sub-0{i}" for i in range(1, 7)]
    ages = {"sub-02": "300"}
    (root / "participants.tsv").write_text("participant_id\tage\n" + "".join(f"{p}\t{ages.get(p, 60)}\n" for p in ids))
    for pid in ids[1:]:
        (root / pid / "anat").mkdir(parents=True)
        (root / pid / "anat" / f"{pid}_T1w.nii.gz").symlink_to("../../sub-01/anat/sub-01_T1w.nii.gz")
    entries, bad = bids.scan(root)
    assert entries == [] and set(bad) == set(ids)
    assert bad["sub-02"].startswith("age 300 is outside the plausible range")
    assert "; sub-02/anat/sub-02_T1w.nii.gz is the same file as" in bad["sub-02"]
    assert bad["sub-01"].startswith(
        "sub-01/anat/sub-01_T1w.nii.gz is the same file as sub-02/anat/sub-02_T1w.nii.gz, "
        "sub-03/anat/sub-03_T1w.nii.gz, sub-04/anat/sub-04_T1w.nii.gz and 2 more (through a link)"
    )


def test_first_names_names_a_few_and_counts_the_rest():
    assert bids.first_names([]) == "" and bids.first_names(["a", "b", "c"]) == "a, b, c"
    assert bids.first_names(["a", "b", "c", "d", "e"]) == "a, b, c and 2 more"
    assert bids.first_names(["a", "b", "c"], shown=1) == "a and 2 more"


def test_links_to_one_file_not_fetched_are_named_as_not_fetched(tmp_path):
    """Two subjects linked to one absent annex object (identical content): nothing to compare until it is fetched."""
    root = _dataset(tmp_path / "bids", [], "sub-01\t60\nsub-02\t61\n")
    for pid in ("sub-01", "sub-02"):
        link = root / pid / "anat" / f"{pid}_T1w.nii.gz"
        link.parent.mkdir(parents=True)
        link.symlink_to("../../.git/annex/objects/XX/YY/SHA256E-s1--abc.nii.gz/SHA256E-s1--abc.nii.gz")
    entries, bad = bids.scan(root)
    assert entries == [] and bad == {
        pid: f"{pid}/anat/{pid}_T1w.nii.gz links to a file that is not here "
        "(an annexed file not fetched yet? datalad get / git annex get)"
        for pid in ("sub-01", "sub-02")
    }


def test_one_subjects_two_names_for_one_file_are_said_to_be_one(tmp_path):
    """A subject uses one image, so its links cannot count twice; the choice it is asked for says they are one."""
    root = _dataset(tmp_path / "bids", ["sub-01/anat/sub-01_T1w.nii.gz"], "sub-01\t60\n")
    (root / "sub-01/anat/sub-01_run-1_T1w.nii.gz").symlink_to("sub-01_T1w.nii.gz")
    entries, bad = bids.scan(root)
    assert entries == [] and bad["sub-01"].endswith(
        "sub-01/anat/sub-01_T1w.nii.gz, sub-01/anat/sub-01_run-1_T1w.nii.gz "
        "(sub-01/anat/sub-01_T1w.nii.gz and sub-01/anat/sub-01_run-1_T1w.nii.gz are one file, through a link)"
    )
    entries, bad = bids.scan(root, select=("run-1",))
    assert [e.image.name for e in entries] == ["sub-01_run-1_T1w.nii.gz"] and bad == {}


def test_a_subject_folder_that_cannot_be_listed_is_named_with_the_reason(tmp_path, monkeypatch):
    """pathlib's glob skips a folder it may not list, so sub-02 read as having no image at all."""
    root = _dataset(
        tmp_path / "bids", ["sub-01/anat/sub-01_T1w.nii.gz", "sub-02/ses-1/anat/sub-02_ses-1_T1w.nii.gz"], ""
    )
    (root / "participants.tsv").write_text("participant_id\tage\nsub-01\t60\nsub-02\t61\nsub-03\t62\n")
    locked = root / "sub-02" / "ses-1" / "anat"
    real_scandir = os.scandir

    def scandir(path="."):
        if os.fspath(path) == os.fspath(locked):
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    entries, bad = bids.scan(root)
    assert [e.participant_id for e in entries] == ["sub-01"]
    assert bad == {
        "sub-02": "sub-02/ses-1/anat cannot be read: Permission denied",
        "sub-03": "in participants.tsv but no image sub-03/anat/sub-03_T1w.nii[.gz]",
    }


def test_hidden_files_beside_the_images_are_not_images(tmp_path):
    """macOS writes AppleDouble files (._NAME) beside every file it copies to a network or exFAT disk; BIDS ignores
    names that start with a dot. They were taken for a second T1w image, which no --select could leave out."""
    root = _dataset(
        tmp_path / "bids",
        [
            "sub-01/anat/sub-01_T1w.nii.gz",
            "sub-01/anat/._sub-01_T1w.nii.gz",
            "sub-02/ses-2/anat/sub-02_ses-2_T1w.nii.gz",
            "sub-02/ses-2/anat/._sub-02_ses-2_T1w.nii.gz",
            "sub-03/anat/.sub-03_T1w.nii",
        ],
        "sub-01\t60\nsub-02\t61\n",
    )
    entries, bad = bids.scan(root, select=("ses-2",))
    assert bad == {"sub-01": "no T1w image with ses-2 (--select); it has sub-01/anat/sub-01_T1w.nii.gz"}
    entries, bad = bids.scan(root)
    assert bad == {} and [e.image.name for e in entries] == ["sub-01_T1w.nii.gz", "sub-02_ses-2_T1w.nii.gz"]


def test_spaces_around_participants_column_names_are_not_part_of_them(tmp_path):
    """A spreadsheet's 'participant_id ' and ' age' were refused as missing columns (the message showed them with
    their spaces); the cells were stripped already, and sessions.tsv strips its column names."""
    root = _dataset(tmp_path / "bids", ["sub-01/anat/sub-01_T1w.nii.gz"], "")
    (root / "participants.tsv").write_text("participant_id \t age\tsex \nsub-01\t50\tF\n")
    entries, bad = bids.scan(root)
    assert [(e.participant_id, e.age, e.sex) for e in entries] == [("sub-01", 50.0, "F")] and bad == {}
    (root / "participants.tsv").write_text("participant_id\tage\t age \nsub-01\t50\t70\n")
    with pytest.raises(bids.DatasetError, match=r"has column\(s\) age more than once; keep one"):
        bids.scan(root)


def test_a_participant_id_without_its_sub_prefix_names_that_subject(tmp_path):
    """participants.tsv written with bare labels (01, as a sessions.tsv's bare 2 is ses-2) made every subject bad
    twice, 'no image 01/anat/01_T1w.nii[.gz]' and 'sub-01: has no row', without saying why. A bare label and its
    sub- form are one subject, so both rows are a repeated one."""
    files = [f"sub-0{i}/anat/sub-0{i}_T1w.nii.gz" for i in (1, 2, 3)]
    root = _dataset(tmp_path / "bids", files, "01\t50\nsub-02\t60\n03\t70\nsub-03\t70\nSUB-04\t80\nsub_05\t55\n")
    entries, bad = bids.scan(root)
    assert [(e.participant_id, e.age) for e in entries] == [("sub-01", 50.0), ("sub-02", 60.0)]
    assert bad == {
        "sub-03": "listed 2 times in participants.tsv",
        "SUB-04": "in participants.tsv but no image SUB-04/anat/SUB-04_T1w.nii[.gz]",
        # not a label: named as written, not as a sub-sub_05 folder nobody wrote
        "sub_05": "in participants.tsv but no image sub_05/anat/sub_05_T1w.nii[.gz]",
    }


def test_an_image_named_for_another_session_than_its_folder_is_bad_input(tmp_path):
    """sub-01/ses-1/anat/sub-01_ses-2_T1w.nii.gz: --select ses-2 chose it by its name and it took ses-1's age from
    sessions.tsv (the folder's), without a word. Which visit it is of is unknown; a name without ses- is not a slip."""
    root = _dataset(
        tmp_path / "bids",
        [
            "sub-01/ses-1/anat/sub-01_ses-2_T1w.nii.gz",
            "sub-01/ses-2/anat/sub-01_ses-3_T1w.nii.gz",
            "sub-02/ses-2/anat/sub-02_T1w.nii.gz",
            "sub-03/anat/sub-03_ses-2_T1w.nii.gz",  # no session folder: as before
        ],
        "sub-01\t40\nsub-02\t50\nsub-03\t60\n",
    )
    (root / "sub-01" / "sub-01_sessions.tsv").write_text("session_id\tage\nses-1\t40\nses-2\t45\n")
    (root / "sub-02" / "sub-02_sessions.tsv").write_text("session_id\tage\nses-2\t52\n")
    entries, bad = bids.scan(root, select=("ses-2",))
    assert [(e.participant_id, e.age) for e in entries] == [("sub-02", 52.0), ("sub-03", 60.0)]
    assert bad == {
        "sub-01": "sub-01/ses-1/anat/sub-01_ses-2_T1w.nii.gz is named for ses-2 but lies in ses-1: "
        "which session is it?",
    }
    entries, bad = bids.scan(root)
    assert [(e.participant_id, e.age) for e in entries] == [("sub-02", 52.0), ("sub-03", 60.0)]
    assert list(bad) == ["sub-01"]


def test_an_image_in_a_session_folder_without_ses_in_its_name_is_of_that_session(tmp_path):
    """sub-01/ses-2/anat/sub-01_T1w.nii.gz: BIDS wants ses-2 in the name too, but datasets leave it out, and pybids
    reads the session from the folder ('[_/]ses-' in its entity pattern). --select ses-2 found no such image, so a
    subject whose visits all lacked it could not be chosen at all ('several T1w images', then 'no T1w image')."""
    root = _dataset(
        tmp_path / "bids",
        [
            "sub-01/ses-1/anat/sub-01_T1w.nii.gz",
            "sub-01/ses-2/anat/sub-01_T1w.nii.gz",
            "sub-02/ses-2/anat/sub-02_run-1_T1w.nii.gz",
            "sub-02/ses-2/anat/sub-02_run-2_T1w.nii.gz",
            "sub-03/ses-1/anat/sub-03_T1w.nii.gz",
        ],
        "sub-01\t40\nsub-02\t50\nsub-03\t60\n",
    )
    (root / "sub-01" / "sub-01_sessions.tsv").write_text("session_id\tage\nses-1\t40\nses-2\t45\n")
    assert bids.image_entities(root, root / "sub-02/ses-2/anat/sub-02_run-1_T1w.nii.gz") == {"sub-02", "ses-2", "run-1"}
    entries, bad = bids.scan(root, select=("ses-2", "run-1"))
    assert [(e.participant_id, e.image.relative_to(root).as_posix()) for e in entries] == [
        ("sub-02", "sub-02/ses-2/anat/sub-02_run-1_T1w.nii.gz")
    ]
    entries, bad = bids.scan(root, select=("ses-2",))
    assert [(e.participant_id, e.age, e.image.relative_to(root).as_posix()) for e in entries] == [
        ("sub-01", 45.0, "sub-01/ses-2/anat/sub-01_T1w.nii.gz")  # ses-2's age: the folder is the session
    ]
    assert bad == {
        "sub-02": "several T1w images (choose one with --select, e.g. --select ses-2): "
        "sub-02/ses-2/anat/sub-02_run-1_T1w.nii.gz, sub-02/ses-2/anat/sub-02_run-2_T1w.nii.gz",
        "sub-03": "no T1w image with ses-2 (--select); it has sub-03/ses-1/anat/sub-03_T1w.nii.gz",
    }


def test_an_image_that_cannot_be_opened_is_bad_input_naming_the_file_and_why(tmp_path, monkeypatch):
    """Tests run as root, whom chmod does not deny: open and stat are made to. A folder that may be listed but not
    entered (r without x: pathlib's is_file raises) was a PermissionError traceback; an image or a .hdr's .img that
    cannot be read was found only by the preprocessing, named 'Could not read file' or 'Cannot work out file type',
    and as that reason is not in the input's fingerprint, an output that skipped it stayed up to date once fixed."""
    root = _dataset(
        tmp_path / "bids",
        [
            "sub-01/anat/sub-01_T1w.nii.gz",
            "sub-02/anat/sub-02_T1w.nii.gz",
            "sub-03/anat/sub-03_T1w.hdr",
            "sub-03/anat/sub-03_T1w.img",
            "sub-04/ses-1/anat/sub-04_ses-1_T1w.nii",
        ],
        "sub-01\t50\nsub-02\t50\nsub-03\t50\nsub-04\t50\n",
    )
    entered = os.fspath(root / "sub-04" / "ses-1" / "anat") + os.sep
    denied = {os.fspath(root / "sub-02/anat/sub-02_T1w.nii.gz"), os.fspath(root / "sub-03/anat/sub-03_T1w.img")}
    real_open, real_stat = open, os.stat

    def refused(path):
        return os.fspath(path) in denied or os.fspath(path).startswith(entered)

    def fake_open(path, *args, **kwargs):
        if refused(path):
            raise PermissionError(errno.EACCES, "Permission denied", os.fspath(path))
        return real_open(path, *args, **kwargs)

    def fake_stat(path, *args, **kwargs):
        if isinstance(path, (str, os.PathLike)) and os.fspath(path).startswith(entered):
            raise PermissionError(errno.EACCES, "Permission denied", os.fspath(path))
        return real_stat(path, *args, **kwargs)

    monkeypatch.setattr("builtins.open", fake_open)
    monkeypatch.setattr(os, "stat", fake_stat)
    entries, bad = bids.scan(root)
    assert [e.participant_id for e in entries] == ["sub-01"]
    assert bad == {
        "sub-02": "sub-02/anat/sub-02_T1w.nii.gz cannot be read: Permission denied",
        "sub-03": "sub-03/anat/sub-03_T1w.img cannot be read: Permission denied",
        "sub-04": "sub-04/ses-1/anat/sub-04_ses-1_T1w.nii cannot be read: Permission denied",
    }


def test_an_image_linked_to_a_named_pipe_is_named_without_waiting_on_it(tmp_path):
    """Opening a named pipe for reading waits for a writer: a dataset whose image links to one (a FUSE or
    streaming mount, a mistake) held the scan for ever. It is bad input naming the file."""
    root = _dataset(tmp_path / "bids", ["sub-02/anat/sub-02_T1w.nii.gz"], "sub-01\t50\nsub-02\t50\n")
    os.mkfifo(tmp_path / "pipe")
    (root / "sub-01" / "anat").mkdir(parents=True)
    (root / "sub-01" / "anat" / "sub-01_T1w.nii.gz").symlink_to(tmp_path / "pipe")
    entries, bad = bids.scan(root)
    assert [e.participant_id for e in entries] == ["sub-02"]
    assert bad == {"sub-01": "sub-01/anat/sub-01_T1w.nii.gz is not a regular file (a named pipe, a device or a socket)"}


def test_an_image_or_companion_that_is_a_directory_is_named_as_one(tmp_path):
    """A link to a directory (or a .img folder beside a .hdr) is not a named pipe, a device or a socket, as the
    regular-file check before the open called it: the open names it, as it did before that check."""
    root = _dataset(tmp_path / "bids", ["sub-02/anat/sub-02_T1w.hdr"], "sub-01\t50\nsub-02\t50\n")
    (tmp_path / "folder").mkdir()
    (root / "sub-01" / "anat").mkdir(parents=True)
    (root / "sub-01" / "anat" / "sub-01_T1w.nii.gz").symlink_to(tmp_path / "folder")
    (root / "sub-02" / "anat" / "sub-02_T1w.img").mkdir()
    entries, bad = bids.scan(root)
    assert entries == []
    assert bad == {
        "sub-01": "sub-01/anat/sub-01_T1w.nii.gz cannot be read: Is a directory",
        "sub-02": "sub-02/anat/sub-02_T1w.img cannot be read: Is a directory",
    }


def test_a_participants_file_that_is_a_named_pipe_is_named_without_waiting_on_it(tmp_path):
    """As for an image: opening a named pipe for reading waits for a writer, and the scan hung."""
    root = tmp_path / "bids"
    root.mkdir()
    os.mkfifo(root / "participants.tsv")
    with pytest.raises(bids.DatasetError, match=r"participants\.tsv is not a regular file \(a named pipe"):
        bids.read_participants(root)


def test_scans_to_predict_on_may_lack_ages_but_a_given_age_must_be_plausible(tmp_path):
    """preprocess nifti --ages-optional (scans to date with a trained model): a missing age (n/a, an empty cell, no
    age column, no participants.tsv) is kept as NaN; an age that is given and wrong is bad input as always, and
    without the option a missing age still is."""
    files = [f"sub-0{k}/anat/sub-0{k}_T1w.nii.gz" for k in (1, 2, 3, 4)]
    root = _dataset(tmp_path / "a", files, "sub-01\t60\nsub-02\tn/a\nsub-03\t\nsub-04\t700\n")
    entries, bad = bids.scan(root, ages_required=False)
    assert [e.participant_id for e in entries] == ["sub-01", "sub-02", "sub-03"]
    assert entries[0].age == 60.0 and all(e.age != e.age for e in entries[1:])  # NaN
    assert list(bad) == ["sub-04"] and "outside the plausible range" in bad["sub-04"]
    _, bad = bids.scan(root)
    assert sorted(bad) == ["sub-02", "sub-03", "sub-04"] and bad["sub-02"] == "missing age"

    bare = tmp_path / "b"
    for rel in files[:2]:
        (bare / rel).parent.mkdir(parents=True, exist_ok=True)
        (bare / rel).write_bytes(b"")
    entries, bad = bids.scan(bare, ages_required=False)
    assert [(e.participant_id, e.sex, e.site) for e in entries] == [("sub-01", "n/a", "n/a"), ("sub-02", "n/a", "n/a")]
    assert not bad and all(e.age != e.age for e in entries)
    with pytest.raises(bids.DatasetError, match=r"participants\.tsv is missing .*--ages-optional"):
        bids.scan(bare)
    (bare / "participants.tsv").write_text("participant_id\tsex\nsub-01\tF\nsub-02\tM\n")
    entries, bad = bids.scan(bare, ages_required=False)
    assert [e.sex for e in entries] == ["F", "M"] and not bad
    with pytest.raises(bids.DatasetError, match="lacks column"):
        bids.scan(bare)


def test_with_ages_optional_a_sessions_missing_age_is_unknown_not_another_visits(tmp_path):
    """sub-X_sessions.tsv with an age column but n/a for the chosen session: without --ages-optional the subject is
    bad input; with it the age is unknown, not participants.tsv's, which is often another visit's (review of
    c32b539: it was taken silently, with the note that no sessions.tsv gives the session's age)."""
    root = _dataset(tmp_path / "bids", ["sub-01/ses-2/anat/sub-01_ses-2_T1w.nii.gz"], "sub-01\t50\n")
    (root / "sub-01" / "sub-01_sessions.tsv").write_text("session_id\tage\nses-1\t50\nses-2\tn/a\n")
    (entry,), bad = bids.scan(root, ages_required=False)
    assert not bad and entry.age != entry.age and not entry.session_age_assumed
    _, bad = bids.scan(root)
    assert bad == {"sub-01": "sub-01/sub-01_sessions.tsv has an age column but no age for ses-2"}
