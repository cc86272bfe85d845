"""The per-cell table the measuring stages share, and the AnnData it becomes (``cells.h5ad``).

:mod:`tme_pipeline.quantify` (tiled) and :mod:`tme_pipeline.quantify_reference`
(its untiled oracle) both fill a :class:`CellTable` and turn it into the same
AnnData with :func:`cell_anndata`, so the two can only differ in how they measure.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields

import anndata as ad
import numpy as np
import pandas as pd

__all__ = ["COMPARTMENT_LAYERS", "LAYERS", "MIN_RING_PX", "MAX_STARDIST_ID", "CellTable", "cell_anndata",
           "check_measure_inputs", "measure_params"]

# Panel compartment (MarkerSpec.compartment) -> the layer that X takes it from.
COMPARTMENT_LAYERS = {"nuclear": "nucleus", "membrane": "membrane", "cytoplasm": "cytoplasm",
                      "perinuclear": "perinuclear", "whole": "cell"}
LAYERS = ("nucleus", "membrane", "cytoplasm", "perinuclear", "cell")
# A ring thinner than one pixel would be empty: take at least the boundary pixels.
MIN_RING_PX = 1.0 + 1e-6
MAX_STARDIST_ID = 65535  # stardist's star_dist reads labels as uint16


@dataclass
class CellTable:
    """Measurements of k cells in level-0 px; the measuring stages' internal currency."""

    ids: np.ndarray  # (k,) int64
    nucleus_px: np.ndarray  # (k,) float64 pixel counts
    cell_px: np.ndarray  # (k,)
    centroid_yx: np.ndarray  # (k, 2) float64, nucleus centroid
    eccentricity: np.ndarray  # (k,)
    solidity: np.ndarray  # (k,)
    means: np.ndarray  # (5, k, C) float64, compartments in LAYERS order
    centre_yx: np.ndarray  # (k, 2) int64, pixel the rays start from
    ray_dist: np.ndarray  # (k, n_rays) float32, px

    @classmethod
    def concat(cls, tables: Sequence[CellTable]) -> CellTable:
        axis = {"means": 1}
        return cls(**{f.name: np.concatenate([getattr(t, f.name) for t in tables], axis=axis.get(f.name, 0))
                      for f in fields(cls)})

    def take(self, order: np.ndarray) -> CellTable:
        return CellTable(**{f.name: getattr(self, f.name)[:, order] if f.name == "means" else getattr(self, f.name)[order]
                         for f in fields(self)})

    @classmethod
    def empty(cls, n_channels: int, n_rays: int) -> CellTable:
        z = np.zeros(0)
        return cls(z.astype(np.int64), z, z, np.zeros((0, 2)), z, z, np.zeros((len(LAYERS), 0, n_channels)),
                   np.zeros((0, 2), np.int64), np.zeros((0, n_rays), np.float32))


def measure_params(expand_um, membrane_um, perinuclear_um, n_rays, neighbours=None) -> dict:
    """``uns['cells']``: the measuring parameters (µm), and the neighbour correction or ``False``."""
    return {"expand_um": float(expand_um), "membrane_um": float(membrane_um),
            "perinuclear_um": float(perinuclear_um), "n_rays": int(n_rays),
            "neighbour_correction": neighbours.to_uns() if neighbours else False}


def check_measure_inputs(image, shape_yx, markers, compartments, nuclear_channel, pixel_um, n_rays) -> list[int]:
    """Validate the arguments; the sorted channel indices to read."""
    if image.ndim != 3 or tuple(image.shape[1:]) != tuple(shape_yx):
        raise ValueError(f"image must be (C, Y, X) with (Y, X) = {tuple(shape_yx)}, got {image.shape}")
    if not pixel_um > 0 or n_rays < 3:
        raise ValueError(f"need pixel_um > 0 and n_rays >= 3, got {pixel_um}, {n_rays}")
    bad = {m: compartments.get(m) for m in markers if compartments.get(m) not in COMPARTMENT_LAYERS}
    if bad:
        raise ValueError(f"markers without a valid compartment ({', '.join(COMPARTMENT_LAYERS)}): {bad}")
    chans = sorted({*markers.values(), nuclear_channel})
    if chans and not 0 <= chans[0] <= chans[-1] < image.shape[0]:
        raise ValueError(f"channel indices {chans} out of range for {image.shape[0]} channels")
    return chans


def cell_anndata(table: CellTable, chans, markers, compartments, nuclear_channel, channel_names, pixel_um,
             params: dict) -> ad.AnnData:
    """The cells.h5ad AnnData of a table: µm, float32 layers, plain arrays and strings only."""
    names = list(markers)
    col = {c: j for j, c in enumerate(chans)}
    cols = [col[markers[m]] for m in names]
    layers = {name: table.means[j][:, cols].astype(np.float32) for j, name in enumerate(LAYERS)}
    X = np.empty((table.ids.size, len(names)), np.float32)
    for j, m in enumerate(names):
        X[:, j] = layers[COMPARTMENT_LAYERS[compartments[m]]][:, j]
    y_um, x_um = table.centroid_yx[:, 0] * pixel_um, table.centroid_yx[:, 1] * pixel_um
    obs = pd.DataFrame({
        "cell_id": table.ids.astype(np.int64), "x_um": x_um, "y_um": y_um,
        "area_um2": table.cell_px * pixel_um**2, "nucleus_area_um2": table.nucleus_px * pixel_um**2,
        "eccentricity": table.eccentricity.astype(np.float64), "solidity": table.solidity.astype(np.float64),
        "dapi_mean": table.means[0][:, col[nuclear_channel]],
    }, index=pd.Index(table.ids.astype(str), name="cell"))
    var = pd.DataFrame({
        "compartment": [compartments[m] for m in names],
        "channel": [channel_names[markers[m]] if channel_names is not None else f"C{markers[m]}" for m in names],
    }, index=pd.Index(names, name="marker"))
    adata = ad.AnnData(X=X, obs=obs, var=var, layers=layers)
    adata.obsm["spatial"] = np.column_stack([x_um, y_um]).astype(np.float64)
    adata.obsm["nucleus_polygon_um"] = _polygon_um(table, pixel_um)
    adata.uns["spatial_unit"] = "um"
    adata.uns["pixel_um"] = float(pixel_um)
    adata.uns["cells"] = params
    return adata


def _polygon_um(table: CellTable, pixel_um: float) -> np.ndarray:
    """Vertices (n, n_rays, 2) float32 ``x, y`` µm, as stardist's ``dist_to_coord``."""
    from stardist.geometry.geom2d import ray_angles

    phi = ray_angles(table.ray_dist.shape[1])
    d = table.ray_dist.astype(np.float64)
    y = table.centre_yx[:, :1] + d * np.sin(phi)
    x = table.centre_yx[:, 1:] + d * np.cos(phi)
    return (np.stack([x, y], axis=-1) * pixel_um).astype(np.float32)
