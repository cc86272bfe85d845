"""Cells on a slide of 10⁵–10⁶ of them: a lean table, an overview raster, and points only where zoomed in.

A napari Points layer costs about 1.5 kB of memory and 0.1 ms of CPU per point when it is
built and first drawn (measured: 10⁶ points, 1.2 GB and 140 s under Xvfb), so a whole slide's
cells cannot be one Points layer at open. Here the cell table is read as three columns
(positions float32, phenotype codes, cell ids: 17 bytes a cell, no per-cell Python object);
the whole slide shows a phenotype-coloured density raster (``cells (overview)``) whose size
depends on the slide's area only, and the ``cells (phenotype)`` Points layer holds the cells
inside the current view once there are at most ``max_points`` of them
(:func:`follow_camera`), so its cost is bounded whatever the slide's size.

Nothing here imports napari at module level; the plain functions are tested without a viewer.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = ["CellTable", "read_cell_table", "rows_in_box", "overview_rgba", "points_kwargs", "show_rows", "on_refill",
           "view_box_um", "canvas_size_px", "follow_camera", "follow_points_layer", "POINTS_LAYER",
           "OVERVIEW_LAYER", "MAX_POINTS", "REFILLED"]

POINTS_LAYER = "cells (phenotype)"
OVERVIEW_LAYER = "cells (overview)"
#: The Points layer's event emitted after :func:`show_rows` refilled it (see :func:`on_refill`).
REFILLED = "cells_refilled"
#: Most cells the Points layer holds at once (about 75 MB and a few s of CPU to build and draw).
MAX_POINTS = 50_000

# Fixed colours for the phenotypes the pipeline calls, so a colour means the same cell type
# on every slide; other names take the next colour of _EXTRA_RGB.
_PHENOTYPE_RGB = {
    "CD8_T": (0.89, 0.10, 0.11), "CD4_T": (1.0, 0.50, 0.0), "Treg": (0.60, 0.31, 0.64),
    "B": (0.22, 0.49, 0.72), "tumor": (0.30, 0.69, 0.29), "other": (0.6, 0.6, 0.6),
}
_EXTRA_RGB = ((0.65, 0.34, 0.16), (0.97, 0.51, 0.75), (0.0, 0.8, 0.8), (0.9, 0.9, 0.2), (0.4, 0.4, 1.0))
_MISSING_RGBA = (0.5, 0.5, 0.5, 1.0)


@dataclass(frozen=True)
class CellTable:
    """The columns of the cell table the viewer needs, one row per cell in ``obs`` order.

    Attributes
    ----------
    yx_um : numpy.ndarray, (N, 2) float32
        Centroid (y, x), µm.
    codes : numpy.ndarray, (N,) int16
        Phenotype category code (-1: none).
    categories : tuple of str
        Phenotype names by code.
    cell_id : numpy.ndarray, (N,) int64
        ``obs['cell_id']`` (= label value).
    """

    yx_um: np.ndarray
    codes: np.ndarray
    categories: tuple[str, ...]
    cell_id: np.ndarray

    def __len__(self) -> int:
        return len(self.cell_id)

    def palette(self) -> tuple[np.ndarray, dict[str, tuple]]:
        """RGBA per code ((K + 1, 4) float32, the last row for code -1) and phenotype -> RGBA."""
        palette = np.empty((len(self.categories) + 1, 4), np.float32)
        extra = 0
        for i, name in enumerate(self.categories):
            rgb = _PHENOTYPE_RGB.get(name)
            if rgb is None:
                rgb, extra = _EXTRA_RGB[extra % len(_EXTRA_RGB)], extra + 1
            palette[i] = (*rgb, 1.0)
        palette[-1] = _MISSING_RGBA
        legend = {name: tuple(float(v) for v in palette[i]) for i, name in enumerate(self.categories)}
        return palette, legend

    @classmethod
    def from_obs(cls, obs, *, what: str = "cell table") -> CellTable:
        """From a DataFrame with ``x_um``, ``y_um`` (µm), ``phenotype`` and optionally ``cell_id``."""
        import pandas as pd

        missing = [c for c in ("x_um", "y_um", "phenotype") if c not in obs.columns]
        if missing:
            raise ValueError(f"{what} has no column(s) {missing}; have {list(obs.columns)}")
        cat = pd.Categorical(obs["phenotype"])
        ids = obs["cell_id"].to_numpy(np.int64) if "cell_id" in obs.columns else np.arange(1, len(obs) + 1)
        yx = np.column_stack([obs["y_um"].to_numpy(np.float32), obs["x_um"].to_numpy(np.float32)])
        return cls(yx, np.asarray(cat.codes, np.int16), tuple(str(c) for c in cat.categories), ids)


def read_cell_table(path: str | Path) -> CellTable:
    """The viewer's columns of a ``cells.h5ad``, read column by column (not the whole ``obs``).

    Parameters
    ----------
    path : str or Path
        An AnnData file whose ``obs`` has ``x_um``, ``y_um`` (µm), ``phenotype`` (categorical)
        and ``cell_id``.

    Returns
    -------
    CellTable

    Raises
    ------
    ValueError
        Naming the file, if a column is missing.
    """
    import h5py
    import pandas as pd
    from anndata.io import read_elem

    path = Path(path)
    with h5py.File(path, "r") as f:
        obs = f["obs"]
        missing = [c for c in ("x_um", "y_um", "phenotype") if c not in obs]
        if missing:
            raise ValueError(f"{path}: obs has no column(s) {missing}; have {sorted(obs.keys())}")
        phenotype = read_elem(obs["phenotype"])
        cat = phenotype if isinstance(phenotype, pd.Categorical) else pd.Categorical(phenotype)
        yx = np.column_stack([obs["y_um"][()].astype(np.float32), obs["x_um"][()].astype(np.float32)])
        ids = obs["cell_id"][()].astype(np.int64) if "cell_id" in obs else np.arange(1, len(yx) + 1)
    return CellTable(yx, np.asarray(cat.codes, np.int16), tuple(str(c) for c in cat.categories), ids)


def rows_in_box(table: CellTable, lo_yx_um, hi_yx_um) -> np.ndarray:
    """Indices (int64, ascending) of the cells with ``lo <= (y, x) < hi`` (µm)."""
    lo, hi = np.asarray(lo_yx_um, np.float32), np.asarray(hi_yx_um, np.float32)
    inside = ((table.yx_um >= lo) & (table.yx_um < hi)).all(axis=1)
    return np.flatnonzero(inside)


def overview_rgba(table: CellTable, extent_yx_um, *, bin_um: float = 20.0) -> np.ndarray:
    """The cells as a raster: each bin coloured by the mix of its cells' phenotypes.

    Parameters
    ----------
    table : CellTable
    extent_yx_um : (float, float)
        Slide height and width, µm.
    bin_um : float
        Raster pixel edge, µm; pixel ``(i, j)`` covers ``[i, i+1) x [j, j+1)`` times ``bin_um``.

    Returns
    -------
    numpy.ndarray, (ceil(H / bin_um), ceil(W / bin_um), 4) float32
        RGB = count-weighted mean of the phenotype colours; alpha = density relative to the
        99th percentile of non-empty bins (0 where there is no cell).
    """
    if not bin_um > 0:
        raise ValueError(f"bin_um must be positive, got {bin_um}")
    shape = tuple(max(1, int(np.ceil(float(e) / bin_um))) for e in extent_yx_um)
    ij = np.clip((table.yx_um // np.float32(bin_um)).astype(np.int64), 0, np.array(shape) - 1)
    flat = ij[:, 0] * shape[1] + ij[:, 1]
    palette, _ = table.palette()
    n_px = shape[0] * shape[1]
    counts = np.bincount(flat, minlength=n_px).astype(np.float32)
    rgba = np.zeros((n_px, 4), np.float32)
    for k in range(3):  # colour sums per bin, one channel at a time: no (N, 3) temporary
        rgba[:, k] = np.bincount(flat, weights=palette[table.codes, k], minlength=n_px)
    filled = counts > 0
    rgba[filled, :3] /= counts[filled, None]
    if filled.any():
        rgba[:, 3] = np.clip(counts / max(float(np.percentile(counts[filled], 99)), 1.0), 0.0, 1.0)
    return rgba.reshape(*shape, 4)


def points_kwargs(table: CellTable, rows: np.ndarray, *, size_um: float = 6.0) -> tuple[np.ndarray, dict]:
    """Data and layer keywords for the cells ``rows`` of ``table``.

    Returns
    -------
    data : numpy.ndarray, (len(rows), 2) float32, (y, x) µm
    kwargs : dict
        ``features``: ``cell_id``, ``phenotype`` (categorical over all of the table's
        phenotypes) and ``row`` (the cell's index in the table, for per-cell values such as
        a marker's intensity); ``face_color`` one RGBA per cell (absent with no rows).
    """
    import pandas as pd

    if not size_um > 0:
        raise ValueError(f"size_um must be positive, got {size_um}")
    rows = np.asarray(rows, np.int64)
    palette, legend = table.palette()
    codes = table.codes[rows]
    features = pd.DataFrame({
        "cell_id": table.cell_id[rows],
        "phenotype": pd.Categorical.from_codes(codes, categories=list(table.categories)),
        "row": rows,
    })
    kwargs = {"name": POINTS_LAYER, "scale": (1.0, 1.0), "units": "micrometer", "size": size_um,
              "border_width": 0.0, "features": features,
              "metadata": {"phenotype_colors": legend, "n_cells": len(table)}}
    if len(rows):
        kwargs["face_color"] = palette[codes]  # napari cannot colour an empty layer from an array
    return table.yx_um[rows], kwargs


def on_refill(layer, callback) -> None:
    """Call ``callback(event)`` each time :func:`show_rows` has refilled ``layer`` (data, features, colours).

    ``event.rows`` holds the table rows now shown. The layer's own ``data`` event fires before
    its features and colours follow, so whoever restyles the points (e.g. the review widget's
    pending reassignments) listens here instead.
    """
    if not hasattr(layer.events, REFILLED):
        layer.events.add(**{REFILLED: None})
    getattr(layer.events, REFILLED).connect(callback)


def show_rows(layer, table: CellTable, rows: np.ndarray) -> None:
    """Put the cells ``rows`` of ``table`` in the Points ``layer`` (data, features, colours).

    Then emits the layer's :func:`on_refill` event, if anyone connected to it.
    """
    data, kwargs = points_kwargs(table, rows, size_um=float(np.asarray(layer.size).flat[0]) if len(layer.data)
                                 else 6.0)
    layer.selected_data = set()
    layer.data = data
    layer.features = kwargs["features"]
    if len(rows):
        layer.face_color = kwargs["face_color"]
    if hasattr(layer.events, REFILLED):
        getattr(layer.events, REFILLED)(rows=np.asarray(rows, np.int64))


def view_box_um(center_yx, zoom: float, canvas_yx_px) -> tuple[np.ndarray, np.ndarray]:
    """The world box (µm) a 2D camera shows: ``center ± canvas / zoom / 2``."""
    half = np.asarray(canvas_yx_px, np.float64) / float(zoom) / 2.0
    center = np.asarray(center_yx, np.float64)[-2:]
    return center - half, center + half


def canvas_size_px(viewer) -> tuple[int, int]:
    """The canvas (height, width) in screen px: napari's public canvas model (``viewer.canvas.size``).

    The model follows the window (and a viewer without one keeps napari's default size).
    """
    return tuple(int(v) for v in viewer.canvas.size)


def follow_camera(viewer, layer, table: CellTable, *, max_points: int = MAX_POINTS) -> callable:
    """Keep ``layer`` filled with the cells in view when there are at most ``max_points`` of them.

    Connected to the camera's ``zoom`` and ``center`` events (and run once now); with more
    cells in view the layer is left empty and the overview raster stands for them.
    Returns the update function (call it to refresh; it returns the rows shown).
    """
    state = {"rows": None}

    def update(*_) -> np.ndarray:
        camera = viewer.scene.camera
        lo, hi = view_box_um(camera.center, camera.zoom, canvas_size_px(viewer))
        rows = rows_in_box(table, lo, hi)
        if len(rows) > max_points:
            rows = rows[:0]
        if state["rows"] is None or not np.array_equal(rows, state["rows"]):
            show_rows(layer, table, rows)
            state["rows"] = rows
        return rows

    viewer.scene.camera.events.zoom.connect(update)
    viewer.scene.camera.events.center.connect(update)
    update()
    return update


def follow_points_layer(viewer, layer, *, max_points: int = MAX_POINTS):
    """:func:`follow_camera` for a Points layer of :func:`tme_napari.layers.result_folder_layers`
    that opened with fewer cells than its slide has; once per layer. Returns the update function or None."""
    meta = layer.metadata
    if meta.get("following") or "cells_file" not in meta or meta.get("n_cells", 0) <= len(layer.data):
        return None
    table = read_cell_table(meta["cells_file"])
    meta["following"] = True
    return follow_camera(viewer, layer, table, max_points=max_points)
