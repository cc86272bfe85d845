"""regions.py on small hand-made slides: point patterns of cells over a small glowing image."""

import numpy as np
import pandas as pd
import pytest
import shapely
from scipy import ndimage as ndi
from shapely.geometry import Point, box, shape

from tme_pipeline.geojson import qupath_problems
from tme_pipeline.regions import Regions, RegionsConfig, find_regions, regions_geojson

CHANNELS = ("DAPI", "CD3", "SATB2")
IMAGE_UM = 4.0


def _points(rng, region, density_per_mm2):
    """Uniform random points (x, y) µm inside a shapely region at a density (cells/mm²)."""
    if region.is_empty:
        return np.empty((0, 2))
    x0, y0, x1, y1 = region.bounds
    n = rng.poisson(density_per_mm2 * (x1 - x0) * (y1 - y0) * 1e-6)
    xy = rng.uniform((x0, y0), (x1, y1), size=(n, 2))
    return xy[shapely.contains_xy(region, xy[:, 0], xy[:, 1])]


def make_slide(*, size_um=(2000.0, 1500.0), tissue=None, tumour=None, necrosis=None, seed=0,
               tumour_density=3000.0, stroma_density=3000.0):
    """obs and a (C, Y, X) image: glass at 100 ± 2, tissue glowing at 300 in every channel.

    Stroma cells ('other', 30 µm² nuclei) fill the tissue, tumour cells (100 µm²) fill
    ``tumour`` minus ``necrosis``; necrosis holds debris (6 µm² objects) and no viable nuclei.
    """
    rng = np.random.default_rng(seed)
    w, h = size_um
    tissue = box(100, 100, w - 100, h - 100) if tissue is None else tissue
    empty = shapely.Polygon()
    tumour = empty if tumour is None else tumour.intersection(tissue)
    necrosis = empty if necrosis is None else necrosis.intersection(tumour)
    viable_tumour = tumour.difference(necrosis)
    parts = [(_points(rng, tissue.difference(tumour), stroma_density), "other", 30.0),
             (_points(rng, viable_tumour, tumour_density), "tumor", 100.0),
             (_points(rng, necrosis, 6000.0), "other", 6.0)]
    xy = np.concatenate([p[0] for p in parts])
    obs = pd.DataFrame({"x_um": xy[:, 0], "y_um": xy[:, 1],
                        "phenotype": pd.Categorical(np.concatenate([[p[1]] * len(p[0]) for p in parts])),
                        "nucleus_area_um2": np.concatenate([[p[2]] * len(p[0]) for p in parts])})
    ny, nx = int(h / IMAGE_UM), int(w / IMAGE_UM)
    yy, xx = np.mgrid[0:ny, 0:nx]
    inside = shapely.contains_xy(tissue, (xx + 0.5) * IMAGE_UM, (yy + 0.5) * IMAGE_UM)
    image = 100.0 + rng.normal(0, 2.0, (len(CHANNELS), ny, nx)) + 200.0 * inside
    return obs, image.astype(np.float32)


def run(obs, image, *, size_um=(2000.0, 1500.0), tls=(), **config):
    return find_regions(obs, image, IMAGE_UM, channel_names=CHANNELS, nuclear_channel="DAPI", size_um=size_um,
                        tls_polygons_um=tls, config=RegionsConfig(**config))


def mask_of(geom, regions: Regions):
    h, w = regions.masks["tissue"].shape
    yy, xx = np.mgrid[0:h, 0:w]
    g = regions.grid_um
    return shapely.contains_xy(geom, (xx + 0.5) * g, (yy + 0.5) * g)


@pytest.fixture(scope="module")
def nodule():
    disc = Point(1000, 750).buffer(400)
    obs, image = make_slide(tumour=disc)
    return disc, obs, image, run(obs, image)


def test_tissue_is_the_glowing_section(nodule):
    _, _, _, r = nodule
    assert r.areas_mm2["tissue"] == pytest.approx(1.8 * 1.3, rel=0.02)
    truth = mask_of(box(100, 100, 1900, 1400), r)
    assert (r.masks["tissue"] == truth).mean() > 0.99


def test_slide_covered_by_tissue_has_no_glass():
    obs, image = make_slide(tissue=box(0, 0, 2000, 1500), tumour=Point(1000, 750).buffer(300), seed=9)
    # Patchy autofluorescence: the dim half must not be taken for glass.
    image[:, :, : image.shape[2] // 2] -= 120.0
    r = run(obs, image)
    assert r.areas_mm2["tissue"] == pytest.approx(3.0)
    assert r.areas_mm2["tumor"] == pytest.approx(np.pi * 0.3 ** 2, rel=0.06)


def test_bed_where_tumour_cells_are_dense(nodule):
    disc, _, _, r = nodule
    truth = mask_of(disc, r)
    bed = r.masks["tumor"]
    assert (bed & truth).sum() / (bed | truth).sum() > 0.93
    assert r.areas_mm2["tumor"] == pytest.approx(disc.area * 1e-6, rel=0.05)
    assert not r.absent


def test_partition_is_exact(nodule):
    m = nodule[3].masks
    parts = [m["tumor_core"], m["margin"], m["stroma"]]
    assert np.array_equal(parts[0] | parts[1] | parts[2], m["tissue"])
    assert sum(p.astype(int) for p in parts).max() == 1
    assert np.array_equal(m["tumor_core"], m["tumor"] & ~m["margin"])
    assert np.array_equal(m["viable_tumor"] | m["necrosis"] | m["fibrosis"], m["tumor"])


def test_margin_is_a_band_each_side_of_the_border(nodule):
    disc, _, _, r = nodule
    ring = disc.buffer(250).difference(disc.buffer(-250))
    assert r.areas_mm2["margin"] == pytest.approx(ring.area * 1e-6, rel=0.05)


def test_signed_border_distance(nodule):
    disc, obs, _, r = nodule
    d_centre = np.hypot(obs.x_um - 1000, obs.y_um - 750).to_numpy()
    expected = d_centre - 400
    inner = np.abs(expected) < 300
    assert np.median(np.abs(r.border_distance_um[inner] - expected[inner])) < 15
    assert (r.border_distance_um[d_centre < 300] < 0).all()
    assert (r.border_distance_um[d_centre > 500] > 0).all()
    # The edge follows the random pattern within a fraction of the 25 µm kernel.
    assert (r.in_tumor[d_centre < 350]).all() and not r.in_tumor[d_centre > 430].any()
    assert r.in_tumor[d_centre < 380].mean() > 0.995
    assert set(np.unique(r.cell_region)) == {"tumor_core", "margin", "stroma"}
    assert (r.cell_region[np.abs(r.border_distance_um) < 200] == "margin").all()


def test_tls_is_carved_out_of_the_bed(nodule):
    disc, obs, image, r0 = nodule
    tls = Point(1000, 750).buffer(120)
    r = run(obs, image, tls=[tls])
    inside = mask_of(tls.buffer(-10), r)
    assert r0.masks["tumor"][inside].all() and not r.masks["tumor"][inside].any()
    assert r.areas_mm2["tumor"] == pytest.approx(r0.areas_mm2["tumor"] - tls.area * 1e-6, rel=0.03)


def test_small_holes_filled_large_kept_out():
    disc = Point(1000, 750).buffer(500)
    small, large = Point(850, 750).buffer(45), Point(1180, 750).buffer(120)  # 0.006 and 0.045 mm²
    obs, image = make_slide(tumour=disc.difference(small).difference(large), seed=1)
    r = run(obs, image, min_tumor_hole_mm2=0.02)
    assert r.masks["tumor"][mask_of(small, r)].all()
    assert not r.masks["tumor"][mask_of(large.buffer(-30), r)].any()


def test_margin_clipped_to_tissue_and_not_along_glass():
    # The bed fills the tissue's left end: its edge against glass is not a border.
    tissue = box(100, 100, 1900, 1400)
    bed = box(0, 0, 1000, 1500)
    obs, image = make_slide(tissue=tissue, tumour=bed, seed=2)
    r = run(obs, image)
    m = r.masks
    assert not (m["margin"] & ~m["tissue"]).any()
    far_from_border = mask_of(box(120, 120, 700, 1380), r)
    assert m["tumor_core"][far_from_border].all() and not m["margin"][far_from_border].any()
    # The band is 2 x 250 µm wide along the 1.3 mm border.
    assert r.areas_mm2["margin"] == pytest.approx(0.5 * 1.3, rel=0.06)


def test_biopsy_core_swallowed_by_margin_is_absent():
    disc = Point(1000, 750).buffer(200)
    obs, image = make_slide(tumour=disc, seed=3)
    r = run(obs, image)
    assert r.areas_mm2["tumor_core"] < 0.05
    assert "tumor_core" in r.absent and "mm²" in r.absent["tumor_core"]
    assert "margin" not in r.absent and "tumor" not in r.absent


def test_necrosis_inside_the_bed():
    disc = Point(1000, 750).buffer(500)
    necrosis = Point(1000, 750).buffer(200)
    obs, image = make_slide(tumour=disc, necrosis=necrosis, seed=4)
    r = run(obs, image)
    assert r.masks["tumor"][mask_of(necrosis, r)].all()  # the bed is drawn around its necrosis
    expected = 100 * necrosis.area / disc.area
    assert r.percent_necrosis == pytest.approx(expected, abs=3)
    assert r.percent_viable_tumor == pytest.approx(100 - r.percent_necrosis - 100 * r.areas_mm2["fibrosis"]
                                                   / r.areas_mm2["tumor"])


def test_fibrotic_scar_is_part_of_the_bed():
    disc = Point(1000, 750).buffer(500)
    scar = Point(1000, 750).buffer(180)
    obs, image = make_slide(tumour=disc.difference(scar), seed=10)
    obs = obs[~shapely.contains_xy(scar, obs.x_um.to_numpy(), obs.y_um.to_numpy())]
    sparse = _points(np.random.default_rng(11), scar, 300.0)  # a few fibroblasts in collagen
    obs = pd.concat([obs, pd.DataFrame({"x_um": sparse[:, 0], "y_um": sparse[:, 1], "phenotype": "other",
                                        "nucleus_area_um2": 30.0})], ignore_index=True)
    r = run(obs, image)
    assert r.masks["tumor"][mask_of(scar, r)].all()
    assert r.areas_mm2["fibrosis"] == pytest.approx(scar.area * 1e-6, rel=0.25)
    assert r.areas_mm2["necrosis"] < 0.1 * r.areas_mm2["fibrosis"]
    # The same paucicellular tissue at the section's edge is stroma, not bed.
    edge = box(100, 100, 400, 400)
    obs_e, image_e = make_slide(tumour=disc, seed=12, stroma_density=300.0)
    assert not run(obs_e, image_e).masks["tumor"][mask_of(edge, r)].any()


def test_no_tumour_cells_gives_an_empty_bed_with_a_reason():
    obs, image = make_slide(seed=5)
    r = run(obs, image)
    assert not r.masks["tumor"].any() and r.percent_necrosis is None
    assert r.absent["tumor"] == "no tumour cells" and "tumor_core" in r.absent and "margin" in r.absent
    assert "stroma" not in r.absent
    assert np.isnan(r.border_distance_um).all() and (r.cell_region == "stroma").all()
    assert r.to_json()["cells"]["stroma"] == len(obs)


def test_mostly_glass_slide():
    tissue = box(900, 700, 1020, 800)  # 0.012 mm² of tissue
    obs, image = make_slide(tissue=tissue, tumour=tissue, seed=6)
    r = run(obs, image)
    assert r.areas_mm2["tissue"] < 0.02
    assert {"tumor", "tumor_core", "margin", "stroma"} <= set(r.absent)
    obs0 = obs.iloc[:0]
    glass = 100.0 + np.random.default_rng(7).normal(0, 2.0, image.shape).astype(np.float32)
    r0 = run(obs0, glass)
    assert not r0.masks["tissue"].any() and r0.absent["tissue"].startswith("tissue not found")


def test_geojson_imports_and_keeps_areas(nodule):
    r = nodule[3]
    pixel_um = 0.5
    fc = regions_geojson(r, pixel_um=pixel_um, slide_id="S1")
    assert qupath_problems(fc) == []
    names = {f["properties"]["classification"]["name"] for f in fc["features"]}
    assert {"tissue", "tumor", "tumor_core", "margin", "stroma"} <= names
    for f in fc["features"]:
        key = f["properties"]["region"]
        area_mm2 = shape(f["geometry"]).area * pixel_um ** 2 * 1e-6
        assert area_mm2 == pytest.approx(r.areas_mm2[key], rel=0.01), key
        assert f["properties"]["measurements"]["Area mm^2"] == pytest.approx(r.areas_mm2[key])


def test_to_json_is_json_safe(nodule):
    import json
    r = nodule[3]
    d = json.loads(json.dumps(r.to_json()))
    assert d["params"]["margin_um"] == 250.0
    assert sum(d["cells"][k] for k in ("tumor_core", "margin", "stroma")) == len(nodule[1])


def test_bad_input_is_named():
    obs, image = make_slide(seed=8)
    with pytest.raises(ValueError, match="channels"):
        find_regions(obs, image[:2], IMAGE_UM, channel_names=CHANNELS, nuclear_channel="DAPI",
                     size_um=(2000.0, 1500.0), tls_polygons_um=[], config=RegionsConfig())
    with pytest.raises(ValueError, match="nuclear channel"):
        find_regions(obs, image, IMAGE_UM, channel_names=CHANNELS, nuclear_channel="Hoechst",
                     size_um=(2000.0, 1500.0), tls_polygons_um=[], config=RegionsConfig())
    with pytest.raises(ValueError, match="phenotype"):
        find_regions(obs.drop(columns="phenotype"), image, IMAGE_UM, channel_names=CHANNELS,
                     nuclear_channel="DAPI", size_um=(2000.0, 1500.0), tls_polygons_um=[], config=RegionsConfig())
    with pytest.raises(Exception, match="extra"):
        RegionsConfig(margin=3)


def _cells(xy, phenotype, area):
    return pd.DataFrame({"x_um": xy[:, 0], "y_um": xy[:, 1], "phenotype": phenotype, "nucleus_area_um2": area})


def _cluster(cx, cy, n, spacing_um):
    """``n`` cells on a hexagonal patch around (cx, cy), neighbours ``spacing_um`` apart (µm)."""
    ring = [(0.0, 0.0)] + [(spacing_um * np.cos(a), spacing_um * np.sin(a)) for a in np.arange(6) * np.pi / 3]
    ring += [(2 * spacing_um * np.cos(a), 2 * spacing_um * np.sin(a)) for a in np.arange(6) * np.pi / 3]
    return np.array(ring[:n]) + (cx, cy)


def test_satellite_nest_is_bed_a_bud_is_not():
    disc = Point(700, 750).buffer(300)
    obs, image = make_slide(tumour=disc, seed=13)
    nest, bud = _cluster(1500, 500, 8, 18.0), _cluster(1500, 1100, 4, 18.0)
    obs = pd.concat([obs, _cells(nest, "tumor", 100.0), _cells(bud, "tumor", 100.0)], ignore_index=True)
    r = run(obs, image)
    bed = r.masks["tumor"]
    lab, n = ndi.label(bed)
    assert n == 2  # the nodule and the nest; the bud is no piece of bed
    nest_px = mask_of(Point(1500, 500).buffer(20), r)
    assert bed[nest_px].all() and not bed[mask_of(Point(1500, 1100).buffer(20), r)].any()
    # 8 cells 18 µm apart: an outline of about their own extent, far below min_tumor_island_mm2.
    nest_area = (lab == lab[nest_px].max()).sum() * r.grid_um ** 2 * 1e-6
    assert 0.002 < nest_area < RegionsConfig().min_tumor_island_mm2
    # The nest carries its own 250 µm margin band, on both sides of its border.
    band = Point(1500, 500).buffer(250 + 20)
    assert r.masks["margin"][mask_of(band, r) & r.masks["tissue"]].mean() > 0.97
    assert r.in_tumor[len(obs) - 12:len(obs) - 4].all() and not r.in_tumor[len(obs) - 4:].any()
    # Raising the cell count above the nest's drops it: the rule is in cells, not area.
    assert run(obs, image, min_nest_cells=9).masks["tumor"][nest_px].sum() == 0


def test_scattered_tumour_calls_make_no_nest():
    disc = Point(700, 750).buffer(300)
    obs, image = make_slide(tumour=disc, seed=14)
    rng = np.random.default_rng(15)
    # 40 stray tumour calls over 0.6 mm² of stroma (~70 per mm²): none within 30 µm of five others.
    stray = rng.uniform((1200, 200), (1800, 1300), size=(40, 2))
    r0 = run(obs, image)
    r = run(pd.concat([obs, _cells(stray, "tumor", 100.0)], ignore_index=True), image)
    assert r.areas_mm2["tumor"] == pytest.approx(r0.areas_mm2["tumor"], rel=0.01)


def test_debris_outnumbering_merged_clumps_is_necrosis():
    # Another lab's blur merges debris into nucleus-sized clumps: 2000 "viable" objects per mm²
    # in the necrosis, above the absolute cap, under 6000 debris per mm².
    disc = Point(1000, 750).buffer(500)
    necrosis = Point(1000, 750).buffer(220)
    obs, image = make_slide(tumour=disc, necrosis=necrosis, seed=16)
    clumps = _points(np.random.default_rng(17), necrosis, 2000.0)
    obs = pd.concat([obs, _cells(clumps, "other", 25.0)], ignore_index=True)
    r = run(obs, image)
    expected = 100 * necrosis.area / disc.area
    # Within the 5 points; the 25 µm kernel mixes the clumps into the edge's test.
    assert r.percent_necrosis == pytest.approx(expected, abs=5)
    # With the absolute cap alone the clumps hide the necrosis.
    assert run(obs, image, necrosis_min_debris_ratio=100.0).percent_necrosis < expected / 2


def test_stroma_island_above_the_hole_size_stays_a_hole_with_its_own_margin():
    # A 0.015 mm² stroma island: the density kernel alone reads it as under 0.01 mm² and fills it.
    disc = Point(1000, 750).buffer(600)
    island, speck = Point(1000, 750).buffer(70), Point(700, 750).buffer(40)  # 0.0154 and 0.005 mm²
    obs, image = make_slide(tumour=disc.difference(island).difference(speck), seed=20)
    r = run(obs, image)
    m = r.masks
    assert RegionsConfig().min_tumor_hole_mm2 < island.area * 1e-6
    assert not m["tumor"][mask_of(island.buffer(-15), r)].any()
    hole = mask_of(island.buffer(30), r) & m["tissue"] & ~m["tumor"]
    assert hole.sum() * r.grid_um ** 2 * 1e-6 == pytest.approx(island.area * 1e-6, rel=0.2)
    assert m["tumor"][mask_of(speck, r)].all()  # under min_tumor_hole_mm2: filled
    # The band goes round the island, inside the bed, and the island is margin, not stroma.
    ring = mask_of(Point(1000, 750).buffer(250).difference(island.buffer(30)), r)
    assert m["margin"][ring].all() and m["tumor"][ring].mean() > 0.99 and not m["tumor_core"][ring].any()
    assert m["margin"][mask_of(island.buffer(-15), r)].all() and not m["stroma"][mask_of(island, r)].any()
    inside = shapely.contains_xy(island.buffer(-15), obs.x_um.to_numpy(), obs.y_um.to_numpy())
    assert inside.any() and (r.border_distance_um[inside] > 0).all() and not r.in_tumor[inside].any()
    assert (r.cell_region[inside] == "margin").all()
    # Without the island the same ring is core where it lies over 250 µm from the outer border.
    r0 = run(*make_slide(tumour=disc, seed=20))
    assert r0.masks["tumor_core"][ring].mean() > 0.95
    assert r.areas_mm2["margin"] > r0.areas_mm2["margin"] + 0.15


def test_hole_size_is_measured_on_the_cells():
    disc = Point(1000, 750).buffer(500)
    island = Point(1000, 750).buffer(64)  # 0.0129 mm²
    obs, image = make_slide(tumour=disc.difference(island), seed=21)
    kept = run(obs, image)
    assert not kept.masks["tumor"][mask_of(island.buffer(-15), kept)].any()
    # With a hole size over the island's area it is filled.
    filled = run(obs, image, min_tumor_hole_mm2=0.02)
    assert filled.masks["tumor"][mask_of(island, filled)].all()
