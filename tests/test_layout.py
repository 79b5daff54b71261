"""A split directory's file names: what counts as a learner file, and in which order."""

from __future__ import annotations

from preprocess import layout


def test_learner_files_are_found_by_number_in_learner_order(tmp_path):
    for name in ("learner_2.h5", "learner_10.h5", "learner_9.h5", "test.h5", "partition.json"):
        (tmp_path / name).touch()
    for lookalike in ("learner_old.h5", "learner_1.h5.bak", "learner_0.h5", "learner_01.h5", "xlearner_3.h5"):
        (tmp_path / lookalike).touch()
    found = layout.learner_files(tmp_path)
    assert list(found) == [2, 9, 10] and found[10] == tmp_path / "learner_10.h5"
    assert layout.learner_files(tmp_path / "missing") == {}


def test_the_names_a_split_writes_are_the_ones_it_owns():
    written = [layout.learner_file(k) for k in (1, 12)] + [layout.TEST_FILE, layout.PARTITION_FILE]
    assert written == ["learner_1.h5", "learner_12.h5", "test.h5", "partition.json"]
    assert all(layout.OWNED.fullmatch(name) for name in written)
    assert not any(layout.OWNED.fullmatch(n) for n in ("learner_x.h5", "test.h5.tmp", "notes.txt", "learner_0.h5"))


def test_a_learner_files_name_is_told_from_names_that_only_look_alike():
    assert layout.is_learner_file(layout.learner_file(12))
    for name in ("learner_0.h5", "learner_old.h5", "learner_1.h5.bak", "test.h5", "xlearner_1.h5"):
        assert not layout.is_learner_file(name), name
