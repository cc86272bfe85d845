"""Per-slide metrics on hand-built cell tables and region grids, and the metrics stage on a hand-built folder."""

import json
from types import SimpleNamespace

import anndata as ad
import numpy as np
import pandas as pd
import pytest

from tme_pipeline.config import load_config
from tme_pipeline.geojson import feature_collection
from tme_pipeline.metrics import (
    METRIC_REGIONS, MetricsConfig, immune_class, infiltration_profile, metrics_json, signed_border_distance_um,
    slide_metrics,
)
from tme_pipeline.results import METRICS_JSON, SlideResults
from tme_pipeline.stages import metrics_stage

UNITS = {"mm2", "cells/mm2", "%", "ratio", "count", "1/mm2", "score"}
PHENOTYPES = ["CD8_T", "Treg", "CD4_T", "B", "tumor", "other"]
G = 10.0  # grid pixel (µm)


def grids(width_px=120, height_px=40, bed_cols=60):
    """Tissue everywhere on a 1200 x 400 µm grid; the bed is the left half, so the border is x = 600 µm;
    the margin band x = 350..850 µm as :func:`make_cells` draws it (none without a bed)."""
    tissue = np.ones((height_px, width_px), bool)
    bed = np.zeros_like(tissue)
    bed[:, :bed_cols] = True
    margin = np.zeros_like(tissue)
    if bed_cols:
        margin[:, 35:85] = True
    return {"tissue": tissue, "tumor": bed, "margin": margin}, G


#: Bed or margin on :func:`grids`: x < 850 µm, 85 columns of 40 pixels (mm²); counted on the grid.
TUMOR_MARGIN_MM2 = 85 * 40 * G * G * 1e-6


def make_cells(x, phenotype, *, categories=PHENOTYPES, core_end=350.0, margin_end=850.0, border=600.0,
               pdl1=None, nucleus_area=None):
    """A cells AnnData whose regions follow x (µm): core < core_end <= margin < margin_end <= stroma."""
    x = np.asarray(x, float)
    obs = pd.DataFrame({
        "x_um": x, "y_um": np.full(len(x), 200.0),
        "phenotype": pd.Categorical(phenotype, categories=categories),
        "region": pd.Categorical(np.where(x < core_end, "tumor_core", np.where(x < margin_end, "margin", "stroma")),
                                 categories=["tumor_core", "margin", "stroma"]),
        "in_tumor": x < border,
        "border_distance_um": (x - border).astype(np.float32),
        "nucleus_area_um2": np.full(len(x), 30.0) if nucleus_area is None else np.asarray(nucleus_area, float),
    })
    if pdl1 is not None:
        obs["PD-L1_pos"] = np.asarray(pdl1, bool)
    obs.index = obs.index.astype(str)
    return ad.AnnData(X=np.zeros((len(x), 1), np.float32), obs=obs)


AREAS = {"tissue": 1.0, "tumor": 0.5, "tumor_core": 0.25, "margin": 0.5, "stroma": 0.25, "viable_tumor": 0.4,
         "necrosis": 0.1, "fibrosis": 0.0}


def regions_json(absent=None, areas=None):
    areas = {**AREAS, **(areas or {})}
    bed = areas["tumor"]
    return {"areas_mm2": areas, "absent": dict(absent or {}),
            "percent_necrosis": 100 * areas["necrosis"] / bed if bed else None,
            "percent_viable_tumor": 100 * areas["viable_tumor"] / bed if bed else None}


TLS = {"count": 2, "counts": {"aggregate": 1, "primary": 0, "secondary": 1, "unstaged": 0},
       "tls": [{"tls_id": 1, "area_um2": 20000.0}, {"tls_id": 2, "area_um2": 30000.0}]}


def random_cells(seed=0, n=3000):
    rng = np.random.default_rng(seed)
    return make_cells(rng.uniform(0, 1200, n), rng.choice(PHENOTYPES, n), pdl1=rng.random(n) < 0.3)


def test_densities_are_counts_over_areas_and_every_metric_has_a_unit():
    cells = random_cells()
    result = slide_metrics(cells, regions_json(), grids(), TLS, MetricsConfig())
    obs = cells.obs
    members = {"tissue": np.ones(len(obs), bool), "tumor": obs["in_tumor"].to_numpy(),
               **{r: (obs["region"] == r).to_numpy() for r in ("tumor_core", "margin", "stroma")},
               "tumor_margin": (obs["x_um"] < 850).to_numpy()}
    areas = {**AREAS, "tumor_margin": TUMOR_MARGIN_MM2}
    groups = {p: [p] for p in PHENOTYPES if p != "other"}
    groups.update(t_cells=["CD8_T", "CD4_T", "Treg"], lymphocytes=["CD8_T", "CD4_T", "Treg", "B"])
    for r in METRIC_REGIONS:
        for g, names in groups.items():
            n = int((obs["phenotype"].isin(names).to_numpy() & members[r]).sum())
            assert result.metrics[f"density_{g}_{r}"] == pytest.approx(n / areas[r], rel=1e-12)
            assert result.metrics[f"fraction_{g}_{r}"] == pytest.approx(100 * n / members[r].sum(), rel=1e-12)
        n8 = ((obs["phenotype"] == "CD8_T").to_numpy() & members[r]).sum()
        nt = ((obs["phenotype"] == "Treg").to_numpy() & members[r]).sum()
        assert result.metrics[f"ratio_cd8_t_treg_{r}"] == pytest.approx(n8 / nt)
    assert "density_other_tissue" not in result.metrics
    assert set(result.metrics) == set(result.units) == set(result.descriptions)
    assert set(result.units.values()) <= UNITS
    assert result.units["density_CD8_T_tumor"] == "cells/mm2" and result.units["pdl1_cps"] == "score"
    assert result.metrics["n_cells"] == len(obs) and result.metrics["area_margin_mm2"] == AREAS["margin"]
    assert result.metrics["tls_count"] == 2 and result.metrics["tls_secondary_count"] == 1
    assert result.metrics["tls_per_mm2"] == pytest.approx(2 / AREAS["tissue"])
    assert result.metrics["tls_area_fraction"] == pytest.approx(100 * 0.05 / AREAS["tissue"])
    assert result.metrics["percent_necrosis"] == pytest.approx(20.0)
    assert result.metrics["area_tumor_margin_mm2"] == pytest.approx(TUMOR_MARGIN_MM2)
    # no necrosis grid: nothing is left out
    assert result.metrics["n_cells_in_necrosis"] == 0
    assert all(result.metrics[f"area_{r}_without_necrosis_mm2"] == pytest.approx(areas[r]) for r in METRIC_REGIONS)
    assert result.absent == {}


def test_necrosis_is_left_out_of_densities_areas_and_cells():
    # necrosis: x = 100..300 µm (core) on rows 0..19 (y < 200 µm): 20 x 20 pixels, 0.04 mm²
    masks, g = grids()
    necrosis = np.zeros_like(masks["tissue"])
    necrosis[:20, 10:30] = True
    masks.update(necrosis=necrosis, tumor_core=np.zeros_like(necrosis), stroma=np.zeros_like(necrosis))
    masks["tumor_core"][:, :35] = True
    masks["stroma"][:, 85:] = True
    # 30 CD8 T cells in the core, 10 of them on the necrosis (y = 100 µm); 5 in the margin
    x = [200.0] * 30 + [700.0] * 5
    cells = make_cells(x, ["CD8_T"] * 35)
    cells.obs["y_um"] = [100.0] * 10 + [300.0] * 25
    result = slide_metrics(cells, regions_json(), (masks, g), TLS)
    nec_mm2 = 400 * g * g * 1e-6
    m = result.metrics
    assert m["n_cells_in_necrosis"] == 10
    assert m["area_tumor_core_mm2"] == AREAS["tumor_core"]  # the region's whole area is kept
    assert m["area_tumor_core_without_necrosis_mm2"] == pytest.approx(AREAS["tumor_core"] - nec_mm2)
    assert m["area_margin_without_necrosis_mm2"] == pytest.approx(AREAS["margin"])  # no necrosis there
    assert m["density_CD8_T_tumor_core"] == pytest.approx(20 / (AREAS["tumor_core"] - nec_mm2))
    assert m["density_CD8_T_tumor"] == pytest.approx(20 / (AREAS["tumor"] - nec_mm2))  # x = 700 is outside the bed
    assert m["density_CD8_T_tissue"] == pytest.approx(25 / (AREAS["tissue"] - nec_mm2))
    assert m["density_CD8_T_tumor_margin"] == pytest.approx(25 / (TUMOR_MARGIN_MM2 - nec_mm2))
    assert m["density_CD8_T_margin"] == pytest.approx(5 / AREAS["margin"])
    assert m["fraction_CD8_T_tumor_core"] == 100.0  # the 20 viable cells of the core are all CD8 T
    # the profile leaves necrosis out too: 100 columns within 500 µm of the border, less the 0.04 mm²
    prof = result.infiltration_profile
    assert prof.area_mm2.sum() == pytest.approx(100 * 40 * g * g * 1e-6 - nec_mm2)
    assert prof.counts["CD8_T"].sum() == 25
    # a core almost all necrotic carries no density; the class reads the bed instead
    masks["necrosis"] = masks["tumor_core"].copy()
    masks["necrosis"][:, 34] = False  # 40 pixels left: 0.004 mm² of the grid core's 0.14 mm²
    result = slide_metrics(cells, regions_json(areas={"tumor_core": 0.14}), (masks, g), TLS)
    assert result.metrics["density_CD8_T_tumor_core"] is None
    assert "< 0.05 mm²" in result.absent["density_CD8_T_tumor_core"]
    assert "bed CD8" in result.immune_class_reason
    # necrosis on the grid, but no cell positions: a clear error
    cells.obs = cells.obs.drop(columns=["x_um"])
    with pytest.raises(ValueError, match="x_um"):
        slide_metrics(cells, regions_json(), (masks, g), TLS)


def test_an_absent_region_gives_nulls_with_reasons():
    cells = random_cells(1)
    reason = "tumor_core 0.01 mm² < 0.05 mm²"
    result = slide_metrics(cells, regions_json({"tumor_core": reason}, {"tumor_core": 0.01}), grids(), TLS)
    core = [k for k in result.metrics if "_tumor_core" in k and k != "area_tumor_core_mm2"]
    assert len(core) == 2 * 7 + 2  # density and fraction per group, the ratio, the area without necrosis
    for k in core:
        assert result.metrics[k] is None and reason in result.absent[k] and k in result.units
    assert result.metrics["area_tumor_core_mm2"] == 0.01  # the area is a measurement, kept
    assert result.metrics["density_CD8_T_margin"] is not None
    assert set(result.absent) == set(core)
    doc = metrics_json(result, slide_id="S")
    json.dumps(doc, allow_nan=False)
    assert all(doc["metrics"][k] is not None or k in doc["absent"] for k in doc["metrics"])


def test_a_region_without_treg_has_no_ratio():
    cells = make_cells([100, 110, 700], ["CD8_T", "CD8_T", "Treg"])
    result = slide_metrics(cells, regions_json(), grids(), TLS)
    assert result.metrics["ratio_cd8_t_treg_tumor_core"] is None
    assert "no Treg cells in tumor_core" in result.absent["ratio_cd8_t_treg_tumor_core"]
    assert result.metrics["ratio_cd8_t_treg_tissue"] == 2.0


def cd8_at(core: int, margin: int) -> ad.AnnData:
    """``core`` CD8 T cells in the core (x = 100) and ``margin`` in the margin's outer half (x = 700)."""
    return make_cells([100.0] * core + [700.0] * margin, ["CD8_T"] * (core + margin))


@pytest.mark.parametrize("core, margin, expected", [
    (25, 0, "desert"),  # 100 /mm² exactly is not above 100
    (26, 0, "inflamed"),
    (25, 100, "desert"),  # margin 200 /mm² exactly is not above 200
    (25, 101, "excluded"),
    (0, 101, "excluded"),
    (26, 101, "inflamed"),
])
def test_immune_class_thresholds_at_their_boundaries(core, margin, expected):
    # core area 0.25 mm², margin 0.5 mm²: 25 cells = 100 /mm², 100 cells = 200 /mm², exactly in floats
    result = slide_metrics(cd8_at(core, margin), regions_json(), grids(), TLS)
    assert result.metrics["density_CD8_T_tumor_core"] == core / 0.25
    assert result.immune_class == expected, result.immune_class_reason
    assert "core CD8" in result.immune_class_reason


def test_immune_class_without_a_core_reads_the_bed_and_without_a_bed_is_null():
    # a biopsy: the margin swallowed the core; the bed (0.5 mm²) holds 60 CD8 = 120 /mm²
    cells = make_cells([400.0] * 60, ["CD8_T"] * 60)
    absent = {"tumor_core": "tumor_core 0.01 mm² < 0.05 mm²"}
    result = slide_metrics(cells, regions_json(absent, {"tumor_core": 0.01}), grids(), TLS)
    assert result.immune_class == "inflamed"
    assert "bed CD8 120" in result.immune_class_reason and "tumor_core" in result.immune_class_reason
    no_bed = {r: "no tumour cells" for r in ("tumor", "tumor_core", "margin")}
    masks, g = grids(bed_cols=0)
    result = slide_metrics(make_cells([1000.0] * 60, ["CD8_T"] * 60), regions_json(no_bed), (masks, g), TLS)
    assert result.immune_class is None and "no tumour cells" in result.immune_class_reason
    assert result.metrics["density_CD8_T_tumor"] is None and result.metrics["density_CD8_T_stroma"] == 240.0
    assert result.infiltration_profile.reason == "no tumour bed"
    assert all(np.isnan(d).all() for d in result.infiltration_profile.density.values())



def test_immune_class_from_densities_alone():
    assert immune_class(None, 300.0, bed_cd8=50.0)[0] == "excluded"
    assert "bed CD8 50" in immune_class(None, 300.0, bed_cd8=50.0)[1]
    cls, why = immune_class(50.0, None, why_no_margin="margin absent: no border")
    assert cls is None and "margin absent: no border" in why
    assert immune_class(150.0, None)[0] == "inflamed"  # a hot core needs no margin
    strict = MetricsConfig(inflamed_core_cd8_per_mm2=200.0, excluded_margin_cd8_per_mm2=500.0)
    assert immune_class(150.0, 400.0, config=strict)[0] == "desert"

def test_phenotype_names_match_exactly():
    cells = make_cells([100, 110, 120, 130], ["CD8_T", "CD8_T_like", "CD8_T_like", "CD4_T"],
                       categories=["CD8_T", "CD8_T_like", "CD4_T", "other"])
    config = MetricsConfig(t_cells=("CD8_T", "CD4_T", "CD8"), lymphocytes=("CD8_T", "CD4_T"))
    result = slide_metrics(cells, regions_json(), grids(), TLS, config)
    assert result.metrics["density_CD8_T_tumor_core"] == 1 / 0.25
    assert result.metrics["density_CD8_T_like_tumor_core"] == 2 / 0.25
    assert result.metrics["density_t_cells_tumor_core"] == 2 / 0.25  # CD8_T + CD4_T, no CD8_T_like, no "CD8"
    assert any("'CD8'" in w for w in result.warnings)
    # the slide has no Treg phenotype: no ratio, with the reason
    assert "Treg" in result.absent["ratio_cd8_t_treg_tissue"]


def test_pdl1_scores_on_a_hand_made_table():
    # 200 viable tumour cells in the bed, 50 PD-L1+; 10 PD-L1+ tumour debris (nucleus 5 µm²) do not count;
    # PD-L1+ lymphocytes: 30 in the bed or margin (count), 20 in the stroma (do not)
    x = [100.0] * 210 + [500.0] * 15 + [700.0] * 15 + [1000.0] * 20
    phen = ["tumor"] * 210 + ["CD8_T"] * 15 + ["B"] * 15 + ["CD4_T"] * 20
    pdl1 = [True] * 50 + [False] * 150 + [True] * 10 + [True] * 50
    area = [30.0] * 200 + [5.0] * 10 + [30.0] * 50
    result = slide_metrics(make_cells(x, phen, pdl1=pdl1, nucleus_area=area), regions_json(), grids(), TLS)
    assert result.metrics["pdl1_tps"] == pytest.approx(25.0)
    assert result.metrics["pdl1_cps"] == pytest.approx(100 * (50 + 30) / 200)
    # CPS is capped at 100
    many = make_cells(x + [500.0] * 300, phen + ["CD8_T"] * 300, pdl1=pdl1 + [True] * 300,
                      nucleus_area=area + [30.0] * 300)
    assert slide_metrics(many, regions_json(), grids(), TLS).metrics["pdl1_cps"] == 100.0
    # under 100 viable tumour cells: no score
    few = slide_metrics(make_cells(x, phen, pdl1=pdl1, nucleus_area=area), regions_json(), grids(), TLS,
                        MetricsConfig(min_viable_tumor_cells=201))
    assert few.metrics["pdl1_tps"] is None and "200 viable tumour cells < 201" in few.absent["pdl1_tps"]
    # no PD-L1 gate at all: no score, with the reason
    ungated = slide_metrics(make_cells(x, phen), regions_json(), grids(), TLS)
    assert ungated.metrics["pdl1_cps"] is None and "PD-L1_pos" in ungated.absent["pdl1_cps"]


def test_profile_areas_sum_to_the_tissue_within_reach_and_densities_are_counts_over_areas():
    masks, g = grids()
    masks["tissue"][:20, 100:] = False  # glass over part of the stroma: a bin with less area
    config = MetricsConfig()
    cells = random_cells(2, 5000)
    prof = infiltration_profile(cells.obs["border_distance_um"].to_numpy(np.float64),
                                cells.obs["phenotype"].astype(str).to_numpy(), masks, g,
                                {"CD8_T": ["CD8_T"], "t_cells": ["CD8_T", "CD4_T", "Treg"]}, config)
    assert list(prof.bin_edges_um) == list(np.arange(-500, 501, 50.0))
    # pixel centres x = 10 j + 5 µm; the border lies at x = 600 µm
    centre = (np.arange(masks["tissue"].shape[1]) * g + 0.5 * g) - 600.0
    within = masks["tissue"] & (np.abs(centre) < 500)[None, :]
    assert prof.area_mm2.sum() == pytest.approx(within.sum() * g * g * 1e-6)
    assert prof.area_mm2[0] == pytest.approx(5 * 40 * g * g * 1e-6)  # 5 columns of 40 pixels per 50 µm bin
    d = cells.obs["border_distance_um"].to_numpy()
    is_cd8 = (cells.obs["phenotype"] == "CD8_T").to_numpy()
    for k, (lo, hi) in enumerate(zip(prof.bin_edges_um[:-1], prof.bin_edges_um[1:])):
        n = int((is_cd8 & (d >= lo) & (d < hi)).sum())
        assert prof.counts["CD8_T"][k] == n
        assert prof.density["CD8_T"][k] == pytest.approx(n / prof.area_mm2[k])
    # too little tissue in a bin: no density, and why
    small = infiltration_profile(d.astype(np.float64), cells.obs["phenotype"].astype(str).to_numpy(), masks, g,
                                 {"CD8_T": ["CD8_T"]}, MetricsConfig(profile_min_area_mm2=0.015))
    last = len(small.area_mm2) - 1  # 400-450, 450-500 µm: half the rows are glass (0.01 mm²)
    assert np.isnan(small.density["CD8_T"][last]) and "< 0.015 mm²" in small.bin_absent[last]
    assert small.bin_absent[0] is None and np.isfinite(small.density["CD8_T"][0])


def test_signed_border_distance_ignores_the_edge_against_glass():
    masks, g = grids()
    masks["tissue"][:, 110:] = False
    signed = signed_border_distance_um(masks["tissue"], masks["tumor"], g)
    np.testing.assert_allclose(signed[5, :60], -(595.0 - 10 * np.arange(60)))
    np.testing.assert_allclose(signed[5, 60:110], 5.0 + 10 * np.arange(50))
    assert signed_border_distance_um(masks["tissue"], masks["tissue"], g) is None  # all bed: no border


def test_config_refuses_a_range_that_is_no_whole_number_of_bins():
    with pytest.raises(ValueError, match="whole number"):
        MetricsConfig(profile_bin_um=30.0, profile_range_um=500.0)
    with pytest.raises(ValueError, match="obs lacks"):
        slide_metrics(ad.AnnData(obs=pd.DataFrame({"phenotype": ["B"]}, index=["0"])), regions_json(), grids(), TLS)


def write_folder(folder, cells, regions, masks, grid_um, tls):
    """A finished slide's annotate outputs, as the stages write them."""
    folder.mkdir(parents=True)
    cells.write_h5ad(folder / "cells.h5ad")
    (folder / "regions.json").write_text(json.dumps(regions))
    names = sorted(masks)
    np.savez_compressed(folder / "regions.npz", grid_um=np.float64(grid_um), mask_names=np.array(names),
                        **{f"mask_{n}": masks[n] for n in names})
    (folder / "tls.json").write_text(json.dumps(tls))
    (folder / "tls.geojson").write_text(json.dumps(feature_collection([], pixel_um=0.5)))


@pytest.mark.parametrize("kind", ["full", "empty"])
def test_the_stage_writes_metrics_json(tmp_path, kind):
    if kind == "full":
        cells, regions, masks, tls = random_cells(3), regions_json(), grids()[0], TLS
    else:  # no bed, no TLS, no PD-L1 gate
        cells = make_cells([1000.0] * 80, ["CD8_T"] * 80)
        regions = regions_json({r: "no tumour cells" for r in ("tumor", "tumor_core", "margin")},
                               {"tumor": 0.0, "tumor_core": 0.0, "margin": 0.0, "necrosis": 0.0})
        masks, tls = grids(bed_cols=0)[0], {"count": 0, "counts": {}, "tls": [], "reason": "no B cells"}
    folder = tmp_path / "S"
    write_folder(folder, cells, regions, masks, G, tls)
    inputs = SimpleNamespace(slide_id="S", config=load_config())
    output = metrics_stage(inputs, folder)
    doc = SlideResults("S", folder).metrics()
    assert (folder / METRICS_JSON).is_file() and doc["format"] == 1 and doc["slide_id"] == "S"
    assert set(doc["metrics"]) == set(doc["units"]) and set(doc["units"].values()) <= UNITS
    nulls = {k for k, v in doc["metrics"].items() if v is None}
    assert nulls == set(doc["absent"])
    info = output.info["metrics"]
    assert info == {"immune_class": doc["immune_class"], "n_metrics": len(doc["metrics"]), "n_absent": len(nulls)}
    assert len(doc["infiltration_profile"]["bin_edges_um"]) == 21 and doc["parameters"]["profile_bin_um"] == 50.0
    assert "NaN" not in (folder / METRICS_JSON).read_text()
    if kind == "empty":
        assert doc["immune_class"] is None and doc["immune_class_reason"]
        assert doc["metrics"]["tls_count"] == 0 and doc["metrics"]["pdl1_tps"] is None
        assert doc["infiltration_profile"]["reason"] == "no tumour bed"
        assert doc["metrics"]["percent_necrosis"] is None and "tumor" in doc["absent"]["percent_necrosis"]
    else:
        assert doc["immune_class"] in ("inflamed", "excluded", "desert") and not nulls
