""".ci/run and the Makefile's test targets, with the venv's python and mpirun replaced by stubs that
exit as told: CI fails when a check or a test fails, and does not fail when a selection holds no tests
(pytest's exit code 5, which the MPI run turns into 0 itself: tests/conftest.py)."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# The stub python: `import torch` exits TORCH_RC, the version check OLD_PYTHON, the linters LINT_RC, pytest
# SERIAL_RC or, with --with-mpi, rank RANK's word of MPI_RCS; each call is logged, so a test can see which steps ran.
PYTHON_STUB = """#!/bin/sh
echo "python $*" >> "$CALLS"
case "$*" in
  *"import torch"*) exit "${TORCH_RC:-0}" ;;
  *version_info*) exit "${OLD_PYTHON:-0}" ;;
  *--with-mpi*) set -- ${MPI_RCS:-0} 0 0 0; shift "${RANK:-0}"; exit "$1" ;;
  *pytest*) echo "launcher ${FEDMPI_MPIRUN:-}" >> "$CALLS"; exit "${SERIAL_RC:-0}" ;;
  *ruff*|*mypy*) exit "${LINT_RC:-0}" ;;
esac
exit 0
"""
# The stub mpirun runs the rest of "-n N ..." as N ranks and exits with their codes ORed, as MPICH's does.
MPIRUN_STUB = """#!/bin/sh
echo "mpirun $*" >> "$CALLS"
n=$2; shift 2
rc=0; rank=0
while [ $rank -lt $n ]; do RANK=$rank "$@"; rc=$((rc | $?)); rank=$((rank + 1)); done
exit $rc
"""


@pytest.fixture
def venv(tmp_path) -> Path:
    """A venv that make's setup finds installed: bin/python, bin/mpirun and .installed newer than
    pyproject.toml."""
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    for name, text in (("python", PYTHON_STUB), ("mpirun", MPIRUN_STUB)):
        path = venv / "bin" / name
        path.write_text(text)
        path.chmod(path.stat().st_mode | stat.S_IXUSR)
    (venv / ".installed").touch()
    return venv


def _clean_env() -> dict[str, str]:
    """This environment without make's own variables from a calling make (`make test MPIRUN=...` passes its
    overrides down in MAKEFLAGS) and the Makefile's settings a caller may have exported."""
    make = ("MAKEFLAGS", "GNUMAKEFLAGS", "MFLAGS", "MAKELEVEL", "MAKEFILES")
    dropped = (*make, "MPIRUN", "MPI", "MPICC", "PYTHON", "TORCH_SPEC", "TORCH_INDEX")
    return {k: v for k, v in os.environ.items() if k not in (*dropped, "FEDMPI_MPIRUN")}


def _ci(venv: Path, command: tuple[str, ...] = (str(ROOT / ".ci" / "run"),), **rcs: int) -> tuple[int, list[str]]:
    calls = venv / "calls.log"
    env = _clean_env()
    env.update(VENV=str(venv), CALLS=str(calls), **{k: str(v) for k, v in rcs.items()})
    proc = subprocess.run(list(command), cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    return proc.returncode, calls.read_text().splitlines() if calls.exists() else []


def test_ci_passes_when_every_check_and_test_passes(venv):
    rc, calls = _ci(venv)
    assert rc == 0
    assert [c.split()[2] for c in calls if c.startswith("python -m")] == ["ruff", "ruff", "mypy"] + ["pytest"] * 4
    assert sum(c.startswith("mpirun -n 3 ") for c in calls) == 1


def test_ci_passes_when_a_selection_holds_no_tests(venv):
    assert _ci(venv, SERIAL_RC=5)[0] == 0


def test_an_empty_mpi_selection_exits_0_so_that_no_failure_hides_behind_5():
    """Every rank of the MPI run may find no tests; it must not exit 5, which mpirun's OR also makes of 1 and 4."""
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_ci.py", "-k", "no_such"]
    assert subprocess.run(command, cwd=ROOT, capture_output=True).returncode == 5
    assert subprocess.run([*command, "--with-mpi"], cwd=ROOT, capture_output=True).returncode == 0


@pytest.mark.parametrize("rc", [1, 2, 3, 4])
def test_ci_fails_when_the_serial_tests_fail_and_stops_there(venv, rc):
    status, calls = _ci(venv, SERIAL_RC=rc)
    assert status != 0
    assert not any(c.startswith("mpirun") for c in calls)


@pytest.mark.parametrize("rcs", ["1 1 1", "2 2 2", "4 4 4", "1 0 0", "1 5 5", "4 1 1"])
def test_ci_fails_when_the_mpi_tests_fail(venv, rcs):
    """Also when the ranks' codes OR to 5 (a failure on one rank, nothing collected or a usage error on another)."""
    status, calls = _ci(venv, MPI_RCS=rcs)
    assert status != 0
    assert any(c.startswith("mpirun") for c in calls)


def test_ci_fails_when_lint_fails_before_any_test(venv):
    status, calls = _ci(venv, LINT_RC=1)
    assert status != 0
    assert not any("pytest" in c for c in calls)


def test_the_serial_tests_start_their_jobs_with_the_makefiles_launcher(venv):
    """A site's MPI has no mpirun inside the venv: `make test MPIRUN=mpirun` must reach the end-to-end tests'
    jobs too, not only test-mpi."""
    assert "launcher " + str(venv / "bin" / "mpirun") in _ci(venv, ("make", "test-serial"))[1]
    assert "launcher /opt/site/bin/mpirun" in _ci(venv, ("make", "test-serial", "MPIRUN=/opt/site/bin/mpirun"))[1]
    quoted = 'mpirun -x "A=b c"'  # flags with quotes reach the tests as written
    assert _ci(venv, ("make", "test-serial", f"MPIRUN={quoted}"))[1][-1] == "launcher " + quoted
    relative = os.path.relpath(venv, ROOT)  # `make test VENV=.venv`: the tests start jobs from other directories
    assert _ci(venv, ("make", "test-serial", f"VENV={relative}"))[1][-1] == "launcher " + str(venv / "bin" / "mpirun")


def _setup(venv: Path, *args: str) -> tuple[int, list[str]]:
    (venv / ".installed").unlink()
    return _ci(venv, ("make", "setup", *args))


def test_setup_installs_the_mpich_wheel_by_default(venv):
    rc, calls = _setup(venv)
    assert rc == 0
    assert [c for c in calls if "pip install" in c] == ["python -m pip install -q -e .[test,mpich,report,lint]"]


def test_setup_asks_the_cpu_index_alone_for_torch(venv):
    """Not as an extra index beside PyPI: where the CPU index cannot be reached, pip would install PyPI's torch,
    the CUDA build, without a word. TORCH_INDEX= leaves pip's own settings alone."""
    (venv / ".installed").unlink()
    rc, calls = _ci(venv, ("make", "setup"), TORCH_RC=1)
    assert rc == 0
    assert [c for c in calls if "torch==" in c] == [
        "python -m pip install -q --no-deps --index-url https://download.pytorch.org/whl/cpu torch==2.13.0"
    ]
    (venv / ".installed").unlink()
    (venv / "calls.log").unlink()
    rc, calls = _ci(venv, ("make", "setup", "TORCH_INDEX="), TORCH_RC=1)
    assert rc == 0
    assert [c for c in calls if "torch==" in c] == ["python -m pip install -q --no-deps torch==2.13.0"]


def test_setup_for_a_system_mpi_builds_mpi4py_against_it_and_leaves_the_wheel_out(venv):
    rc, calls = _setup(venv, "MPI=system", "MPICC=/bin/true")
    assert rc == 0
    assert [c for c in calls if "pip install" in c] == [
        "python -m pip install -q --no-cache-dir --no-binary=mpi4py mpi4py>=4,<5",
        "python -m pip install -q -e .[test,report,lint]",
    ]
    assert (venv / ".installed").exists()


def test_setup_makes_a_venv_whose_python_is_gone_again(venv, tmp_path):
    """Its interpreter removed or upgraded away, bin/python dangles: setup must not call the venv installed (every
    later target then failed on it until `make clean`), nor leave `venv`'s dangling links in place."""
    python = venv / "bin" / "python"
    python.unlink()
    python.symlink_to(tmp_path / "gone" / "python3.9")
    maker = tmp_path / "python3"  # `python3 -m venv --clear VENV`: a working stub python in VENV again
    maker.write_text(
        '#!/bin/sh\necho "maker $*" >> "$CALLS"\nfor venv; do :; done\nrm -f "$venv/bin/python"\n'
        f'cat > "$venv/bin/python" <<\'EOF\'\n{PYTHON_STUB}EOF\nchmod +x "$venv/bin/python"\n'
    )
    maker.chmod(0o755)
    rc, calls = _ci(venv, ("make", "setup", f"PYTHON={maker}"))
    assert rc == 0
    assert calls[0] == f"maker -m venv --clear {venv}"
    assert [c for c in calls if "pip install" in c] == ["python -m pip install -q -e .[test,mpich,report,lint]"]


def test_setup_refuses_a_python_older_than_3_10_before_installing_anything(venv):
    """Else pip's first words were about torch==2.13.0 ("conflicting dependencies" under Python 3.9), not the
    Python: a cluster's python3 is often 3.9 or older."""
    (venv / ".installed").unlink()
    env = dict(_clean_env(), VENV=str(venv), CALLS=str(venv / "calls.log"), OLD_PYTHON="1")
    proc = subprocess.run(["make", "setup"], cwd=ROOT, env=env, capture_output=True, text=True)
    assert proc.returncode != 0
    assert "fedmpi needs Python 3.10 or newer" in proc.stderr and "make setup PYTHON=python3.11" in proc.stderr
    assert "pip install" not in (venv / "calls.log").read_text()


def test_setup_for_a_system_mpi_without_its_compiler_says_so(venv):
    (venv / ".installed").unlink()
    env = dict(_clean_env(), VENV=str(venv), CALLS=str(venv / "calls.log"))
    proc = subprocess.run(
        ["make", "setup", "MPI=system", "MPICC=/nonexistent/mpicc"], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert proc.returncode != 0
    assert "MPI=system: no /nonexistent/mpicc here (load your MPI module or set MPICC)" in proc.stderr
    assert "pip install" not in (venv / "calls.log").read_text()


def test_the_venv_remembers_its_mpi_and_refuses_another(venv):
    """After `make setup MPI=system`, a plain `make test` must not take the wheel's (absent) mpirun, nor
    install the wheel into the venv when pyproject.toml changes."""
    assert _setup(venv, "MPI=system", "MPICC=/bin/true")[0] == 0
    assert (venv / ".mpi").read_text().strip() == "system"
    env = dict(_clean_env(), VENV=str(venv))
    dry = subprocess.run(["make", "-n", "test-mpi"], cwd=ROOT, env=env, capture_output=True, text=True)
    assert dry.stdout.startswith("mpirun -n 3 ")
    other = subprocess.run(["make", "-n", "test", "MPI=mpich"], cwd=ROOT, env=env, capture_output=True, text=True)
    assert other.returncode != 0 and "was set up for MPI=system, not mpich: make clean" in other.stderr
    assert subprocess.run(["make", "-n", "clean", "MPI=mpich"], cwd=ROOT, env=env, capture_output=True).returncode == 0


def test_a_system_mpi_is_started_by_its_own_mpirun_and_an_unknown_choice_is_refused(venv):
    env = _clean_env()
    dry = subprocess.run(
        ["make", "-n", "test-mpi", "MPI=system", f"VENV={venv}"], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert dry.stdout.startswith("mpirun -n 3 ")
    bad = subprocess.run(
        ["make", "-n", "setup", "MPI=openmpi", f"VENV={venv}"], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert bad.returncode != 0 and 'MPI must be mpich or system, not "openmpi"' in bad.stderr
