"""The HTML reports: one page per slide (stage ``report``) and the pieces every page uses.

The cohort page is :mod:`tme_pipeline.cohort_report`. Both pages are single self-contained
files: pictures are embedded as base64 ``data:`` URIs (photographs as JPEG, plots as PNG),
the style sheet is inline, and nothing points outside the file except the cohort page's
relative links to the slide pages, so a page opens offline, mailed or copied alone. Every
text that comes from data (slide ids, errors, metric names, reasons) is HTML-escaped. A value is shown with its unit; a metric
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

import numpy as np

from .settings.report import DEFAULT_KEY_METRICS, ReportConfig

__all__ = ["ReportConfig", "format_value", "write_slide_report", "DEFAULT_KEY_METRICS", "ABSENT",
           # the pieces the cohort page builds with
           "Html", "esc", "html_table", "html_page", "plot_img", "class_badge", "unit_of", "value_cell", "write_atomic"]

#: Regions of the metric names, longest first so that ``_tumor_core`` is tried before ``_tumor``.
_REGIONS = ("tumor_core", "tissue", "tumor", "margin", "stroma")
_REGION_ORDER = ("tissue", "tumor", "tumor_core", "margin", "stroma")

#: How a unit of ``metrics.json`` is written and how many decimals its values get.
_UNITS = {"mm2": ("mm²", 3), "cells/mm2": ("cells/mm²", 0), "%": ("%", 1), "ratio": ("", 2),
          "count": ("", 0), "1/mm2": ("/mm²", 2), "score": ("", 1)}

ABSENT = "—"


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

class Html(str):
    """Text that is already HTML (built here from escaped parts); never escaped again."""


def esc(text: object) -> str:
    return text if isinstance(text, Html) else html.escape(str(text), quote=True)


def html_table(headers: Sequence[str], rows: Iterable[Sequence[object]], *, numeric: Sequence[int] = ()) -> Html:
    """A table; the columns ``numeric`` (indices) are right-aligned."""
    head = "".join(f"<th>{esc(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f'<td class="num">{esc(c)}</td>' if k in numeric else f"<td>{esc(c)}</td>"
                                    for k, c in enumerate(row)) + "</tr>" for row in rows)
    return Html(f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")


def _img(data: bytes, mime: str, alt: str) -> Html:
    encoded = base64.b64encode(data).decode("ascii")
    return Html(f'<img alt="{esc(alt)}" src="data:{mime};base64,{encoded}">')


def _photo(path: Path, alt: str, quality: int) -> Html:
    """A picture file embedded as JPEG: the false-colour photographs shrink ~5x with no visible loss."""
    from PIL import Image

    with Image.open(path) as image:
        buffer = io.BytesIO()
        image.convert("RGB").save(buffer, format="JPEG", quality=quality, optimize=True)
    return _img(buffer.getvalue(), "image/jpeg", alt)


def plot_img(path: Path, alt: str) -> Html:
    return _img(path.read_bytes(), "image/png", alt)


def _absent(reason: str | None) -> Html:
    why = reason or "no value"
    return Html(f'<span class="absent" title="{esc(why)}">{ABSENT}</span> <span class="why">{esc(why)}</span>')


def value_cell(metrics: Mapping, name: str, *, with_unit: bool = True) -> object:
    """The value of ``metrics.json`` metric ``name`` (with its unit), or "—" and why."""
    value = metrics["metrics"].get(name)
    if name not in metrics["metrics"]:
        return _absent("not computed")
    if value is None:
        return _absent(metrics.get("absent", {}).get(name))
    return format_value(value, metrics["units"].get(name, ""), with_unit=with_unit)


def unit_of(metrics: Mapping, name: str) -> str:
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


def html_page(title: str, body: Sequence[str]) -> str:
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{esc(title)}</title><style>{_CSS}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n")


def write_atomic(path: Path, text: str) -> Path:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def class_badge(immune_class: object) -> Html:
    if immune_class is None or (isinstance(immune_class, float) and not np.isfinite(immune_class)):
        return Html(f'<span class="absent">{ABSENT}</span>')
    text = str(immune_class)
    css = text if text in ("inflamed", "excluded", "desert") else ""
    return Html(f'<span class="class {css}">{esc(text)}</span>')


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
        rows = [(n[5:-4], value_cell(metrics, n, with_unit=False)) for n in areas]
        parts += ["<h3>Areas</h3>", html_table(["region", "area (mm²)"], rows, numeric=(1,))]
        used.update(areas)
    split = {n: _split_name(n) for n in names}
    for kind, title in (("density", "Cell densities (cells/mm²)"),
                        ("fraction", "Fractions of the region's cells (%)")):
        cells = {(s[1], s[2]): n for n, s in split.items() if s and s[0] == kind}
        if not cells:
            continue
        groups = list(dict.fromkeys(g for g, _ in cells))
        regions = [r for r in _REGION_ORDER if any((g, r) in cells for g in groups)]
        rows = [[g] + [value_cell(metrics, cells[g, r], with_unit=False) if (g, r) in cells else "" for r in regions]
                for g in groups]
        parts += [f"<h3>{esc(title)}</h3>", html_table(["cells"] + regions, rows, numeric=range(1, len(regions) + 1))]
        used.update(cells.values())
    rest = [n for n in names if n not in used]
    if rest:
        parts += ["<h3>Ratios, TLS, PD-L1, necrosis, counts</h3>",
                  html_table(["metric", "value", "unit", "description"],
                         [(n, value_cell(metrics, n, with_unit=False), unit_of(metrics, n), descriptions.get(n, ""))
                          for n in rest], numeric=(1,))]
    every = html_table(["metric", "value", "unit", "description"],
                   [(n, value_cell(metrics, n, with_unit=False), unit_of(metrics, n), descriptions.get(n, ""))
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
    return ['<div class="warn"><ul>' + "".join(f"<li>{esc(i)}</li>" for i in items) + "</ul></div>"]


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

    body = [f"<h1>Slide {esc(slide_id)}</h1>"]
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
        ("immune class", Html(f"{class_badge(metrics.get('immune_class'))} "
                               f"<span class=\"why\">{esc(metrics.get('immune_class_reason') or '')}</span>")),
        ("report written", datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")),
        ("software", _versions()),
    ]
    body.append('<table class="kv">' + "".join(f"<tr><th>{esc(k)}</th><td>{esc(v)}</td></tr>" for k, v in header)
                + "</table>")
    key = [n for n in config.key_metrics]
    body += ["<h2>Key metrics</h2>",
             html_table(["metric", "value", "unit", "description"],
                    [(n, value_cell(metrics, n, with_unit=False), unit_of(metrics, n),
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
        body.append(f'<p class="note">No profile: {esc(why)}.</p>')

    body += _tls_section(results.file(TLS_CLOSEUPS), tls_summary, config.photo_quality)

    body.append("<h2>Gating</h2>")
    for name, what in ((GATES_PNG, "gates per marker"), (CD3_CD8_PNG, "CD3 against CD8")):
        picture = results.file(name)
        body.append(plot_img(picture, what) if picture.is_file() else f'<p class="note">No {esc(name)}.</p>')

    body.append("<h2>Metrics</h2>")
    body += _metrics_tables(metrics)
    target = Path(path) if path is not None else results.file(REPORT_HTML)
    return write_atomic(target, html_page(f"tme report: {slide_id}", body))


def _tls_section(closeups: Path, tls_summary: Mapping | None, quality: int) -> list[str]:
    parts = ["<h2>Tertiary lymphoid structures</h2>"]
    table = (tls_summary or {}).get("tls", [])
    if not table:
        why = (tls_summary or {}).get("reason") or "none found"
        return parts + [f'<p class="note">No TLS: {esc(why)}.</p>']
    counts = (tls_summary or {}).get("counts", {})
    parts.append(f"<p>{len(table)} TLS: " + ", ".join(f"{esc(m)} {esc(c)}" for m, c in counts.items()) + "</p>")
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
    parts.append(html_table([c[1] for c in columns], rows, numeric=(0, 2, 3, 4, 5, 6)))
    figures = []
    for entry in table:
        picture = closeups / f"tls_{int(entry['tls_id'])}.png"
        if picture.is_file():
            caption = f"TLS {int(entry['tls_id'])}: {entry.get('maturity', '?')}"
            figures.append(f"<figure>{_photo(picture, caption, quality)}"
                           f"<figcaption>{esc(caption)}</figcaption></figure>")
    if figures:
        parts.append('<div class="grid">' + "".join(figures) + "</div>")
    return parts
