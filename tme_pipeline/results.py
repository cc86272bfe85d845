"""The one reader of a results folder, and the one place that knows its layout.

Layout of ``OUT`` (``tme run ... --out OUT``)::

    OUT/run.json                    the run: versions, config, per-slide status and stages
    OUT/.tme.lock                   held while a run writes OUT (:mod:`tme_pipeline.lock`)
    OUT/slides/<slide_id>/          one folder per finished slide, swapped in whole
      stages.json                   what each stage was computed from (:mod:`tme_pipeline.stages`)
      labels.ome.zarr               NGFF labels ``nuclei`` and ``cells`` over a DAPI overview
      measured.h5ad                 the measured cell table, before compensation and gating
      phenotyped.h5ad               the gated, phenotyped table, before TLS and regions
      tls.geojson, tls.json         TLS outlines (QuPath), their table and rejected candidates
      tls.npz                       cell_id -> tls_id (0 = none)
      regions.geojson, regions.json regions (QuPath), areas (mm²), % necrosis, absent regions
      regions.npz                   the region grids and, per cell_id, region and border distance
      cells.h5ad                    the cell table users open: phenotypes, tls_id, region
      gates.png, cd3_cd8.png        gating pictures
      overview.png, tls/            the slide with regions and TLS; one close-up per TLS
      metrics.json                  per-slide metrics with units, immune class, infiltration profile
      report.html                   the slide's self-contained report (:mod:`tme_pipeline.report`)
      original/                     a corrected stage's uncorrected files (same names)
    OUT/corrections/<slide_id>/corrections.json   a reviewer's corrections (append-only input)
    OUT/cohort.h5ad                 one row per manifest slide: metrics (X), units (var), status
    OUT/patients.h5ad               one row per patient: layers pre, post, delta, log2_fold_change
    OUT/metrics.csv                 tidy: patient_id,timepoint,slide_id,metric,value,unit
    OUT/report.html                 the cohort report, linking every slide's report.html

Everything else (the pipeline writing, the cohort tables, scripts, tests) takes these names
from here.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "RUN_JSON", "LOCK_FILE", "SLIDES_DIR", "STAGES_JSON", "LABELS", "MEASURED", "CELLS", "GATES_PNG",
    "CD3_CD8_PNG", "PHENOTYPED", "TLS_GEOJSON", "TLS_JSON", "TLS_NPZ", "REGIONS_GEOJSON", "REGIONS_JSON",
    "METRICS_JSON", "REPORT_HTML", "COHORT_REPORT", "ANALYSIS_DIR",
    "REGIONS_NPZ", "OVERVIEW_PNG", "TLS_CLOSEUPS", "CORRECTIONS_DIR", "CORRECTIONS_JSON", "ORIGINAL_DIR",
    "corrections_file", "COHORT_H5AD", "PATIENTS_H5AD", "METRICS_CSV", "Results", "SlideResults", "open_results", "slide_folder",
]

RUN_JSON = "run.json"
LOCK_FILE = ".tme.lock"
SLIDES_DIR = "slides"
STAGES_JSON = "stages.json"
LABELS = "labels.ome.zarr"
MEASURED = "measured.h5ad"
CELLS = "cells.h5ad"
PHENOTYPED = "phenotyped.h5ad"
TLS_GEOJSON = "tls.geojson"
TLS_JSON = "tls.json"
TLS_NPZ = "tls.npz"
REGIONS_GEOJSON = "regions.geojson"
REGIONS_JSON = "regions.json"
REGIONS_NPZ = "regions.npz"
OVERVIEW_PNG = "overview.png"
TLS_CLOSEUPS = "tls"
GATES_PNG = "gates.png"
CD3_CD8_PNG = "cd3_cd8.png"
METRICS_JSON = "metrics.json"
CORRECTIONS_DIR = "corrections"
CORRECTIONS_JSON = "corrections.json"
ORIGINAL_DIR = "original"
COHORT_H5AD = "cohort.h5ad"
PATIENTS_H5AD = "patients.h5ad"
METRICS_CSV = "metrics.csv"
REPORT_HTML = "report.html"
COHORT_REPORT = "report.html"
ANALYSIS_DIR = "analysis"


def slide_folder(out: str | Path, slide_id: str) -> Path:
    """``OUT/slides/<slide_id>``: where a slide's results live once complete."""
    return Path(out) / SLIDES_DIR / slide_id


def corrections_file(out: str | Path, slide_id: str) -> Path:
    """``OUT/corrections/<slide_id>/corrections.json``: a slide's review corrections.

    They live outside ``OUT/slides/`` because they are an input of the run, not an output:
    the runner replaces a slide folder whole, and ``--force`` or deleting the folder must
    never lose a reviewer's work.
    """
    return Path(out) / CORRECTIONS_DIR / slide_id / CORRECTIONS_JSON


@dataclass(frozen=True)
class SlideResults:
    """The results of one finished slide; every file is opened on demand.

    Attributes
    ----------
    slide_id : str
    folder : Path
        ``OUT/slides/<slide_id>``.
    """

    slide_id: str
    folder: Path

    @property
    def stages(self) -> dict:
        """``stages.json``: per stage, its hash, inputs, files written, timings and warnings."""
        return _read_json(self.folder / STAGES_JSON)

    def cells(self, *, backed: bool = False):
        """The cell table users open (``cells.h5ad``: phenotypes, ``tls_id``, ``region``) as AnnData;
        ``backed`` reads ``X`` lazily."""
        return self._h5ad(CELLS, backed)

    def phenotyped(self, *, backed: bool = False):
        """The phenotyped table before TLS and regions (``phenotyped.h5ad``) as AnnData."""
        return self._h5ad(PHENOTYPED, backed)

    def tls(self) -> tuple[list, dict]:
        """The TLS: ``(features, summary)``; features are ``(shapely geometry in µm, properties)``
        from ``tls.geojson``, the summary is ``tls.json``."""
        from .geojson import read_geojson

        features, _ = read_geojson(self._existing(TLS_GEOJSON))
        return features, _read_json(self._existing(TLS_JSON))

    def regions(self) -> dict:
        """``regions.json``: areas (mm²), % necrosis and viable tumour, absent regions and why."""
        return _read_json(self._existing(REGIONS_JSON))

    def region_grids(self) -> tuple[dict, float]:
        """The region masks ``{name: (H, W) bool}`` and their grid pixel (µm), from ``regions.npz``."""
        import numpy as np

        with np.load(self._existing(REGIONS_NPZ), allow_pickle=False) as z:
            names = [str(n) for n in z["mask_names"]]
            return {n: z[f"mask_{n}"] for n in names}, float(z["grid_um"])

    def metrics(self) -> dict:
        """``metrics.json``: metrics with units and descriptions, reasons for nulls, immune class,
        infiltration profile (:func:`tme_pipeline.metrics.metrics_json`)."""
        return _read_json(self._existing(METRICS_JSON))

    def _existing(self, name: str) -> Path:
        path = self.folder / name
        if not path.exists():
            raise FileNotFoundError(f"{path}: no {name} in the results of slide {self.slide_id!r}")
        return path

    def measured(self, *, backed: bool = False):
        """The measured table before compensation and gating (``measured.h5ad``) as AnnData."""
        return self._h5ad(MEASURED, backed)

    def labels(self, name: str = "nuclei", *, level: int = 0):
        """A label image as a lazy dask array.

        Parameters
        ----------
        name : {'nuclei', 'cells'}
        level : int
            Pyramid level; level ``k`` has pixels ``2**k`` times the slide's (µm in
            ``cells.uns['pixel_um']``).

        Returns
        -------
        dask.array.Array, shape (Y, X), uint32
            Cell id = nucleus id = the row's ``obs['cell_id']``.
        """
        import dask.array as da
        import zarr

        path = self.folder / LABELS
        if not path.is_dir():
            raise FileNotFoundError(f"{path}: no label store in the results of slide {self.slide_id!r}")
        group = zarr.open_group(str(path), mode="r")
        key = f"labels/{name}/{level}"
        if key not in group:
            raise ValueError(f"{path}: slide {self.slide_id!r} has no label level {key!r}")
        return da.from_zarr(group[key])

    def _h5ad(self, name: str, backed: bool):
        import anndata as ad

        return ad.read_h5ad(self._existing(name), backed="r" if backed else None)

    def file(self, name: str) -> Path:
        """Path of one file of the folder (a layout name of this module, e.g. ``GATES_PNG``)."""
        return self.folder / name


@dataclass(frozen=True)
class Results:
    """A results folder: the run record and the finished slides.

    Attributes
    ----------
    out : Path
    run : dict
        ``run.json`` (empty when no run recorded one, e.g. a folder of slides only).
    """

    out: Path
    run: dict

    @property
    def slide_ids(self) -> list[str]:
        """Finished slides (a folder with ``stages.json``), in ``run.json`` order, then any others by name."""
        slides = self.out / SLIDES_DIR
        folders = {p.parent.name for p in slides.glob(f"[!.]*/{STAGES_JSON}")} if slides.is_dir() else set()
        recorded = [s["slide_id"] for s in self.run.get("slides", []) if s["slide_id"] in folders]
        return recorded + sorted(folders - set(recorded))

    def slide(self, slide_id: str) -> SlideResults:
        """One finished slide's results; ``ValueError`` naming the finished ones if absent."""
        folder = slide_folder(self.out, slide_id)
        if not (folder / STAGES_JSON).is_file():
            raise ValueError(f"{self.out}: no finished slide {slide_id!r} (finished: {', '.join(self.slide_ids) or 'none'})")
        return SlideResults(slide_id, folder)

    def slides(self) -> list[SlideResults]:
        """Every finished slide."""
        return [SlideResults(s, slide_folder(self.out, s)) for s in self.slide_ids]

    def record(self, slide_id: str) -> dict:
        """The slide's entry of ``run.json`` (status, stages ran and reused, gates, flags)."""
        for entry in self.run.get("slides", []):
            if entry["slide_id"] == slide_id:
                return entry
        raise ValueError(f"{self.out / RUN_JSON}: no slide {slide_id!r}")

    def cohort(self):
        """``cohort.h5ad`` as AnnData: slides x metrics (NaN where absent or failed), ``var['unit']``,
        ``obs`` the manifest columns, ``status``, ``error`` and ``immune_class``."""
        import anndata as ad

        return ad.read_h5ad(self._table(COHORT_H5AD))

    def patients(self):
        """``patients.h5ad`` as AnnData: patients x metrics, layers ``pre``, ``post``, ``delta``
        (= ``X``) and ``log2_fold_change``; ``obs['complete']`` and ``obs['reason']``."""
        import anndata as ad

        return ad.read_h5ad(self._table(PATIENTS_H5AD))

    def metrics_table(self):
        """``metrics.csv`` as a pandas DataFrame: ``patient_id,timepoint,slide_id,metric,value,unit``;
        ``value`` float, NaN where the metric is absent."""
        import pandas as pd

        text = ("patient_id", "timepoint", "slide_id", "metric", "unit")
        # only an empty value is missing: a patient called "NA" stays a patient
        return pd.read_csv(self._table(METRICS_CSV), dtype={c: str for c in text} | {"value": float},
                           keep_default_na=False, na_values={"value": [""]}, float_precision="round_trip")

    def _table(self, name: str) -> Path:
        path = self.out / name
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no {name}; `tme run` writes it at the end of a run")
        return path


def open_results(out: str | Path) -> Results:
    """Open the results folder of ``tme run ... --out OUT``.

    Parameters
    ----------
    out : str or Path

    Returns
    -------
    Results
        ``results.slide("P01_pre").cells()`` is that slide's AnnData,
        ``.labels("nuclei")`` its nucleus labels as a dask array.

    Raises
    ------
    FileNotFoundError
        If ``out`` is not a folder.
    """
    out = Path(out)
    if not out.is_dir():
        raise FileNotFoundError(f"{out}: no such results folder")
    run_path = out / RUN_JSON
    return Results(out=out, run=_read_json(run_path) if run_path.is_file() else {})


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: not found") from None
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: not valid JSON: {error}") from None
