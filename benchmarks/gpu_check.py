"""The GPU measurements of benchmarks/gpu_check.sh (printed numbers, not a test).

1. Training step time of the full-size model (width 1, 91x109x91, 2,948,801 parameters) at batch 4,
   float32 and bf16 autocast, channels-last on and off.
2. Evaluation throughput (volumes/s) at batch 8, float32 and bf16.
3. Data-loader throughput into the GPU from a 2 mm HDF5 file: read from disk each time, cached in host
   memory (pinned, non-blocking copies), cached on the GPU.

    python benchmarks/gpu_check.py --data DIR/learner_1.h5        # DIR from gpu_check.sh
    GPU_CHECK_SMOKE=1 python benchmarks/gpu_check.py --data F.h5  # tiny sizes on the CPU (a check of the script)
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from fedmpi.config import TrainConfig, load_config
from fedmpi.data import loader_options, open_volumes
from fedmpi.device import AUTOCAST, AUTOCAST_TOLERANCE, autocast_weight_grad_error, prepare_model
from fedmpi.model import BrainAgeCNN
from fedmpi.training import local_train, predict
from preprocess.grid import target_grid

SMOKE = os.environ.get("GPU_CHECK_SMOKE") == "1"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bf16_probe(device: torch.device) -> None:
    """The trainer's check of a bf16 convolution's weight gradient, with its error printed."""
    error = autocast_weight_grad_error(device, AUTOCAST["bf16"])
    verdict = "within rounding" if error < AUTOCAST_TOLERANCE else "WRONG: the trainer refuses train.amp=bf16 here"
    print(f"bf16 weight-gradient probe: relative error {error:.2e} against float64 ({verdict})")


def step_times(device: torch.device, shape, width: float, steps: int) -> None:
    """Part 1: seconds per training step at each precision, channels-last off and on, after a warm-up."""
    print("\n| model step, batch 4 | precision | channels-last | s/step | volumes/s |")
    print("|---|---|---|---:|---:|")
    for amp in AUTOCAST:
        for channels_last in (False, True):
            torch.manual_seed(0)
            model = prepare_model(
                BrainAgeCNN(shape, width=width, dropout=0.0), device, TrainConfig(channels_last=channels_last)
            )
            batch = [(torch.randn(4, 1, *shape, device=device), torch.full((4,), 60.0, device=device))]
            kwargs = dict(epochs=1, lr=1e-4, autocast=AUTOCAST[amp], channels_last=channels_last)
            local_train(model, batch * 3, **kwargs)  # warm-up: cuDNN benchmark picks its algorithms here
            _sync(device)
            began = time.perf_counter()
            local_train(model, batch * steps, **kwargs)
            _sync(device)
            per_step = (time.perf_counter() - began) / steps
            print(f"| width {width:g}, {shape} | {amp} | {channels_last} | {per_step:.4f} | {4 / per_step:.1f} |")


def eval_throughput(device: torch.device, shape, width: float, batches: int) -> None:
    """Part 2: evaluated volumes per second at each precision."""
    print("\n| evaluation, batch 8 | precision | volumes/s |")
    print("|---|---|---:|")
    torch.manual_seed(0)
    model = prepare_model(BrainAgeCNN(shape, width=width, dropout=0.0), device)
    data = [(torch.randn(8, 1, *shape, device=device), torch.full((8,), 60.0))] * batches
    for amp in AUTOCAST:
        predict(model, data[:2], autocast=AUTOCAST[amp])
        _sync(device)
        began = time.perf_counter()
        predict(model, data, autocast=AUTOCAST[amp])
        _sync(device)
        print(f"| width {width:g}, {shape} | {amp} | {8 * batches / (time.perf_counter() - began):.1f} |")


def loader_throughput(device: torch.device, path: Path) -> None:
    """Part 3: volumes per second the data loader delivers into the device, for each data.cache (workers only read
    from disk: the configuration refuses them with a cache)."""
    print("\n| data loader into the device, batch 4 | workers | volumes/s |")
    print("|---|---:|---:|")
    for cache, workers, label in (
        ("off", 0, "read from disk every epoch"),
        ("off", min(8, os.cpu_count() or 1), "read from disk every epoch"),
        ("memory", 0, "cached in host memory (warm)"),
        ("device", 0, "cached on the device (warm)"),
    ):
        cfg = load_config(overrides=[f"data.cache={cache}", f"data.workers={workers}"])
        data = open_volumes(path, cfg, device)
        if cache != "off":
            data.warm()
        loader = torch.utils.data.DataLoader(data, batch_size=4, shuffle=True, **loader_options(cfg, device))
        began, n = time.perf_counter(), 0
        for x, _ in loader:
            x = x.to(device, non_blocking=True)
            n += x.shape[0]
        _sync(device)
        print(f"| {label} | {workers} | {n / (time.perf_counter() - began):.0f} |")


def main() -> int:
    """Every part on the GPU (GPU_CHECK_SMOKE=1: tiny sizes on the CPU), each printed as a markdown table; 1 if
    any part failed, after the others ran."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, required=True, help="a 2 mm volume file (gpu_check.sh writes one)")
    args = ap.parse_args()
    device = torch.device("cpu" if SMOKE else "cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("gpu_check: no CUDA device visible to torch " + torch.__version__)
    shape, width = ((20, 24, 20), 0.125) if SMOKE else (target_grid(2)[0], 1.0)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (smoke test)"
    print(
        f"device: {name}; torch {torch.__version__}, CUDA {torch.version.cuda}, "
        f"cuDNN {torch.backends.cudnn.version() if device.type == 'cuda' else '-'}"
    )
    failed = []
    for part, run in (
        ("bf16 probe", lambda: bf16_probe(device)),
        ("model step", lambda: step_times(device, shape, width, steps=2 if SMOKE else 20)),
        ("evaluation", lambda: eval_throughput(device, shape, width, batches=2 if SMOKE else 16)),
        ("data loader", lambda: loader_throughput(device, args.data)),
    ):
        try:  # a part that fails is reported; the others still give their figures
            run()
        except Exception:
            traceback.print_exc()
            print(f"\n!! gpu_check.py: the {part} part failed (traceback above)", flush=True)
            failed.append(part)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
