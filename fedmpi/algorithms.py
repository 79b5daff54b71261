"""What each algorithm does, in one table: where pruning happens, how positions are chosen, how the
target sparsity moves, whether a mask is scored before training, and whether pruned positions may come
back. The server and learner loops, the configuration, the sweep and the report read these facts; nothing
branches on a name."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from . import pruning
from .schedule import ConstantSchedule, CubicSchedule, FractionSchedule, OneShotSchedule


@dataclass(frozen=True)
class Algorithm:
    """One algorithm's row of the table (ALGORITHMS): the facts the loops, the configuration and the report read."""

    name: str
    prune_at: str  # "server" (after aggregation), "learner" (after local training), "start" (a mask before training)
    # or "never"
    selector: str = "magnitude"  # "magnitude" or "random"
    sparsity: str = "progressive"  # how s_t moves: "progressive" (federation.schedule), "oneshot", "fixed", "none"
    # How learner 1 chooses the mask the federation starts from (empty: no start mask): "snip" (|dL/dw * w|),
    # "grasp" (-w * Hg) or "prunefl" (magnitude after one local round); learner.START_MASKS holds the rules.
    start_mask: str = ""
    start_trains: bool = False  # learner 1 trains before choosing the start mask and sends its trained values
    # The mask is chosen afresh every federation.reconfigure_every rounds from the learners' squared gradients
    # (PruneFL): pruned positions may come back. Every other algorithm only ever prunes.
    regrows: bool = False
    trains_centrally: bool = False  # one process on the pooled data, no federation

    @property
    def shared_mask(self) -> bool:
        """Learners train inside the global mask and send values in it (summed by the wire); otherwise each
        learner prunes its own model and sends it encoded (merged by majority vote)."""
        return self.prune_at != "learner"

    @property
    def progressive(self) -> bool:
        """The target sparsity follows federation.schedule (cubic or fraction) up to federation.target."""
        return self.sparsity == "progressive"

    def server_prunes(self, vote_cap: bool) -> bool:
        """The server prunes the merged global model to s_t: every server-side pruner, and Local when
        federation.vote_cap holds it to the schedule (otherwise Local's global model is the vote's, the
        authors' merge)."""
        return self.prune_at == "server" or (self.prune_at == "learner" and vote_cap)

    @property
    def dense(self) -> bool:
        """Never pruned: no target sparsity applies."""
        return self.sparsity == "none"

    def unused_options(self, schedule: str) -> frozenset[str]:
        """The federation options this algorithm never reads (with `schedule` as federation.schedule): they are
        not checked against the rounds and do not block a resume when they change."""
        unused = set()
        if not self.progressive:
            unused |= {"schedule", "start", "end", "frequency", "exponent", "fraction"}
        elif schedule == "fraction":
            unused |= {"end", "exponent"}
        else:
            unused.add("fraction")
        if self.sparsity != "oneshot":
            unused.add("oneshot_round")
        if self.dense:
            unused.add("target")
        if self.shared_mask:
            unused |= {"merge", "vote_cap"}
        if not self.regrows:
            unused |= {"reconfigure_every", "reconfigure_fraction"}
        return frozenset(unused)


# Table order is the order of reports and listings.
ALGORITHMS = {
    "centralized": Algorithm("centralized", "never", sparsity="none", trains_centrally=True),
    "fedavg": Algorithm("fedavg", "never", sparsity="none"),
    "fedsparsify-global": Algorithm("fedsparsify-global", "server"),
    "fedsparsify-local": Algorithm("fedsparsify-local", "learner"),
    "oneshot": Algorithm("oneshot", "server", sparsity="oneshot"),
    "random": Algorithm("random", "server", selector="random"),
    "snip": Algorithm("snip", "start", sparsity="fixed", start_mask="snip"),
    "grasp": Algorithm("grasp", "start", sparsity="fixed", start_mask="grasp"),
    "prunefl": Algorithm("prunefl", "start", sparsity="fixed", start_mask="prunefl", start_trains=True, regrows=True),
}

# The dense federation every other algorithm is compared with (bytes, paired MAE differences).
BASELINE = "fedavg"


if TYPE_CHECKING:
    from .config import Config


def algorithm(cfg: Config) -> Algorithm:
    """The configured algorithm's row of the table."""
    return ALGORITHMS[cfg.federation.algorithm]


def processes(cfg: Config) -> int:
    """The MPI ranks a run takes: the server and its learners, or one for a baseline that trains centrally."""
    return 1 if algorithm(cfg).trains_centrally else cfg.federation.learners + 1


def target_sparsity(cfg: Config) -> float:
    """The sparsity the run aims at: federation.target, or 0 for a dense algorithm (which never reads it)."""
    return 0.0 if algorithm(cfg).dense else cfg.federation.target


def schedule(cfg: Config):
    """The sparsity target s_t for round t."""
    f, kind = cfg.federation, algorithm(cfg).sparsity
    if kind == "none":
        return ConstantSchedule(0.0)
    if kind == "fixed":
        return ConstantSchedule(f.target)
    if kind == "oneshot":
        return OneShotSchedule(f.target, round=f.oneshot_round)
    if f.schedule == "fraction":
        return FractionSchedule(f.fraction, frequency=f.frequency, start=f.start, final=f.target)
    return CubicSchedule(f.target, start=f.start, end=cfg.schedule_end, frequency=f.frequency, exponent=f.exponent)


def reconfigures(cfg: Config, t: int) -> bool:
    """Round t ends with a reconfiguration of the mask (PruneFL): learners send their squared gradients with
    their values and the server re-chooses the mask from them (pruning.reconfigure_mask). Every
    federation.reconfigure_every rounds, but never in the last round, where regrown positions (restarting
    from their initial values) could no longer train."""
    f = cfg.federation
    return algorithm(cfg).regrows and t % f.reconfigure_every == 0 and t < f.rounds


def round_seed(seed: int, round_: int, rank: int) -> int:
    """Independent, reproducible seed per (run seed, round, rank): resuming needs no RNG state."""
    return int(np.random.SeedSequence([seed, round_, rank]).generate_state(1)[0])


def prune(values: np.ndarray, mask: np.ndarray, sparsity: float, selector: str, seed: int) -> np.ndarray:
    """The new mask for `values` at `sparsity`, never reviving a pruned position."""
    if selector == "random":
        return pruning.random_mask(mask, sparsity, np.random.default_rng(seed))
    return pruning.magnitude_mask(values, sparsity, mask)
