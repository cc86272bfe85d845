"""Reports: self-contained pages (nothing outside the file but relative slide links), text
escaped, every metric with its unit, absent metrics with their reason, failed slides with
their errors; the phenotype map drawn from centroids at a bounded size.

The slide folder is hand-made (cells.h5ad obs, metrics.json as the contract fixes it, the
regions and TLS files, small pictures), so every value the page shows is one written here.
"""
from __future__ import annotations

import json
from html.parser import HTMLParser
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest

from tme_pipeline.cohort_report import write_cohort_report
from tme_pipeline.report import ReportConfig, format_value, write_slide_report
from tme_pipeline.report_plots import infiltration_profile_figure, phenotype_map_figure, phenotype_raster
from tme_pipeline.results import (
    CELLS, COHORT_REPORT, GATES_PNG, METRICS_JSON, OVERVIEW_PNG, REGIONS_JSON, REGIONS_NPZ, REPORT_HTML, RUN_JSON,
    TLS_CLOSEUPS, TLS_JSON, slide_folder,
)

NASTY_ID = 'P<1>&"x'
SIZE_UM = (1200.0, 800.0)
UNITS = {"area_tissue_mm2": "mm2", "density_CD8_T_tumor": "cells/mm2", "density_CD8_T_margin": "cells/mm2",
         "density_CD8_T_tumor_core": "cells/mm2", "fraction_CD8_T_tumor": "%", "ratio_cd8_t_treg_margin": "ratio",
         "tls_count": "count", "tls_per_mm2": "1/mm2", "pdl1_cps": "score", "percent_necrosis": "%"}
SHOWN_UNIT = {"mm2": "mm²", "cells/mm2": "cells/mm²", "1/mm2": "1/mm²"}
ABSENT_WHY = "tumor_core absent: area 0.01 mm² < 0.05 mm² <script>alert(1)</script>"


class _Page(HTMLParser):
    """Every tag with its attributes, the text, and the table rows (cells as text)."""

    def __init__(self, text: str):
        super().__init__()
        self.tags, self.text, self.rows, self._row, self._cell = [], [], [], None, None
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))
        if tag == "tr":
            self._row = []
        elif tag in ("td", "th") and self._row is not None:
            self._cell = []

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            self._row.append(" ".join("".join(self._cell).split()))
            self._cell = None
        elif tag == "tr" and self._row is not None:
            self.rows.append(self._row)
            self._row = None

    def handle_data(self, data):
        self.text.append(data)
        if self._cell is not None:
            self._cell.append(data)

    def urls(self):
        return [v for _, attrs in self.tags for k, v in attrs.items() if k in ("src", "href", "action", "srcset")]


def _png(path: Path, shape=(40, 60)) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, size=(*shape, 3), dtype=np.uint8)).save(path)


def _metrics(slide_id: str, values: dict) -> dict:
    metrics = dict(values)
    absent = {n: ABSENT_WHY for n, v in metrics.items() if v is None}
    return {"format": 1, "slide_id": slide_id, "metrics": metrics, "units": dict(UNITS),
            "descriptions": {n: f"{n} <described>" for n in UNITS}, "absent": absent,
            "immune_class": "excluded", "immune_class_reason": "core CD8 40 /mm² <= 100, margin 300 > 200",
            "infiltration_profile": {"bin_edges_um": [-100, -50, 0, 50, 100], "area_mm2": [0.0, 0.1, 0.2, 0.1],
                                     "density": {"CD8_T": [None, 20.0, 300.0, 250.0], "B": [None, 0.0, 10.0, 40.0]}},
            "warnings": ["phenotype 'NK' of metrics.t_cells is not a phenotype of the slide"], "parameters": {}}


VALUES = {"area_tissue_mm2": 0.96, "density_CD8_T_tumor": 41.64, "density_CD8_T_margin": 300.2,
          "density_CD8_T_tumor_core": None, "fraction_CD8_T_tumor": 3.25, "ratio_cd8_t_treg_margin": 2.5,
          "tls_count": 1.0, "tls_per_mm2": 1.0417, "pdl1_cps": 12.0, "percent_necrosis": 7.5}


def make_slide(folder: Path, slide_id: str, *, values: dict = VALUES, n_cells: int = 3000) -> Path:
    """A finished slide folder as the stages up to ``metrics`` leave it."""
    rng = np.random.default_rng(1)
    folder.mkdir(parents=True)
    x, y = rng.uniform(0, SIZE_UM[0], n_cells), rng.uniform(0, SIZE_UM[1], n_cells)
    phenotype = rng.choice(["tumor", "CD8_T", "B", "other"], n_cells, p=[0.3, 0.1, 0.1, 0.5])
    obs = pd.DataFrame({"x_um": x, "y_um": y, "phenotype": pd.Categorical(phenotype)},
                       index=[str(i) for i in range(n_cells)])
    cells = ad.AnnData(np.zeros((n_cells, 1), np.float32), obs=obs)
    cells.uns["slide"] = {"pixel_um": 0.5, "size_mm": [SIZE_UM[1] / 1000, SIZE_UM[0] / 1000], "format": "ome-tiff",
                          "path": f"/data/{slide_id}.ome.tif", "markers": {"CD8": "CD8", "PD-L1": "PDL1"}}
    cells.uns["phenotyping"] = {"flags": ["marker 'CD21': no separated positive population <fallback>"]}
    cells.write_h5ad(folder / CELLS)
    grid_um = 10.0
    tissue = np.ones((80, 120), bool)
    tumor = np.zeros_like(tissue)
    tumor[20:60, 30:90] = True
    np.savez_compressed(folder / REGIONS_NPZ, grid_um=np.float64(grid_um), mask_names=np.array(["tissue", "tumor"]),
                        mask_tissue=tissue, mask_tumor=tumor)
    (folder / REGIONS_JSON).write_text(json.dumps({"areas_mm2": {"tissue": 0.96}, "absent": {
        "tumor_core": "area 0.01 mm² < 0.05 mm²"}}))
    (folder / TLS_JSON).write_text(json.dumps({"count": 1, "counts": {"primary": 1}, "tls": [
        {"tls_id": 1, "maturity": "primary", "area_um2": 52000.0, "n_B": 120, "n_T": 80, "fdc_fraction": 0.4,
         "gc_score": 0.0}]}))
    _png(folder / OVERVIEW_PNG)
    _png(folder / TLS_CLOSEUPS / "tls_1.png")
    _png(folder / GATES_PNG)
    (folder / METRICS_JSON).write_text(json.dumps(_metrics(slide_id, values), allow_nan=False))
    return folder


@pytest.fixture(scope="module")
def slide_page(tmp_path_factory):
    folder = make_slide(tmp_path_factory.mktemp("out") / "slides" / NASTY_ID, NASTY_ID)
    path = write_slide_report(folder, slide_id=NASTY_ID, patient_id="P<1>", timepoint="post")
    return path, path.read_text(encoding="utf-8")


def test_slide_page_is_self_contained(slide_page):
    path, text = slide_page
    assert path.name == REPORT_HTML
    page = _Page(text)
    urls = page.urls()
    images = [attrs["src"] for tag, attrs in page.tags if tag == "img"]
    # overview, phenotype map, profile, one TLS close-up, gates (cd3_cd8.png is absent)
    assert len(images) == 5
    assert all(u.startswith(("data:image/png;base64,", "data:image/jpeg;base64,")) for u in images)
    assert all(u.startswith(("data:", "#")) for u in urls), [u[:40] for u in urls if not u.startswith("data:")]
    assert not any(tag in ("link", "script", "iframe") for tag, _ in page.tags)
    assert "url(" not in text and "@import" not in text


def test_slide_page_escapes_data_text(slide_page):
    _, text = slide_page
    page = _Page(text)
    assert not any(tag == "script" for tag, _ in page.tags)
    assert not any(tag == "1" for tag, _ in page.tags)  # '<1>' of the slide id is text, not a tag
    headings = [row for row in page.text if row.startswith("Slide ")]
    assert headings[0] == f"Slide {NASTY_ID}"
    assert "no separated positive population <fallback>" in "".join(page.text)
    assert ["patient", "P<1>"] in page.rows and ["timepoint", "post"] in page.rows
    assert "metrics: phenotype 'NK' of metrics.t_cells is not a phenotype of the slide" in page.text


def test_slide_page_shows_every_metric_with_its_unit_and_absent_ones_with_why(slide_page):
    _, text = slide_page
    rows = {r[0]: r for r in _Page(text).rows if len(r) == 4 and r[0] in UNITS}
    assert set(rows) == set(UNITS)
    for name, unit in UNITS.items():
        metric, value, shown, description = rows[name]
        assert shown == SHOWN_UNIT.get(unit, unit)
        assert description == f"{name} <described>"
        if VALUES[name] is None:
            assert value.startswith("—") and "tumor_core absent: area 0.01 mm²" in value
        else:
            assert value == format_value(VALUES[name], unit, with_unit=False)
    # the density matrix: CD8_T over tumor, tumor_core (absent), margin
    densities = next(r for r in _Page(text).rows if r and r[0] == "CD8_T")
    assert densities[1] == "42" and densities[2].startswith("— tumor_core absent") and densities[3] == "300"


def test_slide_page_key_metrics_follow_the_config(tmp_path):
    folder = make_slide(tmp_path / "S1", "S1", n_cells=200)
    config = ReportConfig(key_metrics=("pdl1_cps", "no_such_metric"))
    text = write_slide_report(folder, slide_id="S1", config=config).read_text(encoding="utf-8")
    rows = _Page(text).rows
    key_rows = rows[rows.index(["metric", "value", "unit", "description"]) + 1:][:2]
    assert [r[0] for r in key_rows] == ["pdl1_cps", "no_such_metric"]
    assert key_rows[0][1] == "12.0" and key_rows[1][1].startswith("—")
    assert not any(r[0] in ("patient", "timepoint") for r in rows)  # not given: not shown


def test_slide_page_refuses_a_metric_without_unit(tmp_path):
    folder = make_slide(tmp_path / "S1", "S1", n_cells=50)
    metrics = json.loads((folder / METRICS_JSON).read_text())
    del metrics["units"]["tls_count"]
    (folder / METRICS_JSON).write_text(json.dumps(metrics))
    with pytest.raises(ValueError, match="no unit for \\['tls_count'\\]"):
        write_slide_report(folder, slide_id="S1")


def test_format_value_rounds_by_unit_and_marks_missing():
    assert format_value(1234.56, "cells/mm2") == "1,235 cells/mm²"
    assert format_value(0.12345, "mm2") == "0.123 mm²"
    assert format_value(float("nan"), "%") == "—"
    assert format_value(2.345, "ratio") == "2.35"


# ---- the pictures -----------------------------------------------------------------------------

def test_phenotype_raster_keeps_the_highest_rank_per_pixel_and_drops_outside():
    x = np.array([1.0, 5.0, 12.0, 25.0, -1.0, 31.0])
    y = np.array([1.0, 9.0, 1.0, 15.0, 5.0, 5.0])
    codes = np.array([0, 3, 1, 2, 5, 5])
    raster = phenotype_raster(x, y, codes, size_um=(30.0, 20.0), pixel_um=10.0)
    np.testing.assert_array_equal(raster, [[3, 1, -1], [-1, -1, 2]])
    with pytest.raises(ValueError, match="one length"):
        phenotype_raster(x, y[:2], codes, size_um=(30.0, 20.0), pixel_um=10.0)


def test_phenotype_map_is_bounded_whatever_the_slide_size():
    rng = np.random.default_rng(2)
    size = (20000.0, 15000.0)  # a 20 x 15 mm resection
    x, y = rng.uniform(0, size[0], 5000), rng.uniform(0, size[1], 5000)
    phenotype = rng.choice(["CD8_T", "tumor", "Mystery"], 5000)
    fig = phenotype_map_figure(x, y, phenotype, size_um=size, max_px=500)
    image = fig.axes[0].images[0].get_array()
    assert max(image.shape[:2]) <= 500
    labels = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert any(label.startswith("Mystery (") for label in labels)  # a phenotype outside the palette is drawn
    assert sum(int(label.split("(")[1].rstrip(")").replace(",", "")) for label in labels) == 5000


def test_infiltration_profile_draws_each_group_with_gaps_and_checks_lengths():
    profile = {"bin_edges_um": [-100, -50, 0, 50], "area_mm2": [0.0, 0.1, 0.2],
               "density": {"CD8_T": [None, 20.0, 300.0], "B": [None, 0.0, 10.0]}}
    fig = infiltration_profile_figure(profile)
    lines = {line.get_label(): line for line in fig.axes[0].get_lines() if not line.get_label().startswith("_")}
    assert set(lines) == {"CD8_T", "B"}
    np.testing.assert_array_equal(lines["CD8_T"].get_xdata(), [-75, -25, 25])
    np.testing.assert_array_equal(lines["CD8_T"].get_ydata(), [np.nan, 20.0, 300.0])
    with pytest.raises(ValueError, match="density of 'B' has 2 bins"):
        infiltration_profile_figure({**profile, "density": {"B": [1.0, 2.0]}})
    with pytest.raises(ValueError, match="one more edge"):
        infiltration_profile_figure({**profile, "bin_edges_um": [0, 50]})


# ---- the cohort page --------------------------------------------------------------------------

def _cohort(tmp_path):
    from test_cohort_tables import SLIDES, write_results

    from tme_pipeline.cohort_tables import write_cohort_tables

    out, written = write_results(tmp_path)
    run = json.loads((out / RUN_JSON).read_text())
    failed = next(s for s in run["slides"] if s["status"] == "error")
    failed["error"] = "ValueError: <bad> & broken"
    (out / RUN_JSON).write_text(json.dumps(run))
    return out, written, SLIDES, write_cohort_tables


def test_cohort_page_links_slides_lists_failures_and_is_self_contained(tmp_path):
    out, written, slides, write_tables = _cohort(tmp_path)
    write_tables(out)
    # two slides have their page; the others are listed without a link
    for sid in ("P1_pre", "P4_post"):
        (slide_folder(out, sid) / REPORT_HTML).write_text("<html></html>")
    path = write_cohort_report(out)
    assert path == out / COHORT_REPORT
    page = _Page(path.read_text(encoding="utf-8"))
    links = [attrs["href"] for tag, attrs in page.tags if tag == "a"]
    assert links == ["slides/P1_pre/report.html", "slides/P4_post/report.html"]
    assert all((out / link).is_file() for link in links)
    assert all(u.startswith(("data:", "#")) or u in links for u in page.urls())
    failed_rows = [r for r in page.rows if "ValueError: <bad> & broken" in r]
    assert [r[0] for r in failed_rows] == ["P2_post"]
    slide_rows = {r[0]: r for r in page.rows if r and r[0] in written}
    assert set(slide_rows) == set(written)
    # a patient with both sides: pre, post and post - pre of a key metric from patients.h5ad
    pre = written["P4_pre"]["metrics"]["tls_count"]
    post = written["P4_post"]["metrics"]["tls_count"]
    p4 = [r for r in page.rows if r and r[0] == "P4" and len(r) == 4]
    assert [format_value(v, "count") for v in (pre, post, post - pre)] in [r[1:] for r in p4]


def test_cohort_page_counts_class_transitions(tmp_path):
    out, written, slides, write_tables = _cohort(tmp_path)
    write_tables(out)
    page = _Page(write_cohort_report(out).read_text(encoding="utf-8"))
    table = {r[0]: r[1:] for r in page.rows if r and r[0].startswith("pre ")}
    # complete patients: P1 desert -> inflamed, P4 inflamed -> inflamed (P2 failed, P3 has no pre)
    assert table["pre desert"] == ["1", "0", "0"]
    assert table["pre inflamed"] == ["1", "0", "0"]
    assert table["pre excluded"] == ["0", "0", "0"]
    assert "2 patients with both timepoints; 1 went cold → hot" in "".join(page.text)


def test_cohort_page_without_tables_says_what_is_missing(tmp_path):
    out, written, slides, _ = _cohort(tmp_path)
    text = write_cohort_report(out).read_text(encoding="utf-8")
    assert "no patients.h5ad" in text and "No analysis yet" in text
    assert "ValueError: &lt;bad&gt; &amp; broken" in text
    (out / RUN_JSON).unlink()
    with pytest.raises(FileNotFoundError, match="run.json"):
        write_cohort_report(out)


def test_cohort_page_with_no_complete_patient_shows_an_empty_transition_table(tmp_path):
    import anndata as ad

    from tme_pipeline.results import PATIENTS_H5AD

    out, written, slides, write_tables = _cohort(tmp_path)
    write_tables(out)
    patients = ad.read_h5ad(out / PATIENTS_H5AD)
    patients.obs["complete"] = False  # e.g. a cohort of pre-SBRT biopsies only
    patients.write_h5ad(out / PATIENTS_H5AD)
    page = _Page(write_cohort_report(out).read_text(encoding="utf-8"))
    table = {r[0]: r[1:] for r in page.rows if r and r[0].startswith("pre ")}
    assert table == {f"pre {c}": ["0", "0", "0"] for c in ("inflamed", "excluded", "desert")}
    assert "0 patients with both timepoints; 0 went cold → hot" in "".join(page.text)
