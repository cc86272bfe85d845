"""A reviewer's corrections of one slide: the append-only record, and applying it to stage results.

A pathologist reviewing a slide (in napari, :mod:`tme_napari.review`) deletes a false TLS,
changes a maturity, draws a missed TLS, redraws the tumour bed, reassigns the phenotype of
cells or moves a marker's gate. Each is one **correction**, appended to
``OUT/corrections/<slide_id>/corrections.json`` (:func:`tme_pipeline.results.corrections_file`)
and never changed afterwards::

    {"format": 1, "slide_id": "P01_post", "corrections": [
      {"id": "c0001", "who": "anna", "when": "2026-12-03T14:02:11+00:00", "kind": "tls_delete",
       "payload": {"tls_id": 3, "polygon_um": [[x, y], ...]}}, ...]}

Kinds and payloads (coordinates ``[x, y]`` in µm from the slide's top left corner):

==================  =========  ===========================================================
kind                stage      payload
==================  =========  ===========================================================
tls_delete          tls        ``tls_id``, ``polygon_um`` (its outline when deleted)
tls_maturity        tls        ``tls_id``, ``polygon_um``, ``maturity``
tls_add             tls        ``polygon_um``, ``maturity``
bed_edit            regions    ``polygons_um`` (list of outlines): the whole new bed;
                               optional ``holes_um``: per outline, its list of hole rings
                               (e.g. a stroma island inside the bed)
phenotype_reassign  phenotype  ``cell_ids``, ``phenotype``
gate                phenotype  ``marker``, ``gate`` (in ``X`` units of ``cells.h5ad``)
==================  =========  ===========================================================

The run applies them: each stage of the table above applies its own corrections, in order,
to what it computed, and the SHA-256 of those corrections is one of the stage's ``inputs``
in ``stages.json``; so a new correction makes that stage and those downstream of it stale,
and nothing upstream. A TLS is found again by its outline (the current TLS overlapping the
recorded one by IoU >= 0.5), not by its id, so that a correction survives an upstream re-run
that renumbers the TLS; cells are found by ``cell_id`` (stable unless segmentation re-runs).
A correction that no longer applies is skipped with a warning, never silently.
"""

from __future__ import annotations

import fcntl
import getpass
import hashlib
import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from .io.results import write_json

__all__ = [
    "KINDS", "STAGE_OF_KIND", "Correction", "load_corrections", "append_corrections", "for_stage",
    "corrections_digest", "correction_inputs", "corrections_summary", "apply_gates", "apply_reassignments",
    "apply_tls_corrections", "apply_bed_edit", "bed_polygons",
]

log = logging.getLogger(__name__)

FORMAT = 1
#: Correction kind -> the stage that applies it.
STAGE_OF_KIND = {"tls_delete": "tls", "tls_maturity": "tls", "tls_add": "tls", "bed_edit": "regions",
                 "phenotype_reassign": "phenotype", "gate": "phenotype"}
KINDS = tuple(STAGE_OF_KIND)
_PAYLOAD_KEYS = {"tls_delete": ("tls_id", "polygon_um"), "tls_maturity": ("tls_id", "polygon_um", "maturity"),
                 "tls_add": ("polygon_um", "maturity"), "bed_edit": ("polygons_um",),
                 "phenotype_reassign": ("cell_ids", "phenotype"), "gate": ("marker", "gate")}
#: Least overlap (IoU) of a TLS with a correction's recorded outline for it to be that TLS.
MIN_TLS_IOU = 0.5


@dataclass(frozen=True)
class Correction:
    """One reviewer's correction, as stored.

    Attributes
    ----------
    id : str
        ``c0001``, ``c0002``, ... in the order they were saved.
    who : str
        User name.
    when : str
        UTC time, ISO 8601.
    kind : str
        One of :data:`KINDS`.
    payload : dict
        What was corrected (see the module table); lengths in µm.
    """

    id: str
    who: str
    when: str
    kind: str
    payload: Mapping

    def to_json(self) -> dict:
        """The stored entry."""
        return {"id": self.id, "who": self.who, "when": self.when, "kind": self.kind, "payload": dict(self.payload)}


def _polygon(coords, what: str):
    """A valid shapely polygon from ``[[x, y], ...]`` (µm); ``ValueError`` naming ``what`` otherwise."""
    import shapely
    from shapely.geometry import Polygon

    ring = np.asarray(coords, dtype=np.float64)
    if ring.ndim != 2 or ring.shape[1] != 2 or len(ring) < 3 or not np.isfinite(ring).all():
        raise ValueError(f"{what}: a polygon needs >= 3 finite [x, y] points (µm), got shape {ring.shape}")
    poly = shapely.make_valid(Polygon(ring))
    poly = shapely.union_all([g for g in getattr(poly, "geoms", [poly]) if g.geom_type == "Polygon"])
    if poly.is_empty or poly.area <= 0:
        raise ValueError(f"{what}: the polygon has no area")
    return poly


def _check(kind: str, payload: Mapping, what: str) -> None:
    """``ValueError`` naming ``what`` unless the payload has the fields of its kind, well formed."""
    from .tls import MATURITIES

    if kind not in STAGE_OF_KIND:
        raise ValueError(f"{what}: unknown correction kind {kind!r} (known: {', '.join(KINDS)})")
    missing = [k for k in _PAYLOAD_KEYS[kind] if k not in payload]
    if missing:
        raise ValueError(f"{what}: a {kind} correction needs {missing} in its payload")
    if "maturity" in payload and payload["maturity"] not in MATURITIES:
        raise ValueError(f"{what}: maturity {payload['maturity']!r} is not one of {MATURITIES}")
    if "polygon_um" in payload:
        _polygon(payload["polygon_um"], what)
    if kind == "bed_edit":
        for poly in payload["polygons_um"]:
            _polygon(poly, what)
        holes = payload.get("holes_um")
        if holes is not None:
            if not isinstance(holes, list) or len(holes) != len(payload["polygons_um"]):
                raise ValueError(f"{what}: holes_um needs one list of hole rings per outline of polygons_um "
                                 f"({len(payload['polygons_um'])})")
            for rings in holes:
                for ring in rings:
                    _polygon(ring, f"{what} (a hole)")
    if kind == "phenotype_reassign" and (not payload["cell_ids"] or not str(payload["phenotype"])):
        raise ValueError(f"{what}: phenotype_reassign needs cell ids and a phenotype")
    if kind == "gate" and not np.isfinite(float(payload["gate"])):
        raise ValueError(f"{what}: gate {payload['gate']!r} is not a finite number")


def _read(path: Path, slide_id: str | None) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {"format": FORMAT, "slide_id": slide_id, "corrections": []}
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: not valid JSON: {error}") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT or not isinstance(data.get("corrections"), list):
        raise ValueError(f"{path}: not a corrections file (format {FORMAT} with a 'corrections' list)")
    if slide_id is not None and data.get("slide_id") != slide_id:
        raise ValueError(f"{path}: holds the corrections of slide {data.get('slide_id')!r}, not {slide_id!r}")
    return data


def load_corrections(path: str | Path, *, slide_id: str | None = None) -> tuple[Correction, ...]:
    """The corrections of a slide, in order; none when the file does not exist.

    Parameters
    ----------
    path : str or Path
        ``OUT/corrections/<slide_id>/corrections.json``.
    slide_id : str, optional
        Checked against the file's.

    Raises
    ------
    ValueError
        Naming the file and the entry: not a corrections file, another slide's, a malformed entry.
    """
    path = Path(path)
    out = []
    for i, entry in enumerate(_read(path, slide_id)["corrections"]):
        what = f"{path}: correction {entry.get('id', i) if isinstance(entry, dict) else i}"
        if not isinstance(entry, dict) or not {"id", "who", "when", "kind", "payload"} <= set(entry):
            raise ValueError(f"{what}: needs id, who, when, kind and payload")
        _check(entry["kind"], entry["payload"], what)
        out.append(Correction(str(entry["id"]), str(entry["who"]), str(entry["when"]), entry["kind"],
                              dict(entry["payload"])))
    return tuple(out)


def append_corrections(path: str | Path, slide_id: str, new: Sequence[tuple[str, Mapping]], *,
                       who: str | None = None) -> tuple[Correction, ...]:
    """Append corrections to a slide's file; the entries already there are written back as read.

    Parameters
    ----------
    path : str or Path
        ``OUT/corrections/<slide_id>/corrections.json`` (created with its folder if absent).
    slide_id : str
    new : sequence of (kind, payload)
        See the module table; every one is checked before anything is written.
    who : str, optional
        The reviewer; defaults to the login name.

    Returns
    -------
    tuple of Correction
        The appended entries, with their ids and UTC time.
    """
    path = Path(path)
    for i, (kind, payload) in enumerate(new):
        _check(kind, payload, f"{path}: new correction {i + 1} ({kind})")
    path.parent.mkdir(parents=True, exist_ok=True)
    who = who or getpass.getuser()
    when = datetime.now(timezone.utc).isoformat(timespec="seconds")
    # Two review sessions on one slide must not both take the same id or drop each other's entries.
    with open(path.parent / ".corrections.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        data = _read(path, slide_id)
        load_corrections(path, slide_id=slide_id)  # refuse to append to a damaged record
        start = len(data["corrections"]) + 1
        added = tuple(Correction(f"c{start + i:04d}", who, when, kind, json.loads(json.dumps(dict(payload))))
                      for i, (kind, payload) in enumerate(new))
        data["corrections"] = [*data["corrections"], *(c.to_json() for c in added)]
        data["slide_id"] = slide_id
        write_json(path, data)
    return added


def for_stage(corrections: Sequence[Correction], stage: str) -> tuple[Correction, ...]:
    """The corrections a stage applies (``"phenotype"``, ``"tls"``, ``"regions"``), in order."""
    return tuple(c for c in corrections if STAGE_OF_KIND[c.kind] == stage)


def corrections_digest(corrections: Sequence[Correction]) -> str:
    """SHA-256 of the corrections' kinds and payloads, in order (who and when do not change results)."""
    text = json.dumps([[c.kind, c.payload] for c in corrections], sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def correction_inputs(corrections: Sequence[Correction], stage: str) -> dict:
    """A stage's record ``inputs`` for its corrections: empty without any, so uncorrected keys never change."""
    mine = for_stage(corrections, stage)
    if not mine:
        return {}
    return {"corrections": {"count": len(mine), "last_id": mine[-1].id, "sha256": corrections_digest(mine)}}


def corrections_summary(corrections: Sequence[Correction]) -> dict:
    """For ``run.json``: ``count``, ``last_id`` and count per kind."""
    kinds: dict[str, int] = {}
    for c in corrections:
        kinds[c.kind] = kinds.get(c.kind, 0) + 1
    return {"count": len(corrections), "last_id": corrections[-1].id if corrections else None, "kinds": kinds}


def apply_gates(gating, corrections: Sequence[Correction], *, slide_id: str):
    """The gating config with the ``gate`` corrections as manual gates of this slide (the last one per marker wins).

    Parameters
    ----------
    gating : tme_pipeline.config.GatingConfig
    corrections : sequence of Correction
    slide_id : str

    Returns
    -------
    GatingConfig
    """
    gates = {c.payload["marker"]: float(c.payload["gate"]) for c in corrections if c.kind == "gate"}
    if not gates:
        return gating
    per_slide = {**gating.per_slide, slide_id: {**gating.per_slide.get(slide_id, {}), **gates}}
    return gating.model_copy(update={"per_slide": per_slide})


def apply_reassignments(cells, corrections: Sequence[Correction]) -> tuple[dict, list[str]]:
    """Set the phenotype of the cells each ``phenotype_reassign`` names, in order, in place.

    Parameters
    ----------
    cells : anndata.AnnData
        ``obs['cell_id']`` and a categorical ``obs['phenotype']``.
    corrections : sequence of Correction

    Returns
    -------
    info : dict
        ``n_cells`` reassigned (a cell counted once) and the correction ids applied.
    warnings : list of str
        Cell ids no longer in the table (segmentation re-ran).

    Raises
    ------
    ValueError
        A phenotype that is not one of the table's categories.
    """
    phen = cells.obs["phenotype"]
    ids = cells.obs["cell_id"].to_numpy(np.int64)
    row_of = {int(v): i for i, v in enumerate(ids)}
    codes = np.asarray(phen.cat.codes).copy()
    changed = np.zeros(len(ids), bool)
    applied, warnings = [], []
    for c in corrections:
        if c.kind != "phenotype_reassign":
            continue
        name = str(c.payload["phenotype"])
        if name not in phen.cat.categories:
            raise ValueError(f"correction {c.id}: phenotype {name!r} is not one of {list(phen.cat.categories)}")
        rows = [row_of[int(i)] for i in c.payload["cell_ids"] if int(i) in row_of]
        if len(rows) < len(c.payload["cell_ids"]):
            warnings.append(f"correction {c.id}: {len(c.payload['cell_ids']) - len(rows)} cell id(s) no longer "
                            "exist (segmentation re-ran?); the others were reassigned")
        codes[rows] = list(phen.cat.categories).index(name)
        changed[rows] = True
        applied.append(c.id)
    if applied:
        import pandas as pd

        cells.obs["phenotype"] = pd.Categorical.from_codes(codes, categories=phen.cat.categories)
    return {"n_cells": int(changed.sum()), "applied": applied}, warnings


def bed_polygons(payload: Mapping, what: str) -> list:
    """The shapely polygons (µm) of a ``bed_edit`` payload: each outline less its holes.

    A hole is cut from its outline whatever its exact placement (a ring straying over the
    outline's edge removes only the part inside); an outline its holes cover whole is dropped.
    """
    holes = payload.get("holes_um") or [[] for _ in payload["polygons_um"]]
    out = []
    for i, (shell, rings) in enumerate(zip(payload["polygons_um"], holes)):
        poly = _polygon(shell, f"{what} (outline {i + 1})")
        for ring in rings:
            poly = poly.difference(_polygon(ring, f"{what} (a hole of outline {i + 1})"))
        out += [g for g in getattr(poly, "geoms", [poly]) if g.geom_type == "Polygon" and not g.is_empty]
    return out


def _match_tls(polygons: Sequence, payload: Mapping) -> int | None:
    """Index of the TLS overlapping the recorded outline best (IoU >= :data:`MIN_TLS_IOU`), else None."""
    target = _polygon(payload["polygon_um"], "TLS outline")
    best, best_iou = None, MIN_TLS_IOU
    for i, poly in enumerate(polygons):
        union = poly.union(target).area
        iou = poly.intersection(target).area / union if union > 0 else 0.0
        if iou >= best_iou:
            best, best_iou = i, iou
    return best


def apply_tls_corrections(result, corrections: Sequence[Correction], cells, *, config):
    """The TLS after the ``tls_*`` corrections, in order.

    A deleted TLS leaves its id unused and its cells in no TLS; a drawn one takes the next
    id, the given maturity, the cells inside it not already in a TLS, its centroid, area and
    B/T counts (FDC fraction and GC score NaN: a person staged it). The table gains a column
    ``correction``: the id of the last correction that touched the row ("" if none).

    Parameters
    ----------
    result : tme_pipeline.tls.TLSResult
    corrections : sequence of Correction
    cells : anndata.AnnData
        The cells ``result`` was found on (``obs`` ``x_um``, ``y_um`` µm, ``phenotype``).
    config : tme_pipeline.tls.TLSConfig
        Its B and T phenotypes count the cells of a drawn TLS.

    Returns
    -------
    TLSResult, list of str
        The corrected result and a warning per correction that matched no TLS.
    """
    import shapely

    from .tls import TLSResult

    table = result.table.copy()
    table["correction"] = ""
    polys, tls_id = list(result.polygons_um), result.cell_tls_id.copy()
    xy = cells.obs[["x_um", "y_um"]].to_numpy(np.float64)
    pheno = cells.obs["phenotype"].astype(str).to_numpy()
    next_id = int(table["tls_id"].max()) + 1 if len(table) else 1
    applied, warnings = [], []
    for c in corrections:
        if c.kind == "tls_add":
            poly = _polygon(c.payload["polygon_um"], f"correction {c.id}")
            inside = shapely.contains_xy(poly, xy[:, 0], xy[:, 1]) & (tls_id == 0)
            tls_id[inside] = next_id
            row = {"tls_id": next_id, "maturity": c.payload["maturity"], "x_um": poly.centroid.x,
                   "y_um": poly.centroid.y, "area_um2": poly.area, "b_core_area_um2": np.nan,
                   "n_B": int(np.isin(pheno[inside], config.b_phenotypes).sum()),
                   "n_T": int(np.isin(pheno[inside], config.t_phenotypes).sum()), "b_density_per_mm2": np.nan,
                   "fdc_fraction": np.nan, "gc_score": np.nan, "correction": c.id}
            table = _append_row(table, row)
            polys.append(poly)
            next_id += 1
        elif c.kind in ("tls_delete", "tls_maturity"):
            index = _match_tls(polys, c.payload)
            if index is None:
                warnings.append(f"correction {c.id} ({c.kind} of TLS {c.payload['tls_id']}): no TLS overlaps its "
                                f"outline by IoU >= {MIN_TLS_IOU}; skipped")
                continue
            if c.kind == "tls_delete":
                tls_id[tls_id == int(table.at[index, "tls_id"])] = 0
                table = table.drop(index=index).reset_index(drop=True)
                polys.pop(index)
            else:
                table.at[index, "maturity"] = c.payload["maturity"]
                table.at[index, "correction"] = c.id
        else:
            continue
        applied.append(c.id)
    notes = {**result.notes, "corrections": applied}
    if not len(table):
        notes.setdefault("reason", "every TLS deleted in review")
    elif "reason" in notes:
        del notes["reason"]
    return TLSResult(table, polys, tls_id, result.rejected, result.params, notes), warnings


def _append_row(table, row: dict):
    import pandas as pd

    new = pd.DataFrame([row], columns=table.columns)
    return new if not len(table) else pd.concat([table, new], ignore_index=True)


def apply_bed_edit(regions, corrections: Sequence[Correction], obs, *, tls_polygons_um: Sequence = (), config):
    """The regions with the tumour bed the last ``bed_edit`` draws; margin, core, stroma and cells follow.

    The bed is the payload's outlines less their holes (:func:`bed_polygons`): tissue in a hole
    is stroma, and the margin band runs around the hole's border as around the outer one.

    The drawn bed is clipped to the tissue and the TLS are carved out of it, as the detector's
    bed is; necrosis and fibrosis keep their detected foci inside the new bed (a focus outside
    the detected bed is not known). Margin, core, stroma, each cell's region, ``in_tumor``,
    signed border distance and the absent regions are derived exactly as
    :func:`tme_pipeline.regions.find_regions` derives them.

    Parameters
    ----------
    regions : tme_pipeline.regions.Regions
    corrections : sequence of Correction
    obs : pandas.DataFrame
        The cells the regions were found for (``x_um``, ``y_um`` µm).
    tls_polygons_um : sequence of shapely Polygon
    config : tme_pipeline.regions.RegionsConfig

    Returns
    -------
    Regions
    """
    import shapely
    from scipy import ndimage as ndi

    from .regions import DENSITY_REGIONS, Regions

    edits = [c for c in corrections if c.kind == "bed_edit"]
    if not edits:
        return regions
    last = edits[-1]
    g, tissue = regions.grid_um, regions.masks["tissue"]
    shape = tissue.shape
    yy, xx = np.mgrid[0:shape[0], 0:shape[1]]
    cx, cy = (xx + 0.5) * g, (yy + 0.5) * g

    def raster(polys) -> np.ndarray:
        out = np.zeros(shape, bool)
        for poly in polys:
            out |= shapely.contains_xy(poly, cx, cy)
        return out

    drawn = bed_polygons(last.payload, f"correction {last.id}")
    bed = raster(drawn) & tissue & ~raster(tls_polygons_um)
    necrosis, fibrosis = regions.masks["necrosis"] & bed, regions.masks["fibrosis"] & bed
    nontumor = tissue & ~bed
    x, y = obs["x_um"].to_numpy(np.float64), obs["y_um"].to_numpy(np.float64)
    ii, jj = np.clip((y / g).astype(np.int64), 0, shape[0] - 1), np.clip((x / g).astype(np.int64), 0, shape[1] - 1)
    if bed.any() and nontumor.any():
        d_out, d_in = ndi.distance_transform_edt(~bed) * g, ndi.distance_transform_edt(~nontumor) * g
        margin = tissue & np.where(bed, d_in <= config.margin_um, d_out <= config.margin_um)
        signed = np.where(bed, -(d_in - 0.5 * g), d_out - 0.5 * g).astype(np.float32)
        border = ndi.map_coordinates(signed, [y / g - 0.5, x / g - 0.5], order=1, mode="nearest")
    else:
        margin, border = np.zeros(shape, bool), np.full(len(obs), np.nan)
    masks = {"tissue": tissue, "tumor": bed, "tumor_core": bed & ~margin, "margin": margin,
             "stroma": tissue & ~bed & ~margin, "viable_tumor": bed & ~necrosis & ~fibrosis, "necrosis": necrosis,
             "fibrosis": fibrosis}
    px_mm2 = g * g * 1e-6
    areas = {k: float(m.sum()) * px_mm2 for k, m in masks.items()}
    in_tumor = bed[ii, jj]
    border = np.where(in_tumor, -np.abs(border), np.abs(border)).astype(np.float32)
    cell_region = np.where(margin[ii, jj], "margin", np.where(in_tumor, "tumor_core", "stroma")).astype(str)
    absent = {k: v for k, v in regions.absent.items() if k == "tissue"}
    if not bed.any():
        absent["tumor"] = f"the bed drawn in review ({last.id}) covers no tissue"
    for k in DENSITY_REGIONS:
        count = int(masks[k][ii, jj].sum())
        if "tissue" in absent or (absent.get("tumor") and k in ("tumor", "tumor_core", "margin")):
            absent.setdefault(k, absent.get("tissue") or absent["tumor"])
        elif areas[k] < config.min_region_area_mm2:
            absent[k] = f"{k} {areas[k]:.3g} mm² < {config.min_region_area_mm2:g} mm²"
        elif count < config.min_region_cells:
            absent[k] = f"{k} holds {count} cells < {config.min_region_cells}"
    bed_mm2 = areas["tumor"]
    return Regions(grid_um=g, masks=masks, areas_mm2=areas,
                   percent_necrosis=100.0 * areas["necrosis"] / bed_mm2 if bed_mm2 > 0 else None,
                   percent_viable_tumor=100.0 * areas["viable_tumor"] / bed_mm2 if bed_mm2 > 0 else None,
                   absent=absent, cell_region=cell_region, in_tumor=in_tumor, border_distance_um=border,
                   params={**(regions.params or {}), "bed": f"drawn in review ({last.id})"})
