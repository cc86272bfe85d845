"""Read official StarDist 2D Keras folders (config.json + HDF5 weights) without TensorFlow.

The HDF5 file is the one ``keras_model.save_weights`` writes (Keras 2 / tf-keras
layout): the root attribute ``layer_names`` lists the layers in model order,
each layer group has a ``weight_names`` attribute naming its kernel and bias.
A full-model file (weights under ``model_weights``) is read the same way.

StarDist names the U-Net layers (``down_level_0_no_0``, ``middle_0``,
``up_level_0_no_2``, ``features``, ``prob``, ``dist``); only the convolutions
that pool the input to the output grid are unnamed (``conv2d``,
``conv2d_1``, ...), and they come first in model order, so they map to our
``grid_*`` layers in that order.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .net import StarDistConfig

if TYPE_CHECKING:
    import torch

    from .net import StarDistNet

__all__ = ["config_from_keras", "read_keras_weights"]

# Official settings our network hard-codes; anything else is refused.
_FIXED = {
    "backbone": "unet",
    "unet_activation": "relu",
    "unet_last_activation": "relu",
    "unet_batch_norm": False,
    "unet_expansion": 2,
    "unet_prefix": "",
}


def config_from_keras(doc: dict) -> StarDistConfig:
    """Our config from an official StarDist ``config.json`` dict.

    Raises
    ------
    ValueError
        A 3-D model, multi-class model, another backbone, batch norm, other
        activations, pooling other than 2×2, or more than one input channel.
    """
    n_dim = doc.get("n_dim", 2)
    if n_dim != 2:
        raise ValueError(f"only 2-D StarDist models are supported, this one has n_dim={n_dim}")
    if doc.get("n_classes") not in (None, 0):
        raise ValueError(f"multi-class StarDist models are not supported (n_classes={doc['n_classes']})")
    for key, want in _FIXED.items():
        if key in doc and doc[key] != want:
            raise ValueError(f"unsupported {key}={doc[key]!r} (supported: {want!r})")
    if tuple(doc.get("unet_pool", (2, 2))) != (2, 2):
        raise ValueError(f"unsupported unet_pool={doc['unet_pool']!r} (supported: [2, 2])")
    axes = doc.get("axes", "YXC")
    if axes not in ("YXC", "CYX"):
        raise ValueError(f"unsupported axes={axes!r}")
    keys = ("n_rays", "grid", "n_channel_in", "unet_n_depth", "unet_n_filter_base", "unet_kernel_size",
            "unet_n_conv_per_depth", "net_conv_after_unet", "train_patch_size")
    missing = [k for k in keys[:2] if k not in doc]
    if missing:
        raise ValueError(f"not a StarDist config: missing {missing}")
    return StarDistConfig(**{k: doc[k] for k in keys if k in doc})


def read_keras_weights(weights: Path, net: "StarDistNet") -> dict[str, "torch.Tensor"]:
    """A state dict for ``net`` from a Keras HDF5 weights file.

    Conv kernels are stored (kh, kw, in, out) by Keras and become
    (out, in, kh, kw) for torch; biases are copied.

    Raises
    ------
    ValueError
        Not a Keras HDF5 weights file, or its layers do not match ``net``
        (which names the layer and the expected and found shapes).
    """
    import h5py
    import torch

    ours = [name[: -len(".weight")] for name in net.state_dict() if name.endswith(".weight")]
    ours = [n.removeprefix("layers.") for n in ours]
    grid_layers = [n for n in ours if n.startswith("grid_")]
    try:
        f = h5py.File(weights, "r")
    except OSError as e:
        raise ValueError(f"{weights}: not an HDF5 file ({e})") from e
    with f:
        root = f["model_weights"] if "model_weights" in f else f
        if "layer_names" not in root.attrs:
            raise ValueError(f"{weights}: not a Keras 2 HDF5 weights file (no 'layer_names' attribute)")
        kernels: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        unnamed = []
        for raw in root.attrs["layer_names"]:
            lname = raw.decode() if isinstance(raw, bytes) else str(raw)
            group = root[lname]
            wnames = [w.decode() if isinstance(w, bytes) else str(w) for w in group.attrs.get("weight_names", [])]
            if not wnames:
                continue  # input, pooling, up-sampling, concatenation
            arrays = {w.rsplit("/", 1)[-1].split(":")[0]: np.asarray(group[w]) for w in wnames}
            if set(arrays) != {"kernel", "bias"}:
                raise ValueError(f"{weights}: layer {lname!r} has weights {sorted(arrays)}, expected kernel and bias")
            if lname in ours:
                kernels[lname] = (arrays["kernel"], arrays["bias"])
            else:
                unnamed.append((lname, arrays["kernel"], arrays["bias"]))
    if len(unnamed) != len(grid_layers):
        raise ValueError(
            f"{weights}: expected {len(grid_layers)} unnamed grid convolutions before the U-Net, "
            f"found {len(unnamed)} ({[u[0] for u in unnamed]})"
        )
    for ours_name, (_, k, b) in zip(grid_layers, unnamed):
        kernels[ours_name] = (k, b)
    missing = [n for n in ours if n not in kernels]
    if missing:
        raise ValueError(f"{weights}: layers missing for this config: {missing}")
    expected = net.state_dict()
    state = {}
    for name, (k, b) in kernels.items():
        want = tuple(expected[f"layers.{name}.weight"].shape)
        if k.ndim != 4 or (k.shape[3], k.shape[2], k.shape[0], k.shape[1]) != want:
            raise ValueError(
                f"{weights}: layer {name!r} kernel has Keras shape {k.shape}, expected "
                f"{(want[2], want[3], want[1], want[0])} (kh, kw, in, out) for the config in config.json"
            )
        state[f"layers.{name}.weight"] = torch.from_numpy(np.ascontiguousarray(k.transpose(3, 2, 0, 1), np.float32))
        state[f"layers.{name}.bias"] = torch.from_numpy(np.asarray(b, np.float32))
    return state
