"""Run a StarDist net over a 2-D image in batched patches, on CPU or CUDA.

Patches overlap by the net's receptive field, so their outputs are those of a
whole-image pass (float rounding aside) and the patch size is only a speed
and memory knob. The image is padded at its end (reflect) to a multiple of the
net's ``div_by`` exactly as ``StarDist2D`` does, and patches are clamped inside
it, so that the image border is seen as in a whole-image pass.
"""

from __future__ import annotations

import contextlib
import logging
import math
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterator

import numpy as np

from ._malloc import KEPT_FREE_BYTES, keep_freed_host_memory

if TYPE_CHECKING:
    import torch

    from .weights import StarDistModel

__all__ = ["KEPT_FREE_BYTES", "InferenceSettings", "cpu_has_native_bf16", "exact_fp32_convolutions", "inference_settings",
           "keep_freed_host_memory", "pass_slots", "run_net"]

logger = logging.getLogger(__name__)

# Patch core size when none is given, px: large enough that the context
# (receptive field, 128 px a side) costs little, small enough that a patch's
# activations stay within ~2 GB (float32).
_DEFAULT_TILE_PX = 2048


@dataclass(frozen=True)
class InferenceSettings:
    """How the net runs on a device.

    Attributes
    ----------
    device : str
        Torch device string.
    autocast_dtype : {"float16", "bfloat16"} or None
        Run the net under ``torch.autocast`` in this dtype; ``None``: float32.
    pin_memory : bool
        Stage host batches in page-locked memory (CUDA only).
    non_blocking : bool
        Asynchronous host-to-device copies (needs pinned memory).
    channels_last : bool
        NHWC memory format, faster for convolutions on CPU (oneDNN) and
        tensor cores.
    exact_fp32 : bool
        Float32 convolutions in full IEEE float32 on CUDA, not TF32 (see
        :func:`exact_fp32_convolutions`); True for fp32 on CUDA.
    """

    device: str
    autocast_dtype: str | None
    pin_memory: bool
    non_blocking: bool
    channels_last: bool = True
    exact_fp32: bool = False


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bfloat16 in hardware (AVX512-BF16 or AMX).

    Without it, bfloat16 convolutions are emulated and slower than float32.
    """
    import torch

    return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


def inference_settings(device: str | None = None, *, precision: str | None = None) -> InferenceSettings:
    """Settings for ``device``; ``None`` picks CUDA when available, else CPU.

    Parameters
    ----------
    device : str, optional
        Torch device string.
    precision : {"fp32", "bf16", "fp16", "auto"}, optional
        Arithmetic of the net. ``None``, ``"auto"`` or ``"fp32"``: float32 on
        every device, with cuDNN held to IEEE float32 rather than TF32, so that
        CPU and GPU, whatever the tiling and the number of workers, find the
        same nuclei (fp32 reproduces the official StarDist to ~1e-6; a tiled
        slide agrees with one piece for 100 % of nuclei at IoU 0.9). Autocast
        is opt-in: ``"bf16"`` (~2x faster convolutions on CPUs with
        AVX512-BF16 or AMX, see :func:`cpu_has_native_bf16`) or ``"fp16"``
        (CUDA only) move probabilities by ~1e-2 and distances by ~0.1 px:
        accuracy against truth is unchanged (F1 within 0.001 on the shipped
        model's test set, ``models/stardist_fluo_synth/README.md``), but
        near-tied candidates can swap in NMS, so a tiled slide agrees with one
        piece for only 97.8 % of nuclei at IoU 0.9 in bf16
        (``docs/benchmarks.md``).

    >>> inference_settings("cpu", precision="fp32").autocast_dtype is None
    True
    >>> inference_settings("cuda").autocast_dtype is None
    True
    """
    import torch

    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    cuda = torch.device(device).type == "cuda"
    if precision in (None, "auto"):
        precision = "fp32"
    dtypes = {"fp32": None, "fp16": "float16", "bf16": "bfloat16"}
    if precision not in dtypes or (precision == "fp16" and not cuda):
        raise ValueError(f"precision must be fp32, bf16 or fp16 (CUDA only), got {precision!r} for {device}")
    return InferenceSettings(device=str(device), autocast_dtype=dtypes[precision], pin_memory=cuda,
                             non_blocking=cuda, exact_fp32=cuda and dtypes[precision] is None)


def exact_fp32_convolutions() -> None:
    """Hold cuDNN's float32 convolutions to IEEE float32 in this process.

    PyTorch lets cuDNN compute float32 convolutions in TF32 (a 10-bit mantissa, like
    fp16's) on Ampere and later GPUs, which would make the GPU's fp32 differ from the
    CPU's as much as autocast does. The flag is process-wide, as torch keeps it; it
    only narrows what cuDNN may do, and changes nothing on CPU.
    """
    import torch

    cudnn = torch.backends.cudnn
    if hasattr(cudnn, "conv"):
        # torch >= 2.9: the per-operator API; mixing it with the legacy flag is an error.
        cudnn.conv.fp32_precision = "ieee"
    else:
        cudnn.allow_tf32 = False


# Moving a module (device, memory format) replaces its parameters' storage in place; a
# thread already running the same module then reads freed memory, and a half-converted
# module can keep corrupted weights for the rest of the process (seen under Dask's threaded
# scheduler: garbage outputs, an abort in the NMS). Tiles share one model, so the first
# move is done by one thread while the others wait, and later calls find it done.
_PREPARE_LOCK = threading.Lock()


def _prepare(net: "torch.nn.Module", settings: InferenceSettings) -> "torch.nn.Module":
    """``net`` on ``settings.device`` (and channels-last), moved at most once."""
    import torch

    target = torch.empty(0, device=settings.device).device  # "cuda" -> "cuda:0"

    def ready() -> bool:
        weights = [p for p in net.parameters() if p.ndim == 4]
        return all(p.device == target for p in net.parameters()) and (
            not settings.channels_last
            or all(p.is_contiguous(memory_format=torch.channels_last) for p in weights))

    if not ready():
        with _PREPARE_LOCK:
            if not ready():
                net.to(settings.device)
                if settings.channels_last:
                    net.to(memory_format=torch.channels_last)
    return net


# One semaphore per bound, for the whole process: the tiles' passes come from Dask's
# threads, each with its own segmenter (a distributed worker unpickles one per task), so
# only a process-wide object can bound them.
_SLOTS: dict[int, threading.BoundedSemaphore] = {}
_SLOTS_LOCK = threading.Lock()


def pass_slots(n: int) -> threading.BoundedSemaphore:
    """The process's semaphore admitting ``n`` concurrent forward passes.

    A pass on a 1184² tile window holds ~0.7 GB of activations; two tiles' passes
    overlapping at their peaks set a slide's peak memory, and became likelier the
    more tiles a slide has (``docs/benchmarks.md``). With one slot, one pass runs
    at a time on all of torch's threads while the other Dask threads threshold,
    suppress and render other tiles, so peak memory no longer depends on chance
    or on the slide's size.

    Parameters
    ----------
    n : int
        Passes admitted at once, >= 1.

    Returns
    -------
    threading.BoundedSemaphore
        The same object for the same ``n`` in this process.
    """
    if not n >= 1:
        raise ValueError(f"concurrent passes must be >= 1, got {n}")
    with _SLOTS_LOCK:
        return _SLOTS.setdefault(int(n), threading.BoundedSemaphore(int(n)))


def run_net(
    x: np.ndarray, model: "StarDistModel", settings: InferenceSettings, tile_px: int | None, batch_size: int | None,
    *, concurrent_passes: int | None = None,
) -> Iterator[tuple[tuple[int, int], "torch.Tensor", "torch.Tensor"]]:
    """Net output patch by patch.

    Parameters
    ----------
    x : (Y, X) float32 ndarray
        Normalised image at the model's pixel size.
    model : StarDistModel
        Its net is moved to ``settings.device`` (and channels-last).
    settings : InferenceSettings
    tile_px : int, optional
        Patch core size, px; default 2048. Rounded down to a multiple of
        ``div_by``. Windows are core + receptive field on each side: clamped
        to the image on their own, all of one shape (shifted inside the image)
        when batched, so that they stack.
    batch_size : int, optional
        Windows per forward pass; default 4 on CUDA, 1 on CPU.
    concurrent_passes : int, optional
        Each forward pass waits for one of :func:`pass_slots` ``(concurrent_passes)``;
        ``None``: no bound.

    Yields
    ------
    offset : (int, int)
        Core origin in output-grid px (Y, X).
    prob : (h, w) float32 tensor on the device
    dist : (n_rays, h, w) float32 tensor on the device
        Raw net output (not clipped).
    """
    import torch

    cfg = model.config
    dev_type = torch.device(settings.device).type
    div, grid = cfg.div_by, cfg.grid
    tile_px = tile_px or _DEFAULT_TILE_PX
    batch_size = batch_size or (4 if dev_type == "cuda" else 1)
    pad = [(0, (-n) % d) for n, d in zip(x.shape, div)]
    xp = np.pad(x, pad, mode="reflect" if min(x.shape) > 1 else "edge")
    core = [max(d, tile_px // d * d) for d in div]
    # The whole receptive field as context: patches then give the whole-image
    # result (float rounding aside), so the patch size is a speed knob only.
    ctx = [math.ceil(cfg.receptive_radius_px / d) * d for d in div]
    size = [n if n <= c + 2 * m else c + 2 * m for n, c, m in zip(xp.shape, core, ctx)]
    # Batched windows share one shape (core + both contexts, clamped inside the image); a
    # window of its own takes only the context it needs, none beyond the image border,
    # which saves 11 % of the net's work on a 4096² image in 2048-px patches.
    uniform = batch_size > 1
    # (window start, window stop, core start, core stop) per axis, input px.
    axes = []
    for n, c, m, s in zip(xp.shape, core, ctx, size):
        if s >= n:
            axes.append([(0, n, 0, n)])
            continue
        spans = []
        for c0 in range(0, n, c):
            c1 = min(c0 + c, n)
            w0 = min(max(c0 - m, 0), n - s) if uniform else max(c0 - m, 0)
            spans.append((w0, w0 + s if uniform else min(c1 + m, n), c0, c1))
        axes.append(spans)
    windows = [(wy, wx) for wy in axes[0] for wx in axes[1]]

    net = _prepare(model.net, settings)
    if dev_type == "cpu":
        keep_freed_host_memory()
    if settings.exact_fp32:
        exact_fp32_convolutions()
    autocast = (torch.autocast(dev_type, dtype=getattr(torch, settings.autocast_dtype))
                if settings.autocast_dtype else contextlib.nullcontext())
    slots = pass_slots(concurrent_passes) if concurrent_passes is not None else contextlib.nullcontext()
    with torch.inference_mode(), autocast:
        for b0 in range(0, len(windows), batch_size):
            batch = windows[b0:b0 + batch_size]
            host = torch.from_numpy(np.stack([xp[wy[0]:wy[1], wx[0]:wx[1]] for wy, wx in batch]))
            host = host[:, None]
            if settings.pin_memory:
                host = host.pin_memory()
            t = host.to(settings.device, non_blocking=settings.non_blocking)
            if settings.channels_last:
                t = t.contiguous(memory_format=torch.channels_last)
            with slots:
                prob, dist = net(t)
            del t, host
            for k, (wy, wx) in enumerate(batch):
                sl = [slice((c0 - w0) // g, (c1 - w0) // g) for (w0, _, c0, c1), g in zip((wy, wx), grid)]
                yield ((wy[2] // grid[0], wx[2] // grid[1]),
                       prob[k, 0, sl[0], sl[1]].float(), dist[k, :, sl[0], sl[1]].float())
