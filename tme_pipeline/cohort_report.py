"""The cohort's HTML page, ``OUT/report.html``: slides, patients, class transitions, the analysis.

Self-contained like a slide page (:mod:`tme_pipeline.report`, whose pieces it uses): pictures
embedded, style inline; its only links are relative ones to the slide pages.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from urllib.parse import quote

import numpy as np

from .report import (
    ABSENT, DEFAULT_KEY_METRICS, Html, class_badge, esc, format_value, html_page, html_table, plot_img, unit_of,
    value_cell, write_atomic,
)

__all__ = ["write_cohort_report"]


def _slide_link(slide_id: str) -> Html:
    from .results import REPORT_HTML, SLIDES_DIR

    href = f"{SLIDES_DIR}/{quote(slide_id, safe='')}/{REPORT_HTML}"
    return Html(f'<a href="{esc(href)}">{esc(slide_id)}</a>')


def _slides_section(results, slides: Sequence[Mapping], key: Sequence[str]) -> list[str]:
    """Failed slides with their errors, then a row per slide: status, class and key metrics."""
    from .results import METRICS_JSON, REPORT_HTML, slide_folder

    failed = [s for s in slides if s.get("status") == "error"]
    parts = ["<h2>Failed slides</h2>"]
    if failed:
        parts.append('<div class="error">' + html_table(
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
               class_badge(metrics.get("immune_class")) if metrics else ABSENT]
        row += [value_cell(metrics, n, with_unit=False) if metrics else ABSENT for n in key]
        rows.append(row)
    headers = ["slide", "patient", "timepoint", "status", "immune class"]
    # <wbr> lets a long metric name wrap at its underscores, so the table fits the page.
    headers += [Html(f"{esc(n).replace('_', '_<wbr>')}<br><small>{esc(unit_of({'units': units}, n) or '?')}</small>")
                for n in key]
    parts += ["<h2>Slides</h2>", '<p class="note">Each slide id opens its report.</p>',
              html_table(headers, rows, numeric=range(5, 5 + len(key)))]
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
                     Html(f"{class_badge(o.get('immune_class_pre'))} → {class_badge(o.get('immune_class_post'))}"),
                     "yes" if bool(o.get("complete", False)) else f"no: {o.get('reason', '')}"])
    parts = ["<h2>Patients</h2>", html_table(["patient", *extra, "pre slide", "post slide", "immune class pre → post",
                                          "complete"], rows)]
    units = dict(zip(patients.var_names, patients.var["unit"].astype(str))) if "unit" in patients.var else {}
    tables = []
    for name in key:
        if name not in patients.var_names:
            tables.append(f'<div><h3>{esc(name)}</h3><p class="note">not in patients.h5ad</p></div>')
            continue
        j = patients.var_names.get_loc(name)
        unit = units.get(name, "")
        layer = {k: np.asarray(patients.layers[k][:, j], float) for k in ("pre", "post", "delta")
                 if k in patients.layers}
        cells = [[pid] + [format_value(layer[k][i], unit, with_unit=False) if k in layer else ABSENT
                          for k in ("pre", "post", "delta")] for i, pid in enumerate(patients.obs_names)]
        shown = unit_of({"units": units}, name)
        tables.append(f"<div><h3>{esc(name)}{f' ({esc(shown)})' if shown else ''}</h3>"
                      + html_table(["patient", "pre", "post", "post − pre"], cells, numeric=(1, 2, 3)) + "</div>")
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
    pre = pd.Categorical(done["immune_class_pre"].astype(object), classes).codes
    post = pd.Categorical(done["immune_class_post"].astype(object), classes).codes
    # counted by hand: crosstab of empty categoricals (no complete patient) has no clean 3 x 3 shape
    counts = np.zeros((len(classes), len(classes)), int)
    known = (pre >= 0) & (post >= 0)
    np.add.at(counts, (pre[known], post[known]), 1)
    table = pd.DataFrame(counts, index=classes, columns=classes)
    cold_to_hot = int(sum(table.loc[c, "inflamed"] for c in ("desert", "excluded")))
    rows = [[f"pre {c}"] + [int(v) for v in table.loc[c]] for c in classes]
    return ["<h2>Immune class transitions</h2>",
            f"<p>{len(done)} patients with both timepoints; <b>{cold_to_hot}</b> went cold → hot "
            "(desert or excluded before, inflamed after).</p>",
            html_table(["", *(f"post {c}" for c in classes)], rows, numeric=(1, 2, 3))]


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
             f"<p>{esc(patients.get('complete', '?'))} complete patients ({esc(patients.get('incomplete', 0))} "
             f"incomplete); Wilcoxon signed-rank ({esc(params.get('zero_method', ''))}), Hodges–Lehmann estimate "
             f"with its interval, {esc(params.get('adjustment', 'Benjamini–Hochberg'))}.</p>"]
    tests = folder / "paired_tests.csv"
    if "paired_tests.csv" in files and tests.is_file():
        frame = pd.read_csv(tests, dtype={c: str for c in ("metric", "unit", "group", "family", "method")})
        columns = ["metric", "unit", "group", "family", "n_pairs", "median_pre", "median_post", "hl_estimate", "ci_low",
                   "ci_high", "p_value", "p_adjusted", "rank_biserial", "method"]
        columns = [c for c in columns if c in frame.columns]

        def rows(sub):
            out = []
            for _, r in sub.iterrows():
                out.append([_fmt_stat(r[c], c) for c in columns])
            return out

        keys = set(params.get("key_metrics", [])) | set(params.get("primary_metrics", []))
        significant = pd.to_numeric(frame.get("p_adjusted"), errors="coerce") < float(params.get("alpha", 0.05))
        first = frame[(frame["metric"].isin(keys) & (frame["group"] == "all")) | significant]
        numeric = [k for k, c in enumerate(columns) if c not in ("metric", "unit", "group", "family", "method")]
        primary = ", ".join(params.get("primary_metrics", [])) or "none"
        parts += ["<h3>Key and significant metrics</h3>",
                  f'<p class="note">Primary endpoint(s), declared in the config before the analysis and '
                  f"adjusted as their own family: {esc(primary)}; the rest are exploratory.</p>", html_table(columns, rows(first), numeric=numeric),
                  f"<details><summary>All {len(frame)} tests</summary>"
                  f"{html_table(columns, rows(frame), numeric=numeric)}"
                  "</details>"]
    pictures = [f for f in files if f.endswith(".png") and (folder / f).is_file()]
    slopes = [f for f in pictures if f.startswith("slope_")]
    if slopes:
        parts += ["<h3>Slope plots</h3>", '<div class="grid">' + "".join(
            f"<figure>{plot_img(folder / f, f)}<figcaption>{esc(f)}</figcaption></figure>" for f in slopes) + "</div>"]
    for f in (f for f in pictures if f not in slopes):
        parts += [f"<h3>{esc(f)}</h3>", plot_img(folder / f, f)]
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
    from .results import ANALYSIS_DIR, COHORT_REPORT, RUN_JSON, open_results

    results = open_results(out_dir)
    if not results.run:
        raise FileNotFoundError(f"{results.out / RUN_JSON}: no run record; `tme run` writes it")
    run = results.run
    slides = run.get("slides", [])
    key = list(run.get("config", {}).get("report", {}).get("key_metrics") or DEFAULT_KEY_METRICS)
    counts = {st: sum(s.get("status") == st for s in slides) for st in ("done", "skipped", "error")}
    body = [f"<h1>Cohort report: {esc(results.out.resolve().name)}</h1>"]
    header = [("run", f"{run.get('status', '?')}, started {run.get('started', '?')}, finished "
                      f"{run.get('finished') or '—'}"),
              ("manifest", run.get("manifest", ABSENT)),
              ("slides", f"{len(slides)}: {counts['done']} run, {counts['skipped']} up to date, "
                         f"{counts['error']} failed"),
              ("patients", str(len({s.get('patient_id') for s in slides}))),
              ("software", f"tme-pipeline {run.get('versions', {}).get('tme-pipeline', '?')}"),
              ("report written", datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"))]
    body.append('<table class="kv">' + "".join(f"<tr><th>{esc(k)}</th><td>{esc(v)}</td></tr>" for k, v in header)
                + "</table>")
    body += _slides_section(results, slides, key)
    try:
        patients = results.patients()
    except FileNotFoundError as error:
        body += ["<h2>Patients</h2>", f'<p class="note">{esc(error)}</p>']
    else:
        body += _patients_section(patients, key)
        body += _transitions_section(patients)
    body += _analysis_section(results.out / ANALYSIS_DIR)
    return write_atomic(results.out / COHORT_REPORT, html_page(f"tme cohort report: {results.out.name}", body))
