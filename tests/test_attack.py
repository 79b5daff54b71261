"""Membership inference: hand-checked metrics, the logistic attack, and the attack on real (tiny) models."""

from __future__ import annotations

import argparse
import json
import shutil

import h5py
import numpy as np
import pytest
import torch
from torch.utils.data import TensorDataset

from fedmpi import attack, tables, training
from fedmpi.config import MAX_THREADS
from fedmpi.errors import EXIT_USAGE
from fedmpi.model import BrainAgeCNN

SHAPE = (12, 14, 12)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Per-sample passes and the MLP are tiny ops: extra threads only contend on a shared machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


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


def test_bootstrap_aucs_hand_case():
    # one member between two non-members: a resample draws the non-members (low, low) with
    # probability 1/4 (AUC 1), one of each with 1/2 (AUC 1/2), (high, high) with 1/4 (AUC 0)
    aucs = attack.bootstrap_aucs([1.0, 3.0, 2.0], [0, 0, 1], resamples=4000, seed=0)
    assert set(np.unique(aucs).tolist()) == {0.0, 0.5, 1.0}
    assert [np.mean(aucs == v) for v in (0.0, 0.5, 1.0)] == pytest.approx([0.25, 0.5, 0.25], abs=0.03)
    assert attack.auc_interval([1.0, 3.0, 2.0], [0, 0, 1], resamples=4000) == (0.0, 1.0)
    assert attack.auc_interval([1.0, 3.0, 2.0], [0, 0, 1], level=0.4, resamples=4000) == (0.5, 0.5)
    assert np.array_equal(aucs, attack.bootstrap_aucs([1.0, 3.0, 2.0], [0, 0, 1], resamples=4000, seed=0))


def test_auc_interval_degenerate_and_shrinking():
    assert attack.auc_interval([1, 2, 3, 4], [0, 0, 1, 1]) == (1.0, 1.0)  # every resample separates
    assert attack.auc_interval([7, 7, 7, 7], [0, 0, 1, 1]) == (0.5, 0.5)  # every resample ties
    rng = np.random.default_rng(0)
    small = attack.auc_interval(rng.normal(0, 1, 40), np.r_[np.ones(20), np.zeros(20)].astype(int))
    large = attack.auc_interval(rng.normal(0, 1, 400), np.r_[np.ones(200), np.zeros(200)].astype(int))
    assert large[1] - large[0] < (small[1] - small[0]) / 2  # width ~ 1 / sqrt(n)
    assert large[0] < 0.5 < large[1]
    with pytest.raises(ValueError, match="level"):
        attack.auc_interval([1, 2], [0, 1], level=1.0)


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


def test_mlp_separates_is_deterministic_and_seeded():
    rng = np.random.default_rng(0)
    x = np.r_[rng.normal(-1, 1, (60, 5)), rng.normal(1, 1, (60, 5))]
    y = np.r_[np.zeros(60), np.ones(60)]
    state = torch.random.get_rng_state()
    scores = attack.mlp_scores(attack.fit_mlp(x, y, seed=3), x)
    assert torch.equal(state, torch.random.get_rng_state())  # the global RNG is left alone
    assert attack.roc_auc(scores, y) > 0.9
    assert np.array_equal(scores, attack.mlp_scores(attack.fit_mlp(x, y, seed=3), x))
    assert not np.array_equal(scores, attack.mlp_scores(attack.fit_mlp(x, y, seed=4), x))


@pytest.mark.parametrize("dtype, weight_decay", [(torch.float64, 0.01), (torch.float32, 0.0), (torch.float32, 0.3)])
def test_adamw_step_is_torchs_adamw_bit_for_bit(dtype, weight_decay):
    """Forty steps on random gradients: the same bits as torch.optim.AdamW's, which fit_mlp used before (the attack
    rows under docs/results were computed with it)."""
    gen = torch.Generator().manual_seed(0)
    shapes = [(16, 5), (16,), (1, 16), (1,)]
    ours = [torch.randn(s, generator=gen, dtype=dtype) for s in shapes]
    theirs = [p.clone() for p in ours]
    first = ours[0].clone()
    optimizer = torch.optim.AdamW(theirs, lr=0.01, weight_decay=weight_decay)
    state = attack.AdamWState()
    for _ in range(40):
        for a, b in zip(ours, theirs):
            a.grad = torch.randn(a.shape, generator=gen, dtype=dtype)
            b.grad = a.grad.clone()
        attack.adamw_step(ours, state, lr=0.01, weight_decay=weight_decay)
        optimizer.step()
        assert all(torch.equal(a, b) for a, b in zip(ours, theirs))
    assert state.step == 40 and not torch.equal(ours[0], first)


def test_fit_mlp_builds_no_torch_optimizer(monkeypatch):
    """Building one imports torch._dynamo, seconds of every `fedmpi attack`."""
    monkeypatch.setattr(torch.optim.Optimizer, "__init__", lambda *a, **k: pytest.fail("a torch.optim optimizer"))
    rng = np.random.default_rng(1)
    x = np.r_[rng.normal(-1, 1, (20, 3)), rng.normal(1, 1, (20, 3))]
    y = np.r_[np.zeros(20), np.ones(20)]
    assert attack.roc_auc(attack.mlp_scores(attack.fit_mlp(x, y), x), y) > 0.8


def test_validation_rows_are_stratified():
    labels = np.r_[np.ones(40), np.zeros(20)]
    val = attack.validation_rows(labels, seed=0)
    assert val[labels == 1].sum() == 10 and val[labels == 0].sum() == 5
    assert attack.validation_rows(np.array([1, 0, 0]), seed=0).tolist().count(True) == 2  # one per class


def test_standardizer_uses_train_rows_and_survives_constant_columns():
    train = np.array([[1.0, 5.0], [3.0, 5.0]])
    mean, std = attack.standardizer(train)
    assert mean.tolist() == [2.0, 5.0] and std.tolist() == [1.0, 1.0]


def test_balanced_split_is_balanced_disjoint_and_seeded():
    s = attack.balanced_split(30, 11, seed=3)
    assert len(s["members"]) == len(s["nonmembers"]) == 11 and s["n_train_per_class"] == 5
    assert len(set(s["members"].tolist())) == 11 and s["members"].max() < 30
    assert np.array_equal(s["members"], attack.balanced_split(30, 11, seed=3)["members"])
    assert len(attack.balanced_split(30, 11, seed=3, max_per_class=6)["members"]) == 6
    with pytest.raises(attack.AttackError, match="at least 4 members"):
        attack.balanced_split(3, 10, seed=0)
    with pytest.raises(attack.AttackError, match="max_per_class must be at least 4"):
        attack.balanced_split(30, 30, seed=0, max_per_class=3)


def test_feature_matrix_columns():
    f = {
        "pred": np.array([60.0]),
        "abs_error": np.array([2.0]),
        "loss": np.array([4.0]),
        "grad_norm": np.array([[0.0, np.e - 1]]),
    }
    assert attack.feature_matrix(f, np.array([58.0]), "black_box").tolist() == [[60.0, 2.0, 4.0, 58.0]]
    assert attack.feature_matrix(f, np.array([58.0]), "white_box")[0, 4:].tolist() == pytest.approx([0.0, 1.0])
    f.update({g: np.full((1, 2), np.e - 1) for g in training.GRAD_STATS[1:]}, activations=np.array([[3.0, 0.0, 1.0]]))
    row = attack.feature_matrix(f, np.array([58.0]), "white_box_mlp")[0]
    assert row.size == 4 + 4 * 2 + 3 and row[6:11].tolist() == pytest.approx([1.0] * 5)
    assert row[-3:].tolist() == [3.0, 0.0, 1.0]
    with pytest.raises(ValueError, match="kind must be one of"):
        attack.feature_matrix(f, np.array([58.0]), "loss_threshold")


def test_loss_threshold_scores_minus_the_loss():
    losses = np.array([1.0, 2.0, 9.0, 3.0, 8.0, 10.0, 0.5, 7.0])  # rows 0-3 members, 4-7 non-members
    f = {"loss": losses}
    train = np.array([True, True, False, False, True, True, False, False])
    r = attack.evaluate_attack(f, np.zeros(8), np.r_[np.ones(4), np.zeros(4)], train, "loss_threshold")
    # eval: members 9, 3 vs non-members 0.5, 7: lower loss wins in 1 of 4 pairs; threshold loss 5 (from train)
    assert r["auc"] == 0.25 and r["accuracy"] == 0.5 and r["features"] == 1
    assert r["n_train"] == r["n_eval"] == 4 and r["auc_low"] <= 0.25 <= r["auc_high"]


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
    rng = np.random.default_rng(0)
    train, held = _volumes(40, rng), _volumes(40, rng)
    torch.manual_seed(0)
    model = BrainAgeCNN(SHAPE, width=0.125, dropout=0.0, mean_age=62.0)
    opt = torch.optim.Adam(model.parameters(), lr=3e-2)
    x, y = train.tensors
    torch.set_num_threads(2)  # 600 full-batch steps are no tiny op (one_thread): 27 -> 18 s on 2 cores
    try:
        for _ in range(600):
            opt.zero_grad()
            loss = ((model(x) - y) ** 2).mean()
            loss.backward()
            opt.step()
    finally:
        torch.set_num_threads(1)
    with torch.no_grad():
        train_mse = float(((model(x) - y) ** 2).mean())
        held_mse = float(((model(held.tensors[0]) - held.tensors[1]) ** 2).mean())
    assert train_mse < held_mse / 5, (train_mse, held_mse)  # it really is overfit
    return model, train, held, rng


@pytest.mark.slow
def test_attack_detects_members_of_an_overfit_model(overfit):
    model, train, held, _ = overfit
    result = attack.attack_datasets(model, train, held, seed=0)
    assert set(result["attacks"]) == set(attack.ATTACKS)
    for kind, r in result["attacks"].items():
        assert r["n_train"] == 40 and r["n_eval"] == 40
        assert r["auc"] > 0.8 and r["auc_low"] > 0.5, (kind, r)
        assert r["auc_low"] <= r["auc"] <= r["auc_high"]
        assert r["accuracy"] > 0.65, (kind, r)
        scored = r["eval_scores"]  # each attacker-eval subject's score, members first: the AUC is theirs
        assert len(scored["members"]) == len(scored["nonmembers"]) == 20
        assert attack.roc_auc(scored["members"] + scored["nonmembers"], [1] * 20 + [0] * 20) == r["auc"]
    # older readers find the same numbers at the top level, without the scores
    assert result["white_box"] == {k: v for k, v in result["attacks"]["white_box"].items() if k != "eval_scores"}
    assert "eval_subjects" not in result  # no identifiers given
    assert result["attacks"]["white_box_mlp"]["features"] > result["white_box"]["features"] > 4
    assert result["train_mae"] < result["test_mae"] / 3
    assert result["members_eval"] == result["nonmembers_eval"] == 20


@pytest.mark.slow
def test_attack_is_chance_on_subjects_the_model_never_saw(overfit):
    model, _, _, rng = overfit
    a, b = _volumes(160, rng), _volumes(160, rng)  # both unseen: "members" are not members
    result = attack.attack_datasets(model, a, b, seed=0)
    for kind, r in result["attacks"].items():
        assert r["auc_low"] < 0.5 < r["auc_high"], (kind, r)
        assert r["n_eval"] == 160
    assert result["train_mae"] == pytest.approx(result["test_mae"], rel=0.2)


@pytest.mark.slow
def test_attack_balances_members_to_nonmembers(overfit):
    model, train, held, _ = overfit
    few = torch.utils.data.Subset(held, range(10))
    r = attack.attack_datasets(model, train, few, seed=1)["black_box"]
    assert r["n_train"] == 10 and r["n_eval"] == 10 and r["min_nonzero_fpr"] == 0.2


# ---------------------------------------------------------------- run directory


def test_attack_command_on_a_run_directory(tmp_path, capsys):
    pytest.importorskip("fedmpi.data")
    from fedtools import write_split, write_volumes

    from fedmpi.checkpoint import model_digest, save_model
    from fedmpi.config import Config
    from fedmpi.model import flat_parameters

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
    assert out["sparsity"] == pytest.approx(0.5, abs=0.01) and out["model_sha256"] == model_digest(values)
    assert out["n_members_available"] == 24 and out["n_nonmembers_available"] == 16
    assert out["white_box"]["n_eval"] == 16 and set(out["per_learner"]) == {"1", "2"}
    assert set(out["attacks"]) == set(attack.ATTACKS)
    assert out["white_box"] == {k: v for k, v in out["attacks"]["white_box"].items() if k != "eval_scores"}
    # attacker-eval's subjects by file and identifier, in the order of every attack's scores
    with h5py.File(data / "learner_1.h5") as f1, h5py.File(data / "learner_2.h5") as f2:
        members = {f"learner_{k}.h5/{s}" for k, f in ((1, f1), (2, f2)) for s in f["subject_id"].asstr()[:]}
    with h5py.File(data / "test.h5") as f:
        nonmembers = {f"test.h5/{s}" for s in f["subject_id"].asstr()[:]}
    named = out["eval_subjects"]
    assert len(named["members"]) == len(set(named["members"])) == 8 and set(named["members"]) <= members
    assert len(named["nonmembers"]) == len(set(named["nonmembers"])) == 8 and set(named["nonmembers"]) <= nonmembers
    for r in out["attacks"].values():
        assert len(r["eval_scores"]["members"]) == len(r["eval_scores"]["nonmembers"]) == 8
    # a learner attacked alone: its own subjects, against the same non-member pool
    alone = out["per_learner"]["1"]["eval_subjects"]
    assert all(s.startswith("learner_1.h5/") for s in alone["members"]) and set(alone["nonmembers"]) <= nonmembers
    for r in out["attacks"].values():
        assert set(r) >= {
            "auc",
            "auc_low",
            "auc_high",
            "auc_se",
            "accuracy",
            "tpr_at_1pct_fpr",
            "tpr_at_0.1pct_fpr",
            "n_train",
            "n_eval",
            "min_nonzero_fpr",
            "features",
        }
        assert 0.0 <= r["auc_low"] <= r["auc"] <= r["auc_high"] <= 1.0
    assert out["members_eval"] == out["nonmembers_eval"] == 8 and out["train_mae"] > 0 and out["test_mae"] > 0
    assert set(out["per_learner"]["1"]["attacks"]) == set(attack.ATTACKS)
    printed = capsys.readouterr()
    assert "white_box_mlp" in printed.out and "tpr@0.1%fpr" in printed.out and "on non-members" in printed.out
    assert out["stopped_early"] is False and "stopped" not in printed.err

    # a run stopped early (preempted) is attacked as it is, and says so
    (run / "summary.json").write_text(json.dumps({"data_dir": str(data), "rounds": 3, "preempted": True}))
    assert attack.run(parser.parse_args(["--run", str(run), "--max-per-class", "4"])) == 0
    assert "stopped at round 3 (preempted)" in capsys.readouterr().err
    stopped = json.loads((run / "attack.json").read_text())
    assert stopped["stopped_early"] is True and stopped["rounds"] == 3
    (run / "summary.json").write_text(json.dumps({"data_dir": str(data), "target_sparsity": 0.5}))

    extra = tmp_path / "fresh.h5"
    write_volumes(extra, np.random.default_rng(5).uniform(45, 80, 20), np.random.default_rng(6), SHAPE)
    args = ["--run", str(run), "--nonmembers", str(extra), "--out", str(tmp_path / "more.json")]
    assert attack.run(parser.parse_args(args)) == 0
    more = json.loads((tmp_path / "more.json").read_text())
    assert more["n_nonmembers_available"] == 36 and more["nonmembers_eval"] == 12  # 24 members balance 36
    assert more["nonmember_files"] == [str(data / "test.h5"), str(extra)]
    try:
        assert attack.run(parser.parse_args([*args, "--max-per-class", "6", "--threads", "2"])) == 0
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(1)
    capped = json.loads((tmp_path / "more.json").read_text())
    assert capped["attacks"]["loss_threshold"]["n_train"] == 6 and capped["members_eval"] == 3
    capsys.readouterr()
    for threads in ("0", "99999", str(2**31)):  # 99999 segfaulted in torch, 2**31 was a traceback
        assert attack.run(parser.parse_args([*args, "--threads", threads])) == EXIT_USAGE
        assert f"--threads must be in [1, {MAX_THREADS}], got {threads}\n" in capsys.readouterr().err

    for bad, message in ((data / "learner_1.h5", "the run trained on it"), (data / "test.h5", "given twice")):
        assert attack.run(parser.parse_args(["--run", str(run), "--nonmembers", str(bad), "--out", "x"])) == EXIT_USAGE
        assert message in capsys.readouterr().err
    # the same scans under another path: a copy of a learner's file, or of another non-member file
    shutil.copy(data / "learner_1.h5", tmp_path / "copy_of_learner.h5")
    shutil.copy(extra, tmp_path / "copy_of_fresh.h5")
    for bad, message in (
        ([tmp_path / "copy_of_learner.h5"], "12 of its 12 volumes are images the run trained on (learner_1.h5)"),
        ([extra, tmp_path / "copy_of_fresh.h5"], "20 of its 20 volumes are images another non-member file holds"),
    ):
        pools = [a for p in bad for a in ("--nonmembers", str(p))]
        assert attack.run(parser.parse_args(["--run", str(run), *pools, "--out", "x"])) == EXIT_USAGE
        assert message in capsys.readouterr().err
    small = tmp_path / "small.h5"
    write_volumes(small, np.array([50.0, 60.0]), np.random.default_rng(0), (10, 12, 10))
    assert attack.run(parser.parse_args(["--run", str(run), "--nonmembers", str(small), "--out", "x"])) == EXIT_USAGE
    assert "volumes are (10, 12, 10), the model takes (12, 14, 12)" in capsys.readouterr().err

    (tmp_path / "a_file").write_text("x")
    for out, message in ((tmp_path, "is an existing directory"), (tmp_path / "a_file" / "x.json", "is a file, not a")):
        assert attack.run(parser.parse_args(["--run", str(run), "--out", str(out)])) == EXIT_USAGE
        printed = capsys.readouterr()
        assert printed.out == "" and message in printed.err  # refused before the attack ran
    missing = ["--run", str(tmp_path / "nope"), "--out", str(tmp_path / "x.json")]
    assert attack.run(parser.parse_args(missing)) == EXIT_USAGE
    assert "nope: no such run directory" in capsys.readouterr().err
    assert attack.run(parser.parse_args(["--run", str(tmp_path / "a_file")])) == EXIT_USAGE  # --out defaults inside
    assert capsys.readouterr().err == f"fedmpi attack: error: {tmp_path / 'a_file'} is a file, not a run directory\n"

    (run / "summary.json").write_text(json.dumps({"target_sparsity": 0.5}))
    assert attack.run(parser.parse_args(["--run", str(run), "--out", str(tmp_path / "x.json")])) == EXIT_USAGE
    assert "does not record data_dir" in capsys.readouterr().err
    assert not (tmp_path / "x.json").exists()


def test_attack_refuses_a_data_directory_re_split_since_the_run(tmp_path, capsys):
    from fedtools import write_split

    from fedmpi.checkpoint import save_model
    from fedmpi.config import Config
    from fedmpi.data import file_digest
    from fedmpi.model import flat_parameters

    data = write_split(tmp_path / "split", learners=2, per_learner=8, test=8, shape=SHAPE)
    cfg = Config()
    cfg.model.width, cfg.model.dropout, cfg.federation.learners = 0.125, 0.0, 2
    values = flat_parameters(BrainAgeCNN(SHAPE, width=0.125, dropout=0.0))
    run = tmp_path / "runs" / "r"
    save_model(run / "model.npz", values, values != 0, {"input_shape": list(SHAPE), "config": cfg.to_dict()})
    split = {name: file_digest(data / name) for name in ("test.h5", "learner_1.h5", "learner_2.h5")}
    (run / "summary.json").write_text(json.dumps({"data_dir": str(data), "split": split}))
    write_split(data, learners=2, per_learner=8, test=8, seed=3, shape=SHAPE)  # re-split into the same directory
    parser = argparse.ArgumentParser()
    attack.add_arguments(parser)
    assert attack.run(parser.parse_args(["--run", str(run), "--max-per-class", "4"])) == EXIT_USAGE
    err = capsys.readouterr().err
    assert "learner_1.h5, learner_2.h5, test.h5" in err and "re-split or re-preprocessed since" in err
    assert not (run / "attack.json").exists()


def _tiny_run(tmp_path, values=None):
    """A run directory (model.npz of a width-0.125 model, summary.json) on a written split: (run, data, values,
    model.npz's metadata)."""
    from fedtools import write_split

    from fedmpi.checkpoint import save_model
    from fedmpi.config import Config
    from fedmpi.model import flat_parameters

    data = write_split(tmp_path / "split", learners=2, per_learner=8, test=8, shape=SHAPE)
    cfg = Config()
    cfg.model.width, cfg.model.dropout, cfg.federation.learners = 0.125, 0.0, 2
    if values is None:
        values = flat_parameters(BrainAgeCNN(SHAPE, width=0.125, dropout=0.0))
    run = tmp_path / "runs" / "r"
    meta = {"input_shape": list(SHAPE), "config": cfg.to_dict(), "round": 3}
    save_model(run / "model.npz", values, values != 0, meta)
    (run / "summary.json").write_text(json.dumps({"data_dir": str(data), "rounds": 3}))
    return run, data, values, meta


def test_attack_refuses_a_model_that_is_not_the_one_summary_records(tmp_path, capsys):
    """The recorder saves model.npz before summary.json: a resumed run that stops (or crashes) in between, or an
    attack in that window, pairs a new model with the old summary (preempted at an earlier round)."""
    from fedmpi.checkpoint import model_digest, save_model

    run, data, values, meta = _tiny_run(tmp_path)
    summary = {"data_dir": str(data), "rounds": 2, "preempted": True, "model_sha256": model_digest(values)}
    (run / "summary.json").write_text(json.dumps(summary))
    parser = argparse.ArgumentParser()
    attack.add_arguments(parser)
    assert attack.run(parser.parse_args(["--run", str(run), "--max-per-class", "4"])) == 0
    capsys.readouterr()
    attacked = (run / "attack.json").read_text()

    newer = values.copy()
    newer[::3] = 0.0  # the resumed run's round-3 model, saved before its summary
    save_model(run / "model.npz", newer, newer != 0, meta)
    assert attack.run(parser.parse_args(["--run", str(run), "--max-per-class", "4"])) == EXIT_USAGE
    printed = capsys.readouterr()
    assert printed.out == "" and "is not the model" in printed.err and "model_sha256" in printed.err
    assert (run / "attack.json").read_text() == attacked  # the earlier attack of the recorded model is left


@pytest.mark.parametrize(
    "change, said",
    [
        (lambda meta: meta.pop("config"), "lacks the config and input_shape"),
        (lambda meta: meta.pop("input_shape"), "lacks the config and input_shape"),
        (lambda meta: meta.update(input_shape=[12, 12]), "lacks the config and input_shape"),
        (lambda meta: meta.update(config="fedsparsify"), "lacks the config and input_shape"),
        (lambda meta: meta["config"]["model"].update(width="wide"), "model.width: expected a number"),
        (lambda meta: meta["config"]["model"].update(width=0.25), "model needs"),  # not these parameters' network
    ],
)
def test_attack_refuses_a_model_file_whose_metadata_cannot_rebuild_its_network(tmp_path, capsys, change, said):
    """A model.npz saved by other means (or edited) is one line and exit 2, not a KeyError or ValueError traceback."""
    from fedmpi.checkpoint import save_model

    run, _data, values, meta = _tiny_run(tmp_path)
    change(meta)
    save_model(run / "model.npz", values, values != 0, meta)
    parser = argparse.ArgumentParser()
    attack.add_arguments(parser)
    assert attack.run(parser.parse_args(["--run", str(run), "--max-per-class", "4"])) == EXIT_USAGE
    printed = capsys.readouterr()
    assert printed.out == "" and said in printed.err and printed.err.count("\n") == 1
    assert not (run / "attack.json").exists()


def test_attack_refuses_a_seed_numpy_or_torch_cannot_take(tmp_path, capsys):
    run, _data, _values, _meta = _tiny_run(tmp_path)
    parser = argparse.ArgumentParser()
    attack.add_arguments(parser)
    for seed in ("-1", str(2**64)):
        args = ["--run", str(run), "--max-per-class", "4", "--seed", seed]
        assert attack.run(parser.parse_args(args)) == EXIT_USAGE
        printed = capsys.readouterr()
        assert printed.out == "" and f"--seed must be in [0, 2**64), got {seed}" in printed.err
    assert not (run / "attack.json").exists()
    assert attack.run(parser.parse_args(["--run", str(run), "--max-per-class", "4", "--seed", str(2**64 - 1)])) == 0


def test_attack_refuses_a_volume_file_with_non_finite_ages_or_voxels(tmp_path, capsys):
    """A non-finite age or voxel made every score of its subject NaN: a traceback from the metrics, exit 1."""
    import h5py
    from fedtools import write_volumes

    run, _data, _values, _meta = _tiny_run(tmp_path)
    parser = argparse.ArgumentParser()
    attack.add_arguments(parser)
    ages = np.random.default_rng(1).uniform(45, 80, 6)
    ages[3] = np.nan
    write_volumes(tmp_path / "nan_age.h5", ages, np.random.default_rng(2), SHAPE)
    ages[3] = 60.0
    write_volumes(tmp_path / "nan_voxel.h5", ages, np.random.default_rng(3), SHAPE)
    with h5py.File(tmp_path / "nan_voxel.h5", "a") as f:
        volume = f["images"][4]
        volume[5, 5, 5] = np.nan
        f["images"][4] = volume
    for name, message in (
        ("nan_age.h5", "1 non-finite age(s): #3; a subject of unknown age (preprocess nifti --ages-optional) can be"),
        ("nan_voxel.h5", "volume 4 holds non-finite"),
    ):
        args = ["--run", str(run), "--nonmembers", str(tmp_path / name), "--max-per-class", "14"]
        assert attack.run(parser.parse_args(args)) == EXIT_USAGE
        printed = capsys.readouterr()
        assert printed.out == "" and message in printed.err and name in printed.err
    assert not (run / "attack.json").exists()


def test_attack_refuses_an_out_that_is_a_file_it_reads_or_a_record_of_the_run(tmp_path, capsys):
    """--out replaced its path with attack.json: given the run's model.npz (or summary.json, a volume file), it
    destroyed the trained model and said it wrote there (exit 0)."""
    from fedtools import write_volumes

    run, data, _values, _meta = _tiny_run(tmp_path)
    extra = tmp_path / "extra.h5"
    write_volumes(extra, np.random.default_rng(1).uniform(45, 80, 6), np.random.default_rng(2), SHAPE)
    (run / "checkpoints").mkdir()
    parser = argparse.ArgumentParser()
    attack.add_arguments(parser)
    for out in (
        run / "model.npz",
        run / "summary.json",
        run / "config.json",
        run / "checkpoints" / "round-000003.npz",
        data / "test.h5",
        data / "learner_2.h5",
        extra,
    ):
        before = out.read_bytes() if out.exists() else None
        args = ["--run", str(run), "--nonmembers", str(extra), "--max-per-class", "4", "--out", str(out)]
        assert attack.run(parser.parse_args(args)) == EXIT_USAGE, out
        printed = capsys.readouterr()
        assert printed.out == "" and "the attack would overwrite it" in printed.err
        assert (out.read_bytes() if out.exists() else None) == before
    other = run / "attack-seed1.json"  # another name in the run directory is fine
    args = ["--run", str(run), "--max-per-class", "4", "--out", str(other)]
    assert attack.run(parser.parse_args(args)) == 0 and json.loads(other.read_text())["seed"] == 0


def test_attack_refuses_a_summary_whose_values_have_another_type_than_the_trainer_writes(tmp_path, capsys):
    run, data, _values, _meta = _tiny_run(tmp_path)
    parser = argparse.ArgumentParser()
    attack.add_arguments(parser)
    for key, value, kind in (("data_dir", 5, "int"), ("split", ["test.h5"], "list"), ("model_sha256", 7, "int")):
        summary = {"data_dir": str(data), key: value}
        (run / "summary.json").write_text(json.dumps(summary))
        assert attack.run(parser.parse_args(["--run", str(run), "--max-per-class", "4"])) == EXIT_USAGE
        printed = capsys.readouterr()
        assert printed.out == "" and f"summary.json: {key} is {kind}" in printed.err
    assert not (run / "attack.json").exists()


def test_attack_refuses_a_diverged_model_and_non_finite_features(tmp_path, capsys, monkeypatch):
    """A run whose training diverged (a centralized run with a huge lr finishes with NaN weights) made every
    score NaN: a traceback from the metrics, exit 1."""
    from fedmpi.model import flat_parameters

    values = flat_parameters(BrainAgeCNN(SHAPE, width=0.125, dropout=0.0))
    values[:10] = np.nan
    run, _data, _values, _meta = _tiny_run(tmp_path, values)
    parser = argparse.ArgumentParser()
    attack.add_arguments(parser)
    assert attack.run(parser.parse_args(["--run", str(run), "--max-per-class", "4"])) == EXIT_USAGE
    printed = capsys.readouterr()
    assert printed.out == "" and "10 of its" in printed.err and "not finite" in printed.err
    assert not (run / "attack.json").exists()

    # a finite model whose prediction or gradient still overflows for some subject
    real = attack.per_sample_features

    def overflowing(*args, **kwargs):
        features = real(*args, **kwargs)
        features["grad_norm"][1, 2] = np.inf
        return features

    monkeypatch.setattr(attack, "per_sample_features", overflowing)
    gen = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(8, 1, *SHAPE, generator=gen), torch.rand(8, generator=gen) * 30 + 50)
    model = BrainAgeCNN(SHAPE, width=0.125, dropout=0.0)
    with pytest.raises(attack.AttackError, match="not finite for 1 of the 8 attacked subjects"):
        attack.attack_datasets(model, data, data, max_per_class=4)


def test_balanced_split_draws_each_class_from_its_own_pool_in_a_seeded_order():
    s = attack.balanced_split(11, 30, seed=3)  # fewer members: the non-members are a subset of all 30
    assert len(set(s["nonmembers"].tolist())) == 11 and s["nonmembers"].max() < 30
    assert s["nonmembers"].max() >= 11  # drawn from the whole non-member pool, not the first 11
    s = attack.balanced_split(30, 11, seed=3)
    assert sorted(s["nonmembers"].tolist()) == list(range(11))  # every non-member, each once ...
    assert s["nonmembers"].tolist() != list(range(11))  # ... shuffled, so the train half is a random half


def test_attack_datasets_splits_each_class_in_halves_and_reports_the_members_mae(monkeypatch):
    n_members, n_nonmembers = 10, 7
    split = attack.balanced_split(n_members, n_nonmembers, 0)
    n = len(split["members"])  # 7 per class, 3 of each in attacker-train
    monkeypatch.setattr(
        attack, "sample_features", lambda model, pool, **kw: {"abs_error": np.arange(2.0 * n), "age": np.zeros(2 * n)}
    )
    seen = []
    monkeypatch.setattr(
        attack, "evaluate_attack", lambda f, ages, labels, train, kind, seed=0: seen.append((labels, train)) or {}
    )
    out = attack.attack_datasets(None, list(range(n_members)), list(range(n_nonmembers)), seed=0)
    labels, train = seen[0]
    assert labels.tolist() == [1] * n + [0] * n
    assert train.tolist() == [True] * 3 + [False] * 4 + [True] * 3 + [False] * 4
    assert out["train_mae"] == np.mean(np.arange(n)) and out["test_mae"] == np.mean(np.arange(n, 2 * n))
    assert out["members_eval"] == out["nonmembers_eval"] == 4


def test_learned_attacks_standardise_with_the_attacker_train_rows_only(monkeypatch):
    rng = np.random.default_rng(0)
    n = 40
    features = {"pred": rng.normal(60, 5, n), "abs_error": rng.gamma(2, 2, n), "loss": rng.gamma(2, 8, n)}
    labels = np.r_[np.ones(n // 2), np.zeros(n // 2)].astype(int)
    train = np.zeros(n, bool)
    train[:10], train[20:30] = True, True
    features["pred"][~train] += 100.0  # attacker-eval rows far off: they must not move the scaling
    fitted = []
    real = attack.fit_logistic
    monkeypatch.setattr(attack, "fit_logistic", lambda x, y, **kw: fitted.append(x) or real(x, y, **kw))
    attack.evaluate_attack(features, rng.uniform(45, 80, n), labels, train, "black_box")
    (x,) = fitted
    assert x.shape == (20, 4) and np.allclose(x.mean(0), 0, atol=1e-9) and np.allclose(x.std(0), 1)


def test_loss_threshold_accuracy_uses_the_threshold_chosen_on_attacker_train():
    losses = np.array([1.0, 2.0, 10.0, 20.0, 5.0, 6.0, 0.5, 0.7])  # rows 0-3 members, 4-7 non-members
    train = np.array([True, True, False, False, True, True, False, False])
    r = attack.evaluate_attack({"loss": losses}, np.zeros(8), np.r_[np.ones(4), np.zeros(4)], train, "loss_threshold")
    # train: members 1, 2 vs non-members 5, 6 -> member iff loss <= somewhere in (2, 5]; on eval every row is wrong
    assert r["auc"] == 0.0 and r["accuracy"] == 0.0


def test_the_attack_table_lists_every_attack_in_the_reports_order():
    assert tuple(attack.ATTACK_KINDS) == tables.ATTACK_ORDER
    assert tuple(k for k in tables.ATTACK_ORDER if k != "loss_threshold") == attack.LEARNED


def test_a_volume_repeated_within_the_attacked_files_is_refused(tmp_path):
    """The halves are disjoint only if every attacked volume is a different subject: a scan repeated inside one
    non-member file, or in two of the run's learner files, could be learnt from in attacker-train and scored in
    attacker-eval (the attacker sees its exact features), so it is refused like a scan shared across files."""
    import h5py
    from fedtools import write_volumes

    paths = {}
    for i, name in enumerate(("learner_1", "learner_2", "test", "fresh")):
        paths[name] = tmp_path / f"{name}.h5"
        write_volumes(paths[name], np.array([50.0, 60.0, 70.0]), np.random.default_rng(i), SHAPE)
    attack.check_disjoint([paths["learner_1"], paths["learner_2"]], [paths["test"], paths["fresh"]])  # all distinct

    def repeat(src, dst, i, j):
        with h5py.File(src, "r") as f:
            volume = f["images"][i]
        with h5py.File(dst, "r+") as f:
            f["images"][j] = volume

    repeat(paths["fresh"], paths["fresh"], 0, 2)  # one scan twice in one non-member file
    with pytest.raises(attack.AttackError, match=r"fresh.h5: 1 of its 3 volumes repeat"):
        attack.check_disjoint([paths["learner_1"], paths["learner_2"]], [paths["test"], paths["fresh"]])
    repeat(paths["learner_1"], paths["learner_2"], 1, 0)  # a scan in two learner files
    with pytest.raises(attack.AttackError, match=r"learner_2.h5: 1 of its 3 volumes are images another learner file"):
        attack.check_disjoint([paths["learner_1"], paths["learner_2"]], [paths["test"]])


def test_per_learner_refuses_a_learner_too_small_to_attack_before_the_attack_naming_it(tmp_path, capsys):
    """--per-learner attacks each learner's subjects alone: a learner of 3 is named up front, not reported after
    the whole attack as "got 3" members when the run has 15."""
    from fedtools import write_volumes

    from fedmpi.checkpoint import model_digest, save_model
    from fedmpi.config import Config
    from fedmpi.model import flat_parameters

    data = tmp_path / "split"
    data.mkdir()
    for i, (name, n) in enumerate((("learner_1", 12), ("learner_2", 3), ("test", 16))):
        write_volumes(data / f"{name}.h5", np.linspace(50, 70, n), np.random.default_rng(i), SHAPE)
    cfg = Config()
    cfg.model.width, cfg.model.dropout, cfg.federation.learners = 0.125, 0.0, 2
    values = flat_parameters(BrainAgeCNN(SHAPE, width=0.125, dropout=0.0))
    run = tmp_path / "runs" / "r"
    save_model(run / "model.npz", values, values != 0, {"input_shape": list(SHAPE), "config": cfg.to_dict()})
    (run / "summary.json").write_text(json.dumps({"data_dir": str(data), "model_sha256": model_digest(values)}))
    parser = argparse.ArgumentParser()
    attack.add_arguments(parser)
    called = []
    real = attack.attack_datasets
    try:
        attack.attack_datasets = lambda *a, **k: called.append(1) or real(*a, **k)
        assert attack.run(parser.parse_args(["--run", str(run), "--per-learner"])) == EXIT_USAGE
    finally:
        attack.attack_datasets = real
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if "error:" in line]
    assert len(errors) == 1 and "learner_2.h5 holds 3 subjects" in errors[0]
    assert not called  # refused before any subject's features were taken
    assert attack.run(parser.parse_args(["--run", str(run)])) == 0  # the run itself can be attacked


def test_a_non_member_file_holding_members_and_another_pools_scans_counts_each_apart(tmp_path):
    """The unsplit cohort given as --nonmembers holds the learners' scans and test.h5's: the message counts the
    trained-on ones and names their files apart from test.h5, which the run never trained on."""
    import h5py
    from fedtools import write_volumes

    member, test, cohort = tmp_path / "learner_1.h5", tmp_path / "test.h5", tmp_path / "cohort.h5"
    write_volumes(member, np.array([50.0, 60.0, 70.0]), np.random.default_rng(1))
    write_volumes(test, np.array([55.0, 65.0]), np.random.default_rng(2))
    with h5py.File(member) as a, h5py.File(test) as b, h5py.File(cohort, "w") as out:
        for name in ("images", "age", "subject_id", "sex", "site"):
            out.create_dataset(name, data=np.concatenate([a[name][:], b[name][:]]))
        out.attrs.update(dict(a.attrs))
    with pytest.raises(attack.AttackError) as info:
        attack.check_disjoint([member], [test, cohort])
    said = str(info.value)
    assert "3 of its 5 volumes are images the run trained on (learner_1.h5)" in said
    assert "2 another non-member file holds (test.h5)" in said


@pytest.mark.parametrize("record", ["model.npz", "ranks.json"])
def test_attack_refuses_an_out_that_is_one_of_the_runs_records(tmp_path, capsys, record):
    """The result is renamed onto --out: the run's model, or the ranks' table the launcher wrote, would be lost."""
    run, _data, _values, _meta = _tiny_run(tmp_path)
    (run / "ranks.json").write_text("{}")
    before = (run / record).read_bytes()
    parser = argparse.ArgumentParser()
    attack.add_arguments(parser)
    assert attack.run(parser.parse_args(["--run", str(run), "--max-per-class", "4", "--out", str(run / record)])) == 2
    printed = capsys.readouterr()
    assert printed.out == "" and "is a record of the run" in printed.err
    assert (run / record).read_bytes() == before
