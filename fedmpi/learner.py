"""A learner (ranks 1..N): receive the global model, train it locally with its mask, send it back.

Learners keep no state between rounds: model and mask come from the server every round and the
round's randomness derives from (seed, round, rank), so a resumed federation replays exactly.
"""
from __future__ import annotations

import time

import numpy as np
import torch

from . import encoding, pruning
from .algorithms import algorithm, prune, round_seed, schedule
from .config import Config
from .data import VolumeDataset
from .messages import REPORT, record
from .model import build_model, flat_parameters, load_flat_parameters
from .training import local_train, masks_from_flat, snip_scores
from .wire import FLAG_MASK, FLAG_STOP, Transport


def train_round(cfg: Config, model, data, seed: int, device, masks=None) -> tuple[dict, float]:
    """One round of local training with the round's seed (data order, dropout): (stats, seconds).
    Shared by learners and the centralized baseline, so both train the same way."""
    torch.manual_seed(seed)
    tc = cfg.train
    loader = torch.utils.data.DataLoader(data, batch_size=tc.batch_size, shuffle=True, num_workers=cfg.data.workers,
                                         generator=torch.Generator().manual_seed(seed))
    start = time.perf_counter()
    stats = local_train(model, loader, epochs=tc.epochs, lr=tc.lr, momentum=tc.momentum,
                        weight_decay=tc.weight_decay, masks=masks, prox_mu=tc.prox_mu, device=device)
    return stats, time.perf_counter() - start


class Learner:
    def __init__(self, cfg: Config, wire: Transport, data: VolumeDataset, device: torch.device, weight: float):
        self.cfg = cfg
        self.wire = wire
        self.data = data
        self.device = device
        self.weight = np.float32(weight)  # n_k / n: values are pre-weighted so the server only sums
        self.algo = algorithm(cfg)
        self.schedule = schedule(cfg)
        self.model = build_model(cfg, data.shape).to(device)
        self.n = sum(p.numel() for p in self.model.parameters())
        self.mask: np.ndarray | None = None  # the global mask, sent again only when it changes

    def send_start_mask(self) -> None:
        """Score the server's initial model on one local batch (SNIP) and send the mask, fixed from then on."""
        initial = self.wire.recv(np.empty(self.n, np.float32), source=0, what="initial model for the start mask")
        load_flat_parameters(self.model, initial)
        batch = torch.utils.data.DataLoader(self.data, batch_size=self.cfg.train.batch_size, shuffle=True,
                                            generator=torch.Generator().manual_seed(round_seed(self.cfg.run.seed, 0,
                                                                                               self.wire.rank)))
        x, y = next(iter(batch))
        scores = snip_scores(self.model, x.to(self.device), y.to(self.device))
        mask = pruning.magnitude_mask(scores, self.cfg.federation.target)
        self.wire.send(encoding.pack_mask(mask), dest=0, what="start mask")

    def run(self) -> None:
        while True:
            t, flags, nnz, payload = self.wire.recv_model()
            if flags & FLAG_STOP:
                return
            if flags & FLAG_MASK:
                values, self.mask = encoding.decode(payload, expected_n=self.n)
            else:
                values = encoding.scatter_values(payload.view(np.float32), self.mask, np.float32)
            self.round(t, values)

    def round(self, t: int, values: np.ndarray) -> None:
        seed = round_seed(self.cfg.run.seed, t, self.wire.rank)
        load_flat_parameters(self.model, values)
        stats, seconds = train_round(self.cfg, self.model, self.data, seed, self.device,
                                     masks_from_flat(self.model, self.mask))
        local = flat_parameters(self.model)
        if not self.algo.shared_mask:
            s_t = self.schedule(t)
            mask = prune(local, self.mask, s_t, self.algo.selector, seed) if s_t > 0 else self.mask
            payload = encoding.encode(pruning.apply_mask(local, mask), mask)
            send, what = self.wire.gatherv, "learner model"
        else:  # float32 values times a float32 weight: already the buffer the Reduce sums
            payload = encoding.gather_values(local, self.mask) * self.weight
            send, what = self.wire.reduce_sum, "weighted values"
        finite = bool(np.isfinite(local).all())
        self.wire.report(record(REPORT, loss=stats["loss"], samples=stats["samples"], seconds_train=seconds,
                                payload_nbytes=payload.nbytes, finite=finite))
        send(payload, what=what)
        if self.cfg.run.verbose:
            print(f"learner {self.wire.rank}: round {t} loss {stats['loss']:.3f} "
                  f"({stats['samples']} samples, {seconds:.1f}s)", flush=True)
