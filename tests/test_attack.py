"""Membership inference: hand-checked metrics, the logistic attack, and the attack on real (tiny) models."""
from __future__ import annotations

import argparse
import json

import numpy as np
import pytest
import torch
from torch.utils.data import TensorDataset

from fedmpi import attack, training
from fedmpi.model import BrainAgeCNN

SHAPE = (12, 14, 12)


# ---------------------------------------------------------------- metrics

def test_roc_auc_perfect_inverted_and_ties():
    labels = [0, 0, 1, 1]
    assert attack.roc_auc([0.1, 0.2, 0.8, 0.9], labels) == 1.0
    assert attack.roc_auc([0.9, 0.8, 0.2, 0.1], labels) == 0.0
    assert attack.roc_auc([0.5, 0.5, 0.5, 0.5], labels) == 0.5
    # one positive ties one negative (counts 1/2), the other positive beats both: (2 + 1 + 0.5) / 4
    assert attack.roc_auc([0.1, 0.5, 0.5, 0.9], labels) == pytest.approx(0.875)
    # 3 positives x 2 negatives, ranks by hand: pos beats (2, 1, 0) negatives -> 3/6
    assert attack.roc_auc([3, 1, 5, 2, 4], [1, 1, 1, 0, 0]) == pytest.approx(3 / 6)


def test_roc_auc_matches_pairwise_definition():
    rng = np.random.default_rng(1)
    scores = rng.integers(0, 5, 60).astype(float)  # many ties
    labels = rng.integers(0, 2, 60)
    pos, neg = scores[labels == 1], scores[labels == 0]
    pairs = (pos[:, None] > neg[None, :]).mean() + 0.5 * (pos[:, None] == neg[None, :]).mean()
    assert attack.roc_auc(scores, labels) == pytest.approx(pairs)


def test_auc_standard_error():
    assert attack.auc_standard_error(1.0, 10, 10) == 0.0
    # A = 0.5: Q1 = Q2 = 1/3, var = (1/4 + 24/12 + 24/12) / 625 = 4.25 / 625
    assert attack.auc_standard_error(0.5, 25, 25) == pytest.approx((4.25 / 625) ** 0.5)
    assert attack.auc_standard_error(0.5, 100, 100) < attack.auc_standard_error(0.5, 25, 25)


def test_tpr_at_fpr_hand_cases():
    labels = [0, 0, 0, 0, 1, 1, 1, 1]
    assert attack.tpr_at_fpr([1, 2, 3, 4, 5, 6, 7, 8], labels, 0.0) == 1.0
    assert attack.tpr_at_fpr([8, 7, 6, 5, 4, 3, 2, 1], labels, 0.01) == 0.0
    assert attack.tpr_at_fpr([8, 7, 6, 5, 4, 3, 2, 1], labels, 1.0) == 1.0
    # negatives 1, 2, 3, 10; positives 4, 5, 6, 11: FPR 1/4 reached at t=10 (TPR 1/4), then t=4 gives FPR 1/4, TPR 1
    scores = [1, 2, 3, 10, 4, 5, 6, 11]
    assert attack.tpr_at_fpr(scores, labels, 0.0) == 0.25
    assert attack.tpr_at_fpr(scores, labels, 0.25) == 1.0
    # 0.1% FPR with 4 negatives means FPR = 0
    assert attack.tpr_at_fpr(scores, labels, 0.001) == 0.25
    # a positive tied with the top negative cannot be taken without that negative
    assert attack.tpr_at_fpr([1, 2, 3, 9, 9, 5, 6, 11], labels, 0.0) == 0.25


def test_best_threshold_and_accuracy():
    scores = np.array([0.1, 0.4, 0.35, 0.8])
    labels = np.array([0, 0, 1, 1])
    t = attack.best_threshold(scores, labels)
    assert attack.accuracy_at(scores, labels, t) == 0.75
    assert attack.best_threshold([1, 2, 3, 4], [0, 0, 1, 1]) == 2.5
    assert attack.accuracy_at([1, 2, 3, 4], [0, 0, 1, 1], 2.5) == 1.0
    assert attack.best_threshold([4, 3, 2, 1], [0, 0, 1, 1]) == float("-inf")  # calling all members: 50%


def test_metrics_reject_bad_input():
    with pytest.raises(ValueError, match="at least one member and one non-member"):
        attack.roc_auc([0.1, 0.2], [1, 1])
    with pytest.raises(ValueError, match="labels must be 0"):
        attack.roc_auc([0.1, 0.2], [0, 2])
    with pytest.raises(ValueError, match="2 scores but 3 labels"):
        attack.tpr_at_fpr([0.1, 0.2], [0, 1, 1], 0.01)


# ---------------------------------------------------------------- classifier and split

def test_logistic_regression_separates_and_is_deterministic():
    rng = np.random.default_rng(0)
    x = np.r_[rng.normal(-2, 1, (50, 2)), rng.normal(2, 1, (50, 2))]
    y = np.r_[np.zeros(50), np.ones(50)]
    w = attack.fit_logistic(x, y)
    assert attack.roc_auc(attack.logistic_scores(x, w), y) > 0.95
    assert np.array_equal(w, attack.fit_logistic(x, y))
    separable = attack.fit_logistic(np.r_[-np.ones((5, 1)), np.ones((5, 1))], np.r_[np.zeros(5), np.ones(5)])
    assert np.isfinite(separable).all() and separable[0] > 0


def test_standardizer_uses_train_rows_and_survives_constant_columns():
    train = np.array([[1.0, 5.0], [3.0, 5.0]])
    mean, std = attack.standardizer(train)
    assert mean.tolist() == [2.0, 5.0] and std.tolist() == [1.0, 1.0]


def test_balanced_split_is_balanced_disjoint_and_seeded():
    s = attack.balanced_split(30, 11, seed=3)
    assert len(s["members"]) == len(s["nonmembers"]) == 11 and s["n_train_per_class"] == 5
    assert len(set(s["members"].tolist())) == 11 and s["members"].max() < 30
    assert np.array_equal(s["members"], attack.balanced_split(30, 11, seed=3)["members"])
    with pytest.raises(attack.AttackError, match="at least 4 members"):
        attack.balanced_split(3, 10, seed=0)


def test_feature_matrix_columns():
    f = {"pred": np.array([60.0]), "abs_error": np.array([2.0]), "loss": np.array([4.0]),
         "grad_norm": np.array([[0.0, np.e - 1]])}
    assert attack.feature_matrix(f, np.array([58.0]), "black_box").tolist() == [[60.0, 2.0, 4.0, 58.0]]
    assert attack.feature_matrix(f, np.array([58.0]), "white_box")[0, 4:].tolist() == pytest.approx([0.0, 1.0])


def test_per_sample_features_gradient_statistics_and_activations():
    torch.manual_seed(0)
    model = BrainAgeCNN(SHAPE, width=0.125, dropout=0.5)
    with torch.no_grad():
        model.output.weight[0, :3] = 0.0  # a pruned model: 3 of the output layer's weights are zero
    x, y = torch.randn(3, 1, *SHAPE), torch.tensor([50.0, 60.0, 70.0])
    f = training.per_sample_features(model, [(x[:2], y[:2]), (x[2:], y[2:])])
    layers = len(list(model.parameters()))
    assert all(f[g].shape == (3, layers) for g in training.GRAD_STATS)
    assert (f["grad_max_abs"] <= f["grad_norm"] + 1e-6).all() and (f["grad_mean_abs"] <= f["grad_max_abs"]).all()
    assert model.training  # restored after the features were taken in eval mode
    with torch.no_grad():
        pooled = model.eval().head(model.features(x)).reshape(3, -1)
        assert np.allclose(f["activations"], pooled.numpy(), atol=1e-5)  # the output layer's input, dropout off
        pred = model(x).numpy()
    assert np.allclose(f["loss"], (pred - y.numpy()) ** 2, rtol=1e-5)
    # the output weight's gradient is 2 * error * activation: restricted to kept weights it drops the first 3
    err = 2 * (pred - y.numpy())[:, None] * pooled.numpy()
    out_w = [n for n, _ in model.named_parameters()].index("output.weight")
    assert np.allclose(f["grad_norm"][:, out_w], np.linalg.norm(err, axis=1), rtol=1e-4)
    assert np.allclose(f["grad_norm_kept"][:, out_w], np.linalg.norm(err[:, 3:], axis=1), rtol=1e-4)
    assert np.allclose(f["grad_norm_kept"][:, out_w + 1], f["grad_norm"][:, out_w + 1])  # the bias is dense


# ---------------------------------------------------------------- attacks on trained models

def _volumes(n: int, rng) -> TensorDataset:
    """Smooth random volumes (they survive instance norm and pooling) with unlearnable random ages."""
    low = torch.from_numpy(rng.normal(0, 1, (n, 1, 3, 4, 3)).astype(np.float32))
    x = torch.nn.functional.interpolate(low, size=SHAPE, mode="trilinear", align_corners=False)
    x = x + 0.1 * torch.from_numpy(rng.normal(0, 1, (n, 1, *SHAPE)).astype(np.float32))
    return TensorDataset(x, torch.from_numpy(rng.uniform(45, 80, n).astype(np.float32)))


@pytest.fixture(scope="module")
def overfit():
    """A width-0.125 CNN trained to memorise 40 subjects (full-batch Adam), and held-out subjects."""
    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    train, held = _volumes(40, rng), _volumes(40, rng)
    torch.manual_seed(0)
    model = BrainAgeCNN(SHAPE, width=0.125, dropout=0.0, mean_age=62.0)
    opt = torch.optim.Adam(model.parameters(), lr=3e-2)
    x, y = train.tensors
    for _ in range(600):
        opt.zero_grad()
        loss = ((model(x) - y) ** 2).mean()
        loss.backward()
        opt.step()
    with torch.no_grad():
        train_mse = float(((model(x) - y) ** 2).mean())
        held_mse = float(((model(held.tensors[0]) - held.tensors[1]) ** 2).mean())
    assert train_mse < held_mse / 5, (train_mse, held_mse)  # it really is overfit
    return model, train, held, rng


def test_attack_detects_members_of_an_overfit_model(overfit):
    model, train, held, _ = overfit
    result = attack.attack_datasets(model, train, held, seed=0)
    for kind in attack.KINDS:
        r = result[kind]
        assert r["n_train"] == 40 and r["n_eval"] == 40
        assert r["auc"] > 0.75, (kind, r)
        assert r["accuracy"] > 0.65, (kind, r)
    assert result["white_box"]["features"] > result["black_box"]["features"] == 4


def test_attack_is_chance_on_subjects_the_model_never_saw(overfit):
    model, _, _, rng = overfit
    a, b = _volumes(160, rng), _volumes(160, rng)  # both unseen: "members" are not members
    result = attack.attack_datasets(model, a, b, seed=0)
    for kind in attack.KINDS:
        assert abs(result[kind]["auc"] - 0.5) < 0.15, (kind, result[kind])
        assert result[kind]["n_eval"] == 160


def test_attack_balances_members_to_nonmembers(overfit):
    model, train, held, _ = overfit
    few = torch.utils.data.Subset(held, range(10))
    r = attack.attack_datasets(model, train, few, seed=1)["black_box"]
    assert r["n_train"] == 10 and r["n_eval"] == 10 and r["min_nonzero_fpr"] == 0.2


# ---------------------------------------------------------------- run directory

def test_attack_command_on_a_run_directory(tmp_path, capsys):
    pytest.importorskip("fedmpi.data")
    from fedmpi.checkpoint import save_model
    from fedmpi.config import Config
    from fedmpi.model import flat_parameters
    from fedtools import write_split

    data = write_split(tmp_path / "split", learners=2, per_learner=12, test=16, shape=SHAPE)
    cfg = Config()
    cfg.model.width, cfg.model.dropout, cfg.federation.learners = 0.125, 0.0, 2
    model = BrainAgeCNN(SHAPE, width=0.125, dropout=0.0)
    values = flat_parameters(model)
    values[::2] = 0.0
    run = tmp_path / "runs" / "r"
    save_model(run / "model.npz", values, values != 0, {"input_shape": list(SHAPE), "config": cfg.to_dict()})
    (run / "summary.json").write_text(json.dumps({"data_dir": str(data), "target_sparsity": 0.5}))

    parser = argparse.ArgumentParser()
    attack.add_arguments(parser)
    assert attack.run(parser.parse_args(["--run", str(run), "--per-learner"])) == 0
    out = json.loads((run / "attack.json").read_text())
    assert out["sparsity"] == pytest.approx(0.5, abs=0.01)
    assert out["n_members_available"] == 24 and out["n_nonmembers_available"] == 16
    assert out["white_box"]["n_eval"] == 16 and set(out["per_learner"]) == {"1", "2"}
    assert 0.0 <= out["white_box"]["auc"] <= 1.0
    assert "tpr_at_0.1pct_fpr" in capsys.readouterr().out

    (run / "summary.json").write_text(json.dumps({"target_sparsity": 0.5}))
    assert attack.run(parser.parse_args(["--run", str(run), "--out", str(tmp_path / "x.json")])) == 1
    assert "does not record data_dir" in capsys.readouterr().err
    assert not (tmp_path / "x.json").exists()
