"""Membership inference against a trained brain-age model (Gupta et al., MIDL 2021).

The attacker holds the model and a labelled pool of subjects: members (the learners' training
data) and non-members (the held-out test set, never trained on). The two sets are balanced and
each split into disjoint attacker-train / attacker-eval halves. Per-sample signals from
`fedmpi.training.per_sample_features` feed an L2-regularised logistic regression:

- black-box: prediction, absolute error, squared error, and the subject's true age (the
  attacker knows it for its own samples);
- white-box: black-box plus log(1 + per-layer gradient norm) of the sample's loss.

The metrics (ROC AUC, TPR at a fixed FPR, accuracy at a threshold chosen on attacker-train) are
pure numpy functions of scores and labels. `attack_datasets` takes torch Datasets so it runs on
in-memory data; `run` wires it to a run directory.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import ConcatDataset, DataLoader, Dataset, Subset

from .config import DEVICES
from .errors import AttackError, is_user_error
from .files import atomic_write
from .runlog import read_json

FPRS = (("tpr_at_1pct_fpr", 0.01), ("tpr_at_0.1pct_fpr", 0.001))
KINDS = ("black_box", "white_box")



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


def _average_ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks of x, tied values sharing the mean of their ranks."""
    order = np.argsort(x, kind="mergesort")
    sorted_x = x[order]
    starts = np.flatnonzero(np.r_[True, sorted_x[1:] != sorted_x[:-1]])
    ends = np.r_[starts[1:], x.size]
    mean_rank = (starts + ends + 1) / 2.0  # mean of ranks starts+1 .. ends
    ranks = np.empty(x.size)
    ranks[order] = np.repeat(mean_rank, ends - starts)
    return ranks


def roc_auc(scores, labels) -> float:
    """Area under the ROC curve: P(member scores above non-member), ties counting one half.

    Rank-based (Mann-Whitney U). Higher score = more likely a member (label 1).
    """
    scores, labels = _check_binary(scores, labels)
    ranks = _average_ranks(scores)
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


# ---------------------------------------------------------------- attack core

def feature_matrix(features: dict[str, np.ndarray], ages: np.ndarray, kind: str) -> np.ndarray:
    """Rows of attack features for `kind` ("black_box" or "white_box") from per_sample_features output."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    cols = [features["pred"], features["abs_error"], features["loss"], np.asarray(ages)]
    x = np.stack([np.asarray(c, dtype=np.float64).reshape(-1) for c in cols], axis=1)
    if kind == "white_box":
        x = np.hstack([x, np.log1p(np.asarray(features["grad_norm"], dtype=np.float64))])
    return x


def balanced_split(n_members: int, n_nonmembers: int, seed: int) -> dict[str, np.ndarray]:
    """Indices for a balanced, disjoint attacker-train / attacker-eval split.

    Both sets are subsampled to n = min(n_members, n_nonmembers); each class is shuffled and
    its first floor(n/2) go to attacker-train, the rest to attacker-eval. Returns
    "members" and "nonmembers" (the chosen indices, train part first) and "n_train_per_class".
    """
    n = min(n_members, n_nonmembers)
    if n < 4:
        raise AttackError(f"need at least 4 members and 4 non-members, got {n_members} and {n_nonmembers}")
    rng = np.random.default_rng(seed)
    return {
        "members": rng.permutation(n_members)[:n],
        "nonmembers": rng.permutation(n_nonmembers)[:n],
        "n_train_per_class": np.int64(n // 2),
    }


def evaluate_attack(features: dict[str, np.ndarray], ages: np.ndarray, labels: np.ndarray,
                    train: np.ndarray, kind: str, l2: float = 1.0) -> dict:
    """Fit the attack on rows `train` (bool mask), score the other rows; pure numpy.

    Standardisation uses the attacker-train rows only; the accuracy threshold is chosen on
    attacker-train scores and applied unchanged to attacker-eval.
    """
    labels = np.asarray(labels).astype(np.int64)
    train = np.asarray(train, dtype=bool)
    x = feature_matrix(features, ages, kind)
    mean, std = standardizer(x[train])
    x = (x - mean) / std
    w = fit_logistic(x[train], labels[train], l2=l2)
    s_train, s_eval = logistic_scores(x[train], w), logistic_scores(x[~train], w)
    y_eval = labels[~train]
    auc = roc_auc(s_eval, y_eval)
    out = {
        "accuracy": accuracy_at(s_eval, y_eval, best_threshold(s_train, labels[train])),
        "auc": auc,
        "auc_se": auc_standard_error(auc, int((y_eval == 1).sum()), int((y_eval == 0).sum())),
    }
    for key, fpr in FPRS:
        out[key] = tpr_at_fpr(s_eval, y_eval, fpr)
    out.update(n_train=int(train.sum()), n_eval=int((~train).sum()),
               min_nonzero_fpr=1.0 / int((y_eval == 0).sum()), features=int(x.shape[1]))
    return out


def attack_datasets(model: torch.nn.Module, members: Dataset, nonmembers: Dataset, *, seed: int = 0,
                    device=None, batch_size: int = 8) -> dict:
    """Black-box and white-box attacks on `model` with members vs non-members (torch Datasets of (x, age))."""
    split = balanced_split(len(members), len(nonmembers), seed)
    n, half = len(split["members"]), int(split["n_train_per_class"])
    pool = ConcatDataset([Subset(members, split["members"].tolist()), Subset(nonmembers, split["nonmembers"].tolist())])
    features = sample_features(model, pool, device=device, batch_size=batch_size)
    labels = np.r_[np.ones(n, np.int64), np.zeros(n, np.int64)]
    train = np.zeros(2 * n, bool)
    train[:half] = True
    train[n:n + half] = True
    ages = features.pop("age")
    return {kind: evaluate_attack(features, ages, labels, train, kind) for kind in KINDS}


def sample_features(model: torch.nn.Module, dataset: Dataset, device=None, batch_size: int = 8) -> dict:
    """per_sample_features over a dataset in one pass, plus the true ages ("age") in the same order."""
    from .training import per_sample_features

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
        files = sorted(data_dir.glob("learner_*.h5"))
        if not files:
            raise AttackError(f"{data_dir}: no learner_<k>.h5 files")
        return files
    files = [data_dir / f"learner_{k}.h5" for k in range(1, cfg.federation.learners + 1)]
    missing = [str(p) for p in files if not p.exists()]
    if missing:
        raise AttackError(f"training data of the run is missing: {', '.join(missing)}")
    return files


def load_run_model(run_dir: Path):
    """(model with the saved global parameters, config, final sparsity) of a finished run."""
    from .checkpoint import load_model
    from .config import config_from_dict
    from .model import build_model, load_flat_parameters

    values, mask, meta = load_model(run_dir / "model.npz")
    cfg = config_from_dict(meta["config"])
    model = build_model(cfg, meta["input_shape"])
    load_flat_parameters(model, values)
    return model, cfg, float(np.mean(values == 0))


def attack_run(run_dir: Path, *, seed: int = 0, per_learner: bool = False, device: str = "auto") -> dict:
    """The attack.json content for a run directory."""
    from .data import VolumeDataset
    from .training import select_device

    run_dir = Path(run_dir)
    summary = read_json(run_dir / "summary.json", AttackError)
    if not summary.get("data_dir"):
        raise AttackError(f"{run_dir / 'summary.json'} does not record data_dir (the split the run used)")
    data_dir = Path(summary["data_dir"])
    test_path = data_dir / "test.h5"
    if not test_path.exists():
        raise AttackError(f"{test_path}: missing; the attack needs the run's held-out set as non-members")
    model, cfg, sparsity = load_run_model(run_dir)
    dev = select_device(device)
    model.to(dev)
    files = member_files(cfg, data_dir)
    learners = [VolumeDataset(p, cache=False) for p in files]
    nonmembers = VolumeDataset(test_path, cache=False)
    result = {
        "run": str(run_dir), "algorithm": cfg.federation.algorithm, "seed": seed,
        "sparsity": sparsity, "target_sparsity": summary.get("target_sparsity", cfg.federation.target),
        "n_members_available": sum(len(d) for d in learners), "n_nonmembers_available": len(nonmembers),
        **attack_datasets(model, ConcatDataset(learners), nonmembers, seed=seed, device=dev),
    }
    if per_learner:
        result["per_learner"] = {
            p.stem.split("_", 1)[1]: attack_datasets(model, d, nonmembers, seed=seed, device=dev)
            for p, d in zip(files, learners)
        }
    return result


def format_table(result: dict) -> str:
    """A small fixed-width table of the attack metrics."""
    cols = ("accuracy", "auc", "tpr_at_1pct_fpr", "tpr_at_0.1pct_fpr", "n_train", "n_eval")
    lines = [f"model sparsity {result['sparsity']:.3f}",
             f"{'attack':<12}" + "".join(f"{c:>18}" for c in cols)]
    rows = [(k, result[k]) for k in KINDS]
    rows += [(f"learner {k} {kind[0]}b", v[kind]) for k, v in result.get("per_learner", {}).items() for kind in KINDS]
    for name, r in rows:
        lines.append(f"{name:<12}" + "".join(f"{r[c]:>18.3f}" if isinstance(r[c], float) else f"{r[c]:>18d}"
                                             for c in cols))
    eval_neg = result["black_box"]["n_eval"] // 2
    if eval_neg < 1000:
        lines.append(f"note: {eval_neg} non-members in attacker-eval, so the smallest non-zero FPR is "
                     f"{1 / eval_neg:.2%}; TPR at 0.1% FPR below that is the TPR at FPR = 0")
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--run", required=True, help="run directory (runs/<name>) with model.npz and summary.json")
    parser.add_argument("--out", help="output JSON (default: <run>/attack.json)")
    parser.add_argument("--seed", type=int, default=0, help="seed for subsampling and the train/eval split")
    parser.add_argument("--per-learner", action="store_true",
                        help="also attack each learner's data separately (members = that learner only)")
    parser.add_argument("--device", default="auto", choices=DEVICES,
                        help="where per-sample gradients are computed")


def run(args) -> int:
    try:
        result = attack_run(Path(args.run), seed=args.seed, per_learner=args.per_learner, device=args.device)
    except Exception as e:
        if is_user_error(e):
            print(f"fedmpi attack: error: {e}", file=sys.stderr)
            return 1
        raise
    out = Path(args.out) if args.out else Path(args.run) / "attack.json"
    atomic_write(out, (json.dumps(result, indent=2, sort_keys=True) + "\n").encode())
    print(format_table(result))
    print(f"wrote {out}")
    return 0
