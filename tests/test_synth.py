"""Tests of the synthetic slide generator (tme_pipeline.synth): the project's test oracle."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tifffile

from tme_pipeline.synth import (MARKERS, SlideCondition, load_truth, render_truth_labels, synth_cohort,
                                synth_slide)
from tme_pipeline.synth.cells import pack_greedy
from tme_pipeline.synth.layout import MATURITIES, make_layout
from tme_pipeline.synth.write import downsample2, pyramid_shapes

SIZE = (0.6, 0.5)  # mm: 1200 x 1000 px, two pyramid levels
TRUTH_FILES = ("cells.csv.gz", "tls.geojson", "regions.npz", "metrics.json", "truth.json",
               "nuclei_crop.tif", "cells_crop.tif")
COND = SlideCondition(min_tls=1, tls_per_mm2=4.0, maturity_p=(0.0, 0.5, 0.5))


def _make(root: Path, name: str, *, seed: int, block_px: int = 1024):
    path = root / f"{name}.ome.tif"
    truth = synth_slide(path, size_mm=SIZE, seed=seed, condition=COND, block_px=block_px,
                        truth_dir=root / name)
    return path, truth


def _levels(path: Path) -> list[np.ndarray]:
    with tifffile.TiffFile(path) as tf:
        return [lv.asarray() for lv in tf.series[0].levels]


@pytest.fixture(scope="module")
def slides(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    a = _make(root, "a", seed=3)
    a2 = _make(root, "a2", seed=3)
    a512 = _make(root, "a512", seed=3, block_px=512)
    b = _make(root, "b", seed=4)
    return {"root": root, "a": a, "a2": a2, "a512": a512, "b": b}


@pytest.fixture(scope="module")
def pixels(slides):
    return _levels(slides["a"][0])


@pytest.fixture(scope="module")
def labels(slides):
    truth = slides["a"][1]
    h, w = truth.meta["size_px"][1], truth.meta["size_px"][0]
    win = (slice(0, h), slice(0, w))
    return render_truth_labels(truth, win, kind="nuclei"), render_truth_labels(truth, win, kind="cells")


def test_file_is_pyramidal_ome_tiff(slides):
    path, truth = slides["a"]
    with tifffile.TiffFile(path) as tf:
        assert tf.is_ome
        series = tf.series[0]
        assert series.axes == "CYX"
        assert [lv.shape for lv in series.levels] == [(8, 1000, 1200), (8, 500, 600)]
        assert series.dtype == np.uint16
        page = tf.pages[0]
        assert page.is_tiled and page.tilewidth == 512
        ome = tifffile.xml2dict(tf.ome_metadata)["OME"]["Image"]["Pixels"]
    assert [c["Name"] for c in ome["Channel"]] == ["DAPI", "CD3", "CD8", "CD20", "CD21", "FOXP3", "PDL1", "SATB2"]
    assert ome["PhysicalSizeX"] == pytest.approx(0.5) and ome["PhysicalSizeY"] == pytest.approx(0.5)
    assert ome["PhysicalSizeXUnit"] == "µm"
    assert truth.meta["size_px"] == [1200, 1000]


def test_same_seed_identical_pixels_and_truth(slides):
    for la, lb in zip(_levels(slides["a"][0]), _levels(slides["a2"][0])):
        np.testing.assert_array_equal(la, lb)
    ra, rb = slides["root"] / "a", slides["root"] / "a2"
    for name in TRUTH_FILES:
        assert (ra / name).read_bytes() == (rb / name).read_bytes(), name
    assert slides["a"][0].read_bytes() == slides["a2"][0].read_bytes()


def test_different_seed_differs(slides, pixels):
    other = _levels(slides["b"][0])[0]
    assert np.mean(other != pixels[0]) > 0.5
    assert len(slides["b"][1].cells) != len(slides["a"][1].cells) or not np.allclose(
        slides["b"][1].cells["x_um"], slides["a"][1].cells["x_um"])


def test_block_size_leaves_no_seams(slides, pixels):
    for la, lb in zip(pixels, _levels(slides["a512"][0])):
        np.testing.assert_array_equal(la, lb)


def test_pixel_range_is_realistic(pixels):
    img = pixels[0]
    assert img.max() < 60000  # not saturated
    for k in range(img.shape[0]):
        bg = np.percentile(img[k], 5)
        assert 80 < bg < 800, (MARKERS[k], bg)
    assert np.percentile(img[MARKERS.index("DAPI")], 99) > 2000


def test_crop_labels_equal_rendered_labels(slides):
    path, truth = slides["a"]
    loaded = load_truth(slides["root"] / "a")
    c = loaded.meta["crop"]
    win = (slice(c["y0"], c["y0"] + c["size"]), slice(c["x0"], c["x0"] + c["size"]))
    for kind in ("nuclei", "cells"):
        crop = tifffile.imread(slides["root"] / "a" / f"{kind}_crop.tif")
        assert crop.dtype == np.uint32
        np.testing.assert_array_equal(crop, render_truth_labels(loaded, win, kind=kind))
        np.testing.assert_array_equal(crop, render_truth_labels(truth, win, kind=kind))
    ids = np.unique(crop[crop > 0])
    regions = set(loaded.cells.set_index("cell_id").loc[ids, "region"].astype(str))
    assert {"tumor", "stroma"} <= regions | {"margin"} and len(regions) >= 2


def test_every_cell_labelled_with_its_id(slides, labels):
    truth = slides["a"][1]
    nuc, cel = labels
    cells = truth.cells
    ix = np.rint(cells["x_um"].to_numpy() / truth.pixel_um).astype(int)
    iy = np.rint(cells["y_um"].to_numpy() / truth.pixel_um).astype(int)
    inside = (ix < nuc.shape[1]) & (iy < nuc.shape[0])
    assert inside.mean() > 0.99
    np.testing.assert_array_equal(nuc[iy[inside], ix[inside]], cells["cell_id"].to_numpy()[inside])
    # A window rendered on its own equals the same part of the full render.
    win = (slice(317, 701), slice(455, 1001))
    np.testing.assert_array_equal(render_truth_labels(truth, win, kind="nuclei"), nuc[win])
    np.testing.assert_array_equal(render_truth_labels(truth, win, kind="cells"), cel[win])


def test_cells_do_not_overlap_and_contain_their_nucleus(slides, labels):
    nuc, cel = labels
    assert np.array_equal(cel[nuc > 0], nuc[nuc > 0])  # each nucleus pixel is in its own cell
    area_n = np.bincount(nuc.ravel())
    area_c = np.bincount(cel.ravel(), minlength=area_n.size)
    present = area_n[1:] > 0
    assert np.all(area_c[1:][present] >= area_n[1:][present])
    cells = slides["a"][1].cells
    # Tumour cells have a wide cytoplasm, lymphocytes a thin rim.
    ratio = area_c[1:] / np.maximum(area_n[1:], 1)
    t = cells["cell_type"].astype(str).to_numpy()[: ratio.size]
    assert np.median(ratio[(t == "tumor") & present]) > 1.8
    assert np.median(ratio[(t == "cd8_t") & present]) < 2.2


def test_pack_greedy_keeps_distance():
    rng = np.random.default_rng(0)
    x, y = rng.uniform(0, 100, (2, 2000))
    size = rng.uniform(2, 4, 2000)
    keep = pack_greedy(x, y, size, rng.random(2000), factor=1.0)
    xk, yk, sk = x[keep], y[keep], size[keep]
    d = np.hypot(xk[:, None] - xk[None], yk[:, None] - yk[None]) - (sk[:, None] + sk[None])
    np.fill_diagonal(d, 1)
    assert d.min() >= 0
    # Greedy is maximal: every dropped point conflicts with a kept one.
    xd, yd, sd = x[~keep], y[~keep], size[~keep]
    dd = np.hypot(xd[:, None] - xk[None], yd[:, None] - yk[None]) - (sd[:, None] + sk[None])
    assert np.all(dd.min(axis=1) < 0)


def _pack_reference(x, y, size, priority, factor):
    """Sequential greedy packing: the plain oracle for pack_greedy."""
    kept: list[int] = []
    for i in np.argsort(priority):
        if all(np.hypot(x[i] - x[j], y[i] - y[j]) >= factor * (size[i] + size[j]) for j in kept):
            kept.append(i)
    keep = np.zeros(x.size, bool)
    keep[kept] = True
    return keep


def test_pack_greedy_equals_sequential_reference():
    rng = np.random.default_rng(1)
    x, y = rng.uniform(0, 60, (2, 400))
    size, prio = rng.uniform(1.5, 4, 400), rng.random(400)
    np.testing.assert_array_equal(pack_greedy(x, y, size, prio, factor=0.92),
                                  _pack_reference(x, y, size, prio, 0.92))


def test_rasterize_matches_plain_reference(slides):
    """Labels equal a direct per-cell evaluation of the star-convex outline with trig."""
    truth = slides["a"][1]
    win = (slice(400, 480), slice(500, 600))
    cells = truth.cells
    pu = truth.pixel_um
    yy, xx = np.mgrid[win[0], win[1]].astype(float)
    best = np.full(yy.shape, np.inf)
    owner = np.zeros(yy.shape, np.uint32)
    near = cells[(abs(cells.x_um / pu - 550) < 90) & (abs(cells.y_um / pu - 440) < 80)]
    for c in near.itertuples():
        dx, dy = xx - c.x_um / pu, yy - c.y_um / pu
        theta = np.arctan2(dy, dx) - c.nuc_angle
        a, b = c.nuc_a_um / pu, c.nuc_b_um / pu
        r = a * b / np.hypot(b * np.cos(theta), a * np.sin(theta))
        r = r * (1 + sum(amp * np.cos(k * theta + ph) for k, amp, ph in
                         ((2, c.h2_amp, c.h2_phase), (3, c.h3_amp, c.h3_phase), (4, c.h4_amp, c.h4_phase))))
        v = np.hypot(dx, dy) - r
        better = (v <= c.cyto_um / pu) & (v < best)
        best[better], owner[better] = v[better], c.cell_id
    nuclei = np.where(best < 0, owner, 0)
    assert np.mean(render_truth_labels(truth, win, kind="cells") == owner) > 0.995
    assert np.mean(render_truth_labels(truth, win, kind="nuclei") == nuclei) > 0.995


def test_marker_signal_follows_cell_types(slides, pixels, labels):
    cells = slides["a"][1].cells
    _, cel = labels
    img = pixels[0].astype(np.float64)
    types = np.concatenate([["bg"], cells["cell_type"].astype(str).to_numpy()])
    per_pixel = types[cel]

    offset = slides["a"][1].meta["acquisition"]["offset"]

    def mean(marker, ctype):  # above the channel's dark level
        k = MARKERS.index(marker)
        return img[k][per_pixel == ctype].mean() - offset[k]

    assert mean("CD8", "cd8_t") > 3 * mean("CD8", "tumor")
    assert mean("CD8", "cd8_t") + offset[2] > 2 * (mean("CD8", "tumor") + offset[2])  # raw counts too
    assert mean("CD3", "cd4_t") > 3 * mean("CD3", "b_cell")
    assert mean("CD20", "b_cell") > 3 * mean("CD20", "cd8_t")
    assert mean("SATB2", "tumor") > 3 * mean("SATB2", "cd4_t")


def test_tls_present_with_maturities(slides, pixels):
    truth = slides["a"][1]
    assert len(truth.tls) >= 1
    assert set(truth.tls["maturity"]) <= set(MATURITIES)
    assert all(truth.tls["n_B"] > 20)
    # CD21 (the FDC mesh) is brighter inside follicles than elsewhere in tissue.
    t = truth.tls.iloc[0]
    cx, cy = int(t.x_um / truth.pixel_um), int(t.y_um / truth.pixel_um)
    cd21 = pixels[0][MARKERS.index("CD21")].astype(float)
    inner = cd21[max(cy - 40, 0):cy + 40, max(cx - 40, 0):cx + 40].mean()
    assert inner > 1.5 * np.median(cd21)
    seen = set()
    for seed in range(6):
        seen |= {t.maturity for t in make_layout((2.0, 1.5), condition=SlideCondition(), seed=seed).tls}
    assert seen == set(MATURITIES)
    gj = json.loads((slides["root"] / "a" / "tls.geojson").read_text())
    assert {f["properties"]["maturity"] for f in gj["features"]} == set(truth.tls["maturity"])


def test_metrics_match_cells_and_regions(slides):
    d = slides["root"] / "a"
    cells = pd.read_csv(d / "cells.csv.gz")
    metrics = json.loads((d / "metrics.json").read_text())
    with np.load(d / "regions.npz", allow_pickle=False) as z:
        um = float(z["um_per_px"])
        regions = {k: z[k] for k in ("tissue", "tumor", "margin", "stroma", "necrosis")}
    assert np.array_equal(regions["tissue"], regions["tumor"] | regions["margin"] | regions["stroma"]
                          | regions["necrosis"])
    iy, ix = (cells["y_um"] // um).astype(int), (cells["x_um"] // um).astype(int)
    for r in ("tissue", "tumor", "margin", "stroma"):
        area = regions[r].sum() * (um / 1000) ** 2
        assert metrics[f"area_{r}_mm2"] == pytest.approx(area)
        in_r = regions[r][iy, ix]
        for t in ("tumor", "fibroblast", "cd8_t", "cd4_t", "treg", "b_cell", "macrophage"):
            expected = ((cells["cell_type"] == t) & in_r).sum() / area
            assert metrics[f"density_{t}_{r}"] == pytest.approx(expected), (t, r)
    assert metrics["tls_count"] == sum(metrics[f"tls_{m}_count"] for m in MATURITIES)
    assert metrics["tls_per_mm2"] == pytest.approx(metrics["tls_count"] / metrics["area_tissue_mm2"])
    # Lymphocytes are scarcer in tumour nests than in the margin (cold tumour).
    assert metrics["density_t_cell_margin"] > metrics["density_t_cell_tumor"]


def test_load_truth_round_trip(slides):
    truth = slides["a"][1]
    loaded = load_truth(slides["root"] / "a")
    geom = ["x_um", "y_um", "nuc_a_um", "nuc_b_um", "nuc_angle", "cyto_um", "h2_amp", "h2_phase"]
    np.testing.assert_array_equal(loaded.cells[geom].to_numpy(), truth.cells[geom].to_numpy())
    assert loaded.meta["seed"] == 3 and loaded.meta["pixel_um"] == 0.5
    assert set(loaded.meta["acquisition"]) >= {"stain_gain", "offset", "spillover"}
    assert loaded.metrics == pytest.approx(json.loads(json.dumps(truth.metrics)), nan_ok=True)
    with pytest.raises(FileNotFoundError):
        load_truth(slides["root"] / "missing")


def test_cohort_manifest_and_files(tmp_path):
    manifest = synth_cohort(tmp_path, n_patients=2, seed=5, size_mm=SIZE)
    rows = list(csv.DictReader(open(manifest)))
    assert list(rows[0]) == ["patient_id", "timepoint", "slide", "response"]
    assert [(r["patient_id"], r["timepoint"]) for r in rows] == [("P01", "pre"), ("P01", "post"),
                                                                 ("P02", "pre"), ("P02", "post")]
    assert sorted({r["response"] for r in rows}) == ["non_responder", "responder"]
    for r in rows:
        assert (tmp_path / r["slide"]).is_file()
        sid = Path(r["slide"]).name.removesuffix(".ome.tif")
        assert sid == f"{r['patient_id']}_{r['timepoint']}"
        meta = json.loads((tmp_path / "truth" / sid / "truth.json").read_text())
        assert meta["response"] == r["response"] and meta["timepoint"] == r["timepoint"]
    area = {(r["patient_id"], r["timepoint"]): json.loads(
        (tmp_path / "truth" / f"{r['patient_id']}_{r['timepoint']}" / "metrics.json").read_text())["area_tissue_mm2"]
        for r in rows}
    assert all(area[(p, "pre")] < area[(p, "post")] for p in ("P01", "P02"))


def test_pyramid_helpers():
    assert pyramid_shapes((3000, 4000)) == [(3000, 4000), (1500, 2000), (750, 1000)]
    assert pyramid_shapes((1000, 1001)) == [(1000, 1001)]
    assert pyramid_shapes((1000, 1031)) == [(1000, 1031), (500, 516)]
    b = np.array([[[0, 2, 10], [4, 6, 10]]], np.uint16)
    np.testing.assert_array_equal(downsample2(b), [[[3, 10]]])


def test_invalid_input_raises(tmp_path):
    with pytest.raises(ValueError):
        synth_slide(tmp_path / "x.ome.tif", size_mm=(0, 1))
    with pytest.raises(ValueError):
        SlideCondition.for_sample("during", "responder")


def test_partial_responders_sit_between_the_other_classes():
    post = {r: SlideCondition.for_sample("post", r) for r in ("responder", "partial_responder", "non_responder")}
    assert post["responder"].cd8_factor > post["partial_responder"].cd8_factor > post["non_responder"].cd8_factor
    assert SlideCondition.for_sample("pre", "partial_responder").cd8_factor == 1.0
    with pytest.raises(ValueError, match="partial_responder"):
        SlideCondition.for_sample("post", "complete")


def test_cohort_with_partial_responders_has_three_classes(tmp_path, monkeypatch):
    import tme_pipeline.synth.cohort as cohort_mod

    seen = []
    monkeypatch.setattr(cohort_mod, "synth_slide", lambda path, **kw: seen.append(kw["condition"]))
    manifest = synth_cohort(tmp_path, n_patients=10, seed=3, partial_responders=True)
    rows = list(csv.DictReader(open(manifest)))
    per_patient = {r["patient_id"]: r["response"] for r in rows}
    counts = {c: list(per_patient.values()).count(c) for c in ("responder", "partial_responder", "non_responder")}
    assert counts == {"responder": 4, "partial_responder": 3, "non_responder": 3}
    assert [c.response for c in seen] == [r["response"] for r in rows]
