"""What software a run used (fedmpi.provenance): the source digest the ranks agree on and summary.json records."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import numpy as np
import torch

import fedmpi
import preprocess
from fedmpi.provenance import code_digest, mpi_library, software


def test_the_code_digest_follows_every_source_file_and_its_name(tmp_path):
    package = tmp_path / "pkg"
    (package / "sub").mkdir(parents=True)
    (package / "a.py").write_text("x = 1\n")
    (package / "sub" / "b.py").write_text("y = 2\n")
    (package / "notes.txt").write_text("not code")
    first = code_digest((package,))
    assert code_digest((package,)) == first and len(first) == 64
    (package / "notes.txt").write_text("still not code")
    assert code_digest((package,)) == first
    (package / "sub" / "b.py").write_text("y = 3\n")
    changed = code_digest((package,))
    assert changed != first
    (package / "sub" / "b.py").rename(package / "sub" / "c.py")
    assert code_digest((package,)) not in (first, changed)


def test_the_code_digest_is_what_an_install_holds(tmp_path):
    """An install (a wheel) holds the packages' modules but no hidden file: a checkout's editor files, such as
    Emacs's lock of an unsaved buffer (a dangling link named .#module.py), neither change the digest nor fail it."""
    sources = tuple(Path(p.__file__).parent for p in (fedmpi, preprocess))
    installed = tuple(shutil.copytree(p, tmp_path / "site" / p.name) for p in sources)
    assert code_digest(installed) == code_digest()
    (installed[0] / ".#agreement.py").symlink_to("user@host.1234")
    (installed[0] / ".scratch.py").write_text("x = 1\n")
    (installed[1] / ".hidden").mkdir()
    (installed[1] / ".hidden" / "y.py").write_text("y = 1\n")
    assert code_digest(installed) == code_digest()


def test_the_software_record_names_this_process_s_versions(monkeypatch):
    monkeypatch.delitem(sys.modules, "mpi4py.MPI", raising=False)  # no MPI in this process: none is started for it
    record = software()
    assert record["fedmpi"] == fedmpi.__version__ and record["source_sha256"] == code_digest()
    assert record["torch"] == torch.__version__ and record["numpy"] == np.__version__
    assert record["python"] == ".".join(map(str, sys.version_info[:3])) and record["mpi"] == ""
    assert "mpi4py.MPI" not in sys.modules and mpi_library() == ""


def test_the_running_codes_digest_is_taken_once_so_a_later_edit_is_not_recorded(monkeypatch):
    """summary.json records the code the run started with: an edit of the checkout during a long run does not
    change it, and the sources are not read again at the run's end."""
    from fedmpi import provenance

    provenance._running_code_digest.cache_clear()
    first = code_digest()

    def read_again(*_):
        raise AssertionError("the sources were read again")

    monkeypatch.setattr(provenance.hashlib, "sha256", read_again)
    assert code_digest() == first and software()["source_sha256"] == first
