"""A learner (ranks 1..N): receive the global model, train it locally with its mask, send it back.

Learners keep no training state between rounds: the model comes from the server every round, the mask
with it whenever it changes (and after every start or resume), and the round's randomness derives from
(seed, round, rank), so a resumed federation replays exactly. PruneFL's
importance (squared gradients) is accumulated during the local training of the reconfiguration round
itself and sent with that round's values, so it does not live across rounds either.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from . import encoding, pruning
from .algorithms import algorithm, prune, reconfigures, round_seed, schedule
from .config import Config
from .data import VolumeDataset
from .device import prepare_model
from .errors import PayloadError
from .messages import REPORT, record
from .model import build_model, flat_parameters, load_flat_parameters
from .training import (
    SeededLoader,
    grasp_scores,
    masks_from_flat,
    snip_scores,
    train_round,
    warm_up_round,
)
from .wire import FLAG_MASK, FLAG_STOP, Transport

GRASP_SAMPLES = 16  # learner 1's samples GraSP scores on (train.batch_size at a time: double backward is heavy)


class Learner:
    """One learner rank: its copy of the model, its data loader and the global mask, answering the server's rounds."""

    def __init__(self, cfg: Config, wire: Transport, data: VolumeDataset, device: torch.device, weight: float = 1.0):
        self.cfg = cfg
        self.wire = wire
        self.data = data
        self.device = device
        self.weight = np.float32(weight)  # n_k / n: values are pre-weighted so the server only sums
        self.algo = algorithm(cfg)
        self.schedule = schedule(cfg)
        self.model = prepare_model(build_model(cfg, data.shape), device, cfg.train)
        self.loader = SeededLoader(cfg, data, device)
        self.n = sum(p.numel() for p in self.model.parameters())
        self.largest = encoding.encoded_nbytes(self.n, self.n, np.float32)  # the most a model sent to it can take
        self.mask: np.ndarray | None = None  # the global mask, sent again only when it changes
        self.masks: list[torch.Tensor] | None = None  # the same, split per parameter tensor on the device

    def warm_up(self) -> None:
        """One training step on zeros before round 1 (training.warm_up): the first round then trains at the speed
        of the others. Apart from the constructor, so that start-up times it as a phase of its own."""
        warm_up_round(self.cfg, self.model, self.data.shape, len(self.data), self.device)

    def send_start_mask(self) -> None:
        """Learner 1 chooses the mask the federation starts from, by the rule the algorithm table names
        (START_MASKS[start_mask]), from the server's initial model and its own data, and sends it packed;
        when the rule trains (start_trains), the trained kept values follow, for the server to start from."""
        initial = self.wire.recv(np.empty(self.n, np.float32), source=0, what="initial model for the start mask")
        load_flat_parameters(self.model, initial)
        mask = START_MASKS[self.algo.start_mask](self)
        self.wire.send(encoding.pack_mask(mask), dest=0, what="start mask")
        if self.algo.start_trains:
            self.wire.send(encoding.gather_values(flat_parameters(self.model), mask), dest=0, what="start values")

    def start_batches(self, samples: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The first `samples` of this learner's data (all of it if fewer) in batches of train.batch_size, in
        the order round 0's seed shuffles them: what the start-mask scores are computed on."""
        batches, taken = [], 0
        for x, y in self.loader.for_round(round_seed(self.cfg.run.seed, 0, self.wire.rank)):
            if taken >= samples:
                break
            keep = min(samples - taken, x.shape[0])
            batches.append((x[:keep].to(self.device), y[:keep].to(self.device)))
            taken += keep
        return batches

    def run(self) -> None:
        """Answer the server's rounds until the stop flag: each model (with the mask when it changed) is checked against
        its header's round (1..federation.rounds) and count of kept positions, then trained and sent back."""
        while True:
            t, flags, nnz, payload = self.wire.recv_model(self.largest)
            received = time.perf_counter()
            if flags & FLAG_STOP:
                return
            if not 1 <= t <= self.cfg.federation.rounds:  # round_seed would raise a ValueError for a negative one
                raise PayloadError(f"the server's header names round {t}, outside 1..{self.cfg.federation.rounds}")
            if flags & FLAG_MASK:
                values, self.mask = encoding.decode(payload, expected_n=self.n)
                self.masks = masks_from_flat(self.model, self.mask)
            mask = self.global_mask()
            kept = int(np.count_nonzero(mask))
            if kept != nnz:
                raise PayloadError(f"round {t}: the header says {nnz} kept positions, the model keeps {kept}")
            if not flags & FLAG_MASK:
                if payload.nbytes != 4 * kept:  # a float32 per kept position (a view of any other size raised)
                    raise PayloadError(
                        f"round {t}: the server sent {payload.nbytes} bytes of values for {kept} kept positions"
                    )
                values = encoding.scatter_values(payload.view(np.float32), mask, np.float32)
            self.round(t, values, received)

    def global_mask(self) -> np.ndarray:
        """The global mask, into which a model sent as values only is scattered; PayloadError while none has come."""
        if self.mask is None:  # the server sends the mask with the first model of a session
            raise PayloadError("the server sent model values before any mask")
        return self.mask

    def round(self, t: int, values: np.ndarray, received: float) -> None:
        """Train the round's model and send it back; `received` is when its header arrived (perf_counter),
        so the report can say how long this learner spent on set-up and on encoding besides training."""
        seed = round_seed(self.cfg.run.seed, t, self.wire.rank)
        load_flat_parameters(self.model, values)
        squares = [torch.zeros_like(p) for p in self.model.parameters()] if reconfigures(self.cfg, t) else None
        setup = time.perf_counter() - received
        stats, seconds = train_round(
            self.cfg, self.model, self.loader, seed, self.device, self.masks, squared_grads=squares
        )
        trained = time.perf_counter()
        local, global_mask = flat_parameters(self.model), self.global_mask()
        local_finite = bool(np.isfinite(local).all())
        if not self.algo.shared_mask:
            s_t = self.schedule(t)
            # A model that is not finite has no magnitude ranking: it goes unpruned, and the report's finite
            # flag has the server refuse the round naming this learner (as for a shared-mask learner).
            prunes = s_t > 0 and local_finite
            mask = prune(local, global_mask, s_t, self.algo.selector, seed) if prunes else global_mask
            payload = encoding.encode(pruning.apply_mask(local, mask), mask)
        else:  # float32 values times a float32 weight: already the buffer the wire sums
            payload = encoding.gather_values(local, global_mask) * self.weight
        # PruneFL's reconfiguration rounds: every position's squared gradients, dense (pruned ones count too)
        importance = None if squares is None else torch.cat([q.reshape(-1) for q in squares]).float().cpu().numpy()
        extra = 0 if importance is None else importance.nbytes
        finite = local_finite and (importance is None or bool(np.isfinite(importance).all()))
        self.wire.report(
            record(
                REPORT,
                loss=stats["loss"],
                samples=stats["samples"],
                seconds_train=seconds,
                payload_nbytes=payload.nbytes + extra,
                finite=finite,
                seconds_setup=setup,
                seconds_encode=time.perf_counter() - trained,
            )
        )
        if self.algo.shared_mask:
            self.wire.reduce_sum(payload, what="weighted values")
        else:
            self.wire.gatherv(payload, what="learner model")
        if importance is not None:
            self.wire.reduce_sum(importance, what="squared gradients")
        if self.cfg.run.verbose:
            print(
                f"learner {self.wire.rank}: round {t} loss {stats['loss']:.3f} "
                f"({stats['samples']} samples, {seconds:.1f}s)",
                flush=True,
            )


def _snip_mask(learner: Learner) -> np.ndarray:
    """SNIP: keep the largest |dL/dw * w| on the first batch of learner 1's shuffled data."""
    ((x, y),) = learner.start_batches(learner.cfg.train.batch_size)
    return pruning.magnitude_mask(snip_scores(learner.model, x, y), learner.cfg.federation.target)


def _grasp_mask(learner: Learner) -> np.ndarray:
    """GraSP: prune the highest -w * Hg over the first GRASP_SAMPLES samples of learner 1's shuffled data."""
    scores = grasp_scores(learner.model, learner.start_batches(GRASP_SAMPLES))
    return pruning.top_mask(-scores, learner.cfg.federation.target)


def _prunefl_mask(learner: Learner) -> np.ndarray:
    """PruneFL's initial pruning, simplified: one local round on learner 1 (train.epochs epochs, round 0's
    seed), then global magnitude pruning of the trained model to the target; the trained model stays in
    learner.model, and its kept values are what the federation starts from. (The reference code instead
    alternates training steps with prune-and-regrow adjustments until the density settles.)"""
    cfg = learner.cfg
    train_round(cfg, learner.model, learner.loader, round_seed(cfg.run.seed, 0, learner.wire.rank), learner.device)
    return pruning.magnitude_mask(flat_parameters(learner.model), cfg.federation.target)


# The start-mask rules, keyed by the algorithm table's start_mask.
START_MASKS = {"snip": _snip_mask, "grasp": _grasp_mask, "prunefl": _prunefl_mask}
