"""keep_freed_memory: training steps stop faulting memory in, and the user's own allocator settings win.
Each case runs in a fresh interpreter, since mallopt changes the whole process for good."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys

import pytest

glibc = pytest.mark.skipif(
    platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's"
)

# Eight training steps of a small 3D CNN after four warm-up steps (the heap grows to its peak in the first
# few): minor page faults counted over the eight.
STEPS = """
import json, resource, sys
import torch
from fedmpi.memory import keep_freed_memory
applied = keep_freed_memory() if sys.argv[1] == "keep" else None
torch.set_num_threads(1)
torch.manual_seed(0)
net = torch.nn.Sequential(torch.nn.Conv3d(1, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv3d(8, 8, 3, padding=1),
                          torch.nn.ReLU(), torch.nn.MaxPool3d(2), torch.nn.Flatten(), torch.nn.LazyLinear(1))
x = torch.randn(4, 1, 32, 40, 32)
def step():  # SGD as the trainer does it (training.sgd_step; torch.optim would import torch._dynamo)
    net.zero_grad(set_to_none=True)
    net(x).square().mean().backward()
    with torch.no_grad():
        for p in net.parameters():
            p.add_(p.grad, alpha=-1e-3)
for _ in range(4):
    step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(8):
    step()
print(json.dumps({"applied": applied, "faults": resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before}))
"""


def _python(code: str, *args: str, **env: str) -> str:
    """stdout of `code` in a fresh interpreter whose allocator settings are only `env` (none of this shell's)."""
    clean = {
        k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k not in ("GLIBC_TUNABLES", "LD_PRELOAD")
    }
    proc = subprocess.run(
        [sys.executable, "-c", code, *args], env={**clean, **env}, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def _steps(mode: str, **env: str) -> dict:
    return json.loads(_python(STEPS, mode, **env))


@glibc
def test_training_steps_reuse_freed_memory():
    """Each step frees and reallocates about 10 MB of activations. With glibc's trim threshold fixed at its
    default (what setting only MALLOC_TRIM_THRESHOLD_ does) every step faults them back in (about 24,000
    faults a step here); kept, at most an occasional heap extension faults (0-1,300 over the eight steps, once
    3,840 in a full suite run: a bound in absolute faults was flaky, so kept must fault under 5% as often)."""
    kept = _steps("keep")
    default = _steps("none", MALLOC_TRIM_THRESHOLD_="131072")
    assert kept["applied"] is True
    assert default["faults"] > 8 * 2000
    assert kept["faults"] < default["faults"] / 20


@pytest.mark.parametrize(
    "env",
    [
        {"MALLOC_MMAP_THRESHOLD_": "65536"},
        {"MALLOC_TRIM_THRESHOLD_": "131072"},
        {"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=131072"},
        {"LD_PRELOAD": "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2"},
    ],
)
def test_the_users_allocator_settings_win(env):
    # a preload that does not exist only makes the loader warn; the check reads the variable
    assert _python("from fedmpi.memory import keep_freed_memory; print(keep_freed_memory())", **env).strip() == "False"


BIG_BLOCKS = """
import ctypes, json, resource, sys
from fedmpi.memory import keep_freed_memory
applied = keep_freed_memory()
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
size = 64 << 20  # an activation of the paper's full-size model is larger than older glibcs' 32 MB cap
def step():
    p = libc.malloc(size)
    ctypes.memset(p, 1, size)
    libc.free(p)
step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(4):
    step()
print(json.dumps({"applied": applied, "faults": resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before}))
"""


@glibc
def test_blocks_up_to_the_keep_size_are_reused_not_mapped_again():
    """A 64 MB block freed and allocated again four times: kept, it faults in once at most (about 16,000
    pages each time if it were mmapped and unmapped)."""
    out = json.loads(_python(BIG_BLOCKS))
    assert out["applied"] is True
    assert out["faults"] < 2000
