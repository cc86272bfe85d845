"""The untiled reference of :func:`tme_pipeline.quantify.measure_cells`: the test oracle.

Object by object with :func:`skimage.measure.regionprops` and a distance transform per cell,
on whole in-memory arrays; slow, and kept apart from the tiled stage it checks.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import anndata as ad
import numpy as np

from .cell_table import (LAYERS, MAX_STARDIST_ID, MIN_RING_PX, CellTable, cell_anndata, check_measure_inputs,
                         measure_params)
from .quantify import perinuclear

__all__ = ["measure_cells_reference"]


def measure_cells_reference(
    nuclei: np.ndarray,
    cells: np.ndarray,
    image: np.ndarray,
    *,
    pixel_um: float,
    markers: Mapping[str, int],
    compartments: Mapping[str, str],
    nuclear_channel: int,
    expand_um: float,
    membrane_um: float,
    perinuclear_um: float = 1.0,
    channel_names: Sequence[str] | None = None,
    n_rays: int = 32,
) -> ad.AnnData:
    """Untiled, object by object with :func:`skimage.measure.regionprops`: the test oracle.

    Same arguments and result as :func:`measure_cells`, on whole in-memory
    arrays (``nuclei``, ``cells`` (Y, X) int; ``image`` (C, Y, X)); slow.
    """
    from scipy import ndimage as ndi
    from skimage.measure import regionprops
    from stardist.geometry import star_dist

    nuclei, cells, image = np.asarray(nuclei), np.asarray(cells), np.asarray(image)
    chans = check_measure_inputs(image, nuclei.shape, markers, compartments, nuclear_channel, pixel_um, n_rays)
    pixels = np.moveaxis(image[chans], 0, -1).astype(np.float64)
    membrane_px = max(membrane_um / pixel_um, MIN_RING_PX)
    r = math.ceil(membrane_px) + 1
    props = regionprops(nuclei, intensity_image=pixels)
    cell_props = {p.label: p for p in regionprops(cells, intensity_image=pixels)}
    ids, inverse = np.unique(nuclei, return_inverse=True)
    if ids.size > MAX_STARDIST_ID:
        raise ValueError(f"the reference handles at most {MAX_STARDIST_ID} nuclei")
    dist = star_dist((inverse.reshape(nuclei.shape) + (ids[0] != 0)).astype(np.uint16), n_rays=n_rays, mode="cpp")
    k = len(props)
    table = CellTable.empty(len(chans), n_rays)
    table.ids = np.array([p.label for p in props], np.int64)
    table.nucleus_px = np.array([p.area for p in props], np.float64)
    table.cell_px = np.array([cell_props[p.label].area for p in props], np.float64)
    table.centroid_yx = np.array([p.centroid for p in props], np.float64).reshape(k, 2)
    table.eccentricity = np.array([p.eccentricity for p in props], np.float64)
    table.solidity = np.array([p.solidity for p in props], np.float64)
    table.means = np.zeros((len(LAYERS), k, len(chans)))
    peri = perinuclear(nuclei, perinuclear_um / pixel_um)
    centre = np.zeros((k, 2), np.int64)
    for i, p in enumerate(props):
        y0, x0, y1, x1 = cell_props[p.label].bbox
        sl = (slice(max(y0 - r, 0), y1 + r), slice(max(x0 - r, 0), x1 + r))
        inside = cells[sl] == p.label
        ring = inside & (ndi.distance_transform_edt(inside) < membrane_px) if not inside.all() else ~inside
        cyto = inside & (nuclei[sl] != p.label)
        band = cyto & (peri[sl] == p.label)
        table.means[:, i] = [p.intensity_mean, pixels[sl][ring].mean(axis=0),
                             pixels[sl][cyto if cyto.any() else ring].mean(axis=0),
                             pixels[sl][band if band.any() else ring].mean(axis=0),
                             cell_props[p.label].intensity_mean]
        centre[i] = np.floor(np.asarray(p.centroid) + 0.5)
        if nuclei[centre[i, 0], centre[i, 1]] != p.label:
            centre[i] = p.coords[np.argmin(((p.coords - p.centroid) ** 2).sum(axis=1))]
    table.centre_yx, table.ray_dist = centre, dist[centre[:, 0], centre[:, 1]]
    return cell_anndata(table, chans, markers, compartments, nuclear_channel, channel_names, pixel_um,
                    measure_params(expand_um, membrane_um, perinuclear_um, n_rays))
