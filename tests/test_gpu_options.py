"""The GPU options are wired, tested on the CPU: mixed precision reaches the forward pass, channels-last
reaches the volumes and weights, cuDNN benchmark mode (or its deterministic algorithms) and pinned memory are
chosen for a CUDA device, and data.cache=device keeps the volumes on the device without workers."""

from __future__ import annotations

import json

import pytest
import torch
from fedtools import SHAPE, write_split

from fedmpi.config import TrainConfig, load_config
from fedmpi.data import loader_options, open_volumes
from fedmpi.device import AUTOCAST, autocast_problem, prepare_model
from fedmpi.model import BrainAgeCNN
from fedmpi.training import SeededLoader, local_train, predict


def _model():
    """Two pools keep every convolution on grids of 4 or more along the first axis: some CPUs' bf16 weight
    gradient is wrong on a grid of 2 there (device.autocast_problem), and these tests are about wiring."""
    torch.manual_seed(0)
    return BrainAgeCNN(SHAPE, width=0.125, dropout=0.0, pools=2)


def _batches(n=4):
    torch.manual_seed(1)
    return [(torch.randn(2, 1, *SHAPE), torch.full((2,), 60.0)) for _ in range(n // 2)]


def _first_conv_seen(model):
    seen = {}

    def hook(module, inputs, output):
        seen.setdefault("input", inputs[0])
        seen.setdefault("output_dtype", output.dtype)

    handle = model.features[0][0].register_forward_hook(hook)
    return seen, handle


@pytest.mark.slow
def test_bf16_autocast_reaches_the_forward_pass_and_keeps_float32_weights():
    model = _model()
    seen, handle = _first_conv_seen(model)
    stats = local_train(model, _batches(), epochs=1, lr=1e-3, autocast=AUTOCAST["bf16"])
    handle.remove()
    assert seen["output_dtype"] == torch.bfloat16
    assert all(p.dtype == torch.float32 for p in model.parameters()) and stats["loss"] > 0
    seen, handle = _first_conv_seen(model)
    pred, _ = predict(model, _batches(), autocast=AUTOCAST["bf16"])
    handle.remove()
    assert seen["output_dtype"] == torch.bfloat16 and pred.dtype.name == "float32"
    seen, handle = _first_conv_seen(model)
    local_train(model, _batches(), epochs=1, lr=1e-3, autocast=AUTOCAST["off"])
    handle.remove()
    assert seen["output_dtype"] == torch.float32


def test_under_bf16_the_predicted_age_keeps_float32_precision():
    """bfloat16 rounds ages of 32-64 to quarter years: the output layer runs in float32 whatever the autocast."""
    model = _model().eval()
    x = torch.randn(8, 1, *SHAPE) * torch.linspace(0.2, 3.0, 8).view(8, 1, 1, 1, 1)
    with torch.no_grad():
        full = model(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            mixed = model(x)
    assert mixed.dtype == torch.float32
    assert (mixed - full).abs().max() < 0.02  # was up to 0.18, on the bias's bfloat16 value 62.75 for 62.68
    assert len(set(mixed.tolist())) == len(x)


def test_channels_last_reaches_volumes_and_weights():
    model = prepare_model(_model(), torch.device("cpu"), TrainConfig(channels_last=True))
    assert model.features[0][0].weight.is_contiguous(memory_format=torch.channels_last_3d)
    seen, handle = _first_conv_seen(model)
    local_train(model, _batches(), epochs=1, lr=1e-3, channels_last=True)
    handle.remove()
    assert seen["input"].is_contiguous(memory_format=torch.channels_last_3d)


def test_cudnn_benchmark_is_set_for_a_cuda_device_only():
    before = torch.backends.cudnn.benchmark
    try:
        torch.backends.cudnn.benchmark = False
        prepare_model(_model(), torch.device("cpu"))
        assert torch.backends.cudnn.benchmark is False
        model = _model()
        model.to = lambda *a, **k: model  # no GPU here: only the flag is under test
        prepare_model(model, torch.device("cuda"), TrainConfig(cudnn_benchmark=True))
        assert torch.backends.cudnn.benchmark is True
    finally:
        torch.backends.cudnn.benchmark = before


def test_deterministic_asks_cudnn_for_its_deterministic_algorithms_without_benchmark_mode():
    before = torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic
    try:
        model = _model()
        model.to = lambda *a, **k: model  # no GPU here: only the flags are under test
        prepare_model(model, torch.device("cuda"), load_config(overrides=["train.deterministic=true"]).train)
        assert torch.backends.cudnn.deterministic is True and torch.backends.cudnn.benchmark is False
        prepare_model(model, torch.device("cuda"), load_config().train)
        assert torch.backends.cudnn.deterministic is False and torch.backends.cudnn.benchmark is True
    finally:
        torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = before


@pytest.mark.parametrize(
    "cache, workers, device, expected",
    [
        ("memory", 0, "cuda", {"num_workers": 0, "pin_memory": True}),
        ("memory", 0, "cpu", {"num_workers": 0, "pin_memory": False}),
        ("device", 0, "cuda", {"num_workers": 0, "pin_memory": False}),
        ("off", 2, "cuda", {"num_workers": 2, "pin_memory": True}),
        ("off", 2, "cpu", {"num_workers": 2, "pin_memory": False}),
    ],
)
def test_loader_options_pin_memory_for_a_gpu_and_start_workers_only_to_read_from_disk(cache, workers, device, expected):
    cfg = load_config(overrides=[f"data.cache={cache}", f"data.workers={workers}"])
    assert loader_options(cfg, torch.device(device)) == expected


def test_device_cache_holds_volumes_on_the_device(tmp_path):
    split = write_split(tmp_path, learners=1, per_learner=4, test=2)
    cfg = load_config(overrides=["data.cache=device"])
    data = open_volumes(split / "learner_1.h5", cfg, torch.device("cpu")).warm()
    assert data.cache_device == torch.device("cpu") and len(data._cache) == 4
    assert data[0][0] is data[0][0]  # served from the cache, no copy
    off = open_volumes(split / "learner_1.h5", load_config(overrides=["data.cache=off"]), torch.device("cpu")).warm()
    assert off._cache is None


def test_seeded_loader_draws_the_order_a_fresh_loader_would(tmp_path):
    split = write_split(tmp_path, learners=1, per_learner=10, test=2)
    cfg = load_config(overrides=["train.batch_size=3"])
    data = open_volumes(split / "learner_1.h5", cfg, torch.device("cpu"))
    loader = SeededLoader(cfg, data, torch.device("cpu"))
    for seed in (5, 9, 5):  # reseeding each round gives every round the order of a freshly seeded loader
        fresh = torch.utils.data.DataLoader(
            data, batch_size=3, shuffle=True, generator=torch.Generator().manual_seed(seed)
        )
        reused = loader.for_round(seed)
        for _epoch in range(2):  # and later epochs of the round follow it as well
            assert [y.tolist() for _, y in reused] == [y.tolist() for _, y in fresh]


def test_warm_up_leaves_model_gradients_and_random_state_alone():
    from fedmpi.model import flat_parameters
    from fedmpi.training import warm_up

    model = _model()
    before = flat_parameters(model)
    torch.manual_seed(3)
    expected = torch.rand(3)
    torch.manual_seed(3)
    warm_up(model, SHAPE, 2, torch.device("cpu"))
    assert torch.equal(torch.rand(3), expected)
    assert (flat_parameters(model) == before).all() and all(p.grad is None for p in model.parameters())


def _gpu_check(tmp_path, **env):
    """benchmarks/gpu_check.sh in smoke mode (toy sizes on the CPU), its $OUT in tmp_path/out."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from fedtools import MPIRUN, MPIRUN_FLAGS

    root = Path(__file__).resolve().parents[1]
    env = {
        **os.environ,
        "GPU_CHECK_SMOKE": "1",
        "PYTHON": sys.executable,
        "MPIRUN": " ".join([MPIRUN, *MPIRUN_FLAGS]),
        "OUT": str(tmp_path / "out"),
        **env,
    }
    return subprocess.run(
        ["bash", str(root / "benchmarks" / "gpu_check.sh")], capture_output=True, text=True, env=env, timeout=600
    )


@pytest.mark.slow
def test_the_prepared_gpu_check_runs_end_to_end_in_smoke_mode(tmp_path):
    """benchmarks/gpu_check.sh at toy sizes on the CPU: the script a GPU session runs once has run, and its
    output and the federation's metrics come back in $OUT (what the device tool returns); with 4 rounds it also
    gives the steady round time, and with two federations of one precision it compares their models (the same seed
    on the CPU: the same model, also when the second evaluates only every other round: its own option)."""
    proc = _gpu_check(tmp_path, GPU_CHECK_ROUNDS="4", GPU_CHECK_AMPS="bf16 bf16,eval.every=2", GPU_CHECK_TEST="3")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    log = (tmp_path / "out" / "gpu_check.log").read_text()
    amp = "off" if autocast_problem(torch.device("cpu"), "bf16") else "bf16"  # what the script ran, by this CPU
    for table in (
        "bf16 weight-gradient probe: relative error",
        "| model step, batch 4 |",
        "| evaluation, batch 8 |",
        "| data loader into the device",
        "wrote 2 x 4 + 3 volumes",
        "data.cache=device is weighed on host: ",
        "| rank | imports | mpi | prepare | preflight | volumes | model | warm_up | ready |",
        "| learner 2 | ",
        "| round | wall | train | setup |",
        "steady state, rounds 3-4: ",
        f"gpu-2 against gpu (train.amp {amp} against {amp}): parameters: the same model bit for bit",
        "== gpu_check done",
    ):
        assert table in proc.stdout and table in log
    (second,) = [line for line in log.splitlines() if line.startswith("== 3-rank federation gpu-2: ")]
    assert second.startswith("== 3-rank federation gpu-2: 2 learner(s) on one cpu, 4 volumes each, 4 rounds, ")
    assert second.endswith(f"train.amp={amp} eval.every=2")
    rows = [json.loads(line) for line in (tmp_path / "out" / "metrics-gpu-2.jsonl").read_text().splitlines()]
    assert [row.get("test_mae") is not None for row in rows] == [False, True, False, True]
    for name in ("metrics.jsonl", "metrics-gpu-2.jsonl"):
        assert len((tmp_path / "out" / name).read_text().splitlines()) == 4
    assert (tmp_path / "out" / "summary.json").exists()


@pytest.mark.slow
def test_a_failed_federation_leaves_the_gpu_checks_other_figures_and_exits_1(tmp_path):
    """One step that fails (here the launcher) does not take the others' figures with it: GPU time is scarce."""
    proc = _gpu_check(tmp_path, MPIRUN="false")
    assert proc.returncode == 1
    log = (tmp_path / "out" / "gpu_check.log").read_text()
    for line in ("| model step, batch 4 |", "| data loader into the device", "== gpu_check FAILED: federation"):
        assert line in log
    assert "== gpu_check done" not in log


def test_a_failed_part_of_gpu_check_py_leaves_the_others(tmp_path, monkeypatch, capsys):
    import importlib.util
    import sys
    from pathlib import Path

    import numpy as np
    from fedtools import write_volumes

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"
    spec = importlib.util.spec_from_file_location("gpu_check", path)
    assert spec is not None and spec.loader is not None
    gpu_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_check)
    write_volumes(tmp_path / "v.h5", np.full(4, 60.0), np.random.default_rng(0), (20, 24, 20))

    def broken(*args, **kwargs):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(gpu_check, "SMOKE", True)
    monkeypatch.setattr(gpu_check, "step_times", broken)
    monkeypatch.setattr(sys, "argv", ["gpu_check.py", "--data", str(tmp_path / "v.h5")])
    assert gpu_check.main() == 1
    out = capsys.readouterr().out
    assert "the model step part failed" in out and "| model step, batch 4 |" not in out
    assert "| evaluation, batch 8 |" in out and "| data loader into the device" in out


def test_every_amp_the_config_accepts_has_its_autocast_dtype():
    from fedmpi.config import AMPS

    assert set(AMPS) == set(AUTOCAST) and AUTOCAST["bf16"] is torch.bfloat16 and AUTOCAST["off"] is None
