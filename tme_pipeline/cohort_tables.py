"""The cohort tables analysts open: a row per slide, a row per patient, and one tidy table.

``write_cohort_tables(OUT)`` reads ``OUT/run.json``, the manifest it names and every slide's
``metrics.json`` (all through :func:`tme_pipeline.results.open_results`) and writes:

- ``cohort.h5ad``: one row per manifest slide, failed ones included (NaN metrics, their
  status and error), metrics in ``X`` with their unit in ``var['unit']``;
- ``patients.h5ad``: one row per patient, layers ``pre``, ``post``, ``delta`` and
  ``log2_fold_change``, ``X`` = ``delta``, the pre -> post immune-class transition; a patient
  with one usable timepoint is kept, NaN on the missing side, with the reason;
- ``metrics.csv``: ``patient_id,timepoint,slide_id,metric,value,unit``, for R and spreadsheets.

Each file goes through a temporary file and an atomic rename; nothing is pickled.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd

from .io.manifest import Manifest, read_manifest
from .results import COHORT_H5AD, METRICS_CSV, PATIENTS_H5AD, RUN_JSON, Results, open_results

__all__ = [
    "CohortTables", "IMMUNE_CLASSES", "LOG2_PSEUDOCOUNT", "LOG2_PSEUDOCOUNT_OTHER", "METRICS_COLUMNS",
    "build_cohort_tables", "write_cohort_tables",
]

log = logging.getLogger(__name__)

METRICS_FORMAT = 1
IMMUNE_CLASSES = ("inflamed", "excluded", "desert")
METRICS_COLUMNS = ("patient_id", "timepoint", "slide_id", "metric", "value", "unit")
# Pseudo-counts of log2((post + c) / (pre + c)), per unit: about the smallest non-zero step of
# a metric of that unit, so that a zero on one side gives a large but finite fold, and noise
# near zero (a 0 -> 1 cell/mm² change) does not read as a big effect.
LOG2_PSEUDOCOUNT = {"cells/mm2": 1.0, "%": 0.1, "count": 0.5, "mm2": 0.001, "ratio": 0.1}
LOG2_PSEUDOCOUNT_OTHER = 0.1
_OK = ("done", "skipped")
_TABLE_COLUMNS = ("slide_id", "patient_id", "timepoint", "status", "error", "immune_class")
_PATIENT_COLUMNS = ("pre_slide_id", "post_slide_id", "immune_class_pre", "immune_class_post",
                    "immune_transition", "complete", "reason")


@dataclass(frozen=True)
class CohortTables:
    """The three tables, in memory.

    Attributes
    ----------
    cohort : anndata.AnnData
        Slides x metrics (float64, NaN where absent or failed).
    patients : anndata.AnnData
        Patients x metrics; ``X`` = layer ``delta``.
    metrics : pandas.DataFrame
        The tidy table, columns :data:`METRICS_COLUMNS`.
    """

    cohort: object
    patients: object
    metrics: pd.DataFrame


@dataclass
class _Slide:
    slide_id: str
    patient_id: str
    timepoint: str
    columns: dict[str, str]
    status: str
    error: str
    values: dict[str, float] = field(default_factory=dict)
    units: dict[str, str] = field(default_factory=dict)
    descriptions: dict[str, str] = field(default_factory=dict)
    immune_class: str | None = None

    @property
    def usable(self) -> bool:
        return self.status in _OK


def write_cohort_tables(out_dir: str | Path, *, manifest: Manifest | None = None) -> dict[str, Path]:
    """Write ``cohort.h5ad``, ``patients.h5ad`` and ``metrics.csv`` into a results folder.

    When the tables cannot be built (e.g. two slides of one patient at one timepoint), the
    tables of an earlier run are removed before the error is raised, so that no outdated
    table is taken for this run's.

    Parameters
    ----------
    out_dir : str or Path
        The output folder of ``tme run`` (with ``run.json``).
    manifest : Manifest, optional
        The run's manifest; defaults to the one ``run.json`` names (its columns beyond
        ``patient_id,timepoint,slide`` become ``obs`` columns).

    Returns
    -------
    dict of str to Path
        ``{'cohort': OUT/cohort.h5ad, 'patients': OUT/patients.h5ad, 'metrics': OUT/metrics.csv}``.

    Raises
    ------
    FileNotFoundError
        If ``out_dir`` or its ``run.json`` is missing.
    ValueError
        Naming the slides: a patient with two slides at one timepoint; a metric with
        different units on two slides; a config with other than two timepoints.

    Examples
    --------
    >>> paths = write_cohort_tables("demo/out")  # doctest: +SKIP
    >>> open_results("demo/out").patients().to_df(layer="delta")  # doctest: +SKIP
    """
    out = Path(out_dir)
    paths = {"cohort": out / COHORT_H5AD, "patients": out / PATIENTS_H5AD, "metrics": out / METRICS_CSV}
    try:
        tables = build_cohort_tables(out, manifest=manifest)
    except (ValueError, FileNotFoundError):
        for path in paths.values():
            path.unlink(missing_ok=True)
        raise
    for name in ("cohort", "patients"):
        # text columns stay text (only the class columns are categorical), whatever their
        # repeats: an R or HDF5 reader meets one encoding per column, every time
        _atomic(paths[name], lambda tmp, table=getattr(tables, name):
                table.write_h5ad(tmp, convert_strings_to_categoricals=False))
    _atomic(paths["metrics"], lambda tmp: tables.metrics.to_csv(tmp, index=False, na_rep=""))
    return paths


def build_cohort_tables(out_dir: str | Path, *, manifest: Manifest | None = None) -> CohortTables:
    """Build the cohort tables of a results folder without writing them.

    See :func:`write_cohort_tables` for the parameters and errors; the layout of each table
    is in ``docs/architecture.md`` (the data contract).

    Returns
    -------
    CohortTables
    """
    results = open_results(out_dir)
    if not results.run:
        raise FileNotFoundError(f"{results.out / RUN_JSON}: no run record; `tme run` writes it")
    timepoints = tuple(results.run.get("config", {}).get("timepoints", ("pre", "post")))
    if len(timepoints) != 2:
        raise ValueError(f"{results.out / RUN_JSON}: patients.h5ad pairs two timepoints (pre, post); "
                         f"the run's config has {list(timepoints)}")
    slides = _slides(results, manifest, timepoints)
    _check_one_slide_per_timepoint(slides, results.out)
    for slide in slides:
        if slide.usable:
            _read_metrics(results, slide)
    var = _var(slides)
    cohort = _cohort(slides, var, results.run)
    return CohortTables(cohort=cohort, patients=_patients(cohort, slides, timepoints), metrics=_tidy(cohort))


def _slides(results: Results, manifest: Manifest | None, timepoints: tuple[str, ...]) -> list[_Slide]:
    """The manifest's slides with their status in run.json."""
    records = {s["slide_id"]: s for s in results.run.get("slides", [])}
    if manifest is None and results.run.get("manifest"):
        try:
            manifest = read_manifest(results.run["manifest"], timepoints=timepoints)
        except (FileNotFoundError, ValueError) as error:
            log.warning("cohort tables without the manifest's own columns: %s", error)
    if manifest is None:
        rows = [(r["slide_id"], r["patient_id"], r["timepoint"], {"slide": str(r.get("path", ""))})
                for r in records.values()]
    else:
        rows = [(r.slide_id, r.patient_id, r.timepoint, {"slide": str(r.path), **r.extra}) for r in manifest.rows]
    slides = []
    for slide_id, patient_id, timepoint, columns in rows:
        record = records.get(slide_id)
        if record is None:
            status, error = "error", "no record in run.json: the run did not reach this slide"
        else:
            status, error = record["status"], record.get("error") or ""
        slides.append(_Slide(slide_id, patient_id, timepoint, _rename_reserved(columns), status, error))
    return slides


def _rename_reserved(columns: dict[str, str]) -> dict[str, str]:
    renamed = {}
    for name, value in columns.items():
        if name in _TABLE_COLUMNS or name in _PATIENT_COLUMNS:
            log.warning("manifest column %r is a column of the cohort tables: kept as 'manifest_%s'", name, name)
            name = f"manifest_{name}"
        renamed[name] = value
    return renamed


def _check_one_slide_per_timepoint(slides: list[_Slide], out: Path) -> None:
    groups: dict[tuple[str, str], list[str]] = {}
    for s in slides:
        groups.setdefault((s.patient_id, s.timepoint), []).append(s.slide_id)
    duplicated = {k: v for k, v in groups.items() if len(v) > 1}
    if duplicated:
        listed = "; ".join(f"patient {p!r} at {t!r}: {', '.join(ids)}" for (p, t), ids in duplicated.items())
        raise ValueError(f"{out}: patients.h5ad pairs one slide per patient and timepoint, but the manifest "
                         f"has several ({listed}); keep one of each in the manifest or give them distinct "
                         "patient ids")


def _read_metrics(results: Results, slide: _Slide) -> None:
    """Fill the slide's metrics from its metrics.json; a missing or malformed file makes it an error."""
    try:
        data = results.slide(slide.slide_id).metrics()
        _check_metrics(data, slide.slide_id)
    except (FileNotFoundError, ValueError) as error:
        slide.status, slide.error = "error", f"no usable metrics.json: {error}"
        return
    slide.values = {k: math.nan if v is None else float(v) for k, v in data["metrics"].items()}
    slide.units = {k: data["units"][k] for k in data["metrics"]}
    slide.descriptions = {k: str(data.get("descriptions", {}).get(k) or "") for k in data["metrics"]}
    slide.immune_class = data.get("immune_class")


def _check_metrics(data: dict, slide_id: str) -> None:
    where = f"slide {slide_id!r}: metrics.json"
    if not isinstance(data, dict):
        raise ValueError(f"{where} is a {type(data).__name__}, not an object")
    if data.get("format") != METRICS_FORMAT:
        raise ValueError(f"{where} has format {data.get('format')!r}; this version reads format {METRICS_FORMAT}")
    if data.get("slide_id") != slide_id:
        raise ValueError(f"{where} is slide {data.get('slide_id')!r}'s")
    metrics, units = data.get("metrics"), data.get("units")
    if not isinstance(metrics, dict) or not isinstance(units, dict):
        raise ValueError(f"{where} lacks the 'metrics' or 'units' map")
    for name, value in metrics.items():
        if not isinstance(units.get(name), str) or not units[name]:
            raise ValueError(f"{where}: metric {name!r} has no unit")
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise ValueError(f"{where}: metric {name!r} is {value!r}, not a number or null")
    if data.get("immune_class") not in (*IMMUNE_CLASSES, None):
        raise ValueError(f"{where}: immune_class {data['immune_class']!r} is none of {', '.join(IMMUNE_CLASSES)}")


def _var(slides: list[_Slide]) -> pd.DataFrame:
    """Every metric any slide has, in the order first met, with its one unit."""
    unit: dict[str, str] = {}
    description: dict[str, str] = {}
    first: dict[str, str] = {}
    for s in slides:
        for name, u in s.units.items():
            if name not in unit:
                unit[name], first[name] = u, s.slide_id
            elif u != unit[name]:
                raise ValueError(f"metric {name!r} is in {unit[name]!r} on slide {first[name]!r} "
                                 f"but in {u!r} on slide {s.slide_id!r}: one metric, one unit")
            if not description.get(name):
                description[name] = s.descriptions.get(name, "")
    var = pd.DataFrame({"unit": list(unit.values()), "description": [description[n] for n in unit]},
                       index=pd.Index(list(unit), dtype=object))
    return var


def _cohort(slides: list[_Slide], var: pd.DataFrame, run: dict):
    import anndata as ad

    names = list(var.index)
    column = {n: j for j, n in enumerate(names)}
    x = np.full((len(slides), len(names)), np.nan)
    for i, s in enumerate(slides):
        if s.values:
            x[i, [column[n] for n in s.values]] = list(s.values.values())
    extra = list(dict.fromkeys(name for s in slides for name in s.columns))
    obs = pd.DataFrame(
        {
            "patient_id": [s.patient_id for s in slides],
            "timepoint": [s.timepoint for s in slides],
            **{name: [s.columns.get(name, "") for s in slides] for name in extra},
            "status": [s.status for s in slides],
            "error": [s.error for s in slides],
            "immune_class": pd.Categorical([s.immune_class for s in slides], categories=IMMUNE_CLASSES),
        },
        index=pd.Index([s.slide_id for s in slides], dtype=object),
    )
    return ad.AnnData(X=x, obs=obs, var=var.copy(), uns=_uns(run))


def _patients(cohort, slides: list[_Slide], timepoints: tuple[str, ...]):
    import anndata as ad

    pre_tp, post_tp = timepoints
    by_patient: dict[str, dict[str, _Slide]] = {}
    for s in slides:
        by_patient.setdefault(s.patient_id, {})[s.timepoint] = s
    patients = list(by_patient)
    row = {s.slide_id: i for i, s in enumerate(slides)}
    layers = {}
    for layer, tp in (("pre", pre_tp), ("post", post_tp)):
        index = np.array([row[by_patient[p][tp].slide_id] if tp in by_patient[p] else -1 for p in patients])
        values = np.full((len(patients), cohort.n_vars), np.nan)
        values[index >= 0] = cohort.X[index[index >= 0]]
        layers[layer] = values
    layers["delta"] = layers["post"] - layers["pre"]
    pseudo = {u: LOG2_PSEUDOCOUNT.get(u, LOG2_PSEUDOCOUNT_OTHER) for u in dict.fromkeys(cohort.var["unit"])}
    c = cohort.var["unit"].map(pseudo).to_numpy(dtype=float)
    with np.errstate(divide="ignore", invalid="ignore"):
        layers["log2_fold_change"] = np.log2((layers["post"] + c) / (layers["pre"] + c))

    columns = {}
    for name in dict.fromkeys(n for s in slides for n in s.columns if n != "slide"):
        values = [_patient_value([t.columns.get(name, "") for t in by_patient[p].values()]) for p in patients]
        if all(v is not None for v in values):  # a column that varies within a patient is the slide's
            columns[name] = values
    obs = pd.DataFrame(columns, index=pd.Index(patients, dtype=object))
    sides = [(by_patient[p].get(pre_tp), by_patient[p].get(post_tp)) for p in patients]
    obs["pre_slide_id"] = [pre.slide_id if pre else "" for pre, _ in sides]
    obs["post_slide_id"] = [post.slide_id if post else "" for _, post in sides]
    obs["immune_class_pre"] = pd.Categorical([pre.immune_class if pre else None for pre, _ in sides], IMMUNE_CLASSES)
    obs["immune_class_post"] = pd.Categorical([post.immune_class if post else None for _, post in sides],
                                              IMMUNE_CLASSES)
    transitions = [f"{a} -> {b}" for a in IMMUNE_CLASSES for b in IMMUNE_CLASSES]
    obs["immune_transition"] = pd.Categorical(
        [f"{pre.immune_class} -> {post.immune_class}" if pre and post and pre.immune_class and post.immune_class
         else None for pre, post in sides], categories=transitions)
    reasons = [_incomplete_reason(pre, post, pre_tp, post_tp) for pre, post in sides]
    obs["complete"] = np.array([r == "" for r in reasons], dtype=bool)
    obs["reason"] = reasons
    # two parallel arrays, not a map: a unit such as "cells/mm2" is no HDF5 key
    uns = {**cohort.uns, "timepoints": {"pre": pre_tp, "post": post_tp},
           "log2_pseudocount": {"unit": np.array(list(pseudo), dtype=str),
                                "pseudocount": np.array(list(pseudo.values()), dtype=float)}}
    return ad.AnnData(X=layers["delta"].copy(), obs=obs, var=cohort.var.copy(), layers=layers, uns=uns)


def _patient_value(values: list[str]) -> str | None:
    """The patient's value of a manifest column, None when its slides disagree (a slide-level column)."""
    given = set(v for v in values if v != "")
    return given.pop() if len(given) == 1 else ("" if not given else None)


def _incomplete_reason(pre: _Slide | None, post: _Slide | None, pre_tp: str, post_tp: str) -> str:
    reasons = []
    for slide, tp in ((pre, pre_tp), (post, post_tp)):
        if slide is None:
            reasons.append(f"no {tp} slide in the manifest")
        elif not slide.usable:
            reasons.append(f"{tp} slide {slide.slide_id} {slide.status}: {slide.error}")
    return "; ".join(reasons)


def _tidy(cohort) -> pd.DataFrame:
    n, m = cohort.shape
    obs = cohort.obs
    return pd.DataFrame({
        "patient_id": np.repeat(obs["patient_id"].astype(str).to_numpy(), m),
        "timepoint": np.repeat(obs["timepoint"].astype(str).to_numpy(), m),
        "slide_id": np.repeat(np.asarray(obs.index, dtype=str), m),
        "metric": np.tile(np.asarray(cohort.var_names, dtype=str), n),
        "value": cohort.X.reshape(-1),
        "unit": np.tile(cohort.var["unit"].astype(str).to_numpy(), n),
    }, columns=list(METRICS_COLUMNS))


def _uns(run: dict) -> dict:
    from . import __version__

    return {
        "metrics_format": METRICS_FORMAT,
        "tme_version": __version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "run_status": str(run.get("status", "")),
    }


def _atomic(path: Path, write: Callable[[Path], object]) -> None:
    """Write through a hidden temporary file beside ``path`` and rename it in."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
