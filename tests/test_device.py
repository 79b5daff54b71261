"""Where a model runs: this rank's device, and the probe that refuses a reduced precision computed wrongly."""

import pytest
import torch

from fedmpi import device
from fedmpi.device import select_device
from fedmpi.errors import DeviceError


def test_a_rank_on_a_gpu_node_takes_its_gpu_and_makes_it_current(monkeypatch):
    current = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setattr(torch.cuda, "set_device", current.append)
    assert select_device("auto", local_rank=5) == torch.device("cuda", 1)
    assert current == [torch.device("cuda", 1)]
    assert select_device("cpu", local_rank=5) == torch.device("cpu") and len(current) == 1


def test_select_device_on_cpu_machine():
    if torch.cuda.is_available():
        pytest.skip("this test describes a machine without a GPU")
    assert select_device("auto") == torch.device("cpu")
    assert select_device("auto", local_rank=3) == torch.device("cpu")
    assert select_device("cpu") == torch.device("cpu")
    with pytest.raises(DeviceError, match="no CUDA GPU"):
        select_device("cuda")
    with pytest.raises(ValueError):
        select_device("tpu")


def test_the_autocast_probe_measures_a_convolutions_weight_gradient_against_float64():
    cpu = torch.device("cpu")
    assert device.autocast_weight_grad_error(cpu, None) < 1e-6  # float32: the comparison itself is exact
    assert device.autocast_problem(cpu, "off") == ""
    error = device.autocast_weight_grad_error(cpu, torch.bfloat16)
    # rounding alone (about 0.3%), or this CPU's defect (nan, or far off), which autocast_problem then names
    assert 1e-4 < error < 0.02 or not error < device.AUTOCAST_TOLERANCE
    assert (device.autocast_problem(cpu, "bf16") == "") == (error < device.AUTOCAST_TOLERANCE)
