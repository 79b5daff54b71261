import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from fedmpi.metrics import regression_metrics
from fedmpi.model import BrainAgeCNN, flat_parameters, load_flat_parameters, parameter_layout
from fedmpi.pruning import apply_mask
from fedmpi.training import (
    grasp_scores,
    local_train,
    masks_from_flat,
    per_sample_features,
    predict,
    sgd_step,
    snip_scores,
)

TINY = (20, 24, 20)


def blob_data(n, seed=0):
    """Learnable toy cohort: age is encoded as the size of a bright cube."""
    rng = np.random.default_rng(seed)
    k = rng.integers(1, 8, size=n)
    x = np.zeros((n, 1, *TINY), np.float32)
    c = [s // 2 for s in TINY]
    for i, ki in enumerate(k):
        x[i, 0, c[0] - ki : c[0] + ki, c[1] - ki : c[1] + ki, c[2] - ki : c[2] + ki] = 1.0
    x += 0.1 * rng.standard_normal(x.shape).astype(np.float32)
    return torch.from_numpy(x), torch.from_numpy((45 + 5 * k).astype(np.float32))


def make_loader(n=16, batch_size=4, shuffle=False, seed=0):
    x, y = blob_data(n, seed)
    gen = torch.Generator().manual_seed(seed)
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=shuffle, generator=gen)


def tiny_model(dropout=0.0, mean_age=62.68, seed=0):
    torch.manual_seed(seed)
    return BrainAgeCNN(TINY, width=0.125, dropout=dropout, mean_age=mean_age)


def test_masks_from_flat_splits_by_layout():
    model = tiny_model()
    assert masks_from_flat(model, None) is None
    n = flat_parameters(model).size
    flat = np.arange(n) % 3 != 0
    masks = masks_from_flat(model, flat)
    assert [tuple(m.shape) for m in masks] == [tuple(p.shape) for p in model.parameters()]
    assert all(m.dtype == torch.bool for m in masks)
    np.testing.assert_array_equal(np.concatenate([m.numpy().ravel() for m in masks]), flat)
    with pytest.raises(ValueError):
        masks_from_flat(model, flat[:-1])


@pytest.mark.slow
def test_masked_training_keeps_pruned_weights_exactly_zero():
    model = tiny_model(dropout=0.5)
    n = flat_parameters(model).size
    keep = np.random.default_rng(1).random(n) > 0.5
    masks = masks_from_flat(model, keep)
    vec = flat_parameters(model) * keep
    load_flat_parameters(model, vec)
    result = local_train(
        model, make_loader(shuffle=True), epochs=2, lr=1e-2, momentum=0.9, weight_decay=1e-2, masks=masks
    )
    assert result["steps"] == 8 and result["samples"] == 16
    after = flat_parameters(model)
    assert np.all(after[~keep] == 0.0)
    changed = after[keep] != vec[keep]
    assert changed.mean() > 0.9


def test_mask_is_applied_even_if_model_was_dense():
    model = tiny_model()
    keep = np.ones(flat_parameters(model).size, bool)
    keep[::2] = False
    local_train(model, make_loader(n=4), epochs=1, lr=1e-3, masks=masks_from_flat(model, keep))
    assert np.all(flat_parameters(model)[~keep] == 0.0)


@pytest.mark.slow
def test_prox_term_pulls_towards_start():
    start = flat_parameters(tiny_model())
    distances = {}
    for mu in (0.0, 50.0):
        model = tiny_model()
        local_train(model, make_loader(), epochs=3, lr=1e-2, momentum=0.9, prox_mu=mu)
        distances[mu] = np.linalg.norm(flat_parameters(model) - start)
    assert distances[50.0] < 0.5 * distances[0.0]


@pytest.mark.slow
def test_local_train_learns_blob_size():
    _x, y = blob_data(32)
    model = tiny_model(mean_age=float(y.mean()))
    loader = make_loader(n=32, shuffle=True)
    before = regression_metrics(*predict(model, make_loader(n=32)))
    first = local_train(model, loader, epochs=1, lr=3e-2, momentum=0.9)
    last = local_train(model, loader, epochs=8, lr=3e-2, momentum=0.9)
    pred, ages = predict(model, make_loader(n=32))
    after = regression_metrics(pred, ages)
    assert last["steps"] == 64 and last["samples"] == 32
    assert last["loss"] < 0.7 * first["loss"]
    assert after["rmse"] < 0.7 * before["rmse"]
    assert len(pred) == 32


def test_predict_returns_eval_mode_outputs_and_restores_mode():
    model = tiny_model(dropout=0.5)
    model.train()
    loader = make_loader(n=6, batch_size=4)
    p1, ages = predict(model, loader)
    p2, _ = predict(model, loader)
    assert model.training
    assert p1.shape == (6,) and ages.shape == (6,)
    np.testing.assert_array_equal(p1, p2)  # dropout off in eval mode
    np.testing.assert_array_equal(ages, blob_data(6)[1].numpy())


def test_snip_scores_shape_and_sign():
    model = tiny_model()
    x, y = blob_data(4)
    scores = snip_scores(model, x, y)
    assert scores.dtype == np.float32 and scores.shape == flat_parameters(model).shape
    assert np.all(scores >= 0) and np.any(scores > 0)
    assert all(p.grad is None for p in model.parameters())
    # a zero weight has zero saliency
    vec = flat_parameters(model)
    vec[:50] = 0
    load_flat_parameters(model, vec)
    assert np.all(snip_scores(model, x, y)[:50] == 0)


def test_per_sample_features_shapes_and_consistency():
    model = tiny_model()
    loader = make_loader(n=5, batch_size=2)
    feats = per_sample_features(model, loader)
    n_tensors = len(parameter_layout(model))
    assert feats["grad_norm"].shape == (5, n_tensors)
    for key in ("pred", "abs_error", "loss"):
        assert feats[key].shape == (5,)
    np.testing.assert_allclose(feats["loss"], feats["abs_error"] ** 2, rtol=1e-5)
    pred, _ = predict(model, loader)
    np.testing.assert_allclose(feats["pred"], pred, rtol=1e-5)
    assert np.all(feats["grad_norm"] >= 0) and np.all(feats["grad_norm"][:, -1] > 0)
    # the output-bias gradient of (pred - y)^2 is 2 * |pred - y|
    np.testing.assert_allclose(feats["grad_norm"][:, -1], 2 * feats["abs_error"], rtol=1e-4)


def test_local_train_rejects_bad_arguments():
    model = tiny_model()
    with pytest.raises(ValueError):
        local_train(model, make_loader(n=4), epochs=0, lr=1e-3)
    with pytest.raises(ValueError):
        local_train(model, [], epochs=1, lr=1e-3)
    with pytest.raises(ValueError):
        local_train(model, make_loader(n=4), epochs=1, lr=1e-3, masks=[torch.ones(1, dtype=torch.bool)])


class _Regressor(torch.nn.Module):
    """A network small enough for its full Hessian: 3 -> 4 (tanh) -> 1, 21 parameters, float64."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(3)
        self.hidden = torch.nn.Linear(3, 4)
        self.out = torch.nn.Linear(4, 1)
        self.double()

    def forward(self, x):
        return self.out(torch.tanh(self.hidden(x))).flatten()


def test_grasp_scores_are_minus_w_times_the_full_hessian_times_the_gradient():
    model = _Regressor()
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(7, 3, generator=gen, dtype=torch.float64)
    y = torch.randn(7, generator=gen, dtype=torch.float64)
    batches = [(x[:4], y[:4]), (x[4:], y[4:])]  # unequal batches: L is the MSE over all 7 samples
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def loss(flat):
        parts, offset = {}, 0
        for name, shape in zip(names, shapes):
            size = int(np.prod(shape))
            parts[name] = flat[offset : offset + size].view(shape)
            offset += size
        return torch.mean((torch.func.functional_call(model, parts, (x,)) - y) ** 2)

    hessian = torch.autograd.functional.hessian(loss, theta)
    gradient = torch.autograd.functional.jacobian(loss, theta)
    expected = (-theta * (hessian @ gradient)).numpy()
    scores = grasp_scores(model, batches)
    assert scores.dtype == np.float32 and scores.shape == expected.shape
    assert np.abs(expected).max() > 1e-3  # the check below is not comparing zeros
    np.testing.assert_allclose(scores, expected, rtol=1e-5, atol=1e-7 * np.abs(expected).max())
    assert all(p.grad is None for p in model.parameters()) and model.training


def test_grasp_scores_on_the_brain_age_model_match_a_finite_difference_of_the_gradient():
    """Hg of the real model (instance norm, pooling) by double backward, against the central difference
    (grad(w + e g) - grad(w - e g)) / 2e in float64: an independent route to the same quantity."""
    model = tiny_model().double()
    x, y = (t.double() for t in blob_data(3))
    params = list(model.parameters())
    to_params = torch.nn.utils.vector_to_parameters

    def gradient(flat):
        to_params(flat, params)
        grads = torch.autograd.grad(torch.nn.functional.mse_loss(model(x), y), params)
        return torch.cat([d.reshape(-1) for d in grads])

    theta = torch.nn.utils.parameters_to_vector(params).detach().clone()
    g = gradient(theta)
    eps = 1e-5 / float(g.norm())
    expected = (-theta * (gradient(theta + eps * g) - gradient(theta - eps * g)) / (2 * eps)).numpy()
    to_params(theta, params)
    scores = grasp_scores(model, [(x, y)])
    scale = np.abs(expected).max()
    assert scale > 0
    np.testing.assert_allclose(scores, expected, atol=1e-4 * scale)


def test_squared_grads_accumulate_every_position_the_mask_prunes_included():
    model = tiny_model()
    start = flat_parameters(model)
    mask = np.ones(start.size, bool)
    mask[::3] = False
    squares = [torch.zeros_like(p) for p in model.parameters()]
    local_train(
        model,
        make_loader(n=8, batch_size=4),
        epochs=1,
        lr=1e-4,
        masks=masks_from_flat(model, mask),
        squared_grads=squares,
    )
    total = torch.cat([q.reshape(-1) for q in squares]).numpy()
    assert not flat_parameters(model)[~mask].any()  # pruned positions stayed zero ...
    assert (total[~mask] > 0).mean() > 0.5  # ... yet their gradients were accumulated
    # the first step's squared gradient (same masked model, same first batch) is one term of the sum
    load_flat_parameters(model, apply_mask(start, mask))
    x, y = next(iter(make_loader(n=8, batch_size=4)))
    grads = torch.autograd.grad(torch.nn.functional.mse_loss(model(x), y), list(model.parameters()))
    first = torch.cat([d.reshape(-1) ** 2 for d in grads]).numpy()
    assert np.all(total >= first * (1 - 1e-5)) and (total > first * 1.01).any()
    with pytest.raises(ValueError, match="squared_grads"):
        local_train(model, make_loader(n=4), epochs=1, lr=1e-3, squared_grads=squares[:-1])


def test_squared_grads_are_the_losss_without_fedproxs_pull():
    """PruneFL with FedProx: the importance is the loss's squared gradient; the proximal term's mu * (w - w_start)
    (zero at the first step, half the loss's gradient at the second here) is not part of it."""
    lr, mu = 1e-2, 50.0
    model, reference = tiny_model(), tiny_model()
    squares = [torch.zeros_like(p) for p in model.parameters()]
    local_train(model, make_loader(n=8, batch_size=4), epochs=1, lr=lr, prox_mu=mu, squared_grads=squares)
    params = list(reference.parameters())
    start = [p.detach().clone() for p in params]
    expected = [torch.zeros_like(p) for p in params]
    for x, y in make_loader(n=8, batch_size=4):
        loss = torch.nn.functional.mse_loss(reference(x).float(), y)
        grads = torch.autograd.grad(loss, params)
        with torch.no_grad():
            for p, a, g, e in zip(params, start, grads, expected):
                e.add_(g * g)
                p.sub_(lr * (g + mu * (p - a)))
    for got, want in zip(squares, expected):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-10)
    np.testing.assert_allclose(flat_parameters(model), flat_parameters(reference), rtol=1e-5, atol=1e-7)


def test_local_train_is_masked_fedprox_sgd_and_reports_the_last_epochs_sample_weighted_mse():
    """Two epochs of 4 + 2 samples against the same SGD written out by hand: momentum, weight decay,
    FedProx's mu/2 * ||w - w_start||^2 on every parameter, pruned positions held at zero."""
    lr, momentum, wd, mu = 1e-2, 0.9, 1e-3, 5.0
    model, reference = tiny_model(), tiny_model()
    keep = np.ones(flat_parameters(model).size, bool)
    keep[::3] = False
    stats = local_train(
        model,
        make_loader(n=6),
        epochs=2,
        lr=lr,
        momentum=momentum,
        weight_decay=wd,
        prox_mu=mu,
        masks=masks_from_flat(model, keep),
    )
    params = list(reference.parameters())
    masks = masks_from_flat(reference, keep)
    with torch.no_grad():
        for p, m in zip(params, masks):
            p.mul_(m)
    start = [p.detach().clone() for p in params]
    bufs = [torch.zeros_like(p) for p in params]
    reference.train()
    for _ in range(2):
        errors = []
        for x, y in make_loader(n=6):
            pred = reference(x).float()
            loss = torch.mean((pred - y) ** 2)
            prox = sum(((p - a) ** 2).sum() for p, a in zip(params, start))
            grads = torch.autograd.grad(loss + mu / 2 * prox, params)
            with torch.no_grad():
                for p, g, b, m in zip(params, grads, bufs, masks):
                    b.mul_(momentum).add_(g * m + wd * p)
                    p.sub_(lr * b).mul_(m)
            errors.append(((pred - y) ** 2).detach())
    assert np.allclose(flat_parameters(model), flat_parameters(reference), rtol=1e-4, atol=1e-6)
    assert not flat_parameters(model)[~keep].any()
    assert stats["samples"] == 6 and stats["steps"] == 4
    assert stats["loss"] == pytest.approx(float(torch.cat(errors).mean()), rel=1e-4)


@pytest.mark.parametrize("momentum", [0.0, 0.9])
@pytest.mark.parametrize("weight_decay", [0.0, 1e-3])
def test_sgd_step_is_torchs_sgd_bit_for_bit(momentum, weight_decay):
    """Three steps on random gradients, one parameter without a gradient: the same bits as torch.optim.SGD's, which
    the records of earlier code were trained with, and no buffer for the parameter torch leaves alone."""
    gen = torch.Generator().manual_seed(0)
    shapes = [(8, 1, 3, 3, 3), (8,), (1, 8), (5,)]
    ours = [torch.randn(s, generator=gen) for s in shapes]
    theirs = [p.clone() for p in ours]
    optimizer = torch.optim.SGD(theirs, lr=0.05, momentum=momentum, weight_decay=weight_decay)
    buffers: list = [None] * len(ours)
    for _ in range(3):
        grads = [torch.randn(s, generator=gen) for s in shapes[:-1]] + [None]
        for a, b, g in zip(ours, theirs, grads):
            a.grad = b.grad = None if g is None else g.clone()
        sgd_step(ours, buffers, lr=0.05, momentum=momentum, weight_decay=weight_decay)
        optimizer.step()
        assert all(torch.equal(a, b) for a, b in zip(ours, theirs))
    assert torch.equal(ours[-1], theirs[-1]) and buffers[-1] is None
    assert (buffers[0] is not None) == (momentum != 0)


def test_a_learners_training_never_imports_torch_dynamo():
    """Building a torch.optim optimizer imports torch._dynamo, 2-3 CPU-seconds in every learner's start-up (more
    with 8 learners on 2 cores): the warm-up step and a round of momentum SGD with weight decay need none of it."""
    import subprocess
    import sys

    code = f"""
import sys, torch
from fedmpi.model import BrainAgeCNN
from fedmpi.training import local_train, warm_up
model = BrainAgeCNN({TINY!r}, width=0.125)
warm_up(model, {TINY!r}, 2, torch.device("cpu"))
batch = [(torch.zeros(2, 1, *{TINY!r}), torch.full((2,), 60.0))]
local_train(model, batch, epochs=1, lr=1e-3, momentum=0.9, weight_decay=1e-4)
print("torch._dynamo" in sys.modules)
"""
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "False"
