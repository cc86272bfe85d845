"""Save and load StarDist models: our PyTorch folders and official Keras folders.

Our format is a folder::

    config.json        {"format": "tme_pipeline.stardist", "version": 1, "config": {...}}
    thresholds.json    {"prob": 0.5, "nms": 0.4}
    weights.pt         a state dict saved by ``torch.save``, read with ``weights_only=True``
      or weights.safetensors (needs the optional ``safetensors`` package)

An official StarDist folder (``config.json``, ``thresholds.json``,
``weights_best.h5``, as the ``2D_versatile_fluo`` zip unpacks) is read with
h5py, without TensorFlow (see ``_keras.py``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import pickle
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .net import StarDistConfig

if TYPE_CHECKING:
    import torch

    from .net import StarDistNet

__all__ = ["StarDistModel", "Thresholds", "cached_model", "load_model", "save_model"]

logger = logging.getLogger(__name__)

FORMAT_NAME = "tme_pipeline.stardist"
FORMAT_VERSION = 1
# Weight files we look for, in order of preference.
_TORCH_WEIGHTS = ("weights.safetensors", "weights.pt")
_KERAS_WEIGHTS = ("weights_best.h5", "weights_last.h5")


@dataclass(frozen=True)
class Thresholds:
    """Object probability threshold and NMS overlap threshold, both in [0, 1]."""

    prob: float
    nms: float

    def __post_init__(self) -> None:
        for name in ("prob", "nms"):
            v = getattr(self, name)
            if not 0.0 <= float(v) <= 1.0:
                raise ValueError(f"threshold {name} must be in [0, 1], got {v}")
            object.__setattr__(self, name, float(v))


@dataclass
class StarDistModel:
    """A loaded model, ready for inference.

    Attributes
    ----------
    net : StarDistNet
        The network, in eval mode, on the device it was loaded to.
    config : StarDistConfig
        Architecture and inference defaults.
    thresholds : Thresholds
        Default thresholds of the model.
    sha256 : str
        Hex SHA-256 of the weights file (provenance).
    path : Path or None
        The folder it was loaded from (lets worker processes reload it).
    """

    net: "StarDistNet"
    config: StarDistConfig
    thresholds: Thresholds
    sha256: str
    path: Path | None = None


def save_model(
    folder: str | Path,
    net: "StarDistNet",
    config: StarDistConfig,
    thresholds: Thresholds | dict,
    *,
    weights_format: str = "pt",
) -> Path:
    """Write a model folder in our format.

    Parameters
    ----------
    folder : str or Path
        Created if missing; existing model files in it are replaced.
    net : StarDistNet
        Network whose state dict is saved (moved to CPU first).
    config : StarDistConfig
        Its config (must be the one the net was built with).
    thresholds : Thresholds or dict
        ``prob`` and ``nms`` thresholds.
    weights_format : {"pt", "safetensors"}
        ``safetensors`` needs the optional package of that name.

    Returns
    -------
    Path
        The weights file written.
    """
    import torch

    if weights_format not in ("pt", "safetensors"):
        raise ValueError(f"weights_format must be 'pt' or 'safetensors', got {weights_format!r}")
    if net.config != config:
        raise ValueError("save_model: net.config differs from the config given")
    if isinstance(thresholds, dict):
        thresholds = Thresholds(**thresholds)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in net.state_dict().items()}
    for name in _TORCH_WEIGHTS:
        (folder / name).unlink(missing_ok=True)
    if weights_format == "safetensors":
        from safetensors.torch import save_file

        weights = folder / "weights.safetensors"
        save_file(state, str(weights))
    else:
        weights = folder / "weights.pt"
        torch.save(state, weights)
    doc = {"format": FORMAT_NAME, "version": FORMAT_VERSION, "config": config.to_dict()}
    (folder / "config.json").write_text(json.dumps(doc, indent=2) + "\n")
    (folder / "thresholds.json").write_text(json.dumps({"prob": thresholds.prob, "nms": thresholds.nms}) + "\n")
    logger.info("saved StarDist model to %s", folder)
    return weights


def load_model(
    path: str | Path, *, device: str = "cpu", pixel_um: float | None = None
) -> StarDistModel:
    """Load a model folder: ours (``weights.pt``/``.safetensors``) or official Keras (``.h5``).

    Parameters
    ----------
    path : str or Path
        The model folder, or a weights file inside one.
    device : str
        Torch device for the net, e.g. ``"cpu"``, ``"cuda"``.
    pixel_um : float, optional
        Overrides the pixel size (µm) the model was trained at. Official
        Keras configs do not record it; without it such a model segments
        images at their own resolution.

    Returns
    -------
    StarDistModel
        Net in eval mode, config, thresholds, SHA-256 of the weights file.

    Raises
    ------
    FileNotFoundError
        No such folder, no ``config.json``, or no weights file.
    ValueError
        Unreadable or unsupported config, a pickled (non-tensor) ``.pt``,
        missing, unexpected or wrongly shaped tensors.
    """
    path = Path(path)
    if path.is_file():
        folder, weights = path.parent, path
    elif path.is_dir():
        folder, weights = path, None
    else:
        raise FileNotFoundError(f"StarDist model not found: {path}")
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"StarDist model folder {folder} has no config.json")
    try:
        doc = json.loads(config_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{config_file}: not valid JSON ({e})") from e
    if not isinstance(doc, dict):
        raise ValueError(f"{config_file}: expected a JSON object")
    is_ours = doc.get("format") == FORMAT_NAME
    if weights is None:
        names = _TORCH_WEIGHTS if is_ours else _KERAS_WEIGHTS
        weights = next((folder / n for n in names if (folder / n).is_file()), None)
        if weights is None:
            raise FileNotFoundError(f"StarDist model folder {folder} has no weights file (looked for {', '.join(names)})")

    if is_ours:
        if doc.get("version") != FORMAT_VERSION:
            raise ValueError(f"{config_file}: unsupported format version {doc.get('version')!r}")
        try:
            config = StarDistConfig.from_dict(doc.get("config", {}))
        except (TypeError, ValueError) as e:
            raise ValueError(f"{config_file}: {e}") from e
        state = _read_torch_state(weights)
    else:
        from ._keras import config_from_keras, read_keras_weights

        try:
            config = config_from_keras(doc)
        except ValueError as e:
            raise ValueError(f"{config_file}: {e}") from e
        state = None  # filled below, once the net exists to name the tensors
    if pixel_um is not None:
        config = StarDistConfig.from_dict({**config.to_dict(), "pixel_um": float(pixel_um)})
    thresholds = _read_thresholds(folder / "thresholds.json", config)

    from .net import StarDistNet

    net = StarDistNet(config)
    if state is None:
        state = read_keras_weights(weights, net)
    _load_state(net, state, weights)
    net.eval().to(device)
    return StarDistModel(net=net, config=config, thresholds=thresholds, sha256=_sha256(weights), path=folder)


# Models loaded in this process, most recently used last. A per-process cache is needed
# because a distributed worker unpickles a fresh TileSegmenter for every tile task (a
# segmenter's own reference cannot outlive its task), and a run loads the model from
# several places (config check, provenance, the segment stage); each would otherwise
# read and hash the weights again and hold its own copy of the net.
_CACHE: "OrderedDict[tuple, StarDistModel]" = OrderedDict()
_CACHE_LOCK = threading.Lock()
#: Models kept per process; the least recently used is dropped beyond this.
CACHED_MODELS = 4


def cached_model(path: str | Path, *, pixel_um: float | None = None, sha256: str | None = None) -> StarDistModel:
    """A model folder loaded once per process (CPU), then shared.

    Parameters
    ----------
    path : str or Path
        The model folder, or a weights file inside one (as :func:`load_model`).
    pixel_um : float, optional
        Pixel size override, µm (as :func:`load_model`); part of the key.
    sha256 : str, optional
        Hex SHA-256 the weights file must have (e.g. the one recorded where the
        segmenter was made); part of the key, so a changed file is never served
        under an old hash.

    Returns
    -------
    StarDistModel
        The same object for the same folder, pixel size and hash, as long as the
        folder's files keep their size and modification time (checked with ``stat``
        on every call, without reading them). Callers share its net: they must not
        modify its weights. Each loaded model is kept until
        :data:`CACHED_MODELS` others are used after it.

    Raises
    ------
    FileNotFoundError, ValueError
        As :func:`load_model`; ``ValueError`` too when the weights' SHA-256
        differs from ``sha256``.
    """
    path = Path(path).resolve()
    folder = path.parent if path.is_file() else path
    try:
        files = tuple(sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in folder.iterdir() if p.is_file()))
    except OSError:
        files = ()  # load_model names what is missing
    key = (str(path), None if pixel_um is None else float(pixel_um), sha256, files)
    with _CACHE_LOCK:
        model = _CACHE.get(key)
        if model is None:
            model = load_model(path, pixel_um=pixel_um)
            if sha256 is not None and model.sha256 != sha256:
                raise ValueError(f"{path}: weights changed since the segmenter was made (sha256 differs)")
            _CACHE[key] = model
            while len(_CACHE) > CACHED_MODELS:
                _CACHE.popitem(last=False)
        _CACHE.move_to_end(key)
        return model


def _read_torch_state(weights: Path) -> dict[str, "torch.Tensor"]:
    import torch

    if weights.suffix == ".safetensors":
        try:
            from safetensors.torch import load_file
        except ImportError as e:
            raise ValueError(f"{weights}: reading .safetensors needs the 'safetensors' package") from e
        return load_file(str(weights))
    try:
        state = torch.load(weights, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        # weights_only refuses a pickled object by naming its global; any other refusal is
        # bytes that are no pickle at all.
        if "global" in str(e).lower():
            raise ValueError(
                f"{weights}: not a plain state dict of tensors; it holds pickled Python objects, "
                "which are refused for safety (save net.state_dict() with torch.save)"
            ) from e
        raise ValueError(f"{weights}: not a readable torch weights file (corrupt, truncated or not weights)") from e
    except (RuntimeError, EOFError, OSError) as e:
        reason = str(e).split(". ")[0]
        raise ValueError(f"{weights}: not a readable torch weights file, corrupt or truncated ({reason})") from e
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{weights}: expected a dict of tensors (a state dict), got {type(state).__name__}")
    return state


def _load_state(net: "StarDistNet", state: dict, weights: Path) -> None:
    expected = net.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ValueError(f"{weights}: tensors do not match the config: missing {missing}, unexpected {unexpected}")
    for name, tensor in state.items():
        if tuple(tensor.shape) != tuple(expected[name].shape):
            raise ValueError(
                f"{weights}: tensor {name!r} has shape {tuple(tensor.shape)}, "
                f"expected {tuple(expected[name].shape)} for the config in config.json"
            )
    net.load_state_dict({k: v.float() for k, v in state.items()})


def _read_thresholds(file: Path, config: StarDistConfig) -> Thresholds:
    if not file.is_file():
        logger.warning("%s missing; using the config's thresholds", file)
        return Thresholds(prob=config.prob_thresh, nms=config.nms_thresh)
    try:
        d = json.loads(file.read_text())
        return Thresholds(prob=d["prob"], nms=d["nms"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{file}: expected {{'prob': float, 'nms': float}} ({e})") from e


def _sha256(file: Path) -> str:
    h = hashlib.sha256()
    with open(file, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
