"""The review widget: its plain functions without a viewer, then a scripted review in napari
(``make_napari_viewer``, under ``xvfb-run -a``) on the hand-made result folder of the reader tests.
The recompute itself is tested end to end in ``test_corrections.py``; here its worker is checked
to run off the GUI thread and to reload the layers.
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from test_napari_reader import N_CELLS, result_folder  # noqa: F401  (the fixture)

from tme_napari.review import (
    ReviewWidget,
    bed_outlines_yx,
    bed_payload,
    bed_rings_yx,
    describe_correction,
    gate_colors,
    gate_histogram,
    review_colors,
    ring_um,
    tls_outline_um,
)
from tme_pipeline.results import corrections_file


def test_ring_um_swaps_to_x_y_and_drops_the_closing_vertex():
    yx = np.array([[1.0, 10.0], [1.0, 20.0], [5.0, 20.0], [1.0, 10.0]])
    assert ring_um(yx) == [[10.0, 1.0], [20.0, 1.0], [20.0, 5.0]]
    with pytest.raises(ValueError, match=">= 3"):
        ring_um(yx[:2])


def test_tls_outline_takes_the_largest_part_of_the_chosen_tls():
    small = np.array([[0.0, 0], [0, 5], [5, 5], [5, 0]])
    large = np.array([[0.0, 10], [0, 40], [30, 40], [30, 10]])
    other = np.array([[50.0, 50], [50, 60], [60, 60]])
    features = pd.DataFrame({"tls_id": [4, 4, 7]})
    assert tls_outline_um([small, large, other], features, 0) == (4, ring_um(large))
    assert tls_outline_um([small, large, other], features, 1)[0] == 7
    with pytest.raises(ValueError, match="out of range"):
        tls_outline_um([small, large, other], features, 2)


def test_bed_outlines_are_the_tumor_features_outer_rings(result_folder):  # noqa: F811
    from tme_pipeline.results import REGIONS_GEOJSON

    folder, _ = result_folder
    outlines = bed_outlines_yx(folder / REGIONS_GEOJSON)
    assert len(outlines) == 1, "the margin band is not the bed"
    np.testing.assert_allclose(outlines[0].min(axis=0), [0, 64])  # (y, x) µm
    np.testing.assert_allclose(outlines[0].max(axis=0), [64, 128])
    assert bed_outlines_yx(folder / "missing.geojson") == []


def test_bed_rings_and_payload_keep_the_holes(tmp_path):
    from shapely.geometry import Polygon, box

    from tme_pipeline.corrections import bed_polygons
    from tme_pipeline.geojson import feature, feature_collection, write_geojson

    island = box(20, 20, 40, 60)  # x 20-40, y 20-60 µm: stroma inside the bed
    holed = Polygon(box(0, 0, 100, 100).exterior.coords, [island.exterior.coords])
    path = tmp_path / "regions.geojson"
    write_geojson(path, feature_collection([feature(holed, pixel_um=0.5, name="tumor", color=(200, 0, 0)),
                                            feature(box(200, 0, 300, 100), pixel_um=0.5, name="stroma",
                                                    color=(0, 160, 80))], pixel_um=0.5))
    outlines, holes = bed_rings_yx(path)
    assert len(outlines) == 1 and len(holes) == 1
    np.testing.assert_allclose(holes[0].min(axis=0), [20, 20])
    np.testing.assert_allclose(holes[0].max(axis=0), [60, 40])  # (y, x)
    assert bed_rings_yx(tmp_path / "missing.geojson") == ([], [])
    payload = bed_payload(outlines, holes)
    assert len(payload["polygons_um"]) == 1 and len(payload["holes_um"]) == 1 and len(payload["holes_um"][0]) == 1
    assert bed_polygons(payload, "t")[0].area == pytest.approx(holed.area)
    assert "1 hole(s)" in describe_correction("bed_edit", payload)
    # A hole drawn over the edge cuts the bed's outline; one drawn outside changes nothing.
    nibble = np.array([[90.0, 90], [90, 110], [110, 110], [110, 90]])
    outside = np.array([[300.0, 300], [300, 310], [310, 310]])
    cut = bed_payload(outlines, [holes[0], nibble, outside])
    assert bed_polygons(cut, "t")[0].area == pytest.approx(holed.area - 100.0)
    assert "holes_um" not in bed_payload(outlines)
    # Two outlines keep the order they were drawn in.
    two = bed_payload([np.array([[0.0, 500], [0, 600], [50, 600]]), outlines[0]])
    assert min(x for x, _ in two["polygons_um"][0]) == 500.0
    with pytest.raises(ValueError, match="no area left"):
        bed_payload(outlines, [np.array([[-1.0, -1], [-1, 101], [101, 101], [101, -1]])])
    with pytest.raises(ValueError, match="at least one outline"):
        bed_payload([])


def test_describe_correction_names_what_changes():
    assert describe_correction("tls_delete", {"tls_id": 3, "polygon_um": []}) == "delete TLS 3"
    assert describe_correction("tls_maturity", {"tls_id": 2, "maturity": "secondary"}) == "TLS 2 -> secondary"
    assert describe_correction("phenotype_reassign", {"cell_ids": [1, 2], "phenotype": "B"}) == "2 cells -> B"
    assert describe_correction("gate", {"marker": "CD3", "gate": 0.123456}) == "CD3 gate -> 0.1235"
    assert "2 polygon" in describe_correction("bed_edit", {"polygons_um": [[], []]})


def test_gate_colours_and_histogram():
    values = np.array([0.5, 2.0, 10.0, 100.0])
    colors = gate_colors(values, 5.0)
    assert colors.shape == (4, 4)
    assert (colors[2:] == colors[2]).all() and not np.array_equal(colors[0], colors[2])
    counts, edges = gate_histogram(values, bins=8)
    assert counts.sum() == 4 and len(edges) == 9
    assert edges[0] == pytest.approx(0.5) and edges[-1] == pytest.approx(100.0)  # in X units


def test_review_colors_phenotypes_or_gate_then_reassignments_in_order():
    legend = {"CD8_T": (1.0, 0, 0, 1), "tumor": (0, 1.0, 0, 1), "other": (0, 0, 1.0, 1)}
    features = pd.DataFrame({"cell_id": [11, 12, 13, 14], "phenotype": ["CD8_T", "tumor", "other", "tumor"],
                             "row": [3, 0, 1, 2]})
    base = review_colors(features, legend, [])
    np.testing.assert_allclose(base, [legend[p] for p in features["phenotype"]])
    moves = [("phenotype_reassign", {"cell_ids": [12, 13], "phenotype": "CD8_T"}),
             ("gate", {"marker": "CD3", "gate": 1.0}),
             ("phenotype_reassign", {"cell_ids": [13], "phenotype": "tumor"})]
    np.testing.assert_allclose(review_colors(features, legend, moves),
                               [legend["CD8_T"], legend["CD8_T"], legend["tumor"], legend["tumor"]])
    # Gate colours come from each point's row of the table, not its position in the layer.
    values = np.array([0.0, 5.0, 0.0, 5.0])  # rows 1 and 3 above the gate: cells 13 and 11
    gated = review_colors(features, legend, moves[:1], gate_values=values, gate=1.0)
    np.testing.assert_allclose(gated[0], gate_colors(np.array([5.0]), 1.0)[0])
    np.testing.assert_allclose(gated[3], gate_colors(np.array([0.0]), 1.0)[0])
    np.testing.assert_allclose(gated[1:3], [legend["CD8_T"]] * 2)
    with pytest.raises(ValueError, match="need a gate"):
        review_colors(features, legend, [], gate_values=values)


def test_pending_reassignments_keep_their_colour_when_the_points_refill(make_napari_viewer, result_folder):  # noqa: F811
    from tme_napari.layers import result_folder_layers

    folder, obs = result_folder
    viewer = make_napari_viewer()
    widget = ReviewWidget(viewer)
    widget.folder_edit.value = folder
    # The Points layer opens empty, as on a slide with more cells than it holds, and follows the camera.
    for data, kwargs, kind in result_folder_layers(folder, max_points=0):
        getattr(viewer, f"add_{kind}")(data, **kwargs)
    points = viewer.layers["cells (phenotype)"]
    viewer.canvas.size = (200, 200)
    camera = viewer.scene.camera
    camera.center, camera.zoom = (25.0, 25.0), 4.0  # a 50 µm view: cells 0, 1, 4 and 5
    legend = points.metadata["phenotype_colors"]
    assert list(points.features["row"]) == [0, 1, 4, 5]
    points.selected_data = {0, 1}  # cells 0 (CD8_T) and 1 (tumor)
    widget.reassign_selected("other")

    def expected():
        phen = obs["phenotype"].astype(str).to_numpy()[points.features["row"].to_numpy()]
        moved = np.isin(points.features["cell_id"], obs["cell_id"].iloc[[0, 1]])
        return np.array([legend["other"] if m else legend[p] for p, m in zip(phen, moved)])

    assert not np.allclose(expected()[:2], [legend["CD8_T"], legend["tumor"]])
    np.testing.assert_allclose(points.face_color, expected())
    camera.center = (62.5, 100.0)  # pan away: other cells, the layer refilled
    assert set(points.features["row"]) == {7, 11}
    np.testing.assert_allclose(points.face_color, expected())
    camera.center = (25.0, 25.0)  # and back: the reassigned cells still show their new phenotype
    assert list(points.features["row"]) == [0, 1, 4, 5]
    np.testing.assert_allclose(points.face_color, expected())
    widget.save()  # saved, not yet recomputed: the table still has the old phenotypes
    camera.zoom = 3.0
    np.testing.assert_allclose(points.face_color, expected())
    points.selected_data = {2}
    widget.reassign_selected("tumor")
    widget.undo()
    camera.zoom = 4.0
    np.testing.assert_allclose(points.face_color, expected())


def test_scripted_review_in_napari_saves_every_kind(make_napari_viewer, result_folder):  # noqa: F811
    folder, obs = result_folder
    viewer = make_napari_viewer()
    viewer.open(str(folder), plugin="tme-napari")
    _, widget = viewer.window.add_plugin_dock_widget("tme-napari", "Review and correct")
    assert isinstance(widget, ReviewWidget) and widget.folder == folder
    assert len(widget.views) == 2 and widget.phenotype.choices == ("CD8_T", "tumor", "other")

    widget.next_tls()
    widget.delete_tls()
    widget.show_tls(1)
    np.testing.assert_allclose(viewer.scene.camera.center[-2:], [90.0, 85.0])
    widget.maturity.value = "secondary"
    widget.set_maturity("secondary")
    widget.add_drawn_tls()  # first press: a layer to draw in
    viewer.layers["review: draw TLS"].add_polygons([np.array([[100.0, 100], [100, 120], [120, 120], [120, 100]])])
    widget.add_drawn_tls()
    points = viewer.layers["cells (phenotype)"]
    points.selected_data = {0, 3, 5}
    widget.reassign_selected("tumor")
    points.selected_data = {1}  # a tumour cell, reassigned by mistake and undone
    before = np.asarray(points.face_color)[1].copy()
    widget.reassign_selected("CD8_T")
    assert not np.allclose(np.asarray(points.face_color)[1], before)
    assert "5. 1 cells -> CD8_T" in widget.pending_info.value and len(widget.pending) == 5
    assert widget.undo() == ("phenotype_reassign", {"cell_ids": [int(obs["cell_id"].iloc[1])], "phenotype": "CD8_T"})
    np.testing.assert_allclose(np.asarray(points.face_color)[1], before)
    assert len(widget.pending) == 4 and "CD8_T" not in widget.pending_info.value
    assert "4. 3 cells -> tumor" in widget.pending_info.value
    widget.edit_bed()  # the bed's outline, read from regions.geojson only now
    bed_layer = viewer.layers["review: tumour bed"]
    assert bed_layer.nshapes == 1
    bed_layer.add_polygons([np.array([[0.0, 0], [0, 50], [50, 50], [50, 0]])])
    holes_layer = viewer.layers["review: bed holes"]
    assert holes_layer.nshapes == 0, "the bed of regions.geojson has no hole"
    holes_layer.add_polygons([np.array([[10.0, 80], [10, 100], [30, 100], [30, 80]])])  # a stroma island
    widget.keep_bed()

    marker = widget.marker.choices[1]
    widget.marker.value = marker
    values = np.asarray(widget._values)
    widget.gate.value = float(np.median(values))
    positive = gate_colors(values, widget.gate.value)
    legend = points.metadata["phenotype_colors"]
    # Gate colours, except the cells reassigned and not yet recomputed: their new phenotype's colour.
    positive[[0, 3, 5]] = legend["tumor"]
    np.testing.assert_allclose(points.face_color, positive)
    assert f"{int((values > widget.gate.value).sum())} of {N_CELLS}" in widget.gate_info.value
    widget.keep_gate()

    widget.reviewer.value = "dr_who"
    saved = widget.save()
    stored = json.loads(corrections_file(folder.parents[1], folder.name).read_text())
    kinds = [c["kind"] for c in stored["corrections"]]
    assert kinds == ["tls_delete", "tls_maturity", "tls_add", "phenotype_reassign", "bed_edit", "gate"]
    assert [c.id for c in saved] == [c["id"] for c in stored["corrections"]] and widget.pending == []
    first = stored["corrections"][0]["payload"]
    assert first["tls_id"] == 1 and min(x for x, _ in first["polygon_um"]) == pytest.approx(10.0)
    assert stored["corrections"][1]["payload"] == {**stored["corrections"][1]["payload"], "tls_id": 2,
                                                   "maturity": "secondary"}
    assert stored["corrections"][2]["payload"]["polygon_um"][0] == [100.0, 100.0]
    assert stored["corrections"][3]["payload"] == {"cell_ids": [int(obs["cell_id"].iloc[i]) for i in (0, 3, 5)],
                                                   "phenotype": "tumor"}
    bed = np.asarray(stored["corrections"][4]["payload"]["polygons_um"][0])
    np.testing.assert_allclose([bed[:, 0].min(), bed[:, 0].max(), bed[:, 1].min(), bed[:, 1].max()], [64, 128, 0, 64])
    assert len(stored["corrections"][4]["payload"]["polygons_um"]) == 2
    island = np.asarray(stored["corrections"][4]["payload"]["holes_um"][0][0])  # [x, y]: x 80-100, y 10-30
    np.testing.assert_allclose([island[:, 0].min(), island[:, 0].max(), island[:, 1].min(), island[:, 1].max()],
                               [80, 100, 10, 30])
    assert stored["corrections"][4]["payload"]["holes_um"][1] == []
    assert {c["who"] for c in stored["corrections"]} == {"dr_who"}
    assert widget.save() == [], "nothing pending: nothing appended"
    assert widget.pending_info.value == "none" and widget.undo() is None


def test_recompute_runs_in_a_worker_and_reloads(make_napari_viewer, result_folder, qtbot, monkeypatch):  # noqa: F811
    import threading

    import tme_pipeline.recompute as rc
    from tme_pipeline.pipeline import SlideResult

    folder, _ = result_folder
    calls = []

    def fake(out, *, slide_id=None):
        calls.append((out, slide_id, threading.current_thread() is threading.main_thread()))
        return rc.RecomputeResult(out, (SlideResult(slide_id, "done", folder, ran=("tls", "regions")),), {})

    monkeypatch.setattr(rc, "recompute", fake)
    viewer = make_napari_viewer()
    widget = ReviewWidget(viewer)
    widget.open(folder)
    n_layers = len(viewer.layers)
    worker = widget.recompute()
    qtbot.waitUntil(lambda: widget.status.value.startswith("recomputed"), timeout=20000)
    assert calls == [(folder.parents[1], folder.name, False)], "run off the GUI thread, on this slide"
    assert widget.status.value == "recomputed: ran tls, regions" and len(viewer.layers) == n_layers
    assert worker is not None and widget.recompute_button.enabled
