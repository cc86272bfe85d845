"""The HTML reports: one page per slide (stage ``report``) and one for the cohort.

Both pages are single self-contained files: pictures are embedded as base64 ``data:``
URIs (photographs as JPEG, plots as PNG), the style sheet is inline, and nothing points
outside the file except the cohort page's relative links to the slide pages, so a page
opens offline, mailed or copied alone. Every text that comes from data (slide ids,
errors, metric names, reasons) is HTML-escaped. A value is shown with its unit; a metric
without a value shows "—" with the reason from ``metrics.json`` ``absent``.
"""

from __future__ import annotations

import base64
import html
import io
import json
import os
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from urllib.parse import quote

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

__all__ = ["ReportConfig", "format_value", "write_slide_report", "write_cohort_report", "DEFAULT_KEY_METRICS"]

#: The metrics a reader checks first: shown at the top of a slide page and per slide and
#: patient on the cohort page.
DEFAULT_KEY_METRICS: tuple[str, ...] = (
    "density_CD8_T_tumor", "density_CD8_T_margin", "density_lymphocytes_tumor", "tls_count", "tls_per_mm2",
    "percent_necrosis",
)

#: Regions of the metric names, longest first so that ``_tumor_core`` is tried before ``_tumor``.
_REGIONS = ("tumor_core", "tissue", "tumor", "margin", "stroma")
_REGION_ORDER = ("tissue", "tumor", "tumor_core", "margin", "stroma")

#: How a unit of ``metrics.json`` is written and how many decimals its values get.
_UNITS = {"mm2": ("mm²", 3), "cells/mm2": ("cells/mm²", 0), "%": ("%", 1), "ratio": ("", 2),
          "count": ("", 0), "1/mm2": ("/mm²", 2), "score": ("", 1)}

ABSENT = "—"


class ReportConfig(BaseModel):
    """Settings of the reports (config section ``report``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    key_metrics: tuple[str, ...] = Field(
        DEFAULT_KEY_METRICS, min_length=1,
        description="Metric names shown first on a slide page and per slide and patient on the cohort page.")
    map_max_px: int = Field(1000, ge=100, le=4000,
                            description="Most pixels on the phenotype map's longer side (bounds the picture).")
    photo_quality: int = Field(85, ge=50, le=100,
                               description="JPEG quality of the embedded overview and TLS close-ups.")


def format_value(value: float | None, unit: str, *, with_unit: bool = True) -> str:
    """A metric's value with its unit, rounded for reading; ``"—"`` for None or NaN.

    Dimensionless units (count, ratio, score) are not written after the number; tables
    name every unit in their headers or a unit column.

    Examples
    --------
    >>> format_value(412.46, "cells/mm2"), format_value(23.05, "%"), format_value(12.0, "count")
    ('412 cells/mm²', '23.1 %', '12')
    >>> format_value(None, "count"), format_value(412.46, "cells/mm2", with_unit=False)
    ('—', '412')
    """
    if value is None or not np.isfinite(float(value)):
        return ABSENT
    label, decimals = _UNITS.get(unit, (unit, 2))
    number = f"{float(value):,.{decimals}f}"
    return f"{number} {label}" if label and with_unit else number


# ---- HTML pieces ---------------------------------------------------------------------------

class _Html(str):
    """Text that is already HTML (built here from escaped parts); never escaped again."""


def _e(text: object) -> str:
    return text if isinstance(text, _Html) else html.escape(str(text), quote=True)


def _table(headers: Sequence[str], rows: Iterable[Sequence[object]], *, numeric: Sequence[int] = ()) -> _Html:
    """A table; the columns ``numeric`` (indices) are right-aligned."""
    head = "".join(f"<th>{_e(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f'<td class="num">{_e(c)}</td>' if k in numeric else f"<td>{_e(c)}</td>"
                                    for k, c in enumerate(row)) + "</tr>" for row in rows)
    return _Html(f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")


def _img(data: bytes, mime: str, alt: str) -> _Html:
    encoded = base64.b64encode(data).decode("ascii")
    return _Html(f'<img alt="{_e(alt)}" src="data:{mime};base64,{encoded}">')


def _photo(path: Path, alt: str, quality: int) -> _Html:
    """A picture file embedded as JPEG: the false-colour photographs shrink ~5x with no visible loss."""
    from PIL import Image

    with Image.open(path) as image:
        buffer = io.BytesIO()
        image.convert("RGB").save(buffer, format="JPEG", quality=quality, optimize=True)
    return _img(buffer.getvalue(), "image/jpeg", alt)


def _plot(path: Path, alt: str) -> _Html:
    return _img(path.read_bytes(), "image/png", alt)


def _absent(reason: str | None) -> _Html:
    why = reason or "no value"
    return _Html(f'<span class="absent" title="{_e(why)}">{ABSENT}</span> <span class="why">{_e(why)}</span>')


def _value_cell(metrics: Mapping, name: str, *, with_unit: bool = True) -> object:
    """The value of ``metrics.json`` metric ``name`` (with its unit), or "—" and why."""
    value = metrics["metrics"].get(name)
    if name not in metrics["metrics"]:
        return _absent("not computed")
    if value is None:
        return _absent(metrics.get("absent", {}).get(name))
    return format_value(value, metrics["units"].get(name, ""), with_unit=with_unit)


def _unit(metrics: Mapping, name: str) -> str:
    unit = metrics["units"].get(name, "")
    return {"mm2": "mm²", "cells/mm2": "cells/mm²", "1/mm2": "1/mm²"}.get(unit, unit)


_CSS = """
body{font-family:system-ui,-apple-system,'Segoe UI',Helvetica,Arial,sans-serif;margin:24px auto;max-width:1300px;
color:#1d1d1d;line-height:1.4;padding:0 16px}
h1{font-size:1.6em;margin-bottom:4px}
h2{font-size:1.25em;border-bottom:2px solid #ccc;padding-bottom:3px;margin-top:32px}
h3{font-size:1.05em;margin-bottom:4px}
table{border-collapse:collapse;margin:8px 0 16px;font-size:0.9em;display:block;max-width:100%;overflow-x:auto}
th,td{border:1px solid #d0d0d0;padding:3px 8px;text-align:left;vertical-align:top}
thead th{background:#eef1f4}td.num{text-align:right;font-variant-numeric:tabular-nums}
table.kv th{background:#f6f7f8;font-weight:600;width:11em}
img{max-width:100%;height:auto;display:block;margin:6px 0 14px}
.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(400px,1fr));gap:12px}
.grid figure{margin:0}.grid figcaption{font-size:0.85em}
.absent{color:#888}.why{color:#777;font-size:0.82em}
.warn{background:#fff6e0;border-left:4px solid #e0a000;padding:6px 12px;margin:8px 0}
.error{background:#fde8e8;border-left:4px solid #c62828;padding:6px 12px}
.class{font-weight:700;padding:1px 8px;border-radius:4px;background:#eee}
.inflamed{background:#d8f0d8}.excluded{background:#fff0c8}.desert{background:#e8e8f4}
.note{color:#555;font-size:0.88em}
details summary{cursor:pointer;font-weight:600;margin:6px 0}
"""


def _page(title: str, body: Sequence[str]) -> str:
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{_e(title)}</title><style>{_CSS}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n")


def _write_atomic(path: Path, text: str) -> Path:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def _class_badge(immune_class: object) -> _Html:
    if immune_class is None or (isinstance(immune_class, float) and not np.isfinite(immune_class)):
        return _Html(f'<span class="absent">{ABSENT}</span>')
    text = str(immune_class)
    css = text if text in ("inflamed", "excluded", "desert") else ""
    return _Html(f'<span class="class {css}">{_e(text)}</span>')


# ---- the slide page ------------------------------------------------------------------------

def _split_name(name: str) -> tuple[str, str, str] | None:
    """``density_CD8_T_tumor_core`` -> ``('density', 'CD8_T', 'tumor_core')``; None for other names."""
    for kind in ("density", "fraction"):
        if name.startswith(kind + "_"):
            rest = name[len(kind) + 1:]
            for region in _REGIONS:
                if rest.endswith("_" + region) and len(rest) > len(region) + 1:
                    return kind, rest[: -len(region) - 1], region
    return None


def _metrics_tables(metrics: Mapping) -> list[str]:
    """Areas, the density and fraction matrices (groups x regions), ratios, the rest, then every metric."""
    names = list(metrics["metrics"])
    descriptions = metrics.get("descriptions", {})
    parts, used = [], set()
    areas = [n for n in (f"area_{r}_mm2" for r in (*_REGION_ORDER, "viable_tumor", "necrosis", "fibrosis"))
             if n in names]
    if areas:
        rows = [(n[5:-4], _value_cell(metrics, n, with_unit=False)) for n in areas]
        parts += ["<h3>Areas</h3>", _table(["region", "area (mm²)"], rows, numeric=(1,))]
        used.update(areas)
    split = {n: _split_name(n) for n in names}
    for kind, title in (("density", "Cell densities (cells/mm²)"),
                        ("fraction", "Fractions of the region's cells (%)")):
        cells = {(s[1], s[2]): n for n, s in split.items() if s and s[0] == kind}
        if not cells:
            continue
        groups = list(dict.fromkeys(g for g, _ in cells))
        regions = [r for r in _REGION_ORDER if any((g, r) in cells for g in groups)]
        rows = [[g] + [_value_cell(metrics, cells[g, r], with_unit=False) if (g, r) in cells else "" for r in regions]
                for g in groups]
        parts += [f"<h3>{_e(title)}</h3>", _table(["cells"] + regions, rows, numeric=range(1, len(regions) + 1))]
        used.update(cells.values())
    rest = [n for n in names if n not in used]
    if rest:
        parts += ["<h3>Ratios, TLS, PD-L1, necrosis, counts</h3>",
                  _table(["metric", "value", "unit", "description"],
                         [(n, _value_cell(metrics, n, with_unit=False), _unit(metrics, n), descriptions.get(n, ""))
                          for n in rest], numeric=(1,))]
    every = _table(["metric", "value", "unit", "description"],
                   [(n, _value_cell(metrics, n, with_unit=False), _unit(metrics, n), descriptions.get(n, ""))
                    for n in names], numeric=(1,))
    parts += [f"<details><summary>All {len(names)} metrics with units and descriptions</summary>{every}</details>"]
    return parts


def _warnings(metrics: Mapping, regions: Mapping | None, tls_summary: Mapping | None,
              flags: Sequence[str]) -> list[str]:
    """Gating flags, absent regions, why there is no TLS, the metrics' own warnings, and metrics without a
    value grouped by reason."""
    items = [f"gating: {f}" for f in flags]
    for region, why in (regions or {}).get("absent", {}).items():
        items.append(f"region {region} absent: {why}")
    if tls_summary is not None and not tls_summary.get("count") and tls_summary.get("reason"):
        items.append(f"no TLS: {tls_summary['reason']}")
    items += [f"metrics: {w}" for w in metrics.get("warnings", [])]
    by_reason: dict[str, list[str]] = {}
    for name, value in metrics["metrics"].items():
        if value is None:
            by_reason.setdefault(metrics.get("absent", {}).get(name) or "no reason given", []).append(name)
    for why, names in by_reason.items():
        items.append(f"{len(names)} metric(s) without a value ({why}): {', '.join(names)}")
    if not items:
        return ['<p class="note">No warnings.</p>']
    return ['<div class="warn"><ul>' + "".join(f"<li>{_e(i)}</li>" for i in items) + "</ul></div>"]


def _versions() -> str:
    from importlib import metadata

    from . import __version__

    parts = [f"tme-pipeline {__version__}"]
    for package in ("numpy", "anndata", "scikit-image", "torch"):
        try:
            parts.append(f"{package} {metadata.version(package)}")
        except metadata.PackageNotFoundError:
            continue
    return ", ".join(parts)


def write_slide_report(folder: str | os.PathLike, *, slide_id: str, config: ReportConfig | None = None,
                       patient_id: str | None = None, timepoint: str | None = None,
                       path: str | os.PathLike | None = None) -> Path:
    """Write a slide's self-contained ``report.html`` from its finished result files.

    Reads ``metrics.json``, ``cells.h5ad`` (obs and uns only), ``regions.json`` and
    ``regions.npz``, ``tls.json`` and the QC pictures (``overview.png``, ``tls/``,
    ``gates.png``, ``cd3_cd8.png``; a missing picture is said to be missing). Draws the
    phenotype map from the cells' centroids and the infiltration profile from
    ``metrics.json``.

    Parameters
    ----------
    folder : path-like
        The slide's result folder.
    slide_id : str
    config : ReportConfig, optional
    patient_id, timepoint : str, optional
        From the manifest, for the header (left out when not given).
    path : path-like, optional
        Where to write; defaults to ``folder / REPORT_HTML``.

    Returns
    -------
    Path
        The page written (atomically).

    Raises
    ------
    FileNotFoundError
        If ``metrics.json`` or ``cells.h5ad`` is missing.
    ValueError
        If ``metrics.json`` does not follow the contract (a metric without a unit).
    """
    from .report_plots import infiltration_profile_figure, phenotype_map_figure, png_bytes
    from .results import (CD3_CD8_PNG, GATES_PNG, OVERVIEW_PNG, REGIONS_JSON, REGIONS_NPZ, REPORT_HTML, TLS_CLOSEUPS,
                          TLS_JSON, SlideResults)

    config = config or ReportConfig()
    results = SlideResults(slide_id, Path(folder))
    metrics = results.metrics()
    no_unit = [n for n in metrics["metrics"] if n not in metrics.get("units", {})]
    if no_unit:
        raise ValueError(f"{results.folder}: metrics.json of slide {slide_id!r} gives no unit for {no_unit}")
    cells = results.cells(backed=True)
    try:
        obs = cells.obs[["x_um", "y_um", "phenotype"]].copy()
        info = dict(cells.uns.get("slide", {}))
        flags = [str(f) for f in np.atleast_1d(cells.uns.get("phenotyping", {}).get("flags", []))]
    finally:
        cells.file.close()
    regions = results.regions() if results.file(REGIONS_JSON).is_file() else None
    # tls.json alone: the outlines (tls.geojson) are drawn in the overview already.
    tls_path = results.file(TLS_JSON)
    tls_summary = json.loads(tls_path.read_text(encoding="utf-8")) if tls_path.is_file() else None
    height_mm, width_mm = (float(v) for v in info.get("size_mm", (np.nan, np.nan)))
    if not (np.isfinite(width_mm) and np.isfinite(height_mm)):
        width_mm, height_mm = (float(obs[c].max()) / 1000.0 for c in ("x_um", "y_um"))

    body = [f"<h1>Slide {_e(slide_id)}</h1>"]
    markers = info.get("markers", {})
    # The stage knows no manifest row: patient and timepoint show when a caller gives them.
    known = [(k, v) for k, v in (("patient", patient_id), ("timepoint", timepoint)) if v]
    header = [
        *known,
        ("size", f"{width_mm:.2f} × {height_mm:.2f} mm (width × height)"),
        ("pixel", f"{float(info['pixel_um']):g} µm" if "pixel_um" in info else ABSENT),
        ("file", f"{Path(str(info.get('path', ''))).name} ({info.get('format', '?')})"),
        ("panel", ", ".join(f"{m} = {c}" if m != c else m for m, c in markers.items()) or ABSENT),
        ("cells", f"{len(obs):,}"),
        ("immune class", _Html(f"{_class_badge(metrics.get('immune_class'))} "
                               f"<span class=\"why\">{_e(metrics.get('immune_class_reason') or '')}</span>")),
        ("report written", datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")),
        ("software", _versions()),
    ]
    body.append('<table class="kv">' + "".join(f"<tr><th>{_e(k)}</th><td>{_e(v)}</td></tr>" for k, v in header)
                + "</table>")
    key = [n for n in config.key_metrics]
    body += ["<h2>Key metrics</h2>",
             _table(["metric", "value", "unit", "description"],
                    [(n, _value_cell(metrics, n, with_unit=False), _unit(metrics, n),
                      metrics.get("descriptions", {}).get(n, "")) for n in key], numeric=(1,))]
    body += ["<h2>Warnings</h2>", *_warnings(metrics, regions, tls_summary, flags)]

    body.append("<h2>Overview: regions and TLS</h2>")
    overview = results.file(OVERVIEW_PNG)
    body.append(_photo(overview, f"overview of {slide_id}", config.photo_quality) if overview.is_file()
                else '<p class="note">No overview.png (the qc stage did not write one).</p>')

    body.append("<h2>Phenotype map</h2>")
    bed = tissue = grid_um = None
    if results.file(REGIONS_NPZ).is_file():
        masks, grid_um = results.region_grids()
        bed, tissue = masks.get("tumor"), masks.get("tissue")
    fig = phenotype_map_figure(obs["x_um"].to_numpy(float), obs["y_um"].to_numpy(float),
                               obs["phenotype"].astype(str).to_numpy(), size_um=(width_mm * 1000, height_mm * 1000),
                               bed_mask=bed, tissue_mask=tissue, grid_um=grid_um, max_px=config.map_max_px,
                               title=slide_id)
    body.append(_img(png_bytes(fig), "image/png", f"phenotype map of {slide_id}"))

    body.append("<h2>Infiltration profile</h2>")
    profile = metrics.get("infiltration_profile")
    if profile and profile.get("area_mm2") and np.nansum([v or 0 for v in profile["area_mm2"]]) > 0:
        fig = infiltration_profile_figure(profile, title=f"{slide_id}: density by distance to the tumour bed's border")
        body.append(_img(png_bytes(fig), "image/png", f"infiltration profile of {slide_id}"))
    else:
        why = metrics.get("absent", {}).get("infiltration_profile", "no tumour bed border")
        body.append(f'<p class="note">No profile: {_e(why)}.</p>')

    body += _tls_section(results.file(TLS_CLOSEUPS), tls_summary, config.photo_quality)

    body.append("<h2>Gating</h2>")
    for name, what in ((GATES_PNG, "gates per marker"), (CD3_CD8_PNG, "CD3 against CD8")):
        picture = results.file(name)
        body.append(_plot(picture, what) if picture.is_file() else f'<p class="note">No {_e(name)}.</p>')

    body.append("<h2>Metrics</h2>")
    body += _metrics_tables(metrics)
    target = Path(path) if path is not None else results.file(REPORT_HTML)
    return _write_atomic(target, _page(f"tme report: {slide_id}", body))


def _tls_section(closeups: Path, tls_summary: Mapping | None, quality: int) -> list[str]:
    parts = ["<h2>Tertiary lymphoid structures</h2>"]
    table = (tls_summary or {}).get("tls", [])
    if not table:
        why = (tls_summary or {}).get("reason") or "none found"
        return parts + [f'<p class="note">No TLS: {_e(why)}.</p>']
    counts = (tls_summary or {}).get("counts", {})
    parts.append(f"<p>{len(table)} TLS: " + ", ".join(f"{_e(m)} {_e(c)}" for m, c in counts.items()) + "</p>")
    columns = [("tls_id", "TLS", "{:d}"), ("maturity", "maturity", "{}"), ("area_um2", "area (mm²)", None),
               ("n_B", "B cells", "{:d}"), ("n_T", "T cells", "{:d}"), ("fdc_fraction", "FDC fraction", "{:.2f}"),
               ("gc_score", "GC score", "{:.2f}")]
    rows = []
    for entry in table:
        row = []
        for key, _, fmt in columns:
            value = entry.get(key)
            if value is None:
                row.append(ABSENT)
            elif key == "area_um2":
                row.append(f"{float(value) / 1e6:.3f}")
            else:
                row.append(fmt.format(int(value) if fmt == "{:d}" else value))
        rows.append(row)
    parts.append(_table([c[1] for c in columns], rows, numeric=(0, 2, 3, 4, 5, 6)))
    figures = []
    for entry in table:
        picture = closeups / f"tls_{int(entry['tls_id'])}.png"
        if picture.is_file():
            caption = f"TLS {int(entry['tls_id'])}: {entry.get('maturity', '?')}"
            figures.append(f"<figure>{_photo(picture, caption, quality)}"
                           f"<figcaption>{_e(caption)}</figcaption></figure>")
    if figures:
        parts.append('<div class="grid">' + "".join(figures) + "</div>")
    return parts


# ---- the cohort page -----------------------------------------------------------------------

def _slide_link(slide_id: str) -> _Html:
    from .results import REPORT_HTML, SLIDES_DIR

    href = f"{SLIDES_DIR}/{quote(slide_id, safe='')}/{REPORT_HTML}"
    return _Html(f'<a href="{_e(href)}">{_e(slide_id)}</a>')


def _slides_section(results, slides: Sequence[Mapping], key: Sequence[str]) -> list[str]:
    """Failed slides with their errors, then a row per slide: status, class and key metrics."""
    from .results import METRICS_JSON, REPORT_HTML, slide_folder

    failed = [s for s in slides if s.get("status") == "error"]
    parts = ["<h2>Failed slides</h2>"]
    if failed:
        parts.append('<div class="error">' + _table(
            ["slide", "patient", "timepoint", "error"],
            [(s["slide_id"], s.get("patient_id", ""), s.get("timepoint", ""), s.get("error") or "unknown error")
             for s in failed]) + "</div>")
    else:
        parts.append(f'<p class="note">None: all {len(slides)} slides finished.</p>')
    rows, units = [], {}
    for s in slides:
        sid = s["slide_id"]
        folder = slide_folder(results.out, sid)
        metrics = None
        if s.get("status") != "error" and (folder / METRICS_JSON).is_file():
            metrics = results.slide(sid).metrics()
            units.update({n: metrics["units"].get(n, "") for n in key if n in metrics["units"]})
        link = _slide_link(sid) if s.get("status") != "error" and (folder / REPORT_HTML).is_file() else sid
        status = s.get("status", "")
        row = [link, s.get("patient_id", ""), s.get("timepoint", ""), status,
               _class_badge(metrics.get("immune_class")) if metrics else ABSENT]
        row += [_value_cell(metrics, n, with_unit=False) if metrics else ABSENT for n in key]
        rows.append(row)
    headers = ["slide", "patient", "timepoint", "status", "immune class"]
    # <wbr> lets a long metric name wrap at its underscores, so the table fits the page.
    headers += [_Html(f"{_e(n).replace('_', '_<wbr>')}<br><small>{_e(_unit({'units': units}, n) or '?')}</small>")
                for n in key]
    parts += ["<h2>Slides</h2>", '<p class="note">Each slide id opens its report.</p>',
              _table(headers, rows, numeric=range(5, 5 + len(key)))]
    return parts


def _patients_section(patients, key: Sequence[str]) -> list[str]:
    """Per patient: the slides, the class transition and why incomplete; per key metric pre, post, delta."""
    import pandas as pd

    obs = patients.obs
    fixed = {"pre_slide_id", "post_slide_id", "immune_class_pre", "immune_class_post", "immune_transition",
             "complete", "reason"}
    extra = [c for c in obs.columns if c not in fixed]
    rows = []
    for pid in patients.obs_names:
        o = obs.loc[pid]
        rows.append([pid, *(o[c] if pd.notna(o[c]) else "" for c in extra), o.get("pre_slide_id", ""),
                     o.get("post_slide_id", ""),
                     _Html(f"{_class_badge(o.get('immune_class_pre'))} → {_class_badge(o.get('immune_class_post'))}"),
                     "yes" if bool(o.get("complete", False)) else f"no: {o.get('reason', '')}"])
    parts = ["<h2>Patients</h2>", _table(["patient", *extra, "pre slide", "post slide", "immune class pre → post",
                                          "complete"], rows)]
    units = dict(zip(patients.var_names, patients.var["unit"].astype(str))) if "unit" in patients.var else {}
    tables = []
    for name in key:
        if name not in patients.var_names:
            tables.append(f'<div><h3>{_e(name)}</h3><p class="note">not in patients.h5ad</p></div>')
            continue
        j = patients.var_names.get_loc(name)
        unit = units.get(name, "")
        layer = {k: np.asarray(patients.layers[k][:, j], float) for k in ("pre", "post", "delta")
                 if k in patients.layers}
        cells = [[pid] + [format_value(layer[k][i], unit, with_unit=False) if k in layer else ABSENT
                          for k in ("pre", "post", "delta")] for i, pid in enumerate(patients.obs_names)]
        shown = _unit({"units": units}, name)
        tables.append(f"<div><h3>{_e(name)}{f' ({_e(shown)})' if shown else ''}</h3>"
                      + _table(["patient", "pre", "post", "post − pre"], cells, numeric=(1, 2, 3)) + "</div>")
    parts += ["<h3>Key metrics per patient</h3>", '<div class="grid">' + "".join(tables) + "</div>"]
    return parts


def _transitions_section(patients) -> list[str]:
    """Pre class x post class counts over the complete patients, and how many went cold -> hot."""
    import pandas as pd

    obs = patients.obs
    if not {"immune_class_pre", "immune_class_post"} <= set(obs.columns):
        return []
    done = obs[obs["complete"].to_numpy(bool)] if "complete" in obs else obs
    classes = ["inflamed", "excluded", "desert"]
    pre = pd.Categorical(done["immune_class_pre"].astype(object), classes)
    post = pd.Categorical(done["immune_class_post"].astype(object), classes)
    table = pd.crosstab(pre, post, dropna=False).reindex(index=classes, columns=classes, fill_value=0)
    cold_to_hot = int(sum(table.loc[c, "inflamed"] for c in ("desert", "excluded")))
    rows = [[f"pre {c}"] + [int(v) for v in table.loc[c]] for c in classes]
    return ["<h2>Immune class transitions</h2>",
            f"<p>{len(done)} patients with both timepoints; <b>{cold_to_hot}</b> went cold → hot "
            "(desert or excluded before, inflamed after).</p>",
            _table(["", *(f"post {c}" for c in classes)], rows, numeric=(1, 2, 3))]


def _analysis_section(folder: Path) -> list[str]:
    """The paired tests of ``tme analyze`` (key and significant metrics; all in a fold-out) and its plots."""
    import pandas as pd

    summary_path = folder / "analysis.json"
    if not summary_path.is_file():
        return ["<h2>Paired analysis</h2>",
                '<p class="note">No analysis yet: run <code>tme analyze OUT</code> (needs a patient with both '
                "timepoints).</p>"]
    summary = json.loads(summary_path.read_text(encoding="utf-8"))
    files = list(summary.get("files", []))
    patients = summary.get("patients", {})
    params = summary.get("parameters", {})
    parts = ["<h2>Paired analysis (pre → post)</h2>",
             f"<p>{_e(patients.get('complete', '?'))} complete patients ({_e(patients.get('incomplete', 0))} "
             f"incomplete); Wilcoxon signed-rank ({_e(params.get('zero_method', ''))}), Hodges–Lehmann estimate "
             f"with its interval, {_e(params.get('adjustment', 'Benjamini–Hochberg'))}.</p>"]
    tests = folder / "paired_tests.csv"
    if "paired_tests.csv" in files and tests.is_file():
        frame = pd.read_csv(tests, dtype={c: str for c in ("metric", "unit", "group", "method")})
        columns = ["metric", "unit", "group", "n_pairs", "median_pre", "median_post", "hl_estimate", "ci_low",
                   "ci_high", "p_value", "p_adjusted", "rank_biserial", "method"]
        columns = [c for c in columns if c in frame.columns]

        def rows(sub):
            out = []
            for _, r in sub.iterrows():
                out.append([_fmt_stat(r[c], c) for c in columns])
            return out

        keys = set(params.get("key_metrics", []))
        significant = pd.to_numeric(frame.get("p_adjusted"), errors="coerce") < float(params.get("alpha", 0.05))
        first = frame[(frame["metric"].isin(keys) & (frame["group"] == "all")) | significant]
        numeric = [k for k, c in enumerate(columns) if c not in ("metric", "unit", "group", "method")]
        parts += ["<h3>Key and significant metrics</h3>", _table(columns, rows(first), numeric=numeric),
                  f"<details><summary>All {len(frame)} tests</summary>{_table(columns, rows(frame), numeric=numeric)}"
                  "</details>"]
    pictures = [f for f in files if f.endswith(".png") and (folder / f).is_file()]
    slopes = [f for f in pictures if f.startswith("slope_")]
    if slopes:
        parts += ["<h3>Slope plots</h3>", '<div class="grid">' + "".join(
            f"<figure>{_plot(folder / f, f)}<figcaption>{_e(f)}</figcaption></figure>" for f in slopes) + "</div>"]
    for f in (f for f in pictures if f not in slopes):
        parts += [f"<h3>{_e(f)}</h3>", _plot(folder / f, f)]
    return parts


def _fmt_stat(value: object, column: str) -> str:
    if isinstance(value, str):
        return value
    if value is None or (isinstance(value, float) and not np.isfinite(value)):
        return ABSENT
    if column in ("p_value", "p_adjusted"):
        return f"{float(value):.2g}" if value >= 0.001 else f"{float(value):.1e}"
    if column == "n_pairs":
        return f"{int(value)}"
    return f"{float(value):,.3g}" if abs(float(value)) < 100 else f"{float(value):,.0f}"


def write_cohort_report(out_dir: str | os.PathLike) -> Path:
    """Write the cohort's self-contained ``OUT/report.html`` from what the run left.

    Reads ``run.json`` (every manifest slide, failed ones with their errors), each
    finished slide's ``metrics.json`` (immune class, the key metrics of the config's
    ``report.key_metrics``), ``patients.h5ad`` (pre, post and delta per patient, class
    transitions) and ``analysis/`` (paired tests, slope plots, heat map) when present; a
    missing table leaves its section saying so. Links each slide's ``report.html``
    relatively, so the folder can be moved whole.

    Parameters
    ----------
    out_dir : path-like
        The results folder of ``tme run``.

    Returns
    -------
    Path
        ``OUT/report.html``, written atomically.

    Raises
    ------
    FileNotFoundError
        If ``out_dir`` has no ``run.json``.
    """
    from .analysis import ANALYSIS_DIR
    from .results import COHORT_REPORT, RUN_JSON, open_results

    results = open_results(out_dir)
    if not results.run:
        raise FileNotFoundError(f"{results.out / RUN_JSON}: no run record; `tme run` writes it")
    run = results.run
    slides = run.get("slides", [])
    key = list(run.get("config", {}).get("report", {}).get("key_metrics") or DEFAULT_KEY_METRICS)
    counts = {st: sum(s.get("status") == st for s in slides) for st in ("done", "skipped", "error")}
    body = [f"<h1>Cohort report: {_e(results.out.resolve().name)}</h1>"]
    header = [("run", f"{run.get('status', '?')}, started {run.get('started', '?')}, finished "
                      f"{run.get('finished') or '—'}"),
              ("manifest", run.get("manifest", ABSENT)),
              ("slides", f"{len(slides)}: {counts['done']} run, {counts['skipped']} up to date, "
                         f"{counts['error']} failed"),
              ("patients", str(len({s.get('patient_id') for s in slides}))),
              ("software", f"tme-pipeline {run.get('versions', {}).get('tme-pipeline', '?')}"),
              ("report written", datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"))]
    body.append('<table class="kv">' + "".join(f"<tr><th>{_e(k)}</th><td>{_e(v)}</td></tr>" for k, v in header)
                + "</table>")
    body += _slides_section(results, slides, key)
    try:
        patients = results.patients()
    except FileNotFoundError as error:
        body += ["<h2>Patients</h2>", f'<p class="note">{_e(error)}</p>']
    else:
        body += _patients_section(patients, key)
        body += _transitions_section(patients)
    body += _analysis_section(results.out / ANALYSIS_DIR)
    return _write_atomic(results.out / COHORT_REPORT, _page(f"tme cohort report: {results.out.name}", body))
