import hashlib
import json

import h5py
import numpy as np
import pytest
import torch

from tme_pipeline.segment.net import StarDistConfig, StarDistNet
from tme_pipeline.segment.weights import StarDistModel, Thresholds, load_model, save_model

SMALL = StarDistConfig(n_rays=8, unet_n_depth=2, unet_n_filter_base=4, net_conv_after_unet=8, pixel_um=0.5)


def _net(cfg=SMALL, seed=0):
    torch.manual_seed(seed)
    return StarDistNet(cfg).eval()


def _outputs(net, seed=1):
    x = torch.rand(1, 1, 64, 48, generator=torch.Generator().manual_seed(seed))
    with torch.inference_mode():
        return net(x)


def _keras_folder(folder, net, *, unnamed_prefix="conv2d", full_model=False, keras_config=None):
    """Write `net` as an official StarDist folder: Keras 2 HDF5 layout, layers in model order."""
    folder.mkdir(parents=True, exist_ok=True)
    cfg = net.config
    doc = {"n_dim": 2, "axes": "YXC", "n_channel_in": 1, "n_rays": cfg.n_rays, "grid": list(cfg.grid),
           "backbone": "unet", "n_classes": None, "unet_n_depth": cfg.unet_n_depth,
           "unet_kernel_size": list(cfg.unet_kernel_size), "unet_n_filter_base": cfg.unet_n_filter_base,
           "unet_n_conv_per_depth": cfg.unet_n_conv_per_depth, "unet_pool": [2, 2], "unet_activation": "relu",
           "unet_last_activation": "relu", "unet_batch_norm": False, "unet_expansion": 2, "unet_prefix": "",
           "net_conv_after_unet": cfg.net_conv_after_unet, "train_patch_size": [256, 256]}
    doc.update(keras_config or {})
    (folder / "config.json").write_text(json.dumps(doc))
    (folder / "thresholds.json").write_text(json.dumps({"prob": 0.45, "nms": 0.3}))
    with h5py.File(folder / "weights_best.h5", "w") as f:
        root = f.create_group("model_weights") if full_model else f
        names = ["input"]
        for i, (name, conv) in enumerate(net.layers.items()):
            kname = f"{unnamed_prefix}_{i}" if name.startswith("grid_") else name
            g = root.create_group(kname)
            kernel = conv.weight.detach().numpy().transpose(2, 3, 1, 0)
            g.attrs["weight_names"] = [f"{kname}/kernel:0".encode(), f"{kname}/bias:0".encode()]
            g.create_dataset(f"{kname}/kernel:0", data=kernel)
            g.create_dataset(f"{kname}/bias:0", data=conv.bias.detach().numpy())
            names.append(kname)
            if name.startswith("down_level_") and name.endswith(f"_no_{cfg.unet_n_conv_per_depth - 1}"):
                root.create_group(f"max_{name.split('_')[2]}").attrs["weight_names"] = []
                names.append(f"max_{name.split('_')[2]}")
        root.create_group("input").attrs["weight_names"] = []
        root.attrs["layer_names"] = [n.encode() for n in names]
    return folder


@pytest.mark.parametrize("fmt", ["pt", "safetensors"])
def test_round_trip(tmp_path, fmt):
    if fmt == "safetensors":
        pytest.importorskip("safetensors")
    net = _net()
    weights = save_model(tmp_path / "m", net, SMALL, {"prob": 0.6, "nms": 0.3}, weights_format=fmt)
    model = load_model(tmp_path / "m")
    assert isinstance(model, StarDistModel)
    assert model.config == SMALL
    assert model.thresholds == Thresholds(prob=0.6, nms=0.3)
    assert model.sha256 == hashlib.sha256(weights.read_bytes()).hexdigest()
    assert model.path == tmp_path / "m"
    assert not model.net.training
    for a, b in zip(_outputs(net), _outputs(model.net)):
        assert torch.equal(a, b)
    # A weights file path works as well as its folder.
    assert load_model(weights).sha256 == model.sha256


def test_pixel_size_override(tmp_path):
    save_model(tmp_path / "m", _net(), SMALL, Thresholds(0.5, 0.4))
    assert load_model(tmp_path / "m", pixel_um=0.25).config.pixel_um == 0.25


def test_missing_folder_config_and_weights(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        load_model(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        load_model(tmp_path / "empty")
    save_model(tmp_path / "m", _net(), SMALL, Thresholds(0.5, 0.4))
    (tmp_path / "m" / "weights.pt").unlink()
    with pytest.raises(FileNotFoundError, match=r"has no weights file.*weights\.pt"):
        load_model(tmp_path / "m")


class _Payload:
    pass


def test_pickled_pt_refused(tmp_path):
    save_model(tmp_path / "m", _net(), SMALL, Thresholds(0.5, 0.4))
    torch.save({"layers.prob.weight": _Payload()}, tmp_path / "m" / "weights.pt")
    with pytest.raises(ValueError, match=r"weights\.pt: .*pickled Python objects"):
        load_model(tmp_path / "m")


def test_non_state_dict_pt_refused(tmp_path):
    save_model(tmp_path / "m", _net(), SMALL, Thresholds(0.5, 0.4))
    torch.save(torch.zeros(3), tmp_path / "m" / "weights.pt")
    with pytest.raises(ValueError, match="expected a dict of tensors"):
        load_model(tmp_path / "m")


def test_wrong_shape_names_tensor(tmp_path):
    save_model(tmp_path / "m", _net(), SMALL, Thresholds(0.5, 0.4))
    other = StarDistConfig(**{**SMALL.to_dict(), "n_rays": 16})
    (tmp_path / "m" / "config.json").write_text(json.dumps({"format": "tme_pipeline.stardist", "version": 1,
                                                             "config": other.to_dict()}))
    with pytest.raises(ValueError, match=r"'layers\.dist\.weight' has shape \(8, 8, 1, 1\), expected \(16, 8, 1, 1\)"):
        load_model(tmp_path / "m")


def test_missing_tensor_named(tmp_path):
    save_model(tmp_path / "m", _net(), SMALL, Thresholds(0.5, 0.4))
    state = torch.load(tmp_path / "m" / "weights.pt", weights_only=True)
    del state["layers.features.bias"]
    torch.save(state, tmp_path / "m" / "weights.pt")
    with pytest.raises(ValueError, match=r"missing \['layers\.features\.bias'\]"):
        load_model(tmp_path / "m")


def test_unsupported_config_in_folder(tmp_path):
    save_model(tmp_path / "m", _net(), SMALL, Thresholds(0.5, 0.4))
    doc = json.loads((tmp_path / "m" / "config.json").read_text())
    doc["config"]["n_channel_in"] = 2
    (tmp_path / "m" / "config.json").write_text(json.dumps(doc))
    with pytest.raises(ValueError, match=r"config\.json: unsupported StarDist config: only n_channel_in=1"):
        load_model(tmp_path / "m")


def test_bad_thresholds(tmp_path):
    save_model(tmp_path / "m", _net(), SMALL, Thresholds(0.5, 0.4))
    (tmp_path / "m" / "thresholds.json").write_text('{"prob": 0.5}')
    with pytest.raises(ValueError, match=r"thresholds\.json"):
        load_model(tmp_path / "m")


@pytest.mark.parametrize("full_model", [False, True])
def test_keras_folder_maps_layer_by_layer(tmp_path, full_model):
    net = _net(StarDistConfig(n_rays=8, unet_n_depth=2, unet_n_filter_base=4, net_conv_after_unet=8, grid=(4, 2)))
    folder = _keras_folder(tmp_path / "k", net, full_model=full_model)
    model = load_model(folder)
    assert model.config.grid == (4, 2) and model.config.pixel_um is None
    assert model.thresholds == Thresholds(prob=0.45, nms=0.3)
    assert model.sha256 == hashlib.sha256((folder / "weights_best.h5").read_bytes()).hexdigest()
    for a, b in zip(_outputs(net), _outputs(model.net)):
        assert torch.equal(a, b)


@pytest.mark.parametrize("change, message", [
    ({"n_dim": 3}, "only 2-D StarDist models"),
    ({"n_channel_in": 3}, "only n_channel_in=1"),
    ({"unet_batch_norm": True}, "unsupported unet_batch_norm"),
    ({"n_classes": 2}, "multi-class"),
    ({"backbone": "resnet"}, "unsupported backbone"),
])
def test_keras_unsupported_config(tmp_path, change, message):
    folder = _keras_folder(tmp_path / "k", _net(), keras_config=change)
    with pytest.raises(ValueError, match=f"config.json: .*{message}"):
        load_model(folder)


def test_keras_wrong_kernel_shape(tmp_path):
    folder = _keras_folder(tmp_path / "k", _net(), keras_config={"n_rays": 16})
    with pytest.raises(ValueError, match=r"weights_best\.h5: layer 'dist' kernel has Keras shape \(1, 1, 8, 8\), "
                                         r"expected \(1, 1, 8, 16\)"):
        load_model(folder)


def test_keras_not_hdf5(tmp_path):
    folder = _keras_folder(tmp_path / "k", _net())
    (folder / "weights_best.h5").write_bytes(b"not hdf5")
    with pytest.raises(ValueError, match=r"weights_best\.h5: not an HDF5 file"):
        load_model(folder)


def test_cached_model_loads_a_folder_once_per_process(tmp_path, monkeypatch):
    import pickle

    from tme_pipeline.segment import weights as weights_module
    from tme_pipeline.segment.predict import make_tile_segmenter

    save_model(tmp_path / "m", _net(), SMALL, Thresholds(0.5, 0.4))
    reads = []
    read = weights_module._read_torch_state
    monkeypatch.setattr(weights_module, "_read_torch_state", lambda f: reads.append(f) or read(f))
    blob = pickle.dumps(make_tile_segmenter(tmp_path / "m", pixel_um=0.5, norm=(0.0, 1.0), device="cpu"))
    # Two tile tasks of one worker process, each unpickling its own segmenter.
    first, second = pickle.loads(blob), pickle.loads(blob)
    assert first.model() is second.model()
    assert weights_module.cached_model(tmp_path / "m") is first.model()
    assert len(reads) == 1
    # Another pixel size is another model; a rewritten weights file is read again.
    assert weights_module.cached_model(tmp_path / "m", pixel_um=0.25).config.pixel_um == 0.25
    save_model(tmp_path / "m", _net(seed=1), SMALL, Thresholds(0.5, 0.4))
    fresh = weights_module.cached_model(tmp_path / "m")
    assert fresh is not first.model() and fresh.sha256 != first.model().sha256
    assert len(reads) == 3


def test_cached_model_refuses_other_weights_than_pinned(tmp_path):
    from tme_pipeline.segment.weights import cached_model

    save_model(tmp_path / "m", _net(), SMALL, Thresholds(0.5, 0.4))
    with pytest.raises(ValueError, match=r"m: weights changed.*sha256"):
        cached_model(tmp_path / "m", sha256="0" * 64)
