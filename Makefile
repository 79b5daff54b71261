# Two commands from a fresh clone: `make demo` and `make test`. Both set up .venv when needed.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# MPI=mpich (workstations, CI): the mpich wheel, whose mpirun lands in the venv. MPI=system (a cluster's MPI
# module, README "Clusters"): mpi4py built from source against the MPI whose mpicc is MPICC, started by that
# MPI's mpirun; --no-cache-dir, so that pip never reuses an mpi4py it once built against another MPI. Setup
# records the choice in $(VENV)/.mpi; later runs take it from there and refuse another.
SET_UP_FOR := $(shell cat "$(VENV)/.mpi" 2>/dev/null)
MPI    ?= $(or $(SET_UP_FOR),mpich)
MPICC  ?= mpicc
ifeq ($(MPI),mpich)
MPIRUN ?= $(abspath $(VENV))/bin/mpirun
EXTRAS := test,mpich,report,lint
else ifeq ($(MPI),system)
MPIRUN ?= mpirun
EXTRAS := test,report,lint
BUILD_MPI4PY = command -v "$(MPICC)" >/dev/null || { echo "MPI=system: no $(MPICC) here (load your MPI module or set MPICC)" >&2; exit 2; }; \
	env MPICC="$(MPICC)" $(PY) -m pip install -q --no-cache-dir --no-binary=mpi4py "mpi4py>=4,<5"
else
$(error MPI must be mpich or system, not "$(MPI)")
endif
ifneq ($(filter-out $(MPI),$(SET_UP_FOR)),)
ifeq ($(filter clean,$(MAKECMDGOALS)),)
$(error $(VENV) was set up for MPI=$(SET_UP_FOR), not $(MPI): make clean (or another VENV=) first)
endif
endif
# torch: the CPU wheel unless a torch is already importable (a CUDA build installed by the user). PyPI's
# Linux torch is the CUDA build (GBs of nvidia-* wheels), so torch is asked of the CPU index instead of PyPI
# (--index-url, not --extra-index-url: where the CPU index cannot be reached, pip would take PyPI's CUDA build
# without failing). Only torch itself comes from there (--no-deps): its dependencies come with the package's
# install below. pip's configured extra indexes and find-links still count. TORCH_INDEX= (empty) leaves pip's
# own index settings alone.
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX ?= https://download.pytorch.org/whl/cpu
# pytest exits 5 when a selection holds no tests; that is not a failure here.
NO_TESTS_OK = || [ $$? -eq 5 ]

.PHONY: setup demo test test-fast test-serial test-mpi lint format bench clean

setup: $(VENV)/.installed

# A venv whose Python is gone (its interpreter removed or upgraded away: bin/python dangles) is made again from
# scratch: `venv` over it kept the dangling links, and a venv marked installed was not looked at again.
$(VENV)/.installed: pyproject.toml $(PY)
	test -x $(PY) || $(PYTHON) -m venv --clear $(VENV)
	$(PY) -c 'import sys; sys.exit(sys.version_info < (3, 10))' || { \
		echo "$(VENV): fedmpi needs Python 3.10 or newer, and $(PY) is older;" >&2; \
		echo "make clean, then make setup PYTHON=python3.11 (or another 3.10+)" >&2; exit 2; }
	$(PY) -c "import torch" 2>/dev/null || \
		$(PY) -m pip install -q --no-deps $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)) "$(TORCH_SPEC)"
	$(BUILD_MPI4PY)
	$(PY) -m pip install -q -e ".[$(EXTRAS)]"
	echo $(MPI) > $(VENV)/.mpi
	touch $@

$(PY): ;

demo: setup
	$(MPIRUN) -n 9 $(PY) -m fedmpi train

test: test-serial test-mpi

# The edit loop: unit tests only, no mpirun, no cohort building.
test-fast: setup
	$(PY) -m pytest -q -m "not mpi and not slow and not cohort" tests $(NO_TESTS_OK)

# The end-to-end tests start their jobs with the same launcher as test-mpi.
test-serial: export FEDMPI_MPIRUN = $(MPIRUN)
test-serial: setup
	$(PY) -m pytest -q -m "not mpi" tests $(NO_TESTS_OK)

# The MPI tests take seconds each: one still running after 120 s waits for a message that never comes,
# and the hang watchdog (pyproject.toml) ends it sooner than its 600 s for any test. mpirun ORs the ranks'
# exit codes (1 and 4 give 5), so 5 is not let pass here: an empty selection exits 0 (tests/conftest.py).
test-mpi: setup
	$(MPIRUN) -n 3 $(PY) -m pytest -q --with-mpi -m mpi -o faulthandler_timeout=120 tests

lint: setup
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m mypy

format: setup
	$(PY) -m ruff check --fix .
	$(PY) -m ruff format .

bench: setup
	$(PY) benchmarks/bench_data.py
	$(PY) benchmarks/bench_model.py
	$(PY) benchmarks/bench_comm.py
	$(PY) benchmarks/bench_round.py
	$(PY) benchmarks/bench_mpi_floor.py

clean:
	rm -rf $(VENV) build *.egg-info
