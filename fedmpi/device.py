"""Where a model runs: choosing this rank's device, placing the model and its batches there, and mixed
precision, with the probe that refuses a reduced precision this device computes wrongly.

Kept apart from training so that start-up (preflight), the attack and the benchmarks can ask about the
device without the training loop, and so that every GPU option (cuDNN benchmark mode, channels-last-3d,
bf16 autocast) is set in one place.
"""

from __future__ import annotations

import contextlib
from typing import TypeVar

import torch
from torch import nn

from .config import AMPS, DEVICES, TrainConfig
from .errors import DeviceError


def select_device(preference: str = "auto", local_rank: int = 0) -> torch.device:
    """Pick this process's device; with several GPUs, ranks on a node spread over them."""
    if preference not in DEVICES:
        raise ValueError(f"device must be one of {DEVICES}, got {preference!r}")
    if preference == "cpu":
        return torch.device("cpu")
    if torch.cuda.is_available() and torch.cuda.device_count() > 0:
        device = torch.device("cuda", local_rank % torch.cuda.device_count())
        # The process's current device: what helper threads (DataLoader's pinning) and a bare "cuda" use;
        # left at 0, every rank of a node would open a context on GPU 0 as well.
        torch.cuda.set_device(device)
        return device
    if preference == "cuda":
        raise DeviceError(
            "device 'cuda' was requested but no CUDA GPU is visible to PyTorch "
            f"(torch {torch.__version__}, built with CUDA {torch.version.cuda}); "
            "use device 'cpu' or 'auto', or install a CUDA build of torch"
        )
    return torch.device("cpu")


def gpu_room(device: torch.device) -> tuple[str, int]:
    """A GPU's name for the preflight and its free memory in bytes, as the driver counts it (other processes'
    allocations taken off). The name is the GPU's UUID where torch gives it (GPU-..., as `nvidia-smi -L` shows
    it), since the index does not tell GPUs apart: ranks with a CUDA_VISIBLE_DEVICES of their own all call theirs
    cuda:0, and ranks sharing one may call it cuda:0 and cuda:1."""
    free, _total = torch.cuda.mem_get_info(device)
    uuid = getattr(torch.cuda.get_device_properties(device), "uuid", None)
    return (f"GPU-{uuid}" if uuid else str(device)), int(free)


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def place(model: nn.Module, device) -> torch.device:
    """The device to run on (the model's own when None), with the model moved there."""
    device = model_device(model) if device is None else torch.device(device)
    model.to(device)
    return device


def to_device(x: torch.Tensor, device: torch.device, channels_last: bool) -> torch.Tensor:
    x = x.to(device, non_blocking=True)
    return x.contiguous(memory_format=torch.channels_last_3d) if channels_last else x


def autocast_context(device: torch.device, dtype: torch.dtype | None):
    """Mixed precision for the forward pass when `dtype` is given (bf16 needs no loss scaling)."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


M = TypeVar("M", bound=nn.Module)


AUTOCAST = {amp: None if name is None else getattr(torch, name) for amp, name in AMPS.items()}


# A convolution's weight gradient in reduced precision is off by about 0.3% (bf16); far beyond this is a
# defect of the kernel, not rounding.
AUTOCAST_TOLERANCE = 0.05


def autocast_weight_grad_error(device: torch.device, dtype: torch.dtype | None) -> float:
    """Relative error, against float64, of a 3x3x3 convolution's weight gradient under autocast on `device`,
    on a 2x3x2 grid such as the model's last blocks see (nan when it is not finite)."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 8, 2, 3, 2, generator=gen)
    w = torch.randn(16, 8, 3, 3, 3, generator=gen) * 0.1
    g = torch.randn(2, 16, 2, 3, 2, generator=gen)
    if dtype is not None:  # both sides see the same rounded inputs
        x, w = x.to(dtype).float(), w.to(dtype).float()
    exact = w.double().requires_grad_()
    (want,) = torch.autograd.grad(nn.functional.conv3d(x.double(), exact, padding=1), exact, g.double())
    probe = w.to(device).requires_grad_()
    with autocast_context(device, dtype):
        out = nn.functional.conv3d(x.to(device), probe, padding=1)
    (got,) = torch.autograd.grad(out.float(), probe, g.to(device))
    got = got.double().cpu()
    if not torch.isfinite(got).all():
        return float("nan")
    return float((got - want).abs().max() / want.abs().max())


def autocast_problem(device: torch.device, amp: str) -> str:
    """Why train.amp cannot train on `device`, or "". torch 2.13's oneDNN computes a 3x3x3 convolution's
    weight gradient in bf16 wrongly (inf, NaN, or off by orders of magnitude) when the volume's first axis
    is 2, on CPUs with AVX-512 BF16 but no AMX (seen on an AMD EPYC): the model's last blocks run on such
    grids (2x3x2 at 4 mm), so training would diverge without a word. The probe takes milliseconds."""
    dtype = AUTOCAST[amp]
    if dtype is None:
        return ""
    error = autocast_weight_grad_error(device, dtype)
    if error < AUTOCAST_TOLERANCE:
        return ""
    return (
        f"train.amp={amp}: on this {device.type} (torch {torch.__version__}) a convolution's weight gradient in "
        f"{amp} is wrong ({error:.3g} relative error against float64, where rounding gives under 1%), so training "
        "would diverge; use train.amp=off here"
    )


def prepare_model(model: M, device: torch.device, train: TrainConfig | None = None) -> M:
    """The model on its device as the train section asks (its defaults without one): cuDNN picking the fastest
    convolution algorithms for the fixed volume shape (benchmark mode; with the nondeterministic algorithms cuDNN
    may pick, two runs of one seed ended 0.65 apart in a parameter on an H200), or its deterministic algorithms
    only (train.deterministic); channels-last-3d weights when asked. A no-op on CPU apart from the memory format."""
    t = train or TrainConfig()
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = t.cudnn_benchmark and not t.deterministic
        torch.backends.cudnn.deterministic = t.deterministic
    model.to(device)
    if t.channels_last:
        model.to(memory_format=torch.channels_last_3d)  # type: ignore[call-overload]  # Module.to takes it
    return model
