#!/usr/bin/env bash
# Run here, where PyPI is reachable, before benchmarks/gpu_check.sh goes to the GPU machine: that machine has no
# network, and its image's Python (3.12, torch with CUDA) has mpi4py but no MPI library or mpirun as far as
# known. This fetches mpi4py and the mpich wheel for that Python into .whl (ignored by git: name it in the device
# tool's carry); gpu_check.sh installs them into its temporary folder where PYTHON's mpi4py finds no MPI.
#   benchmarks/gpu_wheels.sh            # Python 3.12 wheels; PY=3.11 for another
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-3.12}
"${PYTHON:-python3}" -m pip download -q --no-deps --only-binary=:all: --python-version "$PY" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform manylinux_2_5_x86_64 --platform manylinux1_x86_64 -d .whl "mpi4py>=4,<5" mpich
ls -l .whl
