"""preprocess/bids.py: which T1w image and participants.tsv row each subject gets (bids.scan reads no image:
empty files stand in for them)."""

from preprocess import bids


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
        "sub-03": "several T1w images: "
        "sub-03/ses-1/anat/sub-03_ses-1_T1w.nii.gz, sub-03/ses-2/anat/sub-03_ses-2_T1w.nii.gz",
        "sub-04": "listed 2 times in participants.tsv",
        "(blank participant_id)": "a participants.tsv row has an empty participant_id",
    }
