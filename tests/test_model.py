import numpy as np
import pytest
import torch

from fedmpi.config import load_config
from fedmpi.model import (
    BrainAgeCNN,
    ConvBlock,
    auto_pools,
    build_model,
    flat_parameters,
    layer_sparsity,
    load_flat_parameters,
    max_pool2,
    parameter_count,
    parameter_layout,
)

TINY = (20, 24, 20)


def tiny_model(**kw):
    torch.manual_seed(0)
    return BrainAgeCNN(TINY, width=0.125, **kw)


@pytest.mark.parametrize("width", [0.01, 0.125, 0.3, 1.0])
def test_the_parameter_count_on_the_meta_device_is_the_models(width):
    model = BrainAgeCNN((16, 20, 16), width=width)
    assert parameter_count(width) == sum(p.numel() for p in model.parameters())


def test_parameter_count_at_full_size():
    model = BrainAgeCNN()
    assert sum(p.numel() for p in model.parameters()) == 2_948_801
    assert model.pools == 5 and model.head_grid == (2, 3, 2)


def test_auto_pools_keeps_head_grid_at_least_two():
    assert auto_pools((91, 109, 91)) == 5
    assert auto_pools((45, 54, 45)) == 4
    assert auto_pools((30, 36, 30)) == 3 and BrainAgeCNN((30, 36, 30), width=0.125).head_grid == (3, 4, 3)
    assert BrainAgeCNN((45, 54, 45), width=0.125).head_grid == (2, 3, 2)
    assert auto_pools(TINY) == 3
    assert auto_pools((2, 2, 2)) == 0
    # parameter count does not depend on the pooling choice
    assert sum(p.numel() for p in BrainAgeCNN((45, 54, 45)).parameters()) == 2_948_801


def test_auto_pools_never_exceeds_the_number_of_blocks():
    """A large grid could be halved more than five times, but only the five conv blocks can pool."""
    assert auto_pools((256, 256, 256)) == 5
    assert BrainAgeCNN((128, 128, 128), width=0.03125).head_grid == (4, 4, 4)


def test_only_first_pools_blocks_pool():
    model = BrainAgeCNN((45, 54, 45), width=0.125)
    has_pool = [any(isinstance(m, torch.nn.MaxPool3d) for m in block) for block in model.features]
    assert has_pool == [True, True, True, True, False]


@pytest.mark.parametrize("shape", [(2, 3, 8, 6, 4), (1, 2, 9, 7, 5), (3, 1, 2, 2, 2)])
def test_pairwise_pooling_gives_max_pool3d_values(shape):
    torch.manual_seed(0)
    for x in (torch.randn(shape), torch.randint(-2, 3, shape).float()):  # the second is full of ties
        assert torch.equal(max_pool2(x), torch.nn.functional.max_pool3d(x, 2))
        assert torch.equal(max_pool2(x.contiguous(memory_format=torch.channels_last_3d)), max_pool2(x))


def _block(pool: bool) -> ConvBlock:
    torch.manual_seed(0)
    layers = [torch.nn.Conv3d(2, 3, 3, padding=1), torch.nn.InstanceNorm3d(3, eps=1e-3)]
    return ConvBlock(*layers, *([torch.nn.MaxPool3d(2)] if pool else []), torch.nn.ReLU(inplace=True))


def _listed_order(block: ConvBlock, x: torch.Tensor) -> torch.Tensor:
    for layer in block:
        x = layer(x)
    return x


@pytest.mark.parametrize("pool", [True, False])
def test_block_training_runs_the_layers_as_listed_so_gradients_are_torchs(pool):
    block, x = _block(pool), torch.randn(2, 2, 9, 8, 7)
    block(x).square().sum().backward()
    grads = [p.grad.clone() for p in block.parameters()]
    block.zero_grad()
    _listed_order(block, x).square().sum().backward()
    assert all(torch.equal(g, p.grad) for g, p in zip(grads, block.parameters()))


@pytest.mark.parametrize("pool", [True, False])
def test_block_inference_reorders_to_the_same_values(pool):
    block = _block(pool)
    x = torch.randn(2, 2, 9, 8, 7) * 3 + 5  # a mean far from zero, as a convolution's output may have
    with torch.no_grad():
        reference = _listed_order(block, x)
        fast = block(x)
        assert fast.shape == reference.shape and (fast > 0).any() and (fast == 0).any()
        torch.testing.assert_close(fast, reference, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(block(x.contiguous(memory_format=torch.channels_last_3d)), reference)
        with torch.autocast("cpu", dtype=torch.bfloat16):  # a bf16 convolution: the layers as listed
            assert torch.equal(block(x), _listed_order(block, x))


def test_evaluation_matches_the_model_run_layer_by_layer():
    torch.manual_seed(0)
    model = BrainAgeCNN((21, 24, 19), width=0.125).eval()
    x = torch.randn(3, 1, 21, 24, 19)
    with torch.inference_mode():
        h = x
        for block in model.features:
            h = _listed_order(block, h)
        reference = model.output(model.head(h)).flatten()
        torch.testing.assert_close(model(x), reference, rtol=1e-6, atol=1e-4)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"input_shape": (1, 24, 20)},
        {"input_shape": TINY, "width": 0.0},
        {"input_shape": TINY, "width": -1.0},
        {"input_shape": (45, 54, 45), "pools": 5},
        {"input_shape": (20, 24)},
        {"input_shape": TINY, "pools": -1},
        {"input_shape": TINY, "dropout": 1.0},
        {"input_shape": TINY, "dropout": -0.1},
    ],
)
def test_rejects_impossible_configurations(kwargs):
    with pytest.raises(ValueError):
        BrainAgeCNN(**kwargs)


def test_glorot_init_is_glorot_uniform_with_zero_biases():
    model = tiny_model(init="glorot", mean_age=60.0)
    conv = model.features[1][0]
    fan_in, fan_out = conv.in_channels * 27, conv.out_channels * 27
    bound = (6.0 / (fan_in + fan_out)) ** 0.5
    w = conv.weight.detach()
    assert w.abs().max() <= bound and w.abs().max() > 0.8 * bound  # uniform on [-bound, bound]
    assert w.std().item() == pytest.approx(bound / 3**0.5, rel=0.15)
    biases = [m.bias for m in model.modules() if isinstance(m, torch.nn.Conv3d) and m is not model.output]
    assert all((b == 0).all() for b in biases)
    assert model.output.bias.item() == 60.0  # the output still starts at the mean age
    default = tiny_model()
    assert not (default.features[1][0].bias == 0).all()  # PyTorch's default init has non-zero biases
    with pytest.raises(ValueError, match="init"):
        tiny_model(init="he")


def test_norm_eps_reaches_instance_norm():
    model = tiny_model(norm_eps=1e-3)
    norms = [m for m in model.modules() if isinstance(m, torch.nn.InstanceNorm3d)]
    assert len(norms) == 6 and all(m.eps == 1e-3 for m in norms)


def test_forward_shape_and_initial_bias():
    model = tiny_model(mean_age=70.5)
    assert model.output.bias.item() == pytest.approx(70.5)
    out = model(torch.randn(3, 1, *TINY))
    assert out.shape == (3,)
    assert torch.isfinite(out).all()
    model.train()
    assert model(torch.randn(2, 1, *TINY)).shape == (2,)
    with pytest.raises(ValueError):
        model(torch.randn(2, 2, *TINY))


def test_dropout_reaches_the_head():
    assert tiny_model(dropout=0.3).head[-1].p == 0.3


def test_build_model_passes_every_model_option():
    """The configuration is the only way a run chooses its model: each option must reach the network, and
    model.pools = 0 means automatic, not "no pooling"."""
    sets = ["model.width=0.25", "model.dropout=0.3", "model.init=glorot", "model.norm_eps=0.001"]
    model = build_model(load_config(overrides=sets), (45, 54, 45), mean_age=55.0)
    assert model.pools == 4 and model.head_grid == (2, 3, 2)
    assert model.features[0][0].out_channels == 8 and model.head[0].out_channels == 16
    assert model.head[-1].p == 0.3
    assert all(m.eps == 1e-3 for m in model.modules() if isinstance(m, torch.nn.InstanceNorm3d))
    assert all((m.bias == 0).all() for m in model.modules() if isinstance(m, torch.nn.Conv3d) and m is not model.output)
    assert model.output.bias.item() == 55.0
    assert build_model(load_config(overrides=["model.pools=2"]), (45, 54, 45)).pools == 2


def test_width_rounds_channels_to_the_nearest_integer():
    """32 x 0.3 = 9.6 channels is 10, not 9: the parameter count of a width (and so which checkpoints fit it)
    must not depend on truncation."""
    model = BrainAgeCNN(TINY, width=0.3)
    assert [block[0].out_channels for block in model.features] == [10, 19, 38, 77, 77]
    assert model.head[0].out_channels == 19


def test_width_scales_channels_with_minimum_one():
    model = BrainAgeCNN(TINY, width=0.01)
    assert model.features[0][0].out_channels == 1
    assert model.head[0].out_channels == 1


def test_layout_is_contiguous_and_matches_named_parameters():
    model = tiny_model()
    layout = parameter_layout(model)
    names = [n for n, _ in model.named_parameters()]
    assert [entry[0] for entry in layout] == names
    offset = 0
    for (_name, off, size, shape), p in zip(layout, model.parameters()):
        assert off == offset and size == p.numel() and shape == tuple(p.shape)
        offset += size
    assert offset == flat_parameters(model).size


def test_flat_round_trip():
    model = tiny_model()
    vec = flat_parameters(model)
    assert vec.dtype == np.float32 and vec.ndim == 1
    other = BrainAgeCNN(TINY, width=0.125)
    assert not np.array_equal(flat_parameters(other), vec)
    load_flat_parameters(other, vec)
    np.testing.assert_array_equal(flat_parameters(other), vec)
    x = torch.randn(2, 1, *TINY)
    model.eval(), other.eval()
    torch.testing.assert_close(model(x), other(x))
    # flat_parameters is a copy, not a view
    vec[:] = 0
    assert np.any(flat_parameters(model) != 0)


def test_load_rejects_wrong_length():
    model = tiny_model()
    with pytest.raises(ValueError, match="model needs"):
        load_flat_parameters(model, np.zeros(10, np.float32))


def test_load_rejects_a_column_of_the_right_length():
    """A (N, 1) array holds N values, but it is not the wire's flat vector: it is refused, not reshaped."""
    model = tiny_model()
    with pytest.raises(ValueError, match="model needs"):
        load_flat_parameters(model, flat_parameters(model)[:, None])


def test_layer_sparsity_counts_exact_zeros():
    model = tiny_model()
    vec = flat_parameters(model)
    name, off, size, _ = parameter_layout(model)[2]
    vec[off : off + size // 2] = 0.0
    load_flat_parameters(model, vec)
    sparsity = layer_sparsity(model)
    assert sparsity[name] == pytest.approx((size // 2) / size)
    assert sparsity["output.bias"] == 0.0
