import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from fedmpi.model import BrainAgeCNN, flat_parameters, load_flat_parameters, parameter_layout
from fedmpi.training import (
    DeviceError,
    evaluate,
    local_train,
    masks_from_flat,
    per_sample_features,
    predict,
    select_device,
    snip_scores,
)

TINY = (20, 24, 20)


def blob_data(n, seed=0):
    """Learnable toy cohort: age is encoded as the size of a bright cube."""
    rng = np.random.default_rng(seed)
    k = rng.integers(1, 8, size=n)
    x = np.zeros((n, 1) + TINY, np.float32)
    c = [s // 2 for s in TINY]
    for i, ki in enumerate(k):
        x[i, 0, c[0] - ki:c[0] + ki, c[1] - ki:c[1] + ki, c[2] - ki:c[2] + ki] = 1.0
    x += 0.1 * rng.standard_normal(x.shape).astype(np.float32)
    return torch.from_numpy(x), torch.from_numpy((45 + 5 * k).astype(np.float32))


def make_loader(n=16, batch_size=4, shuffle=False, seed=0):
    x, y = blob_data(n, seed)
    gen = torch.Generator().manual_seed(seed)
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=shuffle, generator=gen)


def tiny_model(dropout=0.0, mean_age=62.68, seed=0):
    torch.manual_seed(seed)
    return BrainAgeCNN(TINY, width=0.125, dropout=dropout, mean_age=mean_age)


def test_select_device_on_cpu_machine():
    if torch.cuda.is_available():
        pytest.skip("this test describes a machine without a GPU")
    assert select_device("auto") == torch.device("cpu")
    assert select_device("auto", local_rank=3) == torch.device("cpu")
    assert select_device("cpu") == torch.device("cpu")
    with pytest.raises(DeviceError, match="no CUDA GPU"):
        select_device("cuda")
    with pytest.raises(ValueError):
        select_device("tpu")


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


def test_prox_term_pulls_towards_start():
    start = flat_parameters(tiny_model())
    distances = {}
    for mu in (0.0, 50.0):
        model = tiny_model()
        local_train(model, make_loader(), epochs=3, lr=1e-2, momentum=0.9, prox_mu=mu)
        distances[mu] = np.linalg.norm(flat_parameters(model) - start)
    assert distances[50.0] < 0.5 * distances[0.0]


def test_local_train_learns_blob_size():
    x, y = blob_data(32)
    model = tiny_model(mean_age=float(y.mean()))
    loader = make_loader(n=32, shuffle=True)
    before = evaluate(model, make_loader(n=32))
    first = local_train(model, loader, epochs=1, lr=3e-2, momentum=0.9)
    last = local_train(model, loader, epochs=8, lr=3e-2, momentum=0.9)
    after = evaluate(model, make_loader(n=32))
    assert last["steps"] == 64 and last["samples"] == 32
    assert last["loss"] < 0.7 * first["loss"]
    assert after["rmse"] < 0.7 * before["rmse"]
    assert after["n"] == 32


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
