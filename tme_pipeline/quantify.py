"""Per-cell measurements: compartment intensities, morphology and nucleus outline.

Tile by tile over the segmentation's :class:`~tme_pipeline.tiling.TileGrid`,
with its ownership rule: a cell is measured by the one tile whose core holds
its nucleus centroid (rounded half up), inside that tile's core grown by
``overlap + expansion + ring width`` px, so the whole cell and every pixel its
membrane ring looks at are in view. The grid's overlap exceeds the largest
nucleus, so a nucleus whose centroid lies in a core is seen whole by that tile
and a partly seen nucleus never appears to be owned. Memory is bounded by one
window; :func:`measure_cells_reference` is the untiled oracle.

Compartments of a cell (pixel sets of the level-0 image):

- ``nucleus``: its nucleus label's pixels;
- ``membrane``: its cell pixels whose distance to the nearest pixel outside the
  cell (pixel centre to pixel centre) is below ``membrane_um``;
- ``cytoplasm``: cell minus nucleus, or the membrane ring where that is empty;
- ``perinuclear``: a band around the nucleus, its cell pixels outside the nucleus and
  within ``perinuclear_um`` of it (the membrane ring where that is empty): a lymphocyte's
  membrane lies ~0.4 µm out of its nucleus, a touching neighbour's ~1.6 µm out, so a 1 µm
  band reads the one and not the other, nor the nucleus, whose pixels carry no membrane
  stain but do carry other dyes' spillover;
- ``cell``: all its cell pixels.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import anndata as ad
import dask
import dask.array as da
import numpy as np
import zarr

from .cell_table import (COMPARTMENT_LAYERS, LAYERS, MIN_RING_PX, CellTable, cell_anndata, check_measure_inputs,
                         measure_params)
from .solidity import convex_hull_px
from .tiling import Tile, TileGrid, label_array, map_tiles, window_source

__all__ = ["COMPARTMENT_LAYERS", "measure_cells", "perinuclear"]

logger = logging.getLogger(__name__)

_RAY_BATCH = 1024  # objects per star_dist call, to bound its canvas


def measure_cells(
    nuclei: zarr.Array | da.Array,
    cells: zarr.Array | da.Array,
    image: da.Array,
    *,
    grid: TileGrid,
    pixel_um: float,
    markers: Mapping[str, int],
    compartments: Mapping[str, str],
    nuclear_channel: int,
    expand_um: float,
    membrane_um: float,
    perinuclear_um: float = 1.0,
    channel_names: Sequence[str] | None = None,
    n_rays: int = 32,
    neighbour_markers: Sequence[str] = (),
    neighbour_boundary_um: float = 1.0,
) -> ad.AnnData:
    """Measure every cell, tile by tile: intensities per compartment, morphology, outline.

    Parameters
    ----------
    nuclei, cells : zarr.Array or dask array, shape (Y, X), integer
        Level-0 nucleus labels and the cells grown from them
        (:func:`tme_pipeline.cells.expand_nuclei_tiled`); cell id = nucleus id.
    image : dask array, shape (C, Y, X)
        The slide's level 0, intensities in the slide's units; any chunking.
    grid : TileGrid
        The segmentation's grid; its overlap exceeds the largest nucleus.
    pixel_um : float
        Level-0 pixel size, µm.
    markers : mapping of str to int
        Marker -> channel index; its order is the order of ``var``.
    compartments : mapping of str to str
        Marker -> ``nuclear``, ``membrane``, ``cytoplasm``, ``perinuclear`` or ``whole``: which
        compartment's mean ``X`` holds (``MarkerSpec.compartment``).
    nuclear_channel : int
        Channel the nuclei were segmented on; its nucleus mean is ``dapi_mean``.
    expand_um : float
        How far cells reach beyond their nucleus, µm (``CellsConfig.expand_um``);
        widens the windows and is recorded in ``uns['cells']``.
    membrane_um : float
        Width of the membrane ring, µm; below one pixel, one pixel.
    perinuclear_um : float
        Width of the perinuclear band outside the nucleus, µm (> 0).
    channel_names : sequence of str, optional
        The slide's channel names for ``var['channel']``; ``C<index>`` without.
    n_rays : int, optional
        Rays of the nucleus polygon.
    neighbour_markers : sequence of str
        Markers whose compartment mean is corrected for touching neighbours' signal
        (:func:`tme_pipeline.spillover.correct_spillover`, REDSEA); those not in ``markers``
        are left out; empty: none.
    neighbour_boundary_um : float
        Width of each cell's boundary band for that correction, µm.

    Returns
    -------
    AnnData
        One row per cell, ordered by ``cell_id`` (index: the id as str).
        ``obs``: ``cell_id`` (int), ``x_um``, ``y_um`` (nucleus centroid, µm;
        pixel centres at index × pixel size), ``area_um2`` (cell),
        ``nucleus_area_um2``, ``eccentricity``, ``solidity`` (of the nucleus, as
        :func:`skimage.measure.regionprops`), ``dapi_mean``. ``var`` (index:
        markers): ``compartment``, ``channel``. ``X`` (float32, n × markers):
        each marker's mean in its compartment. ``layers`` ``nucleus``,
        ``membrane``, ``cytoplasm``, ``perinuclear``, ``cell`` (float32, n × markers): the mean in
        each. ``obsm['spatial']``: (n, 2) float64 centroids ``x, y`` µm.
        ``obsm['nucleus_polygon_um']``: (n, n_rays, 2) float32 vertices ``x, y``
        µm, the star-convex polygon of the nucleus (stardist's ``star_dist``
        from the centroid pixel, or the nucleus pixel nearest to the centroid
        when that pixel is outside; ray k at angle 2πk/n_rays, row offset
        ``d·sin``, column offset ``d·cos``). ``uns``: ``spatial_unit = 'um'``,
        ``pixel_um``, ``cells = {expand_um, membrane_um, perinuclear_um, n_rays,
        neighbour_correction}`` (``{markers, boundary_um}`` of the correction, or ``False``).

    Raises
    ------
    ValueError
        On inconsistent shapes or panel arguments, or when a cell reaches the
        edge of its tile's window (an object larger than the tile overlap).
    """
    image = image if isinstance(image, da.Array) else da.asarray(image)
    chans = check_measure_inputs(image, grid.shape_yx, markers, compartments, nuclear_channel, pixel_um, n_rays)
    nuclei, cells = label_array(nuclei, grid), label_array(cells, grid)
    pixels = window_source(image, chans)  # each window one read of the slide's file
    membrane_px = max(membrane_um / pixel_um, MIN_RING_PX)
    guard = math.ceil(membrane_px)
    peri_px = perinuclear_um / pixel_um
    margin = grid.overlap_px + math.ceil(expand_um / pixel_um) + guard + 1
    neighbours = _neighbour_plan(neighbour_markers, neighbour_boundary_um, markers, compartments, chans,
                                 pixel_um, guard)
    tasks = map_tiles(_measure_tile, [nuclei, cells, pixels], grid=grid, margin_px=margin,
                      args=(grid.shape_yx, membrane_px, peri_px, guard, n_rays, neighbours))
    tables = [t for t in dask.compute(*tasks) if t.ids.size]
    table = CellTable.concat(tables) if tables else CellTable.empty(len(chans), n_rays)
    table = table.take(np.argsort(table.ids, kind="stable"))
    if np.any(np.diff(table.ids) == 0):
        raise ValueError("a cell was measured by two tiles: is a nucleus larger than the tile overlap?")
    logger.info("measured %d cells", table.ids.size)
    return cell_anndata(table, chans, markers, compartments, nuclear_channel, channel_names, pixel_um,
                    measure_params(expand_um, membrane_um, perinuclear_um, n_rays, neighbours))


@dataclass(frozen=True)
class _NeighbourPlan:
    """Which layer columns (positions in the read channels) the neighbour correction rewrites."""

    markers: tuple[str, ...]
    columns: dict[int, list[int]]  # layer index (LAYERS) -> channel positions
    boundary_px: float
    boundary_um: float

    def to_uns(self) -> dict:
        return {"markers": list(self.markers), "boundary_um": self.boundary_um}


def _neighbour_plan(names, boundary_um, markers, compartments, chans, pixel_um, guard) -> _NeighbourPlan | None:
    """The correction's columns per layer; None when no marker of the slide asks for it.

    Markers absent from the slide (an optional marker of the panel) are left out, not an error.
    """
    names = [m for m in names if m in markers]
    if not names:
        return None
    boundary_px = boundary_um / pixel_um
    # The band of a neighbour of an owned cell must be seen whole: it lies within `guard` px of the window.
    if not 0 < boundary_px <= guard:
        raise ValueError(f"neighbour_boundary_um must be > 0 and at most the membrane ring's width "
                         f"({guard * pixel_um:g} µm), got {boundary_um}")
    columns: dict[int, list[int]] = {}
    for m in names:
        layer = LAYERS.index(COMPARTMENT_LAYERS[compartments[m]])
        columns.setdefault(layer, []).append(chans.index(markers[m]))
    return _NeighbourPlan(tuple(names), columns, float(boundary_px), float(boundary_um))


def _measure_tile(nuc: np.ndarray, cell: np.ndarray, img: np.ndarray, tile: Tile, box, shape_yx,
                  membrane_px: float, peri_px: float, guard: int, n_rays: int,
                  neighbours: _NeighbourPlan | None = None) -> CellTable:
    ny, nx = shape_yx
    h, w = nuc.shape
    nuc_px = _Pixels(nuc)
    ids, inverse, count = _unique_labels(nuc_px.labels)
    # Sums of integer coordinates are exact in float64, so summing over the nucleus pixels
    # only (not the background as well) gives the same centroids to the last bit.
    cy = np.bincount(inverse, weights=nuc_px.y) / count + box[0]
    cx = np.bincount(inverse, weights=nuc_px.x) / count + box[1]
    ry, rx = np.floor(cy + 0.5), np.floor(cx + 0.5)
    y0, x0, y1, x1 = tile.core
    own = (ry >= y0) & (ry < y1) & (rx >= x0) & (rx < x1)
    if not own.any():
        return CellTable.empty(img.shape[0], n_rays)
    owned = ids[own].astype(np.int64)
    cell_local = _local_ids(cell, owned)
    nuc_local = _local_ids(nuc, owned)
    # Window sides inside the slide must stay `guard` px clear of owned cells.
    lo = (guard if box[0] > 0 else 0, guard if box[1] > 0 else 0)
    hi = (h - guard if box[2] < ny else h, w - guard if box[3] < nx else w)
    nuc_boxes = _check_inside(nuc_local, cell_local, owned, lo, hi, tile)
    not_nucleus = nuc != cell
    peri_local = np.where((perinuclear(nuc, peri_px) == cell) & not_nucleus, cell_local, 0)
    table = _measure_local(nuc_local, cell_local, cell, not_nucleus, peri_local, img, owned, membrane_px, n_rays,
                           nuc_boxes)
    if neighbours is not None:
        _correct_neighbours(table, nuc, cell, img, owned, neighbours, membrane_px, peri_px, lo, hi, tile)
    table.centroid_yx = np.stack([cy[own], cx[own]], axis=1)
    table.centre_yx += np.asarray(box[:2], np.int64)
    return table


class _Pixels:
    """The labelled pixels of a (h, w) label image: flat index, label, row and column (ascending index)."""

    def __init__(self, labels: np.ndarray) -> None:
        flat = labels.ravel()
        self.index = np.flatnonzero(flat)
        self.labels = flat[self.index]
        self.y, self.x = np.divmod(self.index, labels.shape[1])


def _correct_neighbours(table: CellTable, nuc, cell, img, owned, plan: _NeighbourPlan, membrane_px, peri_px,
                        lo, hi, tile: Tile) -> None:
    """Rewrite the owned cells' means of the planned columns with the neighbour correction.

    Each window is corrected on its own labels: exact for owned cells as long as their
    touching neighbours lie whole inside the window (checked), since the correction of a cell
    reads only its own and its neighbours' pixels and border lengths.
    """
    from .spillover import correct_spillover

    frame = cell.copy()
    frame[lo[0]:hi[0], lo[1]:hi[1]] = 0
    compartments = {0: nuc, 1: np.where(_ring(cell, membrane_px), cell, 0), 2: np.where(nuc != cell, cell, 0),
                    3: np.where((perinuclear(nuc, peri_px) == cell) & (nuc != cell), cell, 0), 4: cell}
    for layer, cols in plan.columns.items():
        result = correct_spillover(cell, img[cols], compartment_image=compartments[layer],
                                   boundary_px=plan.boundary_px)
        cut = np.intersect1d(np.unique(frame), result.contacts.labels)
        near = result.contacts.neighbours_of(owned)
        partners = np.union1d(result.contacts.label_a[near], result.contacts.label_b[near])
        clipped = np.intersect1d(partners, cut[cut > 0])
        if clipped.size:
            raise ValueError(f"cell {clipped[0]} touches a cell of tile {tile.index} but reaches the edge of "
                             "its window: it is larger than the tile overlap allows; raise segmentation.overlap_um")
        pos = np.searchsorted(result.labels, owned)
        seen = result.n_px[pos] > 0  # an empty compartment keeps its fallback (the membrane ring)
        means = table.means[layer]
        means[np.ix_(np.flatnonzero(seen), cols)] = result.corrected_mean[pos[seen]]


def _unique_labels(values: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``np.unique(values, return_inverse=True, return_counts=True)`` of labels (> 0), by counting.

    Label ids are bounded by the slide's object count, so a count per id (from the
    smallest id present) is small, and O(pixels) beats the sort.
    """
    if values.size == 0:
        return values.copy(), np.zeros(0, np.intp), np.zeros(0, np.int64)
    base = int(values.min())
    shifted = (values - base).astype(np.intp, copy=False)
    counts = np.bincount(shifted)
    present = np.flatnonzero(counts)
    lut = np.zeros(counts.size, np.intp)
    lut[present] = np.arange(present.size)
    return (present + base).astype(values.dtype), lut[shifted], counts[present]


def _local_ids(labels: np.ndarray, owned: np.ndarray) -> np.ndarray:
    """`labels` with owned ids (sorted) mapped to 1..k and all others to 0; (h, w) int32.

    A lookup table over the owned ids' range (ids of one window span about a tile's
    objects) replaces a binary search per pixel.
    """
    lo, hi = int(owned[0]), int(owned[-1])
    lut = np.zeros(hi - lo + 2, np.int32)  # the last entry: every id outside the range
    lut[owned - lo] = np.arange(1, owned.size + 1, dtype=np.int32)
    shifted = labels.astype(np.int64) - lo
    shifted[(shifted < 0) | (shifted > hi - lo)] = hi - lo + 1
    return lut[shifted]


def _check_inside(nuc_local, cell_local, owned, lo, hi, tile: Tile) -> np.ndarray:
    """Raise where an owned nucleus or cell reaches `lo`/`hi`; the nuclei's boxes (k, 4) ``y0, x0, y1, x1``."""
    from scipy import ndimage as ndi

    k = owned.size
    found = {}
    for name, local in (("nucleus", nuc_local), ("cell", cell_local)):
        found[name] = ndi.find_objects(local, max_label=k)
        for i, sl in enumerate(found[name]):
            if sl is None:
                raise ValueError(f"nucleus {owned[i]} has no cell: cells must be grown from these nuclei")
            if sl[0].start < lo[0] or sl[1].start < lo[1] or sl[0].stop > hi[0] or sl[1].stop > hi[1]:
                raise ValueError(
                    f"{name} {owned[i]} reaches the edge of tile {tile.index}'s window: it is larger "
                    f"than the tile overlap allows; raise segmentation.overlap_um"
                )
    return np.array([(sl[0].start, sl[1].start, sl[0].stop, sl[1].stop) for sl in found["nucleus"]],
                    np.int64).reshape(k, 4)


def perinuclear(nuclei: np.ndarray, distance_px: float) -> np.ndarray:
    """Nuclei grown by ``distance_px`` (as ``expand_labels``); (h, w) int, 0 background.

    Where it equals the cell label and the pixel is not in that cell's nucleus, the pixel
    is in the cell's perinuclear band: a cell never extends past the nucleus nearest to
    its pixels.
    """
    from skimage.segmentation import expand_labels

    return expand_labels(nuclei, distance=distance_px) if distance_px > 0 else nuclei


def _measure_local(nuc_local, cell_local, cell, not_nucleus, peri_local, img, owned, membrane_px,
                   n_rays, nuc_boxes) -> CellTable:
    """Measure owned objects 1..k of a window (vectorised over cells, compartments and channels)."""
    k = owned.size
    ring_local = np.where(_ring(cell, membrane_px), cell_local, 0)
    cyto_local = np.where(not_nucleus, cell_local, 0)
    counts, sums = _compartment_sums((nuc_local, ring_local, cyto_local, peri_local, cell_local), img, k)
    with np.errstate(invalid="ignore", divide="ignore"):
        means = sums / counts[:, :, None]
    for layer in (2, 3):  # no cytoplasm or no perinuclear band: the membrane ring
        empty = counts[layer] == 0
        means[layer][empty] = means[1][empty]
    nuc_px = _Pixels(nuc_local)
    ecc = _eccentricity(nuc_px, k)
    solidity, centre, dist = _nucleus_shapes(nuc_local, nuc_px, nuc_boxes, k, n_rays)
    return CellTable(owned, counts[0], counts[4], np.zeros((k, 2)), ecc, solidity, means, centre, dist)


def _compartment_sums(locals_: Sequence[np.ndarray], img: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel counts (L, k) and intensity sums (L, k, C) of objects 1..k in each label image.

    One bincount per channel over all compartments at once (compartment l's objects are
    bins l·(k+1) + 1..k): each bin still adds its pixels in raster order, so the sums are
    those of a bincount per compartment, bit for bit. Weights are read as stored
    (bincount converts them to float64 itself), never copied to float64 whole.
    """
    n_layers = len(locals_)
    index, bins = [], []
    for layer, lab in enumerate(locals_):
        flat = lab.ravel()
        sel = np.flatnonzero(flat)
        index.append(sel)
        bins.append(flat[sel].astype(np.intp) + layer * (k + 1))
    index, bins = np.concatenate(index), np.concatenate(bins)
    size = n_layers * (k + 1)
    counts = np.bincount(bins, minlength=size).reshape(n_layers, k + 1)[:, 1:].astype(np.float64)
    pixels = img.reshape(img.shape[0], -1)
    sums = np.zeros((n_layers, k, img.shape[0]))
    for c in range(img.shape[0]):
        sums[:, :, c] = np.bincount(bins, weights=pixels[c][index], minlength=size).reshape(n_layers, k + 1)[:, 1:]
    return counts, sums


def _ring(labels: np.ndarray, membrane_px: float) -> np.ndarray:
    """Pixels with another label (or background) closer than `membrane_px`; (h, w) bool.

    Equal to ``distance_transform_edt(labels == own) < membrane_px`` for every
    label at once; pixels beyond the array do not count as outside.
    """
    r = math.ceil(membrane_px)
    padded = np.pad(labels, r, mode="edge")
    h, w = labels.shape
    ring = np.zeros(labels.shape, bool)
    for dy in range(-r, r + 1):
        for dx in range(-r, r + 1):
            if 0 < math.sqrt(dy * dy + dx * dx) < membrane_px:
                ring |= padded[r + dy:r + dy + h, r + dx:r + dx + w] != labels
    return ring & (labels > 0)


def _eccentricity(px: _Pixels, k: int) -> np.ndarray:
    """regionprops eccentricity of objects 1..k: from the pixel coordinates' covariance."""
    lab, y, x = px.labels, px.y, px.x
    n = np.bincount(lab, minlength=k + 1)[1:]
    my = np.bincount(lab, weights=y, minlength=k + 1)[1:] / n
    mx = np.bincount(lab, weights=x, minlength=k + 1)[1:] / n
    dy, dx = y - my[lab - 1], x - mx[lab - 1]
    a = np.bincount(lab, weights=dy * dy, minlength=k + 1)[1:] / n
    c = np.bincount(lab, weights=dx * dx, minlength=k + 1)[1:] / n
    b = np.bincount(lab, weights=dy * dx, minlength=k + 1)[1:] / n
    root = np.sqrt(((a - c) / 2) ** 2 + b**2)
    l1 = np.maximum((a + c) / 2 + root, 0)
    l2 = np.maximum((a + c) / 2 - root, 0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(l1 > 0, np.sqrt(np.clip(1 - l2 / l1, 0, 1)), 0.0)


def _nucleus_shapes(local: np.ndarray, px: _Pixels, boxes: np.ndarray, k: int,
                    n_rays: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Solidity (as regionprops), ray centre pixel (k, 2) and star distances (k, n_rays) of 1..k.

    `px` are `local`'s labelled pixels and `boxes` (k, 4) the objects' ``y0, x0, y1, x1``.
    """
    area = np.bincount(px.labels, minlength=k + 1)[1:k + 1]
    solidity = area / convex_hull_px(local, k)
    centre = _centre_pixels(local, px, boxes, k)
    dist = np.concatenate([_ray_dist(px, boxes, centre, lo, min(lo + _RAY_BATCH, k), n_rays)
                           for lo in range(0, k, _RAY_BATCH)])
    return solidity, centre, dist


def _centre_pixels(local: np.ndarray, px: _Pixels, boxes: np.ndarray, k: int) -> np.ndarray:
    """Per object 1..k, its centroid pixel (rounded half up), or its pixel nearest the centroid
    (the first in raster order among equals) when that one is not the object's; (k, 2) int64.

    Coordinates are taken from each object's box corner, as on its own mask, so that the
    centroid (an exact integer sum over a count) and the distances are the same floats.
    """
    lab = px.labels
    n = np.bincount(lab, minlength=k + 1)[1:]
    yy, xx = px.y - boxes[lab - 1, 0], px.x - boxes[lab - 1, 1]
    cy = np.bincount(lab, weights=yy, minlength=k + 1)[1:] / n
    cx = np.bincount(lab, weights=xx, minlength=k + 1)[1:] / n
    centre = np.stack([np.floor(cy + 0.5), np.floor(cx + 0.5)], axis=1).astype(np.int64) + boxes[:, :2]
    inside = local[centre[:, 0], centre[:, 1]] == np.arange(1, k + 1)
    if not inside.all():
        pick = ~inside[lab - 1]  # the pixels of objects whose centroid pixel is outside them
        plab, py, pxx = lab[pick], yy[pick], xx[pick]
        d2 = (py - cy[plab - 1]) ** 2 + (pxx - cx[plab - 1]) ** 2
        order = np.lexsort((d2, plab))  # stable: raster order among equal distances
        first = order[np.r_[True, np.diff(plab[order]) != 0]]
        objects = plab[first] - 1
        centre[objects] = np.stack([py[first], pxx[first]], axis=1) + boxes[objects, :2]
    return centre


def _ray_dist(px: _Pixels, boxes: np.ndarray, centre: np.ndarray, lo: int, hi: int, n_rays: int) -> np.ndarray:
    """stardist's ``star_dist`` of objects lo+1..hi at their centre pixels; (hi - lo, n_rays) float32 px.

    star_dist evaluates every object pixel, though one per object is needed. So
    the objects are pasted, each framed by background, with their centres on a
    lattice of spacing g, and star_dist runs on that lattice only (its `grid`).
    A ray stops on the first pixel that is not its object (one step at most
    past the object), so it sees the same pixels as on the label image.
    """
    from stardist.geometry import star_dist

    k = hi - lo
    extent = boxes[lo:hi, 2:] - boxes[lo:hi, :2]
    g = 2 * int(extent.max()) + 3
    cols = math.ceil(math.sqrt(k))
    canvas = np.zeros(((-(-k // cols) + 1) * g, (cols + 1) * g), np.uint16)
    slots = np.stack([np.arange(k) // cols + 1, np.arange(k) % cols + 1], axis=1)
    pick = (px.labels > lo) & (px.labels <= hi)
    obj = px.labels[pick] - 1 - lo
    canvas[slots[obj, 0] * g + px.y[pick] - centre[lo + obj, 0],
           slots[obj, 1] * g + px.x[pick] - centre[lo + obj, 1]] = 1
    return star_dist(canvas, n_rays=n_rays, grid=(g, g), mode="cpp")[slots[:, 0], slots[:, 1]]
