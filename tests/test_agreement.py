"""Every rank runs rank 0's configuration and code (fedmpi.agreement), without mpirun: what a learner names,
and rank 0's verdict. The end-to-end run with one learner set up otherwise is in test_reliability.py."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import fedmpi
from fedmpi.agreement import MAX_CONFIG_BYTES, agree, disagreement, statement
from fedmpi.config import load_config
from fedmpi.errors import PayloadError
from fedmpi.messages import row_text, text_row
from fedmpi.preflight import ERROR_BYTES
from fedmpi.provenance import code_digest

CODE = "c" * 64


def _cfg(*sets):
    return load_config(overrides=["federation.learners=2", *sets])


def test_the_same_configuration_and_code_agree():
    assert disagreement(statement(_cfg("train.lr=0.01"), CODE), _cfg("train.lr=0.01"), CODE) == ""


def test_a_setting_of_its_own_is_named_with_both_values():
    problem = disagreement(statement(_cfg(), CODE), _cfg("model.width=0.5"), CODE)
    assert "its configuration differs from rank 0's" in problem and "model.width: 0.25 -> 0.5" in problem
    assert "fedmpi code" not in problem


def test_a_split_staged_under_each_nodes_own_path_agrees():
    """data.dir may differ between ranks that each name a split: a job may copy the split to each node's local
    disk (agreement.NODE_SETTINGS)."""
    assert disagreement(statement(_cfg("data.dir=/scratch/a"), CODE), _cfg("data.dir=/local/b"), CODE) == ""


@pytest.mark.parametrize(
    ("server", "mine", "change"), [("/scratch/a", "", "'/scratch/a' -> ''"), ("", "/b", "'' -> '/b'")]
)
def test_a_split_on_one_rank_and_the_synthetic_cohort_on_another_differ(server, mine, change):
    """An empty data.dir is the synthetic cohort, which rank 0 builds and announces while a rank given a split goes
    on to the preflight: the job waited until run.startup_timeout and blamed a silent rank."""
    problem = disagreement(statement(_cfg(f"data.dir={server}"), CODE), _cfg(f"data.dir={mine}"), CODE)
    assert f"data.dir: {change}" in problem


def test_more_differences_than_a_line_shows_are_counted():
    mine = _cfg("model.width=0.5", "train.lr=0.01", "eval.every=2", "run.seed=3", "train.epochs=1")
    problem = disagreement(statement(_cfg(), CODE), mine, CODE)
    assert "eval.every: 1 -> 2" in problem and "; and 2 more" in problem and "train.lr" not in problem


def test_a_line_cut_to_its_row_keeps_the_advice_and_each_values_ends():
    """A node with another checkout differs in code and settings at once, and paths run long: the line rank 0
    prints is cut at ERROR_BYTES, which cut away what to do about the configuration."""
    deep = "/" + "d" * 300
    mine = _cfg(f"run.dir={deep}/runs", f"data.cache_dir={deep}/cache", "train.lr=0.01")
    problem = disagreement(statement(_cfg(), "a" * 64), mine, "b" * 64)
    line = row_text(text_row(f"rank 2: {problem}", ERROR_BYTES))
    assert "install the same fedmpi on every node" in line
    assert "every node must read the same configuration file and --set options" in line
    assert "data.cache_dir: 'data' -> '/ddd" in line and "ddd/cache'" in line


def test_other_code_is_named_apart_from_the_configuration():
    """The line names the install this rank imported: a node may hold several (a module's, a venv's, ~/.local)."""
    problem = disagreement(statement(_cfg(), "a" * 64), _cfg(), "b" * 64)
    here = Path(fedmpi.__file__).parent
    assert problem.startswith(f"its fedmpi code differs from rank 0's (source digest bbbbbbbbbbbb of {here}, rank 0's ")
    assert "rank 0's aaaaaaaaaaaa): install the same fedmpi on every node" in problem
    assert "configuration differs" not in problem


@pytest.mark.parametrize(
    "said",
    [b"\xff\xfe", b"[1, 2]", b'{"code": "x"}', b"{", b"[" * 100_000, b'{"config": {}, "code": 1%s}' % (b"0" * 5000)],
)
def test_a_statement_that_is_no_configuration_is_named(said):
    """Not JSON, JSON of another shape, JSON that Python's reader refuses (nested too deep: RecursionError; an
    integer of over 4300 digits: ValueError): the learner's one line, not a traceback."""
    assert "no JSON object of a configuration" in disagreement(said, _cfg(), CODE)


def test_a_statement_of_unexpected_values_is_compared_as_it_is():
    said = b'{"config": {"data": 5, "extra": [1]}, "code": 7}'
    problem = disagreement(said, _cfg(), CODE)
    assert "rank 0's 7): install" in problem
    assert "data: 5 -> {" in problem and "extra: [1] -> None" in problem and "; and 4 more" in problem


class JobStandIn:
    """The rest of a 3-rank job for one rank's agreement: the server gets the learners' lines as given, a learner
    gets the server's statement (and its announced size) and verdict as given; what the rank sends is kept."""

    size = 3

    def __init__(self, rank, lines=("", ""), said=b"", size=None, verdict=0):
        self.rank, self.is_server = rank, rank == 0
        self.lines, self.verdict, self.sent = lines, verdict, []
        self.said = np.frombuffer(said, np.uint8)
        self.bcasts = [np.array([len(said) if size is None else size], np.int64), self.said]

    def bcast(self, buf, what=""):
        self.sent.append(buf.copy())
        if self.is_server:
            return buf
        return self.bcasts.pop(0) if self.bcasts else np.array([self.verdict], np.int64)

    def gather(self, buf, out, what=""):
        self.sent.append(buf.copy())
        if out is not None:
            out[0] = buf
            out[1:] = [text_row(t, ERROR_BYTES) for t in self.lines]


def test_the_server_says_each_learners_line_and_every_rank_stops(capsys):
    job = JobStandIn(0, lines=("", "rank 2: its configuration differs from rank 0's (...)"))
    assert agree(_cfg(), job) is False
    assert capsys.readouterr().err == "fedmpi: error: rank 2: its configuration differs from rank 0's (...)\n"
    size, said, _line, verdict = job.sent
    assert size[0] == said.size and disagreement(said.tobytes(), _cfg(), code_digest()) == ""
    assert verdict[0] == 1


def test_the_server_goes_on_when_every_learner_agrees(capsys):
    assert agree(_cfg(), JobStandIn(0)) is True
    assert capsys.readouterr().err == ""


def test_a_learner_sends_its_line_by_its_mpi_rank_and_prints_nothing(capsys):
    job = JobStandIn(2, said=statement(_cfg(), code_digest()), verdict=1)
    assert agree(_cfg("train.lr=0.01"), job) is False
    _size, _said, sent_line, _verdict = job.sent
    line = row_text(sent_line)
    assert line.startswith("rank 2: its configuration differs") and "train.lr: 0.005 -> 0.01" in line
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("size", [0, -1, MAX_CONFIG_BYTES + 1])
def test_a_learner_refuses_a_statement_size_before_allocating_it(size):
    with pytest.raises(PayloadError, match=f"rank 0 announced a configuration of {size} bytes"):
        agree(_cfg(), JobStandIn(1, said=b"{}", size=size))
