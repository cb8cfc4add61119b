import pytest
import torch
from torch import nn

from tendiff.tt import (TTConv2d, channel_modes, count_parameters, dense_param_count, full_ranks, set_mode,
                        tensorize, tt_param_count)
from tendiff.unet import UNet, UNetConfig, preset, unet_from_dense


def rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("layout", ["tt", "ttm", "authors"])
@pytest.mark.parametrize("rank", [1, 2, 3, 4, 7])
@pytest.mark.parametrize("stride,padding,kernel", [(1, 1, 3), (2, 1, 3), (1, 0, 3), (2, 2, 5), (3, 1, (3, 5))])
@pytest.mark.parametrize("batch", [1, 3])  # (batch 1 takes plain matrix products in the chain)
@pytest.mark.parametrize("extra_bias", [False, True])
def test_execution_modes_agree(layout, rank, stride, padding, kernel, batch, extra_bias):
    layer = TTConv2d(12, 20, kernel, stride, padding, rank=rank, layout=layout).double()
    x = torch.randn(batch, 12, 17, 19, dtype=torch.double)
    extra = torch.randn(20, dtype=torch.double) if extra_bias else None
    outs = {}
    for mode in ("rebuild", "chain", "cached", "auto"):
        layer.mode = mode
        with torch.no_grad():
            outs[mode] = layer(x, extra_bias=extra)
    bias = layer.bias if extra is None else layer.bias + extra
    ref = nn.functional.conv2d(x, layer.full_kernel(), bias, stride, padding)
    for mode, y in outs.items():
        assert y.shape == ref.shape
        assert rel_err(y, ref) < 1e-5, mode


@pytest.mark.parametrize("layout", ["tt", "ttm"])
@pytest.mark.parametrize("mode", ["chain", "auto"])
@pytest.mark.parametrize("batch", [1, 2])
def test_factorized_modes_backpropagate_like_rebuild(layout, mode, batch):
    layer = TTConv2d(8, 8, 3, 1, 1, rank=2, layout=layout).double()
    x = torch.randn(batch, 8, 9, 9, dtype=torch.double, requires_grad=True)
    extra = torch.randn(8, dtype=torch.double, requires_grad=True)  # (a time bias, added by the product)
    grads = {}
    for m in ("rebuild", mode):
        layer.zero_grad()
        x.grad = extra.grad = None
        layer.mode = m
        layer(x, extra_bias=extra).square().sum().backward()
        grads[m] = [p.grad.clone() for p in layer.parameters()] + [x.grad.clone(), extra.grad.clone()]
    for a, b in zip(grads["rebuild"], grads[mode]):
        assert rel_err(b, a) < 1e-10


def test_auto_mode_takes_the_chain_where_it_saves_arithmetic():
    layer = TTConv2d(48, 48, 3, 1, 1, rank=2)
    with torch.no_grad():
        assert layer.resolve_mode(torch.zeros(1, 48, 28, 28)) == "chain"
    full_rank = TTConv2d(8, 8, 3, 1, 1, rank=full_ranks(8, 8, 3, "tt"))
    with torch.no_grad():
        assert full_rank.resolve_mode(torch.zeros(1, 8, 28, 28)) == "cached"


@pytest.mark.parametrize("mode", ["cached", "chain"])
def test_cached_kernels_follow_weight_updates(mode):
    layer = TTConv2d(8, 8, 3, 1, 1, rank=2, mode=mode)
    x = torch.randn(1, 8, 6, 6)
    with torch.no_grad():
        before = layer(x)
        layer.cores[0].mul_(2.0)  # an in-place update, as an optimizer or load_state_dict does
        after = layer(x)
        expected = nn.functional.conv2d(x, layer.full_kernel(), layer.bias, 1, 1)
        layer.bias.add_(1.0)  # (the chain caches the bias with the output core)
        after_bias = layer(x)
        expected_bias = nn.functional.conv2d(x, layer.full_kernel(), layer.bias, 1, 1)
    assert not torch.allclose(before, after)
    assert rel_err(after, expected) < 1e-6
    assert rel_err(after_bias, expected_bias) < 1e-6


def test_layers_built_in_inference_mode_run_in_every_mode():
    with torch.inference_mode():
        layer = TTConv2d.from_conv(nn.Conv2d(8, 8, 3, padding=1), 2)
        x = torch.randn(1, 8, 6, 6)
        outs = []
        for mode in ("rebuild", "chain", "chain", "cached", "cached"):
            layer.mode = mode
            outs.append(layer(x))
    assert all(rel_err(o, outs[0]) < 1e-5 for o in outs)


def test_cached_mode_trains_through_rebuild():
    layer = TTConv2d(8, 8, 3, 1, 1, rank=2, mode="cached")
    layer(torch.randn(1, 8, 5, 5)).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in layer.cores)


@pytest.mark.parametrize("layout", ["tt", "ttm", "authors"])
@pytest.mark.parametrize("stride,padding", [(1, 1), (2, 1)])
def test_tt_svd_at_full_rank_reproduces_dense_conv(layout, stride, padding):
    conv = nn.Conv2d(6, 10, 3, stride, padding).double()
    tt = TTConv2d.from_conv(conv, "full", layout)
    assert tt.ranks == full_ranks(6, 10, 3, layout)
    x = torch.randn(2, 6, 11, 11, dtype=torch.double)
    for mode in ("rebuild", "chain"):
        tt.mode = mode
        with torch.no_grad():
            assert rel_err(tt(x), conv(x)) < 1e-10


def test_tt_svd_error_shrinks_with_rank():
    conv = nn.Conv2d(16, 16, 3, 1, 1)
    errors = [rel_err(TTConv2d.from_conv(conv, r).full_kernel(), conv.weight.detach()) for r in (1, 2, 4, 8, 16)]
    assert all(a >= b - 1e-6 for a, b in zip(errors, errors[1:]))
    assert errors[0] > 0.3  # a random kernel is far from rank 1


@pytest.mark.parametrize("layout", ["tt", "ttm", "authors"])
@pytest.mark.parametrize("rank", [1, 2, 3, 4, (2, 3, 5)])
def test_parameter_count_matches_formula(layout, rank):
    if layout != "tt" and isinstance(rank, tuple):
        rank = (2, 3)
    layer = TTConv2d(32, 64, 3, rank=rank, layout=layout)
    n = count_parameters(layer)
    assert n == tt_param_count(32, 64, 3, rank, layout)
    if layout == "tt" and isinstance(rank, int):
        assert n == 32 * rank + 3 * rank * rank * 2 + rank * 64 + 64  # O(N R^2)
    if layout == "authors" and isinstance(rank, int):
        assert n == 64 * 32 * rank + rank * 3 * rank + rank * 3 + 64  # O(N^2 R)
    if layout == "ttm" and isinstance(rank, int):
        # 32 = 8 x 4 in, 64 = 8 x 8 out: cores (9, R), (R, 8, 8, R), (R, 4, 8)
        assert n == 9 * rank + rank * 8 * 8 * rank + rank * 4 * 8 + 64  # O(N R^2)
    assert dense_param_count(32, 64, 3) == count_parameters(nn.Conv2d(32, 64, 3))


@pytest.mark.parametrize("channels,modes", [(48, (8, 6)), (64, (8, 8)), (32, (8, 4)), (3, (3, 1)), (12, (4, 3))])
def test_ttm_channel_modes_are_the_most_balanced_factor_pair(channels, modes):
    assert channel_modes(channels) == modes


def test_ttm_kernel_is_a_sum_of_kronecker_products():
    # 12 = 4 x 3 channels each side; at rank (1, 1) each spatial tap's channel matrix is k * (A kron B).
    layer = TTConv2d(12, 12, 3, rank=1, layout="ttm").double()
    k, g1, g2 = layer.cores
    w = layer.full_kernel()
    kron = torch.kron(g1[0, :, :, 0].t(), g2[0].t())  # (O, I): (s1 s2, c1 c2)
    for tap in range(9):
        assert torch.allclose(w[:, :, tap // 3, tap % 3], k[tap, 0] * kron)
    assert torch.linalg.matrix_rank(kron) == 12  # full rank, unlike a rank-1 tt layer


def test_ttm_beats_tt_on_channel_mixing_at_equal_rank():
    # A kernel whose every tap mixes channels by a full-rank Kronecker product: ttm holds it at
    # rank 1; tt at rank 4 cannot (its output lies in a 4-dim channel subspace).
    a, b = torch.randn(8, 8, dtype=torch.double), torch.randn(6, 6, dtype=torch.double)
    spatial = torch.randn(3, 3, dtype=torch.double)
    conv = nn.Conv2d(48, 48, 3, padding=1).double()
    with torch.no_grad():
        conv.weight.copy_(torch.kron(a, b)[:, :, None, None] * spatial)
    ttm_err = rel_err(TTConv2d.from_conv(conv, 1, "ttm").full_kernel(), conv.weight.detach())
    tt_err = rel_err(TTConv2d.from_conv(conv, 4, "tt").full_kernel(), conv.weight.detach())
    assert ttm_err < 1e-10 and tt_err > 0.5


def test_tt_init_matches_dense_init_scale():
    layer = TTConv2d(64, 64, 3, rank=4)
    dense = nn.Conv2d(64, 64, 3)
    ratio = layer.full_kernel().std() / dense.weight.std()
    assert 0.5 < ratio.item() < 2.0


def test_invalid_arguments_are_refused():
    with pytest.raises(ValueError):
        TTConv2d(8, 8, 3, rank=0)
    with pytest.raises(ValueError):
        TTConv2d(8, 8, 3, layout="cp")
    with pytest.raises(ValueError):
        TTConv2d(8, 8, 3, mode="fast")
    with pytest.raises(ValueError):
        TTConv2d.from_conv(nn.Conv2d(8, 8, 3, groups=2), 2)


def test_tensorize_replaces_only_eligible_convs():
    model = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1),
                          nn.Conv2d(16, 16, 1))
    x = torch.randn(2, 1, 8, 8)
    ref = model(x)
    tensorize(model, "full")
    kinds = [type(m).__name__ for m in model]
    assert kinds == ["Conv2d", "ReLU", "TTConv2d", "Conv2d"]
    assert rel_err(model(x), ref) < 1e-4


@pytest.mark.parametrize("dataset", ["mnist", "cifar10"])
def test_unet_shapes_and_tt_parameter_counts(dataset):
    cfg = preset(dataset)
    x = torch.randn(2, cfg.in_channels, cfg.image_size, cfg.image_size)
    t = torch.tensor([1, 400])
    dense = UNet(cfg)
    assert dense(x, t).shape == x.shape
    counts = [UNet(preset(dataset, "tt", r)).num_parameters() for r in (1, 2, 3, 4)]
    assert counts == sorted(counts) and counts[-1] < dense.num_parameters() / 10
    assert UNet(preset(dataset, "authors", 3)).num_parameters() > counts[-1]


def test_unet_from_dense_matches_dense_at_full_rank_and_loads_into_config_model():
    dense = UNet(preset("mnist", channels=(8, 16))).eval()
    for p in dense.parameters():  # the head starts at zero; make the output informative
        nn.init.normal_(p, std=0.05)
    x, t = torch.randn(2, 1, 28, 28), torch.tensor([3, 300])
    tt = unet_from_dense(dense, 48, "tt").eval()  # 48 >= every full bond rank here
    with torch.no_grad():
        assert rel_err(tt(x, t), dense(x, t)) < 1e-4
    low = unet_from_dense(dense, 2, "tt")
    fresh = UNet(low.config)
    fresh.load_state_dict(low.state_dict())  # same structure as a TT U-Net built from its config
    set_mode(fresh, "chain")
    with torch.no_grad():
        assert rel_err(fresh.eval()(x, t), low.eval()(x, t)) < 1e-5


def test_conditional_unet_takes_labels_and_null_label():
    model = UNet(preset("mnist", num_classes=10, channels=(8, 16)))
    x, t = torch.randn(2, 1, 28, 28), torch.tensor([5, 5])
    assert model(x, t, torch.tensor([1, 10])).shape == x.shape
    with pytest.raises(ValueError):
        UNet(preset("mnist", channels=(8, 16)))(x, t, torch.tensor([1, 2]))


@pytest.mark.parametrize("conv", ["dense", "tt", "authors"])
def test_shared_timestep_fast_path_matches_per_image_timesteps(conv):
    """A batch sharing one t folds the time offset into a conv bias and runs activations in
    place; it must compute what the general per-image path computes."""
    model = UNet(preset("mnist", conv, 2)).double().eval()
    for p in model.parameters():  # the zero-initialised head would hide any difference
        torch.nn.init.normal_(p, std=0.1)
    x = torch.randn(3, 1, 28, 28, dtype=torch.double)
    with torch.no_grad():
        shared = model(x, torch.tensor([100, 100, 100]))
        mixed = model(x, torch.tensor([100, 100, 7]))
        scalar = model(x, torch.tensor(100))
    assert rel_err(mixed[:2], shared[:2]) < 1e-10 and rel_err(scalar, shared) < 1e-12
    assert rel_err(mixed[2:], shared[2:]) > 1e-6  # the third image did get its own timestep
    # Training (gradients) takes the out-of-place path and gives the same values.
    assert rel_err(model(x, torch.tensor([100, 100, 7])), mixed) < 1e-12


def test_time_offsets_cached_per_timestep_follow_weight_updates():
    """In inference mode the time path is cached per timestep; the cache must give what the
    uncached path gives, keep timesteps apart, and notice an in-place weight update."""
    model = UNet(preset("mnist", "tt", 2)).double().eval()
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.1)
    x = torch.randn(2, 1, 28, 28, dtype=torch.double)
    with torch.inference_mode():
        first, again, other_t = model(x, torch.tensor(100)), model(x, torch.tensor(100)), model(x, torch.tensor(50))
    with torch.no_grad():
        uncached = model(x, torch.tensor([100, 100]))
    assert rel_err(first, uncached) < 1e-12 and torch.equal(first, again)
    assert rel_err(other_t, first) > 1e-6
    with torch.no_grad():
        bias = model.blocks()[0].time_proj.bias
        bias.add_(torch.randn_like(bias))  # in place, as an optimizer step would (not a constant: GroupNorm removes it)
        uncached = model(x, torch.tensor([100, 100]))
    with torch.inference_mode():
        updated = model(x, torch.tensor(100))
    assert rel_err(updated, uncached) < 1e-12 and rel_err(updated, first) > 1e-6


def test_configs_saved_with_one_block_per_level_still_load():
    d = preset("mnist").to_dict() | {"blocks": 1}
    assert UNetConfig.from_dict(d) == preset("mnist")
    with pytest.raises(ValueError, match="no longer supported"):
        UNetConfig.from_dict(d | {"blocks": 2})


def test_resampling_matches_the_reference_ops():
    from tendiff.unet import downsample, upsample
    x = torch.randn(3, 5, 8, 12, requires_grad=True)
    assert torch.allclose(downsample(x), nn.functional.avg_pool2d(x, 2), atol=1e-6)
    assert torch.equal(upsample(x), nn.functional.interpolate(x, scale_factor=2.0, mode="nearest"))
    downsample(x).sum().backward()
    assert torch.allclose(x.grad, torch.full_like(x, 0.25))


@pytest.mark.parametrize("batch", [1, 8])  # (1: the matrix-product branch; 8: a 1-channel stem's fast path)
@pytest.mark.parametrize("cin, cout, k", [(1, 48, 3), (3, 48, 3), (48, 1, 3), (48, 3, 3), (1, 4, 5), (6, 2, 5)])
def test_few_channel_conv_matches_conv2d(cin, cout, k, batch):
    from tendiff.unet import few_channel_conv
    conv = nn.Conv2d(cin, cout, k, 1, k // 2).double()
    x = torch.randn(batch, cin, 9, 11, dtype=torch.double, requires_grad=True)
    assert rel_err(few_channel_conv(conv, x), conv(x)) < 1e-12
    few_channel_conv(conv, x).square().sum().backward()
    grad = x.grad.clone()
    x.grad = None
    conv(x).square().sum().backward()
    assert rel_err(grad, x.grad) < 1e-12


@pytest.mark.parametrize("conv", ["dense", "tt"])
def test_channels_last_computes_the_same(conv):
    model = UNet(preset("mnist", conv, 2)).eval()
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.1)
    x = torch.randn(4, 1, 28, 28)
    with torch.no_grad():
        ref = model(x, torch.tensor(50))
        out = model.use_channels_last()(x, torch.tensor(50))
    assert rel_err(out, ref) < 1e-5


@pytest.mark.parametrize("stride", [1, 2])
def test_chain_on_channels_last_input_matches(stride):
    layer = TTConv2d(12, 20, 3, stride, 1, rank=(2, 3, 4), mode="chain").double()
    x = torch.randn(3, 12, 10, 10, dtype=torch.double)
    ref = nn.functional.conv2d(x, layer.full_kernel(), layer.bias, stride, 1)
    xc = x.contiguous(memory_format=torch.channels_last).requires_grad_()
    out = layer(xc)
    assert rel_err(out, ref) < 1e-10
    out.sum().backward()
    assert xc.grad is not None and all(p.grad is not None for p in layer.parameters())


@pytest.mark.parametrize("mode", ["chain", "cached", "auto"])
def test_input_gradients_through_frozen_layers_after_inference_calls(mode):
    """An attack differentiates w.r.t. the input through frozen weights after the app has run
    the same layer under inference mode (which fills the kernel caches with inference tensors)."""
    layer = TTConv2d(8, 8, 3, 1, 1, rank=2, mode=mode).requires_grad_(False)
    x = torch.randn(2, 8, 6, 6)
    with torch.inference_mode():
        ref = layer(x)
    x = x.clone().requires_grad_()
    out = layer(x)
    out.square().sum().backward()
    assert torch.allclose(out, ref, atol=1e-6) and x.grad is not None and x.grad.abs().sum() > 0


@pytest.mark.parametrize("rank", [1, 2, 4, (2, 3, 5)])
def test_chain_weights_reproduce_the_layer(rank):
    """The chain's three operators, applied by hand: input projection, spatial conv (whose extra
    output channel is all ones), output projection carrying the bias in its last column."""
    layer = TTConv2d(12, 20, 3, 1, 1, rank=rank).double()
    x = torch.randn(3, 12, 9, 11, dtype=torch.double)
    with torch.no_grad():
        u_in_t, kernel, ones_bias, w = layer.chain_weights()
        z = nn.functional.conv2d(torch.einsum("ri,nihw->nrhw", u_in_t, x), kernel, ones_bias, 1, 1)
        assert z.shape == (3, layer.ranks[2] + 1, 9, 11) and w.shape == (20, layer.ranks[2] + 1)
        assert torch.equal(z[:, -1], torch.ones_like(z[:, -1]))  # the channel of ones carries the bias
        assert torch.equal(w[:, -1], layer.bias)
        ref = nn.functional.conv2d(x, layer.full_kernel(), layer.bias, 1, 1)
        assert rel_err(torch.einsum("or,nrhw->nohw", w, z), ref) < 1e-12
