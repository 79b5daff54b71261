#!/usr/bin/env bash
# The prepared GPU check (issue: "a GPU path that is ready to be measured"): at most about 8 minutes on
# one GPU. It needs a Python with a CUDA build of torch, mpi4py with an MPI, h5py, numpy and pyyaml
# (PYTHON, default python3; MPIRUN, the launcher and any flags it needs, split at spaces, default
# the mpirun beside PYTHON or on PATH). It prints:
#   0. where the trainer's preflight weighs data.cache=device: the GPU by its UUID (checked against nvidia-smi's),
#      and the memory free there;
#   1. the full-size model's (width 1, 91x109x91) training step at batch 4 in fp32 and bf16, evaluation
#      throughput, and data-loader throughput into the GPU from a 2 mm HDF5 file (benchmarks/gpu_check.py);
#   2. a 9-rank federation at 2 mm on that GPU: 8 learners sharing it, 64 volumes each, 2 rounds
#      (GPU_CHECK_ROUNDS) of 1 local epoch at batch 4, bf16 and the volumes cached on the GPU, with each
#      rank's start-up phases (ranks.json: CUDA's context, the cache, cuDNN's search in the warm-up), each
#      round's breakdown and, from 4 rounds on, the steady round time against the slowest learner's training;
#      GPU_CHECK_AMPS="bf16 bf16 off" runs one federation per entry on the same cohort and seed and compares their
#      models (benchmarks/gpu_runs.py): does a GPU run repeat bit for bit, what does bf16 cost in accuracy.
#      An entry may carry --set options for its own federation after commas: "bf16 bf16,eval.every=100".
#      GPU_CHECK_SET="train.deterministic=true ..." adds --set options to every federation; GPU_CHECK_MODEL=0 skips
#      part 1 (the federations alone: a short device call). GPU_CHECK_LEARNERS (8), GPU_CHECK_PER (64 volumes a
#      learner) and GPU_CHECK_TEST (64 test volumes) size the cohort: GPU_CHECK_LEARNERS=1 GPU_CHECK_PER=512 is
#      a GPU node's own learner, with the GPU to itself.
# Each step runs under a time limit and whatever fails, the others still run; the script then exits 1 naming
# the failed steps. With $OUT set (the device tool's output folder) it writes its output to $OUT/gpu_check.log
# and the federation's metrics.jsonl and summary.json beside it (metrics-gpu-2.jsonl ... for the further ones).
# Where PYTHON's mpi4py finds no MPI (or no mpirun is there) and no MPIRUN is given, the wheels in GPU_CHECK_WHEELS (default .whl:
# mpi4py and mpich for that Python, benchmarks/gpu_wheels.sh fetches them) are installed into a temporary
# prefix: the GPU machine has no network.
# GPU_CHECK_SMOKE=1 runs the same steps at toy sizes on the CPU, to check the script itself.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
PYTHON=${PYTHON:-python3}
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
if [ "${GPU_CHECK_SMOKE:-0}" = 1 ]; then
    SHAPE="(20, 24, 20)"; PER=4; LEARNERS=2; DEVICE=cpu; WIDTH=0.125
else
    SHAPE="(91, 109, 91)"; PER=64; LEARNERS=8; DEVICE=cuda; WIDTH=1.0
fi
LEARNERS=${GPU_CHECK_LEARNERS:-$LEARNERS}
PER=${GPU_CHECK_PER:-$PER}
TEST=${GPU_CHECK_TEST:-$PER}
ROUNDS=${GPU_CHECK_ROUNDS:-2}
CACHE=device
# one federation per entry, on the same cohort and seed: "bf16 bf16 off" asks whether a GPU run repeats bit for bit
# and what bf16 costs in accuracy. bf16 on the CPU too: the smoke run takes the same branches (off where refused).
read -r -a AMPS <<< "${GPU_CHECK_AMPS:-bf16}"
FAILED=()
LAUNCHER=(mpirun)

# step NAME SECONDS COMMAND...: run COMMAND under a time limit; a failure is reported and remembered, not fatal
step() {
    local name=$1 limit=$2 rc
    shift 2
    timeout -k 15 "$limit" "$@"
    rc=$?
    if [ "$rc" -ne 0 ]; then
        [ "$rc" -eq 124 ] && echo "!! gpu_check: $name ran past its ${limit} s" >&2
        echo "!! gpu_check: $name failed (exit $rc)" >&2
        FAILED+=("$name")
    fi
    return "$rc"
}

setup_mpi() {
    if [ -n "${MPIRUN:-}" ]; then
        read -r -a LAUNCHER <<< "$MPIRUN"  # "mpirun --oversubscribe": the command and its flags
        return 0
    fi
    local wheels=${GPU_CHECK_WHEELS:-.whl} site own
    own="$(dirname "$(command -v "$PYTHON")")/mpirun"
    if { ! "$PYTHON" -c "from mpi4py import MPI" 2>/dev/null || { [ ! -x "$own" ] && ! command -v mpirun >/dev/null; }; } \
        && compgen -G "$wheels/*.whl" >/dev/null; then
        echo "(mpi4py finds no MPI, or there is no mpirun: installing the wheels in $wheels into $WORK/mpi)"
        "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --prefix "$WORK/mpi" "$wheels"/*.whl || return 1
        site=$(dirname "$(find "$WORK/mpi" -maxdepth 5 -type d -name mpi4py | head -n 1)")
        export PYTHONPATH=$site${PYTHONPATH:+:$PYTHONPATH}
        export LD_LIBRARY_PATH=$WORK/mpi/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
        export PATH=$WORK/mpi/bin:$PATH
        LAUNCHER=("$WORK/mpi/bin/mpirun")
        return 0
    fi
    LAUNCHER=("$own")
    [ -x "$own" ] || LAUNCHER=(mpirun)
}

# federation NAME ENTRY: the federation of run NAME (ENTRY: train.amp, then its own --set options after commas)
# and its round table
federation() {
    local name=$1 amp=${2%%,*} own="" suffix="" extra=() option
    [[ $2 == *,* ]] && own=${2#*,}
    for option in ${GPU_CHECK_SET:-} ${own//,/ }; do extra+=(--set "$option"); done
    [ "$name" != gpu ] && suffix=-$name
    echo
    echo "== $((LEARNERS + 1))-rank federation $name: $LEARNERS learner(s) on one $DEVICE, $PER volumes each, $ROUNDS rounds, train.amp=$amp${GPU_CHECK_SET:+ $GPU_CHECK_SET}${own:+ ${own//,/ }}"
    OMP_NUM_THREADS=1 step "federation $name" 210 "${LAUNCHER[@]}" -n $((LEARNERS + 1)) "$PYTHON" -m fedmpi train \
        --set data.dir="$WORK/split" --set run.dir="$WORK/runs" --set run.name="$name" --set federation.learners=$LEARNERS \
        --set federation.rounds=$ROUNDS --set federation.algorithm=fedsparsify-global --set federation.target=0.9 \
        --set model.width=$WIDTH --set model.dropout=0 --set train.epochs=1 --set train.batch_size=4 \
        --set train.lr=0.001 --set train.device=$DEVICE --set train.amp="$amp" --set data.cache=$CACHE \
        --set eval.batch_size=8 "${extra[@]}"
    if [ -n "${OUT:-}" ]; then
        cp "$WORK/runs/$name/metrics.jsonl" "$OUT/metrics$suffix.jsonl" 2>/dev/null || true
        cp "$WORK/runs/$name/summary.json" "$OUT/summary$suffix.json" 2>/dev/null || true
    fi
    if [ -s "$WORK/runs/$name/metrics.jsonl" ]; then
        step "round table $name" 60 "$PYTHON" benchmarks/gpu_runs.py rounds "$WORK/runs/$name"
    fi
}

main() {
    echo "== gpu_check: $(date -u +%FT%TZ) on $(hostname)"
    if command -v nvidia-smi >/dev/null; then
        nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
    fi
    setup_mpi || FAILED+=("MPI set-up")
    echo "python: $(command -v "$PYTHON"); launcher: ${LAUNCHER[*]}"
    "$PYTHON" -c "import sys, torch, h5py, numpy, yaml; print('torch', torch.__version__, 'CUDA', torch.version.cuda,
'available' if torch.cuda.is_available() else 'NOT available'); from mpi4py import MPI; print(MPI.Get_library_version().splitlines()[0])" \
        || echo "!! gpu_check: $PYTHON lacks a package above (no MPI: run benchmarks/gpu_wheels.sh where PyPI is reachable, carry .whl)" >&2
    if ! step "cohort" 120 "$PYTHON" - <<EOF
import sys
sys.path.insert(0, "tests")
from pathlib import Path
from fedtools import write_split
write_split(Path("$WORK/split"), learners=$LEARNERS, per_learner=$PER, test=$TEST, shape=$SHAPE)
print("wrote $LEARNERS x $PER + $TEST volumes of shape $SHAPE to $WORK/split")
EOF
    then
        echo "== gpu_check FAILED: cohort (nothing else can run)"
        return 1
    fi
    # where the preflight weighs data.cache=device: the GPU by its UUID, as nvidia-smi names it, and its free memory
    step "cache place" 60 "$PYTHON" - <<EOF
import shutil, subprocess, sys, torch
from fedmpi.preflight import cache_place
place, room = cache_place("device", torch.device("$DEVICE"))
print(f"data.cache=device is weighed on {place}: {room / 2**30:.1f} GiB free there")
if shutil.which("nvidia-smi") and "$DEVICE" == "cuda":
    smi = subprocess.run(["nvidia-smi", "--query-gpu=uuid", "--format=csv,noheader"], capture_output=True, text=True)
    sys.exit(None if place in smi.stdout.split() else f"nvidia-smi names the GPUs {smi.stdout.split()}, not {place}")
EOF
    if [ "${GPU_CHECK_MODEL:-1}" != 0 ]; then
        step "benchmarks/gpu_check.py" 180 "$PYTHON" benchmarks/gpu_check.py --data "$WORK/split/learner_1.h5"
    fi
    # the trainer refuses bf16 where its weight gradient is wrong (the probe above): the federation's figures then in float32
    if ! timeout 60 "$PYTHON" -c "import sys, torch; from fedmpi.device import autocast_problem
sys.exit(autocast_problem(torch.device('$DEVICE'), 'bf16') or None)"; then
        AMPS=("${AMPS[@]/bf16/off}")
        echo "(the federations below run with train.amp=off)"
    fi
    local i name names=()
    for i in "${!AMPS[@]}"; do
        name=gpu; [ "$i" -gt 0 ] && name=gpu-$((i + 1))
        names+=("$name")
        federation "$name" "${AMPS[$i]}"
    done
    [ "${#names[@]}" -gt 1 ] && step "comparison" 60 "$PYTHON" benchmarks/gpu_runs.py compare "$WORK/runs" "${names[@]}"
    if [ "${#FAILED[@]}" -gt 0 ]; then
        echo "== gpu_check FAILED: $(IFS=,; echo "${FAILED[*]}")"
        return 1
    fi
    echo "== gpu_check done"
}

if [ -n "${OUT:-}" ]; then
    mkdir -p "$OUT"
    main 2>&1 | tee "$OUT/gpu_check.log"
    exit "${PIPESTATUS[0]}"
fi
main
