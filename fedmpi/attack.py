"""Membership inference against a trained brain-age model (Gupta et al., MIDL 2021).

The attacker holds the model and a labelled pool of subjects: members (the learners' training
data) and non-members (the held-out test set plus any extra cohorts, never trained on). The two
sets are balanced and each split into disjoint attacker-train / attacker-eval halves. Per-sample
signals from `fedmpi.training.per_sample_features` feed four attacks:

- loss_threshold: no training, member iff the squared error is below a threshold (score -loss);
- black_box: logistic regression on prediction, absolute and squared error, and true age;
- white_box: logistic regression on black-box plus log(1 + per-tensor gradient norm);
- white_box_mlp: a small torch MLP on black-box plus four statistics of every tensor's gradient
  and the head's pooled activations (the literature's learned white box on richer features).

Every attack is scored on attacker-eval: ROC AUC with a bootstrap interval, TPR at a fixed FPR,
and accuracy at a threshold chosen on attacker-train; each subject's score is kept, by name, so that
the report can compare two runs attacked on the same subjects paired. The metrics are pure numpy functions of
scores and labels. `attack_datasets` takes torch Datasets so it runs on in-memory data; `run`
wires it to a run directory.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from torch.utils.data import ConcatDataset, DataLoader, Dataset, Subset

from preprocess import outputs
from preprocess.layout import TEST_FILE, learner_file, learner_files

from . import stats
from .config import DEVICES, MAX_SEED, MAX_THREADS
from .data import VolumeDataset, file_digest, read_volume
from .device import select_device
from .errors import EXIT_USAGE, AttackError, DataError, is_user_error
from .files import write_output
from .finished import check_recorded_model, existing_run, is_run_record, load_run_model, run_summary
from .runlog import dumps

# the attacks in their order, and the logistic ones that are also top-level keys of attack.json for older readers
from .tables import ATTACK_ORDER as ATTACKS
from .tables import LEGACY_ATTACKS as KINDS
from .training import GRAD_STATS, per_sample_features

FPRS = (("tpr_at_1pct_fpr", 0.01), ("tpr_at_0.1pct_fpr", 0.001))
BOOTSTRAP_RESAMPLES = 2000


class Attack(NamedTuple):
    """How an attack scores a subject. "loss" fits nothing: the negated loss, thresholded. "logistic" and
    "mlp" learn from the prediction, its errors and the age, plus `gradients` (of training.GRAD_STATS, per
    tensor) and, with `activations`, the head's pooled activations."""

    scorer: str
    gradients: tuple[str, ...] = ()
    activations: bool = False


# One row per attack, in ATTACKS' order (tests/test_attack.py holds them to it).
ATTACK_KINDS = {
    "loss_threshold": Attack("loss"),
    "black_box": Attack("logistic"),
    "white_box": Attack("logistic", GRAD_STATS[:1]),
    "white_box_mlp": Attack("mlp", GRAD_STATS, activations=True),
}
LEARNED = tuple(name for name, spec in ATTACK_KINDS.items() if spec.scorer != "loss")


# ---------------------------------------------------------------- metrics (pure numpy)


def _check_binary(scores, labels) -> tuple[np.ndarray, np.ndarray]:
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    labels = np.asarray(labels).reshape(-1)
    if scores.shape != labels.shape:
        raise ValueError(f"{scores.size} scores but {labels.size} labels")
    if not np.isin(labels, (0, 1)).all():
        raise ValueError("labels must be 0 (non-member) or 1 (member)")
    labels = labels.astype(bool)
    if labels.all() or not labels.any():
        raise ValueError("need at least one member and one non-member")
    if not np.isfinite(scores).all():
        raise ValueError("scores must be finite")
    return scores, labels


def roc_auc(scores, labels) -> float:
    """Area under the ROC curve: P(member scores above non-member), ties counting one half.

    Rank-based (Mann-Whitney U). Higher score = more likely a member (label 1).
    """
    scores, labels = _check_binary(scores, labels)
    ranks = stats.average_ranks(scores)
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    u = ranks[labels].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def auc_standard_error(auc: float, n_pos: int, n_neg: int) -> float:
    """Hanley & McNeil (1982) standard error of an AUC from n_pos members and n_neg non-members.

    Reported next to each AUC because the CPU-scale study has few held-out subjects, and an
    AUC of 0.6 from 25 + 25 subjects is not distinguishable from chance.
    """
    if n_pos < 1 or n_neg < 1:
        raise ValueError("need at least one member and one non-member")
    q1 = auc / (2.0 - auc)
    q2 = 2.0 * auc * auc / (1.0 + auc)
    var = (auc * (1 - auc) + (n_pos - 1) * (q1 - auc * auc) + (n_neg - 1) * (q2 - auc * auc)) / (n_pos * n_neg)
    return float(np.sqrt(max(var, 0.0)))


def bootstrap_aucs(scores, labels, resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0) -> np.ndarray:
    """AUCs of `resamples` bootstrap resamples, members and non-members drawn separately (stats.bootstrap_win_means)."""
    if resamples < 1:
        raise ValueError(f"resamples must be >= 1, got {resamples}")
    scores, labels = _check_binary(scores, labels)
    return stats.bootstrap_win_means(stats.win_matrix(scores[labels], scores[~labels]), resamples, seed)


def auc_interval(
    scores, labels, level: float = 0.95, resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0
) -> tuple[float, float]:
    """Percentile bootstrap interval of the ROC AUC: the (1-level)/2 and (1+level)/2 quantiles.

    Unlike the Hanley-McNeil error it assumes no score distribution, and it is asymmetric near
    0 and 1; an interval that contains 0.5 means the attack is not distinguishable from chance.
    """
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level}")
    aucs = bootstrap_aucs(scores, labels, resamples, seed)
    low, high = np.quantile(aucs, [(1.0 - level) / 2.0, (1.0 + level) / 2.0])
    return float(low), float(high)


def roc_points(scores, labels) -> tuple[np.ndarray, np.ndarray]:
    """(fpr, tpr) at every distinct threshold "score >= t", from (0, 0) to (1, 1); tied scores move together."""
    scores, labels = _check_binary(scores, labels)
    order = np.argsort(-scores, kind="mergesort")
    s, y = scores[order], labels[order]
    last_of_run = np.r_[s[1:] != s[:-1], True]
    tp = np.cumsum(y)[last_of_run]
    fp = np.cumsum(~y)[last_of_run]
    return np.r_[0.0, fp / (~labels).sum()], np.r_[0.0, tp / labels.sum()]


def tpr_at_fpr(scores, labels, fpr: float) -> float:
    """The highest TPR among thresholds whose FPR is <= fpr (no interpolation between thresholds).

    With n non-members the achievable FPRs are multiples of 1/n; when 1/n > fpr (fewer than
    1000 non-members for fpr = 0.1%) this is the TPR at FPR = 0: the fraction of members
    scoring strictly above every non-member.
    """
    if not 0.0 <= fpr <= 1.0:
        raise ValueError(f"fpr must be in [0, 1], got {fpr}")
    f, t = roc_points(scores, labels)
    return float(t[f <= fpr + 1e-12].max())


def best_threshold(scores, labels) -> float:
    """The threshold t maximising the accuracy of "member iff score >= t" on these samples.

    Candidates are midpoints between consecutive distinct scores plus +-inf; the lowest best
    one is returned so the choice is deterministic.
    """
    scores, labels = _check_binary(scores, labels)
    order = np.argsort(scores, kind="mergesort")
    s, y = scores[order], labels[order]
    # Cut before position i (i = 0..n): samples [i, n) are called members.
    neg_below = np.r_[0, np.cumsum(~y)]
    pos_from = y.sum() - np.r_[0, np.cumsum(y)]
    correct = neg_below + pos_from
    valid = np.r_[True, s[1:] != s[:-1], True]
    i = int(np.flatnonzero(valid)[np.argmax(correct[valid])])
    if i == 0:
        return float("-inf")
    if i == s.size:
        return float("inf")
    return float((s[i - 1] + s[i]) / 2.0)


def accuracy_at(scores, labels, threshold: float) -> float:
    """Fraction of samples classified correctly by "member iff score >= threshold"."""
    scores, labels = _check_binary(scores, labels)
    return float(np.mean((scores >= threshold) == labels))


# ---------------------------------------------------------------- classifier (pure numpy)


def standardizer(train: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-feature mean and std of the attacker-train rows; a constant feature gets std 1."""
    mean = train.mean(axis=0)
    std = train.std(axis=0)
    return mean, np.where(std > 1e-12, std, 1.0)


def fit_logistic(x: np.ndarray, y: np.ndarray, l2: float = 1.0, max_iter: int = 100) -> np.ndarray:
    """L2-regularised logistic regression by Newton's method (full batch, deterministic).

    Minimises sum of log-losses + l2/2 * ||w||^2 (the bias is not penalised); the penalty
    keeps the Hessian positive definite, so perfectly separable data still converges.
    Returns the weights with the bias last.
    """
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64).reshape(-1)
    if x.ndim != 2 or x.shape[0] != y.size:
        raise ValueError(f"x has shape {x.shape}, y has {y.size} entries")
    a = np.hstack([x, np.ones((x.shape[0], 1))])
    penalty = np.full(a.shape[1], float(l2))
    penalty[-1] = 1e-8
    w = np.zeros(a.shape[1])
    for _ in range(max_iter):
        p = 1.0 / (1.0 + np.exp(-np.clip(a @ w, -30, 30)))
        grad = a.T @ (p - y) + penalty * w
        hess = (a * (p * (1 - p))[:, None]).T @ a + np.diag(penalty)
        step = np.linalg.solve(hess, grad)
        w -= step
        if np.max(np.abs(step)) < 1e-8:
            break
    return w


def logistic_scores(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Logits (monotone in the member probability) of rows x under weights from fit_logistic."""
    return np.asarray(x, dtype=np.float64) @ w[:-1] + w[-1]


# ---------------------------------------------------------------- learned classifier (torch)

MLP_HIDDEN = 32
MLP_LR = 1e-2
MLP_WEIGHT_DECAY = 1e-2
MLP_MAX_EPOCHS = 1000
MLP_PATIENCE = 50
MLP_MIN_DELTA = 1e-3  # validation log-loss gains below this (nats) do not count as improving
MLP_VALIDATION = 0.25


def validation_rows(labels: np.ndarray, seed: int) -> np.ndarray:
    """Bool mask of a stratified validation slice: MLP_VALIDATION of each class (at least one row)."""
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    val = np.zeros(labels.size, bool)
    for c in (0, 1):
        rows = np.flatnonzero(labels == c)
        val[rng.permutation(rows)[: max(1, round(MLP_VALIDATION * rows.size))]] = True
    return val


def fit_mlp(x: np.ndarray, y: np.ndarray, seed: int = 0) -> torch.nn.Module:
    """A one-hidden-layer MLP member classifier: full-batch AdamW, early-stopped on a validation slice.

    With hundreds of subjects and ~100 features an unregularised MLP memorises the attacker's
    own training rows, so weight decay and a held-out slice (`validation_rows`) pick the
    weights with the lowest validation log-loss; training stops MLP_PATIENCE epochs after that
    last improved by MLP_MIN_DELTA. Initialisation draws from a forked RNG seeded with `seed`:
    the same rows and seed give the same classifier, and the global RNG is left alone.
    """
    xs = torch.as_tensor(np.asarray(x, dtype=np.float64))
    ys = torch.as_tensor(np.asarray(y, dtype=np.float64).reshape(-1))
    if xs.ndim != 2 or xs.shape[0] != ys.numel():
        raise ValueError(f"x has shape {tuple(xs.shape)}, y has {ys.numel()} entries")
    val = torch.as_tensor(validation_rows(ys.numpy(), seed))
    x_fit, y_fit, x_val, y_val = xs[~val], ys[~val], xs[val], ys[val]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = torch.nn.Sequential(
            torch.nn.Linear(xs.shape[1], MLP_HIDDEN), torch.nn.ReLU(), torch.nn.Linear(MLP_HIDDEN, 1)
        ).double()
    params = list(net.parameters())
    adam = AdamWState()
    loss_fn = torch.nn.functional.binary_cross_entropy_with_logits
    best, since = float("inf"), 0
    best_state = [p.detach().clone() for p in net.parameters()]
    for _ in range(MLP_MAX_EPOCHS):
        net.train()
        for p in params:
            p.grad = None
        loss_fn(net(x_fit).reshape(-1), y_fit).backward()
        adamw_step(params, adam, lr=MLP_LR, weight_decay=MLP_WEIGHT_DECAY)
        net.eval()
        with torch.no_grad():
            val_loss = float(loss_fn(net(x_val).reshape(-1), y_val))
        if val_loss < best - MLP_MIN_DELTA:
            best, best_state, since = val_loss, [p.detach().clone() for p in net.parameters()], 0
        else:
            since += 1
            if since >= MLP_PATIENCE:
                break
    with torch.no_grad():
        for p, b in zip(net.parameters(), best_state):
            p.copy_(b)
    return net.eval()


@dataclasses.dataclass
class AdamWState:
    """What AdamW keeps between steps: their count and each parameter's (first, second) moment."""

    step: int = 0
    moments: list[tuple[torch.Tensor, torch.Tensor]] = dataclasses.field(default_factory=list)


def adamw_step(
    params: Sequence[torch.Tensor],
    state: AdamWState,
    *,
    lr: float,
    weight_decay: float,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
) -> None:
    """One step of torch.optim.AdamW (no amsgrad), its single-tensor update written out, as training.sgd_step is.

    Building a torch.optim optimizer imports torch._dynamo: 2-3 seconds of every `fedmpi attack` for a classifier
    that trains in less. Same operations in the same order as torch's CPU loop, so the same bits
    (tests/test_attack.py). Every parameter must have a gradient.
    """
    beta1, beta2 = betas
    if not state.moments:
        state.moments = [(torch.zeros_like(p), torch.zeros_like(p)) for p in params]
    state.step += 1
    step = state.step
    with torch.no_grad():
        for p, (exp_avg, exp_avg_sq) in zip(params, state.moments, strict=True):
            grad = p.grad
            if grad is None:
                raise ValueError("adamw_step: a parameter without a gradient")
            p.mul_(1 - lr * weight_decay)
            exp_avg.lerp_(grad, 1 - beta1)
            exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
            denom = (exp_avg_sq.sqrt() / (1 - beta2**step) ** 0.5).add_(eps)
            p.addcdiv_(exp_avg, denom, value=-(lr / (1 - beta1**step)))


def mlp_scores(net: torch.nn.Module, x: np.ndarray) -> np.ndarray:
    """Logits (monotone in the member probability) of rows x under a classifier from fit_mlp."""
    with torch.no_grad():
        return net(torch.as_tensor(np.asarray(x, dtype=np.float64))).reshape(-1).numpy()


# ---------------------------------------------------------------- attack core


def feature_matrix(features: dict[str, np.ndarray], ages: np.ndarray, kind: str) -> np.ndarray:
    """Rows of attack features for a learned attack from per_sample_features output.

    black_box: prediction, absolute error, squared error, age. white_box adds log(1 + gradient
    norm) per tensor; white_box_mlp adds log(1 + x) of every GRAD_STATS statistic per tensor
    and the head's pooled activations. Gradient magnitudes are heavy-tailed, hence the log.
    """
    if kind not in LEARNED:
        raise ValueError(f"kind must be one of {LEARNED}, got {kind!r}")
    spec = ATTACK_KINDS[kind]
    cols = [features["pred"], features["abs_error"], features["loss"], np.asarray(ages)]
    x = np.stack([np.asarray(c, dtype=np.float64).reshape(-1) for c in cols], axis=1)
    parts = [x] + [np.log1p(np.asarray(features[g], dtype=np.float64)) for g in spec.gradients]
    if spec.activations:
        parts.append(np.asarray(features["activations"], dtype=np.float64))
    return np.hstack(parts)


def balanced_split(n_members: int, n_nonmembers: int, seed: int, max_per_class: int | None = None) -> dict:
    """Indices for a balanced, disjoint attacker-train / attacker-eval split.

    Both sets are subsampled to n = min(n_members, n_nonmembers, max_per_class); each class is
    shuffled and its first floor(n/2) go to attacker-train, the rest to attacker-eval. Returns
    "members" and "nonmembers" (the chosen indices, train part first) and "n_train_per_class".
    """
    if max_per_class is not None and max_per_class < 4:
        raise AttackError(f"max_per_class must be at least 4 (2 per class in each half), got {max_per_class}")
    n = min(n_members, n_nonmembers, max_per_class or n_members)
    if n < 4:
        raise AttackError(f"need at least 4 members and 4 non-members, got {n_members} and {n_nonmembers}")
    rng = np.random.default_rng(seed)
    return {
        "members": rng.permutation(n_members)[:n],
        "nonmembers": rng.permutation(n_nonmembers)[:n],
        "n_train_per_class": np.int64(n // 2),
    }


def evaluate_attack(
    features: dict[str, np.ndarray], ages: np.ndarray, labels: np.ndarray, train: np.ndarray, kind: str, seed: int = 0
) -> dict:
    """Fit attack `kind` (one of ATTACKS) on rows `train` (bool mask), score the other rows.

    Standardisation uses the attacker-train rows only; the accuracy threshold is chosen on
    attacker-train scores and applied unchanged to attacker-eval. loss_threshold fits nothing
    but that threshold. `seed` drives the MLP and the bootstrap.
    """
    if kind not in ATTACK_KINDS:
        raise ValueError(f"kind must be one of {ATTACKS}, got {kind!r}")
    scorer = ATTACK_KINDS[kind].scorer
    labels = np.asarray(labels).astype(np.int64)
    train = np.asarray(train, dtype=bool)
    if scorer == "loss":
        scores, n_features = -np.asarray(features["loss"], dtype=np.float64), 1
    else:
        x = feature_matrix(features, ages, kind)
        mean, std = standardizer(x[train])
        x = (x - mean) / std
        n_features = x.shape[1]
        if scorer == "mlp":
            scores = mlp_scores(fit_mlp(x[train], labels[train], seed=seed), x)
        else:
            scores = logistic_scores(x, fit_logistic(x[train], labels[train]))
    s_train, s_eval = scores[train], scores[~train]
    y_eval = labels[~train]
    n_pos, n_neg = int((y_eval == 1).sum()), int((y_eval == 0).sum())
    auc = roc_auc(s_eval, y_eval)
    low, high = auc_interval(s_eval, y_eval, seed=seed)
    out: dict = {
        "accuracy": accuracy_at(s_eval, y_eval, best_threshold(s_train, labels[train])),
        "auc": auc,
        "auc_low": low,
        "auc_high": high,
        "auc_se": auc_standard_error(auc, n_pos, n_neg),
    }
    for key, fpr in FPRS:
        out[key] = tpr_at_fpr(s_eval, y_eval, fpr)
    out.update(
        n_train=int(train.sum()), n_eval=int((~train).sum()), min_nonzero_fpr=1.0 / n_neg, features=int(n_features)
    )
    # each attacker-eval subject's score, in row order: two runs attacked on the same subjects pair by subject
    out["eval_scores"] = {"members": s_eval[y_eval == 1].tolist(), "nonmembers": s_eval[y_eval == 0].tolist()}
    return out


def attack_datasets(
    model: torch.nn.Module,
    members: Dataset,
    nonmembers: Dataset,
    *,
    seed: int = 0,
    max_per_class: int | None = None,
    device=None,
    batch_size: int = 8,
    subjects: tuple[list[str], list[str]] | None = None,
) -> dict:
    """Every attack in ATTACKS on `model` with members vs non-members (torch Datasets of (x, age)).

    Returns "attacks" (name -> evaluate_attack result), the logistic ones again under their
    own names, the target model's MAE on the attacked members ("train_mae") and non-members
    ("test_mae"), and the class sizes of attacker-eval. With `subjects` (the members' and the
    non-members' identifiers, in dataset order), "eval_subjects" names attacker-eval's subjects in the
    order of each attack's "eval_scores".
    """
    sizes = len(members), len(nonmembers)  # type: ignore[arg-type]
    if subjects is not None and (len(subjects[0]), len(subjects[1])) != sizes:
        raise ValueError(f"{len(subjects[0])} + {len(subjects[1])} subject identifiers for {sizes} subjects")
    split = balanced_split(*sizes, seed, max_per_class)
    n, half = len(split["members"]), int(split["n_train_per_class"])
    pool: ConcatDataset = ConcatDataset(
        [Subset(members, split["members"].tolist()), Subset(nonmembers, split["nonmembers"].tolist())]
    )
    features = sample_features(model, pool, device=device, batch_size=batch_size)
    finite = np.all([np.isfinite(v.reshape(len(v), -1)).all(axis=1) for v in features.values()], axis=0)
    if not finite.all():
        raise AttackError(
            f"the model's prediction, loss or gradients are not finite for {int((~finite).sum())} of the "
            f"{finite.size} attacked subjects (an overflowing model): its membership cannot be scored"
        )
    labels = np.r_[np.ones(n, np.int64), np.zeros(n, np.int64)]
    train = np.zeros(2 * n, bool)
    train[:half] = True
    train[n : n + half] = True
    ages = features.pop("age")
    attacks = {kind: evaluate_attack(features, ages, labels, train, kind, seed=seed) for kind in ATTACKS}
    result = {
        "attacks": attacks,
        **{kind: {k: v for k, v in attacks[kind].items() if k != "eval_scores"} for kind in KINDS},
        "train_mae": float(features["abs_error"][:n].mean()),
        "test_mae": float(features["abs_error"][n:].mean()),
        "members_eval": n - half,
        "nonmembers_eval": n - half,
    }
    if subjects is not None:
        result["eval_subjects"] = {
            "members": [subjects[0][i] for i in split["members"][half:]],
            "nonmembers": [subjects[1][i] for i in split["nonmembers"][half:]],
        }
    return result


def sample_features(model: torch.nn.Module, dataset: Dataset, device=None, batch_size: int = 8) -> dict:
    """per_sample_features over a dataset in one pass, plus the true ages ("age") in the same order."""
    ages: list[np.ndarray] = []

    def batches():
        for x, y in DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=0):
            ages.append(np.asarray(y, dtype=np.float32).reshape(-1))
            yield x, y

    features = per_sample_features(model, batches(), device=device)
    features["age"] = np.concatenate(ages)
    return features


# ---------------------------------------------------------------- run directory


def member_files(cfg, data_dir: Path) -> list[Path]:
    """The learner files the run trained on: learner_1..N for a federation, all of them when it trained
    centrally."""
    from .algorithms import algorithm

    if algorithm(cfg).trains_centrally:
        files = list(learner_files(data_dir).values())
        if not files:
            raise AttackError(f"{data_dir}: no learner_<k>.h5 files")
        return files
    files = [data_dir / learner_file(k) for k in range(1, cfg.federation.learners + 1)]
    missing = [str(p) for p in files if not p.exists()]
    if missing:
        raise AttackError(f"training data of the run is missing: {', '.join(missing)}")
    return files


def volume_digests(path: Path) -> list[bytes]:
    """A digest of each volume's voxels, in file order: the same scan is recognised in another file, under
    another subject id (independently made cohorts reuse ids like sub-0000). Every volume is read here, so a
    non-finite age or voxel is refused here too (naming the file): it would make its subject's features NaN."""
    from preprocess import bids, h5io

    with h5io.open_checked(path) as f:
        ages = f["age"][:]
        bad = np.flatnonzero(~np.isfinite(ages))
        if bad.size:
            shown = ", ".join(f"#{i}" for i in bad[:5]) + (" ..." if bad.size > 5 else "")
            hint = bids.unknown_ages_note(ages, bad, "used as a non-member by the attack")
            raise AttackError(f"volume file {path}: {bad.size} non-finite age(s): {shown}{hint}")
        reader = h5io.ChunkReader(f["images"])
        digests = []
        for i in range(f["images"].shape[0]):
            try:
                volume = read_volume(reader, path, i)
            except DataError as exc:  # a damaged chunk or non-finite values, named as training names them
                raise AttackError(str(exc)) from None
            digests.append(hashlib.blake2b(volume.tobytes(), digest_size=16).digest())
        return digests


def check_disjoint(members: list[Path], pools: list[Path]) -> None:
    """Refuse non-member files that hold a volume the run trained on (a copy of a learner file, the cohort
    the split was made from) or one that an earlier pool holds: by content, not by path, as those are
    labelled wrong or counted twice. A volume repeated within one file, or in two learner files, is refused
    too: counted twice, one scan could be learnt from in attacker-train and scored in attacker-eval."""
    seen: dict[bytes, Path] = {}
    for path in [*members, *pools]:
        digests = volume_digests(path)
        repeated = len(digests) - len(set(digests))
        if repeated:
            raise AttackError(
                f"{path}: {repeated} of its {len(digests)} volumes repeat another of its volumes (the same image "
                "twice), so one subject could be in both the attacker's training and its evaluation"
            )
        clash = [seen[d] for d in digests if d in seen]
        if clash:
            if path in members:
                where = ", ".join(p.name for p in dict.fromkeys(clash))
                raise AttackError(
                    f"{path}: {len(clash)} of its {len(digests)} volumes are images another learner file holds "
                    f"({where}), so one subject could be in both the attacker's training and its evaluation"
                )
            # the unsplit cohort as --nonmembers holds both: the learners' scans and test.h5's, never trained on
            trained = [p for p in clash if p in members]
            pooled = [p for p in clash if p not in members]
            (count, what, names), *more = [
                (len(found), what, ", ".join(p.name for p in dict.fromkeys(found)))
                for found, what in ((trained, "the run trained on"), (pooled, "another non-member file holds"))
                if found
            ]
            also = "".join(f" and {n} {w} ({f})" for n, w, f in more)
            raise AttackError(
                f"{path}: {count} of its {len(digests)} volumes are images {what} ({names}){also}, "
                "so they cannot count as non-members"
            )
        seen.update(dict.fromkeys(digests, path))


def subject_names(paths: list[Path], datasets: list) -> list[str]:
    """The name FILE/SUBJECT of every volume of `datasets` (read from `paths`), in order: a subject's identifier is
    unique within its cohort, and an extra non-member cohort may reuse another's."""
    return [f"{p.name}/{sid}" for p, d in zip(paths, datasets) for sid in d.subject_ids]


def _volumes(path: Path, input_shape: tuple[int, ...]):
    """The VolumeDataset of `path`, refused unless its volumes have the model's input shape."""
    ds = VolumeDataset(path, cache=False)
    if tuple(ds.shape) != tuple(input_shape):
        raise AttackError(f"{path}: volumes are {tuple(ds.shape)}, the model takes {tuple(input_shape)}")
    return ds


def attack_run(
    run_dir: Path,
    *,
    seed: int = 0,
    per_learner: bool = False,
    device: str = "auto",
    nonmembers: list[Path] | tuple = (),
    max_per_class: int | None = None,
    out: Path | None = None,
) -> dict:
    """The attack.json content for a run directory.

    Non-members are the split's test.h5 plus the `nonmembers` files (other cohorts the run never
    saw, e.g. a fresh synthetic one); `max_per_class` caps the attacked subjects of each class.
    `out`, where the result will be written, is refused (before the attack) if it is a file the attack
    reads or one of the run's records.
    """
    from .algorithms import target_sparsity

    run_dir = existing_run(run_dir, AttackError)
    summary = run_summary(run_dir, AttackError)
    if not summary.get("data_dir"):
        raise AttackError(f"{run_dir / 'summary.json'} does not record data_dir (the split the run used)")
    data_dir = Path(summary["data_dir"])
    test_path = data_dir / TEST_FILE
    if not test_path.exists():
        raise AttackError(f"{test_path}: missing; the attack needs the run's held-out set as non-members")
    model, cfg, sparsity, digest = load_run_model(run_dir, AttackError, "the attack")
    check_recorded_model(summary, run_dir, digest, AttackError, "attack it")
    files = member_files(cfg, data_dir)
    check_split(summary.get("split"), [test_path, *files])
    pools = [test_path, *(Path(p) for p in nonmembers)]
    trained = {p.resolve() for p in files}
    seen: set[Path] = set()
    for p in pools:
        if p.resolve() in trained:
            raise AttackError(f"{p}: the run trained on it, so it cannot hold non-members")
        if p.resolve() in seen:
            raise AttackError(f"{p}: given twice as non-members (its subjects would be counted twice)")
        seen.add(p.resolve())
    if out is not None:
        check_out(Path(out), run_dir, [*files, *pools])
    check_disjoint(files, pools)
    learners = [_volumes(p, model.input_shape) for p in files]
    if per_learner:  # before the attack, not after it: balanced_split's message would give the learner's count alone
        for p, d in zip(files, learners):
            if len(d) < 4:
                raise AttackError(
                    f"--per-learner: {p} holds {len(d)} subjects; attacking a learner alone needs at least 4 "
                    "(2 per class in each half): attack the run without --per-learner"
                )
    pooled = [_volumes(p, model.input_shape) for p in pools]
    outsiders: ConcatDataset = ConcatDataset(pooled)
    member_ids, outsider_ids = subject_names(files, learners), subject_names(pools, pooled)
    dev = select_device(device)
    model.to(dev)
    result = {
        "run": str(run_dir),
        "rounds": summary.get("rounds"),
        "stopped_early": summary.get("preempted") is True,
        "algorithm": cfg.federation.algorithm,
        "seed": seed,
        "sparsity": sparsity,
        "model_sha256": digest,
        "target_sparsity": summary.get("target_sparsity", target_sparsity(cfg)),
        "nonmember_files": [str(p) for p in pools],
        "max_per_class": max_per_class,
        "n_members_available": sum(len(d) for d in learners),
        "n_nonmembers_available": len(outsiders),
        **attack_datasets(
            model,
            ConcatDataset(learners),
            outsiders,
            seed=seed,
            max_per_class=max_per_class,
            device=dev,
            subjects=(member_ids, outsider_ids),
        ),
    }
    if per_learner:
        result["per_learner"] = {
            p.stem.split("_", 1)[1]: attack_datasets(
                model,
                d,
                outsiders,
                seed=seed,
                max_per_class=max_per_class,
                device=dev,
                subjects=(subject_names([p], [d]), outsider_ids),
            )
            for p, d in zip(files, learners)
        }
    return result


def check_out(out: Path, run_dir: Path, inputs: list[Path]) -> None:
    """Refuse an output path that is one of the attack's volume files, one of the run's records or in its
    checkpoints: the result replaces its path, so the trained model or the data would be lost."""
    target = out.resolve()
    reads = target in {p.resolve() for p in inputs}
    if reads or is_run_record(out, run_dir):
        what = "a volume file the attack reads" if reads else "a record of the run"
        raise AttackError(f"--out {out} is {what}: the attack would overwrite it; give another file name")


def check_split(recorded: dict | None, files: list[Path]) -> None:
    """Members must be the subjects the model trained on: refuse a data directory that was re-split (or
    re-preprocessed) since the run, by the digests the run recorded of its files."""
    from .resume import changed_files

    if not recorded:
        print(
            "fedmpi attack: the run recorded no digest of its data (made before fedmpi recorded them); "
            "trusting that its data directory is unchanged",
            file=sys.stderr,
        )
        return
    changed = changed_files(recorded, {p.name: file_digest(p) for p in files})
    if changed:
        raise AttackError(
            f"{', '.join(changed)} in {files[0].parent} differ from the data the run trained and was "
            f"tested on (re-split or re-preprocessed since): its members cannot be known"
        )


def _table_rows(result: dict, indent: str = "") -> list[str]:
    lines = []
    for name, r in result["attacks"].items():
        interval = f"[{r['auc_low']:.3f}, {r['auc_high']:.3f}]"
        lines.append(
            f"{indent + name:<16}{r['accuracy']:>9.3f}{r['auc']:>7.3f}{interval:>18}"
            f"{r['tpr_at_1pct_fpr']:>11.3f}{r['tpr_at_0.1pct_fpr']:>13.3f}{r['n_train']:>9d}{r['n_eval']:>8d}"
        )
    return lines


def format_table(result: dict) -> str:
    """A small fixed-width table: every attack's metrics on attacker-eval, and the target model's fit."""
    lines = [
        f"model sparsity {result['sparsity']:.3f}; MAE {result['train_mae']:.2f} on members, "
        f"{result['test_mae']:.2f} on non-members (the attacked subjects)",
        f"{'attack':<16}{'accuracy':>9}{'auc':>7}{'auc 95% interval':>18}{'tpr@1%fpr':>11}{'tpr@0.1%fpr':>13}"
        f"{'n_train':>9}{'n_eval':>8}",
    ]
    lines += _table_rows(result)
    for k, v in result.get("per_learner", {}).items():
        lines.append(f"learner {k}: MAE {v['train_mae']:.2f} on its members, {v['test_mae']:.2f} on non-members")
        lines += _table_rows(v, indent="  ")
    eval_neg = result["nonmembers_eval"]
    coarse = [f"{100 * fpr:g}%" for _, fpr in FPRS if eval_neg * fpr < 1]
    if coarse:
        lines.append(
            f"note: {eval_neg} non-members in attacker-eval, so the smallest non-zero FPR is "
            f"{1 / eval_neg:.2%}; TPR at {' and '.join(coarse)} FPR is the TPR at FPR = 0"
        )
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of `python -m fedmpi attack` (fedmpi.cli makes the subcommand)."""
    parser.add_argument("--run", required=True, help="run directory (runs/<name>) with model.npz and summary.json")
    parser.add_argument("--out", help="output JSON (default: <run>/attack.json)")
    parser.add_argument(
        "--seed", type=int, default=0, help="seed for subsampling, the train/eval split, the MLP and the bootstrap"
    )
    parser.add_argument(
        "--per-learner",
        action="store_true",
        help="also attack each learner's data separately (members = that learner only)",
    )
    parser.add_argument(
        "--nonmembers",
        action="append",
        default=[],
        metavar="FILE.h5",
        help="extra non-members (a volume file the run never saw, same grid); repeatable",
    )
    parser.add_argument(
        "--max-per-class",
        type=int,
        metavar="N",
        help="attack at most N members and N non-members (faster; default: all that balance)",
    )
    parser.add_argument("--device", default="auto", choices=DEVICES, help="where per-sample gradients are computed")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        metavar="N",
        help="torch CPU threads (default 1: one subject's pass is small, and extra threads "
        "slow it down on cores shared with training)",
    )


def run(args) -> int:
    """`python -m fedmpi attack`: attack the run, write attack.json and print the table; an error the user can fix
    is one line on stderr and exit 2, not a traceback."""
    out = Path(args.out) if args.out else Path(args.run) / "attack.json"
    try:
        if not 1 <= args.threads <= MAX_THREADS:  # torch segfaulted at 99999 and raised a ValueError at 2**31
            raise AttackError(f"--threads must be in [1, {MAX_THREADS}], got {args.threads}")
        if not 0 <= args.seed < MAX_SEED:  # numpy refuses a negative seed, torch one of 2**64 or more
            raise AttackError(f"--seed must be in [0, 2**64), got {args.seed}")
        existing_run(args.run, AttackError)  # first: the default --out is inside it
        outputs.check_file(out, "--out")  # before the attack, not after it
        torch.set_num_threads(args.threads)
        result = attack_run(
            Path(args.run),
            seed=args.seed,
            per_learner=args.per_learner,
            device=args.device,
            nonmembers=args.nonmembers,
            max_per_class=args.max_per_class,
            out=out,
        )
        write_output(out, (dumps(result, indent=2) + "\n").encode(), AttackError)
    except Exception as e:
        if is_user_error(e):
            print(f"fedmpi attack: error: {e}", file=sys.stderr)
            return EXIT_USAGE
        raise
    if result["stopped_early"]:
        print(
            f"fedmpi attack: note: {args.run} stopped at round {result['rounds']} (preempted), so this is its "
            "model from then, not its final one (attack.json says stopped_early); resume the run to attack that",
            file=sys.stderr,
        )
    print(format_table(result))
    print(f"wrote {out}")
    return 0
