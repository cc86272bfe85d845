"""StarDist nuclei: normalise, resample, run the net in batched patches, NMS, render.

The network is ours (PyTorch, ``net.py``); non-maximum suppression and polygon
rendering are ``stardist``'s C++/numpy functions, used exactly as
``StarDist2D.predict_instances`` uses them (sparse candidates above the
probability threshold, 2-grid-pixel border rule, distances clipped at 1e-3),
so that our labels equal the official ones for the same weights.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import numpy as np

from ._infer import InferenceSettings, inference_settings, run_net

if TYPE_CHECKING:
    from .weights import StarDistModel

__all__ = ["InferenceSettings", "TileSegmenter", "inference_settings", "make_tile_segmenter",
           "predict_prob_dist", "segment_nuclei", "single_threaded_openmp", "slide_norm"]

logger = logging.getLogger(__name__)

# Resample only when the pixel size differs by more than this fraction: StarDist
# tolerates a few per cent of scale, and resampling costs time and sharpness.
_RESAMPLE_TOLERANCE = 0.05
# Candidates closer than this many grid pixels to the net's input border are
# ignored, as in stardist (``_ind_prob_thresh(..., b=2)``).
_BORDER_GRID_PX = 2
# Floor of the normalised distances, px: stardist's own, avoids degenerate polygons.
_MIN_DIST = 1e-3


def slide_norm(lowres: np.ndarray, *, percentiles: tuple[float, float] = (1.0, 99.8)) -> tuple[float, float]:
    """Intensity normalisation bounds for a whole slide, from a low-resolution level.

    Computed once per slide so that every tile is normalised alike and
    neighbouring tiles agree on their overlap.

    Parameters
    ----------
    lowres : (Y, X) ndarray, any real dtype
        The nuclear channel at a low-resolution pyramid level.
    percentiles : (float, float)
        Low and high percentiles, in [0, 100].

    Returns
    -------
    (float, float)
        ``(lo, hi)`` in the slide's intensity units; the net sees
        ``(x - lo) / (hi - lo)``.

    >>> slide_norm(np.arange(101.0), percentiles=(1, 99))
    (1.0, 99.0)
    """
    a = np.asarray(lowres)
    if a.size == 0:
        raise ValueError("slide_norm: empty image")
    lo, hi = np.percentile(a, percentiles)
    return float(lo), float(hi)


def predict_prob_dist(
    image: np.ndarray,
    *,
    model: "StarDistModel",
    device: str | None = None,
    precision: str | None = None,
    tile_px: int | None = None,
    batch_size: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Dense network output for a normalised image, as ``StarDist2D.predict``.

    Parameters
    ----------
    image : (Y, X) ndarray
        Normalised intensities (~0-1).
    model : StarDistModel
    device, precision, tile_px, batch_size
        As in :func:`segment_nuclei`.

    Returns
    -------
    prob : (ceil(Y/gy), ceil(X/gx)) float32 ndarray
        Object probability on the output grid.
    dist : (ceil(Y/gy), ceil(X/gx), n_rays) float32 ndarray
        Ray distances, input px, clipped below at 1e-3.
    """
    gy, gx = model.config.grid
    h, w = -(-image.shape[0] // gy), -(-image.shape[1] // gx)
    prob = np.empty((h, w), np.float32)
    dist = np.empty((h, w, model.config.n_rays), np.float32)
    for (oy, ox), p, d in run_net(image, model, inference_settings(device, precision=precision), tile_px, batch_size):
        p, d = p.cpu().numpy(), d.cpu().numpy()
        ty, tx = min(p.shape[0], h - oy), min(p.shape[1], w - ox)
        if ty > 0 and tx > 0:
            prob[oy:oy + ty, ox:ox + tx] = p[:ty, :tx]
            dist[oy:oy + ty, ox:ox + tx] = np.moveaxis(d[:, :ty, :tx], 0, -1)
    np.maximum(dist, _MIN_DIST, out=dist)
    return prob, dist


def segment_nuclei(
    image: np.ndarray,
    pixel_um: float,
    *,
    model: "StarDistModel | str | Path",
    prob_thresh: float | None = None,
    nms_thresh: float | None = None,
    norm: tuple[float, float] | None = None,
    device: str | None = None,
    precision: str | None = None,
    batch_size: int | None = None,
    tile_px: int | None = None,
    n_threads: int | None = None,
    concurrent_passes: int | None = 1,
) -> np.ndarray:
    """Nuclei of one 2-D image as a label image.

    Parameters
    ----------
    image : (Y, X) ndarray, any real dtype
        Nuclear channel (DAPI).
    pixel_um : float
        Pixel size of ``image``, µm. When it differs from the model's training
        pixel size by more than 5 %, the image is resampled for the net and
        the polygons are rendered back on the input grid at scaled coordinates.
    model : StarDistModel or path
        A loaded model or a model folder.
    prob_thresh, nms_thresh : float, optional
        Override the model's thresholds.
    norm : (float, float), optional
        ``(lo, hi)`` intensity bounds (see :func:`slide_norm`); default: the
        model's percentiles of this image.
    device : str, optional
        ``"cuda"``, ``"cpu"``, ...; default CUDA when available. The net is
        moved there.
    precision : {"fp32", "bf16", "fp16"}, optional
        See :func:`inference_settings`; default fp32 on every device
        (autocast in bf16 or fp16 is opt-in).
    batch_size : int, optional
        Patches per forward pass; default 1 on CPU, 4 on CUDA.
    tile_px : int, optional
        Patch core size, px at the net's resolution; default 2048. Larger images are processed in patches with the net's
        receptive field as context (128 px for the default config), smaller
        ones in one pass; the result does not depend on it.
    n_threads : int, optional
        Calls ``torch.set_num_threads`` when given.
    concurrent_passes : int or None
        At most this many forward passes run at once in this process, whichever
        thread calls (see :func:`tme_pipeline.segment._infer.pass_slots`); the
        rest of the work (thresholding, NMS, rendering) is not bounded.
        ``None``: no bound.

    Returns
    -------
    (Y, X) int32 ndarray
        Labels 1..n, 0 background. Empty or constant images give zeros.
    """
    from stardist.geometry import polygons_to_label
    from stardist.nms import non_maximum_suppression_sparse

    if not isinstance(model, _model_type()):
        from .weights import load_model

        model = load_model(model)
    img = np.asarray(image)
    if img.ndim != 2:
        raise ValueError(f"segment_nuclei: expected a 2-D (Y, X) image, got shape {img.shape}")
    if not pixel_um > 0:
        raise ValueError(f"segment_nuclei: pixel_um must be > 0, got {pixel_um}")
    if n_threads is not None:
        import torch

        torch.set_num_threads(int(n_threads))
    labels = np.zeros(img.shape, np.int32)
    if img.size == 0:
        return labels
    if norm is None:
        norm = slide_norm(img, percentiles=model.config.norm_percentiles)
    lo, hi = float(norm[0]), float(norm[1])
    if not hi > lo or np.ptp(img) == 0:
        # No contrast, no nuclei: a trained net's output on a flat input is meaningless.
        return labels
    x = (img.astype(np.float32) - np.float32(lo)) / np.float32(hi - lo)
    x, scale = _resample(x, pixel_um, model.config.pixel_um)

    settings = inference_settings(device, precision=precision)
    thr = model.thresholds.prob if prob_thresh is None else float(prob_thresh)
    nms = model.thresholds.nms if nms_thresh is None else float(nms_thresh)
    prob, dist, points = _candidates(x, model, settings, thr, tile_px, batch_size, concurrent_passes)
    if len(prob) == 0:
        return labels
    with single_threaded_openmp():
        points, prob, dist, _ = non_maximum_suppression_sparse(dist, prob, points, nms_thresh=nms)
    # Back to the input grid: pixel centres map as (p + 0.5) / s - 0.5.
    points = (points + 0.5) / np.asarray(scale) - 0.5
    labels = polygons_to_label(dist, points, shape=img.shape, prob=prob, scale_dist=tuple(1 / s for s in scale))
    return labels.astype(np.int32, copy=False)


@functools.cache
def _openmp_runtimes() -> tuple[ctypes.CDLL, ...]:
    """The OpenMP runtimes loaded in this process (Linux: from ``/proc/self/maps``), e.g.
    torch's ``libgomp`` and the one ``stardist``'s wheel carries; () where unknown."""
    try:
        with open("/proc/self/maps") as maps:
            paths = sorted({line.split()[-1] for line in maps if "/" in line})
    except OSError:
        return ()
    names = ("libgomp", "libiomp", "libomp")
    libs = []
    for path in paths:
        if os.path.basename(path).startswith(names):
            try:
                lib = ctypes.CDLL(path)
                lib.omp_set_num_threads.argtypes, lib.omp_get_max_threads.restype = (ctypes.c_int,), ctypes.c_int
            except (OSError, AttributeError):
                continue
            libs.append(lib)
    return tuple(libs)


@contextlib.contextmanager
def single_threaded_openmp():
    """Within the block, OpenMP code called from this thread runs on this thread alone.

    ``stardist``'s sparse NMS opens one parallel region per kept candidate, each a few
    microseconds of work: while the tiles' forward passes keep the cores busy, its
    helper threads are seldom running when a region ends, and the caller spins at every
    barrier. On one 1184² tile (18 654 candidates, other processes on the two cores):
    3.3-4.3 s of CPU with two threads, 0.2 s with one, the same kept polygons. OpenMP
    keeps the thread count per calling thread, so other threads (the net's) keep theirs,
    and it is restored on leaving.
    """
    libs = _openmp_runtimes()
    before = [lib.omp_get_max_threads() for lib in libs]
    for lib in libs:
        lib.omp_set_num_threads(1)
    try:
        yield
    finally:
        for lib, n in zip(libs, before):
            lib.omp_set_num_threads(n)


def _model_type() -> type:
    from .weights import StarDistModel

    return StarDistModel


def _resample(x: np.ndarray, pixel_um: float, model_pixel_um: float | None) -> tuple[np.ndarray, tuple[float, float]]:
    """Resample ``x`` to the model's pixel size; returns it and the (y, x) scale applied."""
    if model_pixel_um is None or abs(pixel_um / model_pixel_um - 1) <= _RESAMPLE_TOLERANCE:
        return x, (1.0, 1.0)
    from skimage.transform import resize

    s = pixel_um / model_pixel_um
    shape = tuple(max(1, round(n * s)) for n in x.shape)
    logger.debug("resampling %s px at %.3f µm to %s px at %.3f µm", x.shape, pixel_um, shape, model_pixel_um)
    # Centre-aligned (skimage), so pixel centres map as (p + 0.5) * s - 0.5.
    out = resize(x, shape, order=1, anti_aliasing=s < 1, preserve_range=True).astype(np.float32)
    return out, (shape[0] / x.shape[0], shape[1] / x.shape[1])


def _candidates(x, model, settings, prob_thresh, tile_px, batch_size, concurrent_passes):
    """Sparse net output: (prob (n,), dist (n, n_rays), points (n, 2) input px), raster order."""
    import torch

    g = np.asarray(model.config.grid)
    hp, wp = (-(-n // d) * d // gd for n, d, gd in zip(x.shape, model.config.div_by, g))
    probs, dists, idx = [], [], []
    for (oy, ox), p, d in run_net(x, model, settings, tile_px, batch_size, concurrent_passes=concurrent_passes):
        # Threshold on the device: only candidates cross to the host.
        iy, ix = torch.nonzero(p > prob_thresh, as_tuple=True)
        probs.append(p[iy, ix].cpu().numpy())
        dists.append(d[:, iy, ix].T.cpu().numpy())
        idx.append(np.stack([iy.cpu().numpy() + oy, ix.cpu().numpy() + ox], axis=1))
    prob = np.concatenate(probs)
    dist = np.maximum(np.concatenate(dists), _MIN_DIST)
    idx = np.concatenate(idx)
    b = _BORDER_GRID_PX
    points = idx * g
    keep = np.all((idx >= b) & (idx < np.array([hp, wp]) - b) & (points < np.array(x.shape)), axis=1)
    # Whole-image raster order, as stardist's single pass: NMS breaks probability ties by it.
    order = np.flatnonzero(keep)
    order = order[np.lexsort((idx[order, 1], idx[order, 0]))]
    return prob[order], dist[order], points[order]


@dataclass
class TileSegmenter:
    """Picklable per-tile segmenter for the tiling stage: ``labels = seg(tile)``.

    Holds the model's folder, not the model: each worker process loads it
    once, on first call (:func:`tme_pipeline.segment.weights.cached_model`),
    and every segmenter unpickled there shares it. Build it with
    :func:`make_tile_segmenter`.
    """

    model_path: str
    pixel_um: float
    norm: tuple[float, float]
    device: str | None = None
    precision: str | None = None
    prob_thresh: float | None = None
    nms_thresh: float | None = None
    tile_px: int | None = None
    batch_size: int | None = None
    n_threads: int | None = None
    model_pixel_um: float | None = None
    sha256: str | None = None
    concurrent_passes: int | None = 1
    _model: "StarDistModel | None" = field(default=None, init=False, repr=False, compare=False)

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_model"] = None  # workers reload from model_path
        return state

    def model(self) -> "StarDistModel":
        """The model: loaded once per process and shared by every segmenter unpickled in it."""
        if self._model is None:
            from .weights import cached_model

            self._model = cached_model(self.model_path, pixel_um=self.model_pixel_um, sha256=self.sha256)
        return self._model

    def __call__(self, tile: np.ndarray) -> np.ndarray:
        """Labels of one 2-D tile, (Y, X) int32."""
        return segment_nuclei(tile, self.pixel_um, model=self.model(), prob_thresh=self.prob_thresh,
                              nms_thresh=self.nms_thresh, norm=self.norm, device=self.device,
                              precision=self.precision,
                              batch_size=self.batch_size, tile_px=self.tile_px, n_threads=self.n_threads,
                              concurrent_passes=self.concurrent_passes)


def make_tile_segmenter(
    model: "StarDistModel | str | Path",
    *,
    pixel_um: float,
    norm: tuple[float, float],
    device: str | None = None,
    precision: str | None = None,
    prob_thresh: float | None = None,
    nms_thresh: float | None = None,
    tile_px: int | None = None,
    batch_size: int | None = None,
    n_threads: int | None = None,
    concurrent_passes: int | None = 1,
) -> Callable[[np.ndarray], np.ndarray]:
    """A picklable function ``tile (Y, X) -> labels (Y, X) int32`` for the tiling stage.

    Parameters
    ----------
    model : StarDistModel or path
        A model loaded from a folder (its ``path`` is what workers reload),
        or the folder itself.
    pixel_um : float
        Pixel size of the tiles, µm.
    norm : (float, float)
        Slide-wide ``(lo, hi)`` from :func:`slide_norm`; never per tile, or
        tiles would disagree at their seams.
    device, precision, prob_thresh, nms_thresh, tile_px, batch_size, n_threads, concurrent_passes
        As in :func:`segment_nuclei`.
    """
    loaded = model if isinstance(model, _model_type()) else None
    if loaded is not None and loaded.path is None:
        raise ValueError("make_tile_segmenter: the model has no folder to reload it from; save it first")
    seg = TileSegmenter(str(loaded.path if loaded else model), pixel_um, tuple(map(float, norm)), device, precision,
                        prob_thresh, nms_thresh, tile_px, batch_size, n_threads,
                        loaded.config.pixel_um if loaded else None, loaded.sha256 if loaded else None,
                        concurrent_passes)
    seg._model = loaded  # this process already has it
    return seg
