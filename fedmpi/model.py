"""Brain-age 3D CNN (FedSparsify reference architecture) and its flat-vector view.

The federated protocol exchanges models as one float32 vector; `parameter_layout` fixes the
order (``named_parameters`` order) so server and learners agree on positions, which the
pruning masks index into.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from .config import INITS

if TYPE_CHECKING:
    from .config import Config

BLOCK_CHANNELS = (32, 64, 128, 256, 256)
HEAD_CHANNELS = 64
MAX_POOLS = len(BLOCK_CHANNELS)
UKBB_MEAN_AGE = 62.68  # the paper's cohort mean: where the output starts when no training data says otherwise


def _scaled(channels: int, width: float) -> int:
    return max(1, round(channels * width))


def _pooled_shape(shape: tuple[int, ...], pools: int) -> tuple[int, ...]:
    out = tuple(shape)
    for _ in range(pools):
        out = tuple(d // 2 for d in out)
    return out


def auto_pools(input_shape: tuple[int, int, int]) -> int:
    """Largest p <= 5 whose p floor-halvings leave every spatial dim >= 2.

    Raises ValueError when even p = 0 leaves a dim < 2 (instance norm needs a grid).
    """
    if len(input_shape) != 3:
        raise ValueError(f"input_shape must have 3 spatial dims, got {tuple(input_shape)}")
    if min(input_shape) < 2:
        raise ValueError(f"input_shape {tuple(input_shape)} is too small: every spatial dim must be >= 2")
    pools = 0
    while pools < MAX_POOLS and min(_pooled_shape(input_shape, pools + 1)) >= 2:
        pools += 1
    return pools


def max_pool2(x: torch.Tensor) -> torch.Tensor:
    """MaxPool3d(2)'s values as three pairwise maxima of strided views (odd edges dropped, as MaxPool3d
    floors). ATen's CPU max_pool3d finds each window's argmax even when no gradient is wanted; this is
    about seven times faster, and has no gradient routing of its own, so it serves inference only."""
    d, h, w = (n // 2 * 2 for n in x.shape[-3:])
    x = x[..., :d, :h, :w]
    x = torch.maximum(x[..., 0::2, :, :], x[..., 1::2, :, :])
    x = torch.maximum(x[..., 0::2, :], x[..., 1::2, :])
    return torch.maximum(x[..., 0::2], x[..., 1::2])


class ConvBlock(nn.Sequential):
    """Conv3d 3x3x3 -> InstanceNorm3d (no affine) -> [MaxPool3d(2)] -> ReLU.

    With autograd on (training, SNIP, attacks) and on accelerators, the layers run as listed, so training
    and its gradients are exactly PyTorch's. Inference on a CPU in float32 runs the same function
    reordered, because evaluation shares the learners' cores: the norm's mean and variance come from the
    convolution's output, but its scaling and the ReLU are applied after the pooling, to an eighth of the
    voxels (both are monotone, so they commute with max), and the pooling takes pairwise maxima
    (max_pool2). The values equal the listed order's up to float rounding; 32 evaluation volumes at width
    0.25 take about 20% less time.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The layers as listed, or, on a CPU in float32 with autograd off, the reordered equivalent the class docstring
        describes."""
        conv, norm = self[0], self[1]
        y = conv(x)
        if y.device.type != "cpu" or y.dtype != torch.float32 or torch.is_grad_enabled():
            for layer in list(self)[1:]:
                y = layer(y)
            return y
        dims = (2, 3, 4)
        centred = y.sub_(y.mean(dims, keepdim=True))
        var = torch.linalg.vector_norm(centred, dim=dims, keepdim=True).square_() / centred[0, 0].numel()
        if len(self) == 4:
            centred = max_pool2(centred)
        return centred.mul_(var.add_(norm.eps).rsqrt_()).relu_()


class BrainAgeCNN(nn.Module):
    """Five conv blocks + 1x1x1 head regressing age from a (B, 1, X, Y, Z) T1 volume.

    Block: Conv3d 3x3x3 (same) -> InstanceNorm3d (no affine, no running stats) ->
    MaxPool3d(2) -> ReLU, channels 32, 64, 128, 256, 256 scaled by ``width``. Head: Conv3d
    1x1x1 to 64 -> InstanceNorm -> ReLU -> global average pool -> Dropout -> Conv3d 1x1x1 to 1,
    whose bias starts at ``mean_age`` so training starts from the cohort mean.

    Pooling choice: only the first ``pools`` blocks pool. ``pools=None`` picks the largest
    p <= 5 leaving every spatial dim >= 2, because instance norm over a 1x1x1 grid is
    undefined (PyTorch raises in training mode; in eval the features would be all zero).
    At the paper's 2 mm grid 91x109x91 this is p = 5 (head grid 2x3x2, the original
    model); at the 4 mm CPU preset 45x54x45 it is p = 4 (also 2x3x2), so the last block
    there is conv -> norm -> ReLU without pooling; at 6 mm (30x36x30) p = 3 (head grid 3x4x3).
    Parameter count does not depend on it (2,948,801 at width 1).

    ``init="glorot"`` gives Glorot-uniform kernels and zero biases (the authors' TensorFlow
    model; with ``norm_eps=1e-3`` and no dropout); "torch" keeps PyTorch's defaults. Either
    way the output bias starts at ``mean_age``.
    """

    def __init__(
        self,
        input_shape: tuple[int, int, int] = (91, 109, 91),
        width: float = 1.0,
        pools: int | None = None,
        dropout: float = 0.5,
        mean_age: float = UKBB_MEAN_AGE,
        init: str = "torch",
        norm_eps: float = 1e-5,
    ):
        super().__init__()
        if not width > 0:
            raise ValueError(f"width must be > 0, got {width}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        if init not in INITS:
            raise ValueError(f"init must be one of {INITS}, got {init!r}")
        if len(input_shape) != 3:
            raise ValueError(f"input_shape must have 3 spatial dims, got {tuple(input_shape)}")
        input_shape = (int(input_shape[0]), int(input_shape[1]), int(input_shape[2]))
        max_pools = auto_pools(input_shape)
        if pools is None:
            pools = max_pools
        elif not 0 <= pools <= max_pools:
            raise ValueError(
                f"pools={pools} is not possible for input {input_shape}: allowed 0..{max_pools} "
                "(every spatial dim must stay >= 2 for instance norm)"
            )
        self.input_shape = input_shape
        self.width = float(width)
        self.pools = int(pools)
        self.head_grid = _pooled_shape(input_shape, self.pools)

        layers: list[nn.Module] = []
        in_ch = 1
        for i, c in enumerate(BLOCK_CHANNELS):
            out_ch = _scaled(c, width)
            block = [
                nn.Conv3d(in_ch, out_ch, kernel_size=3, padding=1),
                nn.InstanceNorm3d(out_ch, eps=norm_eps, affine=False, track_running_stats=False),
            ]
            if i < self.pools:
                block.append(nn.MaxPool3d(2))
            block.append(nn.ReLU(inplace=True))
            layers.append(ConvBlock(*block))
            in_ch = out_ch
        self.features = nn.Sequential(*layers)
        head_ch = _scaled(HEAD_CHANNELS, width)
        self.head = nn.Sequential(
            nn.Conv3d(in_ch, head_ch, kernel_size=1),
            nn.InstanceNorm3d(head_ch, eps=norm_eps, affine=False, track_running_stats=False),
            nn.ReLU(inplace=True),
            nn.AdaptiveAvgPool3d(1),
            nn.Dropout(dropout),
        )
        self.output = nn.Conv3d(head_ch, 1, kernel_size=1)
        if init == "glorot":  # the authors' TensorFlow model: Glorot-uniform kernels, zero biases
            for m in self.modules():
                if isinstance(m, nn.Conv3d):
                    nn.init.xavier_uniform_(m.weight)
                    nn.init.zeros_(m.bias)  # type: ignore[arg-type]  # every Conv3d here has a bias
        with torch.no_grad():
            self.output.bias.fill_(float(mean_age))  # type: ignore[union-attr]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B,) predicted ages for (B, 1, X, Y, Z) volumes; the output layer runs in float32 even under autocast."""
        if x.dim() != 5 or x.shape[1] != 1:
            raise ValueError(f"expected input of shape (B, 1, X, Y, Z), got {tuple(x.shape)}")
        h = self.head(self.features(x))
        # The age itself in float32 even under mixed precision: bfloat16's 8-bit mantissa puts ages of 64-128 on
        # a 0.5-year grid (the output bias, the cohort mean, included), which no later cast brings back.
        with torch.autocast(x.device.type, enabled=False):
            return self.output(h.to(self.output.weight.dtype)).flatten()


def parameter_count(width: float) -> int:
    """BrainAgeCNN's parameter count at `width`, built on torch's meta device (shapes without memory): the
    preflight refuses a width whose model no model file could hold before torch tries to allocate it."""
    with torch.device("meta"):
        return sum(p.numel() for p in BrainAgeCNN(width=width).parameters())


def build_model(cfg: Config, shape, mean_age: float = UKBB_MEAN_AGE) -> BrainAgeCNN:
    """The configured model for volumes of `shape`, its output starting at `mean_age`."""
    m = cfg.model
    return BrainAgeCNN(
        input_shape=tuple(shape),
        width=m.width,
        pools=m.pools or None,
        dropout=m.dropout,
        mean_age=mean_age,
        init=m.init,
        norm_eps=m.norm_eps,
    )


def parameter_layout(model: nn.Module) -> list[tuple[str, int, int, tuple]]:
    """(name, offset, size, shape) of every trainable tensor in the flat wire vector."""
    layout = []
    offset = 0
    for name, p in model.named_parameters():
        n = p.numel()
        layout.append((name, offset, n, tuple(p.shape)))
        offset += n
    return layout


def flat_parameters(model: nn.Module) -> np.ndarray:
    """All parameters as one float32 CPU vector in `parameter_layout` order (a copy)."""
    with torch.no_grad():
        parts = [p.detach().reshape(-1).to("cpu", torch.float32) for p in model.parameters()]
        return torch.cat(parts).numpy().copy()


def load_flat_parameters(model: nn.Module, vec: np.ndarray) -> None:
    """Copy a flat vector (from `flat_parameters` layout) into the model, on its device."""
    vec = np.asarray(vec)
    total = sum(p.numel() for p in model.parameters())
    if vec.ndim != 1 or vec.shape[0] != total:
        raise ValueError(f"flat parameter vector has shape {vec.shape}, model needs ({total},)")
    src = torch.from_numpy(np.ascontiguousarray(vec, dtype=np.float32))
    offset = 0
    with torch.no_grad():
        for p in model.parameters():
            n = p.numel()
            p.copy_(src[offset : offset + n].view_as(p).to(p.device, p.dtype))
            offset += n


def layer_sparsity(model: nn.Module) -> dict[str, float]:
    """Fraction of exact zeros in each parameter tensor, keyed by parameter name."""
    with torch.no_grad():
        return {name: float((p == 0).sum().item()) / p.numel() for name, p in model.named_parameters()}
