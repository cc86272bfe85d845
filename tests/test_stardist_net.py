import numpy as np
import pytest
import torch

from tme_pipeline.segment.net import StarDistConfig, StarDistNet

# Parameter counts of the official Keras model, read from
# `StarDist2D(Config2D(grid=...)).keras_model.count_params()` (stardist 0.9.2).
OFFICIAL_N_PARAMS = {(2, 2): 1_425_185, (1, 1): 1_406_689}


@pytest.mark.parametrize("grid", [(2, 2), (1, 1)])
def test_parameter_count_equals_official(grid):
    net = StarDistNet(StarDistConfig(grid=grid))
    assert sum(p.numel() for p in net.parameters()) == OFFICIAL_N_PARAMS[grid]


@pytest.mark.parametrize("grid", [(1, 1), (2, 2), (4, 2)])
def test_output_shapes_and_ranges(grid):
    cfg = StarDistConfig(grid=grid, n_rays=16, unet_n_depth=2, unet_n_filter_base=8, net_conv_after_unet=16)
    torch.manual_seed(0)
    net = StarDistNet(cfg).eval()
    h, w = 2 * cfg.div_by[0], 3 * cfg.div_by[1]
    with torch.inference_mode():
        prob, dist = net(torch.rand(2, 1, h, w))
    assert prob.shape == (2, 1, h // grid[0], w // grid[1])
    assert dist.shape == (2, 16, h // grid[0], w // grid[1])
    assert prob.min() >= 0 and prob.max() <= 1


def test_default_config_is_stardist_default_with_versatile_grid():
    cfg = StarDistConfig()
    assert (cfg.n_rays, cfg.grid, cfg.unet_n_depth, cfg.unet_n_filter_base, cfg.net_conv_after_unet) == (
        32, (2, 2), 3, 32, 128)
    assert cfg.div_by == (16, 16)


def test_receptive_radius_bounds_the_influence():
    cfg = StarDistConfig(n_rays=8, unet_n_depth=2, unet_n_filter_base=4, net_conv_after_unet=8)
    torch.manual_seed(1)
    net = StarDistNet(cfg).eval()
    r = cfg.receptive_radius_px
    size = 2 * (r + 32) // cfg.div_by[0] * cfg.div_by[0]
    x = torch.rand(1, 1, size, size)
    c = size // 2  # an output pixel at input px c, c
    far, near = x.clone(), x.clone()
    far[..., c + r + 1:, :] = 5.0
    far[..., :, c + r + 1:] = 5.0
    near[..., c + 2, c + 2] = 5.0
    with torch.inference_mode():
        out, out_far, out_near = (net(t)[1][0, :, c // 2, c // 2] for t in (x, far, near))
    assert torch.equal(out, out_far)
    assert not torch.equal(out, out_near)


@pytest.mark.parametrize("bad", [dict(n_channel_in=3), dict(grid=(3, 3)), dict(unet_kernel_size=(4, 4)),
                                 dict(norm_percentiles=(99, 1)), dict(pixel_um=0.0), dict(n_rays=2)])
def test_unsupported_config_refused(bad):
    with pytest.raises(ValueError, match="unsupported StarDist config"):
        StarDistConfig(**bad)


def test_config_dict_round_trip():
    cfg = StarDistConfig(pixel_um=0.5, grid=(2, 1))
    d = cfg.to_dict()
    assert d["grid"] == [2, 1]
    assert StarDistConfig.from_dict(d) == cfg
    with pytest.raises(ValueError, match="unknown StarDist config keys"):
        StarDistConfig.from_dict({**d, "n_dim": 2})


def test_state_dict_names_follow_keras_layers():
    names = {k.split(".")[1] for k in StarDistNet(StarDistConfig()).state_dict()}
    assert {"grid_0_no_0", "down_level_2_no_1", "middle_0", "middle_2", "up_level_0_no_2", "features", "prob",
            "dist"} <= names
    assert not np.any([n.startswith("middle_1") for n in names])


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="oneDNN's fused convolution")
def test_fused_cpu_inference_is_bit_identical_to_plain(monkeypatch):
    import tme_pipeline.segment.net as net_module

    torch.manual_seed(0)
    net = StarDistNet(StarDistConfig(unet_n_filter_base=8, net_conv_after_unet=16, n_rays=8)).eval()
    x = torch.rand(2, 1, 96, 112)
    calls = []
    fused = net_module._fused_conv_relu
    monkeypatch.setattr(net_module, "_fused_conv_relu", lambda conv, t: calls.append(1) or fused(conv, t))
    with torch.inference_mode():
        for layout in (torch.contiguous_format, torch.channels_last):
            net.to(memory_format=layout)
            got = net(x.contiguous(memory_format=layout))
            assert calls, "CPU inference in float32 takes the fused path"
            with monkeypatch.context() as m:
                m.setattr(net_module, "_fused_conv_relu", net_module._conv_relu)
                want = net(x.contiguous(memory_format=layout))
            assert all(torch.equal(g, w) for g, w in zip(got, want))
            calls.clear()


def test_training_takes_the_plain_path_with_gradients():
    torch.manual_seed(0)
    net = StarDistNet(StarDistConfig(unet_n_filter_base=8, net_conv_after_unet=16, n_rays=8))
    prob, dist = net(torch.rand(1, 1, 64, 64))
    (prob.mean() + dist.mean()).backward()
    assert all(p.grad is not None for p in net.parameters())
