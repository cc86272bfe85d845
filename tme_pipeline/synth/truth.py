"""Ground truth of a synthetic slide: files, expected metrics and label rendering.

Files in a truth folder
-----------------------
``cells.csv.gz``     one row per cell (``cell_id`` = label id), see :func:`make_cells`.
``tls.geojson``      TLS outlines in level-0 px (closed rings); properties tls_id, maturity,
                     area_um2, x_um, y_um (centre), n_B, n_T; ``pixel_um`` on the collection.
``regions.npz``      coarse boolean masks tissue/tumor/margin/stroma/necrosis, ``tumor_bed``
                     (the whole tumour compartment, necrosis and its own margin side included;
                     absent in truth written before it was added) and ``um_per_px``;
                     mask pixel (i, j) covers [j, j+1) x [i, i+1) times ``um_per_px`` µm.
``metrics.json``     expected metrics, see :func:`compute_metrics`.
``truth.json``       seed, pixel size, size, condition, acquisition, crop origin.
``nuclei_crop.tif``, ``cells_crop.tif``  uint32 labels of a crop window (``truth.json`` crop).
"""

from __future__ import annotations

import gzip
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import tifffile

from .cells import CELL_TYPES, MARKERS, T_TYPES
from .layout import MATURITIES, REGION_NAMES
from .raster import CellGeometry, rasterize

METRIC_REGIONS = ("tissue", "tumor", "margin", "stroma")


@dataclass
class SlideTruth:
    """Ground truth of one slide.

    Attributes
    ----------
    cells : DataFrame, one row per cell (see :func:`tme_pipeline.synth.cells.make_cells`).
    tls : DataFrame, one row per TLS: tls_id, maturity, area_um2, x_um, y_um, n_B, n_T and
        ``polygon_px`` ((k, 2) float64 (x, y) level-0 px).
    regions : dict of str -> (Hc, Wc) bool coarse masks.
    region_um : float, µm per coarse mask pixel.
    region_areas_mm2 : dict of region -> area in mm².
    metrics : dict of metric name -> float.
    meta : dict, the contents of truth.json.
    """

    cells: pd.DataFrame
    tls: pd.DataFrame
    regions: dict[str, np.ndarray]
    region_um: float
    region_areas_mm2: dict[str, float]
    metrics: dict[str, float]
    meta: dict = field(default_factory=dict)

    @property
    def pixel_um(self) -> float:
        return float(self.meta["pixel_um"])


def compute_metrics(cells: pd.DataFrame, regions: dict[str, np.ndarray], region_um: float,
                    tls: pd.DataFrame) -> dict[str, float | None]:
    """Expected per-slide metrics from the truth cell table and coarse region masks.

    A cell belongs to the region of the coarse mask pixel under its centre; densities are
    counts per region area (cells/mm²), ``fraction_*`` are % of the region's cells,
    ``tls_per_mm2`` is per mm² of tissue, ``tls_area_fraction`` is TLS area / tissue area,
    ``fraction_pdl1_pos_tumor`` is % of viable tumour cells (any region) that are PD-L1+,
    ``ratio_cd8_t_treg_<region>`` is None where the region has no Treg.
    """
    px_mm2 = (region_um / 1000.0) ** 2
    ix = np.clip((cells["x_um"].to_numpy() // region_um).astype(np.int64), 0, regions["tissue"].shape[1] - 1)
    iy = np.clip((cells["y_um"].to_numpy() // region_um).astype(np.int64), 0, regions["tissue"].shape[0] - 1)
    types = cells["cell_type"].astype(str).to_numpy()
    groups = {t: types == t for t in CELL_TYPES}
    groups["t_cell"] = np.isin(types, T_TYPES)
    out: dict[str, float | None] = {"n_cells": float(len(cells))}
    for r in REGION_NAMES:
        out[f"area_{r}_mm2"] = float(np.count_nonzero(regions[r])) * px_mm2
    for r in METRIC_REGIONS:
        in_r = regions[r][iy, ix]
        area = out[f"area_{r}_mm2"]
        n_r = int(in_r.sum())
        for g, sel in groups.items():
            k = int(np.count_nonzero(sel & in_r))
            out[f"density_{g}_{r}"] = k / area if area > 0 else 0.0
            out[f"fraction_{g}_{r}"] = 100.0 * k / n_r if n_r else 0.0
        n8, nt = np.count_nonzero(groups["cd8_t"] & in_r), np.count_nonzero(groups["treg"] & in_r)
        out[f"ratio_cd8_t_treg_{r}"] = float(n8 / nt) if nt else None  # JSON null, not NaN
    tumor = groups["tumor"] & (cells["state"].astype(str).to_numpy() != "pyknotic")
    out["fraction_pdl1_pos_tumor"] = 100.0 * float(cells["PDL1_pos"].to_numpy()[tumor].mean()) if tumor.any() else 0.0
    out["tls_count"] = float(len(tls))
    for m in MATURITIES:
        out[f"tls_{m}_count"] = float(np.count_nonzero(tls["maturity"] == m)) if len(tls) else 0.0
    tissue = out["area_tissue_mm2"]
    out["tls_per_mm2"] = len(tls) / tissue if tissue else 0.0
    out["tls_area_fraction"] = float(tls["area_um2"].sum()) / 1e6 / tissue if tissue and len(tls) else 0.0
    return out


def render_truth_labels(truth: SlideTruth, window: tuple[slice, slice], *, kind: str = "nuclei") -> np.ndarray:
    """Instance labels of any level-0 window, ids equal to ``truth.cells.cell_id``.

    Parameters
    ----------
    truth : SlideTruth
    window : (slice rows, slice cols) in level-0 pixels, steps of 1.
    kind : {"nuclei", "cells"}

    Returns
    -------
    (h, w) uint32 labels, 0 = background.
    """
    if kind not in ("nuclei", "cells"):
        raise ValueError(f"kind must be 'nuclei' or 'cells', got {kind!r}")
    ys, xs = window
    geom = CellGeometry.from_table(truth.cells, truth.pixel_um)
    owner, v = rasterize(geom, (ys.start, ys.stop, xs.start, xs.stop))
    return owner if kind == "cells" else np.where(v < 0, owner, 0).astype(np.uint32)


def tls_table(layout_tls, cells: pd.DataFrame, pixel_um: float) -> pd.DataFrame:
    """TLS truth table from the layout's TLS specs and the final cells."""
    rows = []
    types = cells["cell_type"].astype(str).to_numpy()
    tid = cells["tls_id"].to_numpy()
    for t in layout_tls:
        poly = t.polygon_um()
        xp, yp = poly[:, 0], poly[:, 1]
        area = 0.5 * abs(np.dot(xp, np.roll(yp, -1)) - np.dot(yp, np.roll(xp, -1)))
        rows.append({"tls_id": t.tls_id, "maturity": t.maturity, "area_um2": float(area),
                     "x_um": t.x_um, "y_um": t.y_um,
                     "n_B": int(np.count_nonzero((tid == t.tls_id) & (types == "b_cell"))),
                     "n_T": int(np.count_nonzero((tid == t.tls_id) & np.isin(types, T_TYPES))),
                     "polygon_px": poly / pixel_um})
    return pd.DataFrame(rows, columns=["tls_id", "maturity", "area_um2", "x_um", "y_um", "n_B", "n_T", "polygon_px"])


def write_truth(truth_dir: str | Path, truth: SlideTruth, *, crop: tuple[int, int, int]) -> None:
    """Write all truth files; ``crop = (y0, x0, size)`` in level-0 px."""
    d = Path(truth_dir)
    d.mkdir(parents=True, exist_ok=True)
    with gzip.GzipFile(d / "cells.csv.gz", "wb", mtime=0) as fh:
        fh.write(truth.cells.to_csv(index=False, lineterminator="\n").encode())
    feats = [{"type": "Feature",
              "geometry": {"type": "Polygon",
                           "coordinates": [np.round(np.vstack([r.polygon_px, r.polygon_px[:1]]), 3).tolist()]},
              "properties": {"tls_id": int(r.tls_id), "maturity": r.maturity, "area_um2": round(r.area_um2, 3),
                             "x_um": r.x_um, "y_um": r.y_um, "n_B": int(r.n_B), "n_T": int(r.n_T)}}
             for r in truth.tls.itertuples()]
    gj = {"type": "FeatureCollection", "pixel_um": truth.pixel_um, "features": feats}
    (d / "tls.geojson").write_text(json.dumps(gj, indent=1))
    np.savez_compressed(d / "regions.npz", um_per_px=np.float64(truth.region_um),
                        **{k: v.astype(bool) for k, v in truth.regions.items()})
    (d / "metrics.json").write_text(json.dumps(truth.metrics, indent=1, sort_keys=True))
    (d / "truth.json").write_text(json.dumps(truth.meta, indent=1, sort_keys=True))
    y0, x0, size = crop
    win = (slice(y0, y0 + size), slice(x0, x0 + size))
    for kind in ("nuclei", "cells"):
        tifffile.imwrite(d / f"{kind}_crop.tif", render_truth_labels(truth, win, kind=kind),
                         compression="zlib", metadata=None)


def load_truth(truth_dir: str | Path) -> SlideTruth:
    """Read a truth folder written by :func:`synth_slide`.

    Parameters
    ----------
    truth_dir : folder with cells.csv.gz, tls.geojson, regions.npz, metrics.json, truth.json.

    Returns
    -------
    SlideTruth
    """
    d = Path(truth_dir)
    if not (d / "truth.json").is_file():
        raise FileNotFoundError(f"{d}: not a synthetic truth folder (no truth.json)")
    meta = json.loads((d / "truth.json").read_text())
    cells = pd.read_csv(d / "cells.csv.gz", float_precision="round_trip")
    cells["cell_id"] = cells["cell_id"].astype(np.uint32)
    for col in ("cell_type", "region", "zone", "state"):
        cells[col] = cells[col].astype("category")
    for m in MARKERS:
        cells[f"{m}_int"] = cells[f"{m}_int"].astype(np.float32)
        cells[f"{m}_pos"] = cells[f"{m}_pos"].astype(bool)
    gj = json.loads((d / "tls.geojson").read_text())
    rows = []
    for f in gj["features"]:
        p = f["properties"]
        poly = np.asarray(f["geometry"]["coordinates"][0], np.float64)[:-1]
        rows.append({**p, "polygon_px": poly})
    tls = pd.DataFrame(rows, columns=["tls_id", "maturity", "area_um2", "x_um", "y_um", "n_B", "n_T", "polygon_px"])
    with np.load(d / "regions.npz", allow_pickle=False) as z:
        regions = {k: z[k] for k in (*REGION_NAMES, "tumor_bed") if k in z.files}
        region_um = float(z["um_per_px"])
    metrics = json.loads((d / "metrics.json").read_text())
    areas = {r: metrics[f"area_{r}_mm2"] for r in regions}
    return SlideTruth(cells, tls, regions, region_um, areas, metrics, meta)
