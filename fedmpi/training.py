"""Local training, evaluation and per-sample signals for one learner's model, and the seeded round of
training that learners and the centralized baseline share.

Masked training implements FedSparsify's "no regrowth": pruned positions get a zero
gradient (so momentum never builds up for them) and are re-zeroed after every step.
The start-mask scores (SNIP, GraSP) and PruneFL's squared gradients are computed here too.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Sequence
from typing import cast

import numpy as np
import torch
from torch import nn

from .config import Config
from .data import loader_options
from .device import AUTOCAST, autocast_context, model_device, place, to_device
from .model import parameter_layout


def masks_from_flat(model: nn.Module, mask: np.ndarray | None) -> list[torch.Tensor] | None:
    """Split a flat keep-mask (nonzero = keep) into per-parameter bool tensors on the model's device."""
    if mask is None:
        return None
    mask = np.asarray(mask).reshape(-1)
    layout = parameter_layout(model)
    total = sum(size for _, _, size, _ in layout)
    if mask.shape[0] != total:
        raise ValueError(f"mask has {mask.shape[0]} entries, model has {total} parameters")
    device = model_device(model)
    flat = torch.from_numpy(mask != 0)
    return [flat[off : off + size].view(shape).to(device) for _, off, size, shape in layout]


def _check_masks(params: Sequence[torch.Tensor], masks: Sequence[torch.Tensor], device) -> list[torch.Tensor]:
    if len(masks) != len(params):
        raise ValueError(f"got {len(masks)} masks for {len(params)} parameter tensors")
    out = []
    for i, (p, m) in enumerate(zip(params, masks)):
        if tuple(m.shape) != tuple(p.shape):
            raise ValueError(f"mask {i} has shape {tuple(m.shape)}, parameter has {tuple(p.shape)}")
        out.append(m.to(device=device, dtype=torch.bool))
    return out


def _apply_masks(params, masks) -> None:
    with torch.no_grad():
        for p, m in zip(params, masks):
            p.mul_(m)


def sgd_step(
    params: Sequence[torch.Tensor],
    buffers: list[torch.Tensor | None],
    *,
    lr: float,
    momentum: float,
    weight_decay: float,
) -> None:
    """One step of torch.optim.SGD (no dampening, no Nesterov), its single-tensor update written out.

    Building any torch.optim optimizer imports torch._dynamo, about 2 CPU-seconds in every learner's start-up,
    for arithmetic this short. Same operations in the same order as torch's own loop (the one it runs on CPU), so
    the same bits (tests/test_training.py). `buffers` holds the momentum buffers, None until a parameter's first
    step; parameters without a gradient are left alone, as torch does.
    """
    with torch.no_grad():
        for i, p in enumerate(params):
            if p.grad is None:
                continue
            grad = p.grad
            if weight_decay != 0:
                grad = grad.add(p, alpha=weight_decay)
            if momentum != 0:
                buf = buffers[i]
                if buf is None:
                    buf = buffers[i] = grad.detach().clone()
                else:
                    buf.mul_(momentum).add_(grad, alpha=1)
                grad = buf
            p.add_(grad, alpha=-lr)


def local_train(
    model: nn.Module,
    loader,
    *,
    epochs: int,
    lr: float,
    momentum: float = 0.0,
    weight_decay: float = 0.0,
    masks: list[torch.Tensor] | None = None,
    prox_mu: float = 0.0,
    device=None,
    squared_grads: list[torch.Tensor] | None = None,
    autocast: torch.dtype | None = None,
    channels_last: bool = False,
) -> dict:
    """Train with plain SGD on MSE for `epochs` passes over `loader`.

    Momentum starts afresh in every call (no optimizer state crosses rounds). `masks`
    keeps pruned weights exactly zero (applied at the start, to gradients, and after each
    step). `prox_mu` > 0 adds FedProx's mu/2 * ||w - w_start||^2. The returned "loss" is
    the sample-weighted MSE over the last epoch, without the proximal term.
    `squared_grads` (one tensor per parameter) accumulates every step's squared gradient of the loss
    (without the proximal term) before the mask zeroes it, so pruned positions get theirs too (the
    gradient at their zero value): PruneFL's importance. `autocast` runs the forward pass and loss in that dtype
    (bf16 mixed precision; weights, gradients and the update stay float32); `channels_last` feeds
    the volumes in channels-last-3d memory order (the model must be converted too: prepare_model).
    The loss is summed on the device and read once per epoch, so a GPU is never stalled per step.
    """
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    if not lr > 0:
        raise ValueError(f"lr must be > 0, got {lr}")
    if prox_mu < 0:
        raise ValueError(f"prox_mu must be >= 0, got {prox_mu}")
    device = place(model, device)
    params = list(model.parameters())
    if masks is not None:
        masks = _check_masks(params, masks, device)
        _apply_masks(params, masks)
    if squared_grads is not None and [a.shape for a in squared_grads] != [p.shape for p in params]:
        raise ValueError("squared_grads must hold one tensor per parameter, of its shape")
    anchor = [p.detach().clone() for p in params] if prox_mu > 0 else None
    buffers: list[torch.Tensor | None] = [None] * len(params)  # momentum: a fresh optimizer per call
    loss_fn = nn.MSELoss()
    model.train()
    steps = 0
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    samples = 0
    for _ in range(epochs):
        loss_sum.zero_()
        samples = 0
        for x, y in loader:
            x = to_device(x, device, channels_last)
            y = y.to(device, dtype=torch.float32, non_blocking=True).reshape(-1)
            model.zero_grad(set_to_none=True)
            with autocast_context(device, autocast):
                loss = loss_fn(model(x).float(), y)
            total = loss
            if anchor is not None:
                prox = sum(torch.sum((p - a) ** 2) for p, a in zip(params, anchor))
                total = loss + 0.5 * prox_mu * prox
            total.backward()
            if squared_grads is not None:
                with torch.no_grad():
                    for i, (p, acc) in enumerate(zip(params, squared_grads)):
                        if p.grad is not None:
                            # the loss's gradient: FedProx's pull towards the round's start is not importance
                            g = p.grad if anchor is None else p.grad - prox_mu * (p - anchor[i])
                            acc.addcmul_(g, g)
            if masks is not None:
                for p, m in zip(params, masks):
                    if p.grad is not None:
                        p.grad.mul_(m)
            sgd_step(params, buffers, lr=lr, momentum=momentum, weight_decay=weight_decay)
            if masks is not None:
                _apply_masks(params, masks)
            steps += 1
            loss_sum += loss.detach().double() * y.shape[0]
            samples += y.shape[0]
        if samples == 0:
            raise ValueError("the training loader yielded no samples")
    return {"loss": float(loss_sum) / samples, "samples": samples, "steps": steps}


def warm_up(
    model: nn.Module,
    shape: tuple[int, ...],
    batch_size: int,
    device: torch.device,
    autocast: torch.dtype | None = None,
    channels_last: bool = False,
) -> None:
    """One local training step of a copy of `model` on a zero batch, so that the first round does not pay
    for the kernels' first-call set-up (oneDNN primitives, cuDNN's benchmark search, the optimiser's first
    step, allocator growth: about 1.5 s a rank on a CPU). The model itself, its gradients and every random
    number generator are left as they were."""
    batch = [(torch.zeros(batch_size, 1, *shape), torch.zeros(batch_size))]
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        local_train(
            copy.deepcopy(model),
            batch,
            epochs=1,
            lr=1e-6,
            device=device,
            autocast=autocast,
            channels_last=channels_last,
        )


def predict(
    model: nn.Module, loader, device=None, autocast: torch.dtype | None = None, channels_last: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """(predictions, true ages) over `loader` in eval mode; the model's train/eval mode is restored."""
    device = place(model, device)
    was_training = model.training
    model.eval()
    preds, ages = [], []
    try:
        with torch.no_grad():
            for x, y in loader:
                with autocast_context(device, autocast):
                    out = model(to_device(x, device, channels_last))
                preds.append(out.float().cpu().numpy())
                ages.append(torch.as_tensor(y).reshape(-1).float().cpu().numpy())
    finally:
        model.train(was_training)
    if not preds:
        raise ValueError("the evaluation loader yielded no samples")
    return np.concatenate(preds), np.concatenate(ages)


def snip_scores(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> np.ndarray:
    """SNIP saliency |dL/dw * w| of the MSE on one batch, flat float32 in layout order.

    Computed in eval mode (dropout off) so the score depends only on the weights and the
    batch; the model's .grad fields are left untouched.
    """
    device = model_device(model)
    params = list(model.parameters())
    was_training = model.training
    model.eval()
    try:
        x = x.to(device)
        y = y.to(device, dtype=torch.float32).reshape(-1)
        loss = nn.functional.mse_loss(model(x), y)
        grads = torch.autograd.grad(loss, params, allow_unused=True)
    finally:
        model.train(was_training)
    parts = [
        (torch.zeros_like(p) if g is None else (g * p).abs()).detach().reshape(-1).float().cpu()
        for p, g in zip(params, grads)
    ]
    return torch.cat(parts).numpy()


GRAD_STATS = ("grad_norm", "grad_mean_abs", "grad_max_abs", "grad_norm_kept")


def grasp_scores(model: nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> np.ndarray:
    """GraSP's score S(-w) = -w * (H g) (Wang, Zhang & Grosse, ICLR 2020), flat float32 in layout order.

    L is the MSE over all samples of `batches` (each batch's mean weighted by its size), g its gradient
    and H its Hessian; H g comes from double backward: the gradient of g^T dL/dw with g held constant.
    Removing w changes the gradient norm (gradient flow) by about S(-w) to first order, so GraSP removes
    the weights with the *highest* scores (the reference code keeps scores <= the k-th largest): the
    caller prunes the top of S, i.e. keeps the top of -S. Eval mode (dropout off), .grad left untouched.
    """
    device = model_device(model)
    params = list(model.parameters())
    total = sum(int(x.shape[0]) for x, _ in batches)
    if total == 0:
        raise ValueError("GraSP needs at least one sample")

    def losses():
        for x, y in batches:
            pred = model(x.to(device))
            y = y.to(device, dtype=pred.dtype).reshape(-1)
            yield nn.functional.mse_loss(pred, y) * (x.shape[0] / total)

    was_training = model.training
    model.eval()
    try:
        g = [torch.zeros_like(p) for p in params]
        for loss in losses():
            for acc, d in zip(g, torch.autograd.grad(loss, params, allow_unused=True)):
                if d is not None:
                    acc += d
        hg = [torch.zeros_like(p) for p in params]
        for loss in losses():
            grads = torch.autograd.grad(loss, params, create_graph=True, allow_unused=True)
            inner = cast(torch.Tensor, sum((gi * d).sum() for gi, d in zip(g, grads) if d is not None))
            for acc, d in zip(hg, torch.autograd.grad(inner, params, allow_unused=True)):
                if d is not None:
                    acc += d
    finally:
        model.train(was_training)
    return torch.cat([(-p.detach() * h).reshape(-1).float().cpu() for p, h in zip(params, hg)]).numpy()


def per_sample_features(model: nn.Module, loader, device=None) -> dict[str, np.ndarray]:
    """Per-sample membership-inference signals (Gupta et al.'s white box), in eval mode.

    "pred", "abs_error", "loss" (squared error): shape (N,). For each of the L parameter tensors
    (layout order) of each sample's loss gradient, shape (N, L): "grad_norm" (L2 norm),
    "grad_mean_abs", "grad_max_abs", and "grad_norm_kept", the L2 norm over the tensor's non-zero
    weights only (the positions a pruned model can still move). "activations" (N, C): what the
    model's `output` layer reads, the head's pooled features. One sample at a time: instance
    norm makes samples independent, but autograd only gives the sum of their gradients.
    """
    device = place(model, device)
    params = list(model.parameters())
    kept = [(p != 0).to(p.dtype) for p in params]
    was_training = model.training
    model.eval()
    inputs: list[torch.Tensor] = []
    output: nn.Module = model.output  # type: ignore[assignment]  # BrainAgeCNN's last layer
    hook = output.register_forward_pre_hook(lambda _, args: inputs.append(args[0].detach().reshape(-1)))
    preds, ages, stats, acts = [], [], [], []
    try:
        for x, y in loader:
            y = torch.as_tensor(y, dtype=torch.float32).reshape(-1)
            for i in range(x.shape[0]):
                xi = x[i : i + 1].to(device)
                yi = y[i : i + 1].to(device)
                pred = model(xi)
                loss = ((pred - yi) ** 2).sum()
                raw = torch.autograd.grad(loss, params, allow_unused=True)
                grads = [torch.zeros_like(p) if g is None else g for p, g in zip(params, raw)]
                stats.append(
                    torch.stack(
                        [
                            torch.stack(
                                (
                                    torch.linalg.vector_norm(g),
                                    g.abs().mean(),
                                    g.abs().max(),
                                    torch.linalg.vector_norm(g * k),
                                )
                            )
                            for g, k in zip(grads, kept)
                        ]
                    ).cpu()
                )
                acts.append(inputs.pop().cpu())
                preds.append(float(pred.detach()))
                ages.append(float(yi))
    finally:
        hook.remove()
        model.train(was_training)
    if not preds:
        raise ValueError("the loader yielded no samples")
    pred = np.asarray(preds, dtype=np.float32)
    age = np.asarray(ages, dtype=np.float32)
    err = pred - age
    grad = torch.stack(stats).numpy().astype(np.float32)  # (N, L, 4)
    out = {
        "pred": pred,
        "abs_error": np.abs(err),
        "loss": err * err,
        "activations": torch.stack(acts).numpy().astype(np.float32),
    }
    out.update({name: grad[:, :, j] for j, name in enumerate(GRAD_STATS)})
    return out


class SeededLoader:
    """A rank's training DataLoader, built once; its shuffling generator is reseeded with each round's seed,
    which draws exactly the order a fresh loader seeded the same way would (data.loader_options says what
    it runs on)."""

    def __init__(self, cfg: Config, data, device: torch.device):
        self.generator = torch.Generator()
        self.loader = torch.utils.data.DataLoader(
            data, batch_size=cfg.train.batch_size, shuffle=True, generator=self.generator, **loader_options(cfg, device)
        )

    def for_round(self, seed: int) -> torch.utils.data.DataLoader:
        """The loader, its shuffle reseeded with the round's seed: the same data order in every run and resume."""
        self.generator.manual_seed(seed)
        return self.loader


def train_round(
    cfg: Config, model, loader: SeededLoader, seed: int, device, masks=None, squared_grads=None
) -> tuple[dict, float]:
    """One round of local training with the round's seed (data order, dropout): (stats, seconds).
    Shared by learners and the centralized baseline, so both train the same way."""
    torch.manual_seed(seed)
    start = time.perf_counter()
    stats = local_train(
        model, loader.for_round(seed), masks=masks, device=device, squared_grads=squared_grads, **train_options(cfg)
    )
    return stats, time.perf_counter() - start


def train_options(cfg: Config) -> dict:
    """local_train's settings from cfg.train, as a round trains (benchmarks/bench_round.py's compute floor takes
    the same, so it follows every option the learners do)."""
    tc = cfg.train
    return dict(
        epochs=tc.epochs,
        lr=tc.lr,
        momentum=tc.momentum,
        weight_decay=tc.weight_decay,
        prox_mu=tc.prox_mu,
        autocast=AUTOCAST[tc.amp],
        channels_last=tc.channels_last,
    )


def warm_up_round(cfg: Config, model: nn.Module, shape: tuple[int, ...], samples: int, device: torch.device) -> None:
    """warm_up as a rank's rounds will train on its `samples` volumes: at the largest batch it trains
    (train.batch_size, or all of them when it has fewer), in train.amp and train.channels_last."""
    t = cfg.train
    warm_up(model, shape, min(t.batch_size, samples), device, AUTOCAST[t.amp], t.channels_last)
