"""The review dock widget: step through TLS, correct them, the bed, phenotypes and gates; save; recompute.

A thin layer over :mod:`tme_pipeline.corrections` (what a correction is, how it is stored and
applied) and :mod:`tme_pipeline.recompute`. The plain functions here turn layer data into
correction payloads (napari's (y, x) into the record's [x, y], both µm) and gate colours; the
widget holds the pending corrections until **Save** appends them to
``OUT/corrections/<slide_id>/corrections.json``, and **Recompute** re-runs the stale stages
in a worker thread, then reloads the slide's layers.
"""

from __future__ import annotations

import getpass
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from magicgui.widgets import ComboBox, Container, FileEdit, FloatSlider, Label, LineEdit, PushButton

from .cells_view import POINTS_LAYER, follow_points_layer, on_refill
from .tls_browser import TLS_LAYER, tls_views, zoom_to

if TYPE_CHECKING:
    import napari

__all__ = ["ReviewWidget", "ring_um", "tls_outline_um", "gate_colors", "review_colors", "gate_histogram",
           "marker_values", "bed_rings_yx", "bed_payload",
           "bed_outlines_yx", "describe_correction"]

REGIONS_LAYER = "regions"
DRAW_LAYER = "review: draw TLS"
BED_LAYER = "review: tumour bed"
BED_HOLES_LAYER = "review: bed holes"
_POSITIVE = (1.0, 0.85, 0.0, 1.0)
_NEGATIVE = (0.35, 0.35, 0.35, 0.6)


def ring_um(polygon_yx: np.ndarray) -> list[list[float]]:
    """A napari polygon (V, 2) (y, x) µm as the record's ``[[x, y], ...]`` µm (closing vertex dropped)."""
    ring = np.asarray(polygon_yx, dtype=np.float64)
    if ring.ndim != 2 or ring.shape[1] != 2 or len(ring) < 3:
        raise ValueError(f"a polygon needs >= 3 (y, x) vertices, got shape {ring.shape}")
    if np.allclose(ring[0], ring[-1]):
        ring = ring[:-1]
    return ring[:, ::-1].tolist()


def tls_outline_um(polygons: Sequence[np.ndarray], features, index: int) -> tuple[int, list[list[float]]]:
    """The id and outline (largest part, ``[[x, y], ...]`` µm) of TLS number ``index`` of :func:`tls_views`.

    Parameters
    ----------
    polygons : sequence of (V, 2) (y, x) µm
        The TLS shapes layer's data.
    features : pandas.DataFrame
        Its features (``tls_id`` per polygon).
    index : int
        Position in the TLS list (parts of one TLS are one entry).
    """
    ids = features["tls_id"].to_numpy()
    keys = list(dict.fromkeys(ids.tolist()))
    if not 0 <= index < len(keys):
        raise ValueError(f"TLS index {index} out of range: {len(keys)} TLS")
    rows = np.flatnonzero(ids == keys[index])
    areas = [_area(polygons[i]) for i in rows]
    return int(keys[index]), ring_um(polygons[rows[int(np.argmax(areas))]])


def _area(ring: np.ndarray) -> float:
    y, x = np.asarray(ring, dtype=np.float64).T
    return 0.5 * abs(float(np.dot(x, np.roll(y, 1)) - np.dot(y, np.roll(x, 1))))


def gate_colors(values: np.ndarray, gate: float) -> np.ndarray:
    """Per-cell RGBA (N, 4): cells above ``gate`` (in ``X`` units) bright, the others dim grey."""
    above = np.asarray(values, dtype=np.float64) > gate
    return np.where(above[:, None], np.asarray(_POSITIVE), np.asarray(_NEGATIVE))


def review_colors(features, legend: dict, reassignments: Sequence[tuple[str, dict]], *,
                  gate_values: np.ndarray | None = None, gate: float | None = None) -> np.ndarray:
    """Per-point RGBA of the review: phenotype (or gate) colours, then the reassignments not yet applied.

    Parameters
    ----------
    features : pandas.DataFrame
        The Points layer's features, one row per point: ``cell_id``, ``phenotype`` and
        (for gate colours) ``row``, the cell's index in the cell table.
    legend : dict of str -> RGBA
        Phenotype colours (``metadata['phenotype_colors']`` of the layer).
    reassignments : sequence of (kind, payload)
        Corrections in the order made; each ``phenotype_reassign`` paints its cells in
        their new phenotype's colour, later ones over earlier ones; other kinds are ignored.
    gate_values : numpy.ndarray (n_cells,), optional
        A marker's ``X`` column for every cell of the table: the base colours are then
        :func:`gate_colors` of ``gate`` instead of the phenotypes.
    gate : float, optional
        The gate, ``X`` units; needed with ``gate_values``.

    Returns
    -------
    numpy.ndarray, (len(features), 4) float64
    """
    n = len(features)
    if gate_values is not None:
        if gate is None:
            raise ValueError("gate_values need a gate")
        rows = features["row"].to_numpy() if "row" in features else np.arange(n)
        colors = gate_colors(np.asarray(gate_values)[rows], float(gate)).astype(np.float64)
    else:
        missing = np.asarray(_NEGATIVE)
        colors = np.array([legend.get(str(p), missing) for p in features["phenotype"]], np.float64).reshape(n, 4)
    ids = features["cell_id"].to_numpy()
    for kind, payload in reassignments:
        if kind == "phenotype_reassign" and payload["phenotype"] in legend:
            colors[np.isin(ids, payload["cell_ids"])] = legend[payload["phenotype"]]
    return colors


def gate_histogram(values: np.ndarray, *, bins: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """Counts and edges of ``arcsinh`` intensities (the gating transform), for the gate slider's plot.

    Returns
    -------
    counts : (bins,) int
    edges : (bins + 1,) float, in ``X`` units (``sinh`` of the transformed edges)
    """
    t = np.arcsinh(np.asarray(values, dtype=np.float64))
    t = t[np.isfinite(t)]
    counts, edges = np.histogram(t, bins=bins)
    return counts, np.sinh(edges)


def marker_values(folder: str | Path, marker: str) -> np.ndarray:
    """One marker's column of ``X`` (mean intensity in its compartment) of ``cells.h5ad``, read lazily.

    Returns
    -------
    numpy.ndarray, (n_cells,) float64, in the order of ``obs``
    """
    from tme_pipeline.results import SlideResults

    folder = Path(folder)
    cells = SlideResults(folder.name, folder).cells(backed=True)
    try:
        if marker not in cells.var_names:
            raise ValueError(f"{folder}: no marker {marker!r} in cells.h5ad (markers: {list(cells.var_names)})")
        column = cells[:, marker].X
        return np.asarray(column.toarray() if hasattr(column, "toarray") else column, dtype=np.float64).ravel()
    finally:
        cells.file.close()


def bed_rings_yx(path: str | Path) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """The tumour bed's outer rings and its holes, of a regions GeoJSON, as napari polygons.

    Parameters
    ----------
    path : str or Path
        ``regions.geojson`` (QuPath, level-0 pixels; the feature classified ``tumor``).

    Returns
    -------
    outlines, holes : list of numpy.ndarray, each (V, 2) float64 (y, x) µm
        One outline per part of the bed, and every hole of every part (e.g. a stroma island
        inside the bed); both empty if the file has no bed or does not exist.
    """
    from tme_pipeline.geojson import read_geojson

    path = Path(path)
    if not path.is_file():
        return [], []
    outlines, holes = [], []
    for geometry, props in read_geojson(path)[0]:
        if (props.get("classification") or {}).get("name") != "tumor":
            continue
        for part in getattr(geometry, "geoms", [geometry]):
            if part.geom_type == "Polygon" and not part.is_empty:
                outlines.append(np.asarray(part.exterior.coords)[:-1, ::-1].copy())
                holes += [np.asarray(ring.coords)[:-1, ::-1].copy() for ring in part.interiors]
    return outlines, holes


def bed_outlines_yx(path: str | Path) -> list[np.ndarray]:
    """The outer rings of :func:`bed_rings_yx`."""
    return bed_rings_yx(path)[0]


def bed_payload(outlines_yx: Sequence[np.ndarray], holes_yx: Sequence[np.ndarray] = ()) -> dict:
    """A ``bed_edit`` payload from the edited outlines and holes (napari polygons, (y, x) µm).

    The bed is the union of the outlines less the union of the holes, so a hole needs not be
    matched to its outline by hand, a hole drawn outside the bed changes nothing and
    overlapping outlines merge.

    Returns
    -------
    dict
        ``polygons_um``: one ``[[x, y], ...]`` ring per part of the bed; ``holes_um`` (only
        when there is a hole): per part, its hole rings.

    Raises
    ------
    ValueError
        If there is no outline, a polygon has fewer than 3 vertices, or the holes cover the bed.
    """
    import shapely
    from shapely.geometry import Polygon

    def polygons(rings) -> list:
        return [shapely.make_valid(Polygon(np.asarray(ring_um(r), np.float64))) for r in rings]

    if not len(outlines_yx):
        raise ValueError("the bed needs at least one outline")
    shells, cuts = polygons(outlines_yx), polygons(holes_yx)
    bed = shapely.union_all(shells)
    if cuts:
        bed = bed.difference(shapely.union_all(cuts))
    parts = [g for g in getattr(bed, "geoms", [bed]) if g.geom_type == "Polygon" and g.area > 0]
    if not parts:
        raise ValueError("the bed has no area left (its holes cover it)")
    # The parts in the order of the outlines they come from, as the reviewer drew them.
    parts.sort(key=lambda part: min(i for i, shell in enumerate(shells) if shell.intersects(part)))
    payload = {"polygons_um": [np.asarray(p.exterior.coords)[:-1].tolist() for p in parts]}
    holes = [[np.asarray(r.coords)[:-1].tolist() for r in p.interiors] for p in parts]
    if any(holes):
        payload["holes_um"] = holes
    return payload


class ReviewWidget(Container):
    """Dock widget to review and correct one slide's results.

    Parameters
    ----------
    viewer : napari.viewer.Viewer
        Injected by napari. The slide's folder is the one its layers were read from, or the
        one chosen here and opened with **Open**.
    """

    def __init__(self, viewer: napari.viewer.Viewer):
        super().__init__()
        self._viewer = viewer
        self.pending: list[tuple[str, dict]] = []
        # Saved reassignments the shown cell table does not have yet (until Recompute reloads it).
        self._saved_reassignments: list[tuple[str, dict]] = []
        self._styled_points = None
        self._worker = None
        self._values: np.ndarray | None = None
        # napari calls reset_choices on docked widgets whenever layers change: the lists are
        # callables over what the widget read last, so that a reset keeps them.
        self._views: list = []
        self._shown: int | None = None
        self._phenotypes: list[str] = []
        self._markers: list[str] = []
        self.folder_edit = FileEdit(label="result folder", mode="d")
        self.open_button = PushButton(text="Open")
        self.reviewer = LineEdit(label="reviewer", value=getpass.getuser())
        self.tls_choice = ComboBox(label="TLS", choices=lambda _: [(v.label, i) for i, v in enumerate(self._views)])
        self.next_button = PushButton(text="Next TLS")
        self.maturity = ComboBox(label="maturity", choices=["aggregate", "primary", "secondary", "unstaged"])
        self.set_maturity_button = PushButton(text="Set maturity")
        self.delete_button = PushButton(text="Delete TLS")
        self.add_button = PushButton(text="Add drawn TLS")
        self.edit_bed_button = PushButton(text="Edit bed")
        self.keep_bed_button = PushButton(text="Keep edited bed")
        self.phenotype = ComboBox(label="phenotype", choices=lambda _: self._phenotypes)
        self.reassign_button = PushButton(text="Reassign selected cells")
        self.marker = ComboBox(label="gate marker", choices=lambda _: self._markers)
        self.gate = FloatSlider(label="gate", min=0.0, max=1.0, value=0.5)
        self.gate_info = Label(value="")
        self.keep_gate_button = PushButton(text="Keep gate")
        self.undo_button = PushButton(text="Undo last unsaved")
        self.pending_info = Label(label="pending", value="none")
        self.save_button = PushButton(text="Save")
        self.recompute_button = PushButton(text="Recompute")
        self.status = Label(value="")
        self.extend([self.folder_edit, self.open_button, self.reviewer, self.tls_choice, self.next_button,
                     self.maturity, self.set_maturity_button, self.delete_button, self.add_button,
                     self.edit_bed_button, self.keep_bed_button, self.phenotype, self.reassign_button, self.marker,
                     self.gate, self.gate_info, self.keep_gate_button, self.pending_info, self.undo_button,
                     self.save_button, self.recompute_button,
                     self.status])
        self._histogram_canvas()
        self.open_button.clicked.connect(lambda: self.open(self.folder_edit.value))
        self.tls_choice.changed.connect(self._zoom)
        self.next_button.clicked.connect(self.next_tls)
        self.set_maturity_button.clicked.connect(lambda: self.set_maturity(self.maturity.value))
        self.delete_button.clicked.connect(self.delete_tls)
        self.add_button.clicked.connect(self.add_drawn_tls)
        self.edit_bed_button.clicked.connect(self.edit_bed)
        self.keep_bed_button.clicked.connect(self.keep_bed)
        self.reassign_button.clicked.connect(lambda: self.reassign_selected(self.phenotype.value))
        self.marker.changed.connect(self._load_marker)
        self.gate.changed.connect(self._recolour)
        self.keep_gate_button.clicked.connect(self.keep_gate)
        self.undo_button.clicked.connect(self.undo)
        self.save_button.clicked.connect(self.save)
        self.recompute_button.clicked.connect(self.recompute)
        viewer.layers.events.inserted.connect(self.refresh)
        self.refresh()

    # --- where the slide is ------------------------------------------------------------------------

    @property
    def folder(self) -> Path | None:
        """The slide's result folder ``OUT/slides/<slide_id>``, from the layers' source or the chooser."""
        for layer in self._viewer.layers:
            path = getattr(layer.source, "path", None)
            if path and (Path(path) / "cells.h5ad").is_file():
                return Path(path)
        value = Path(self.folder_edit.value)
        return value if (value / "cells.h5ad").is_file() else None

    def _require_folder(self) -> Path:
        folder = self.folder
        if folder is None:
            raise ValueError("no slide result folder open: choose OUT/slides/<slide_id> and press Open")
        return folder

    def open(self, folder: str | Path) -> None:
        """Show a result folder's layers (replacing those of the same names)."""
        from .layers import result_folder_layers

        folder = Path(folder)
        self.folder_edit.value = folder
        layers = result_folder_layers(folder)
        for _, kwargs, _ in layers:
            if kwargs["name"] in self._viewer.layers:
                self._viewer.layers.remove(kwargs["name"])
        for data, kwargs, kind in layers:
            getattr(self._viewer, f"add_{kind}")(data, **kwargs)
        self.refresh()

    def refresh(self, *_) -> None:
        """Re-read the TLS list, phenotypes and markers from the layers and the folder."""
        layer = self._layer(TLS_LAYER)
        self._views = [] if layer is None else tls_views(layer.data, layer.features)
        self._shown = None
        points = self._layer(POINTS_LAYER)
        if points is not None and "phenotype" in points.features:
            self._phenotypes = [str(c) for c in points.features["phenotype"].cat.categories]
        if points is not None and points is not self._styled_points:
            # A large slide opens with no points: the cells in view are put in once few enough,
            # and refilled as the camera moves; each refill is restyled with the review's colours.
            on_refill(points, self._restyle)
            self._styled_points = points
            self._saved_reassignments = []
        if points is not None:
            follow_points_layer(self._viewer, points)
        folder = self.folder
        if folder is not None and not self._markers:
            from tme_pipeline.results import SlideResults

            cells = SlideResults(folder.name, folder).cells(backed=True)
            self._markers = [str(v) for v in cells.var_names]
            cells.file.close()
        # Filling the TLS list selects its first entry; that must not move the camera.
        for widget in (self.tls_choice, self.phenotype, self.marker):
            with widget.changed.blocked():
                widget.reset_choices()
        self._say(f"{len(self._views)} TLS; {len(self.pending)} correction(s) not saved")

    def _layer(self, name: str):
        return self._viewer.layers[name] if name in self._viewer.layers else None

    def _say(self, text: str) -> None:
        self.status.value = text

    # --- TLS ----------------------------------------------------------------------------------------

    @property
    def views(self) -> list:
        return list(self._views)

    def show_tls(self, index: int) -> None:
        """Centre and zoom on TLS number ``index`` of the list."""
        if not 0 <= index < len(self._views):
            raise ValueError(f"TLS index {index} out of range: {len(self._views)} TLS listed")
        zoom_to(self._viewer, self._views[index])
        self._shown = index
        with self.tls_choice.changed.blocked():
            self.tls_choice.value = index

    def next_tls(self, *_) -> None:
        if self._views:
            self.show_tls(0 if self._shown is None else (self._shown + 1) % len(self._views))

    def _zoom(self, index) -> None:
        if index is not None:
            self.show_tls(index)

    def _current_tls(self) -> tuple[int, list]:
        layer, index = self._layer(TLS_LAYER), self.tls_choice.value
        if layer is None or index is None:
            raise ValueError("no TLS chosen")
        return tls_outline_um(layer.data, layer.features, index)

    def set_maturity(self, maturity: str) -> None:
        """Queue a maturity change of the chosen TLS."""
        tls_id, outline = self._current_tls()
        self._queue("tls_maturity", {"tls_id": tls_id, "polygon_um": outline, "maturity": maturity})

    def delete_tls(self, *_) -> None:
        """Queue the deletion of the chosen TLS."""
        tls_id, outline = self._current_tls()
        self._queue("tls_delete", {"tls_id": tls_id, "polygon_um": outline})

    def add_drawn_tls(self, *_) -> None:
        """Queue every polygon of the draw layer as a missed TLS of the chosen maturity, then clear the layer."""
        layer = self._layer(DRAW_LAYER)
        if layer is None or not len(layer.data):
            self._viewer.add_shapes(name=DRAW_LAYER, units="micrometer", edge_color="cyan", face_color="transparent",
                                    edge_width=4.0)
            self._viewer.layers[DRAW_LAYER].mode = "add_polygon"
            self._say(f"draw the TLS outline in '{DRAW_LAYER}', then press 'Add drawn TLS' again")
            return
        for polygon in layer.data:
            self._queue("tls_add", {"polygon_um": ring_um(polygon), "maturity": self.maturity.value})
        layer.data = []

    # --- tumour bed -------------------------------------------------------------------------------

    def edit_bed(self, *_) -> None:
        """Load the bed's outlines and holes from ``regions.geojson`` into two editable shapes layers.

        Only now, not at open: the regions are shown as a coarse labels grid, and a slide's
        outlines can have thousands of vertices. The holes (stroma islands inside the bed) are
        their own layer, where one is drawn, moved or deleted; TLS are carved again.
        """
        from tme_pipeline.results import REGIONS_GEOJSON

        folder = self._require_folder()
        bed, holes = bed_rings_yx(folder / REGIONS_GEOJSON)
        for name in (BED_LAYER, BED_HOLES_LAYER):
            if name in self._viewer.layers:
                self._viewer.layers.remove(name)
        self._viewer.add_shapes(bed, shape_type="polygon", name=BED_LAYER, units="micrometer", edge_color="red",
                                face_color=[1, 0, 0, 0.15], edge_width=6.0)
        self._viewer.add_shapes(holes, shape_type="polygon", name=BED_HOLES_LAYER, units="micrometer",
                                edge_color="cyan", face_color=[0, 1, 1, 0.15], edge_width=6.0)
        self._viewer.layers[BED_LAYER].mode = "direct"
        self._viewer.layers.selection.active = self._viewer.layers[BED_LAYER]
        self._say(f"{len(bed)} bed outline(s) in '{BED_LAYER}', {len(holes)} hole(s) in '{BED_HOLES_LAYER}'; "
                  "press 'Keep edited bed' when done")

    def keep_bed(self, *_) -> None:
        """Queue the edited bed (the bed layer's polygons less the holes layer's) as the slide's tumour bed."""
        layer = self._layer(BED_LAYER)
        if layer is None:
            raise ValueError("press 'Edit bed' first")
        holes = self._layer(BED_HOLES_LAYER)
        self._queue("bed_edit", bed_payload(layer.data, holes.data if holes is not None else ()))

    # --- phenotypes and gates ------------------------------------------------------------------------

    def reassign_selected(self, phenotype: str) -> None:
        """Queue the selected points' new phenotype."""
        points = self._layer(POINTS_LAYER)
        selected = sorted(points.selected_data) if points is not None else []
        if not selected:
            raise ValueError(f"select cells in '{POINTS_LAYER}' first")
        ids = points.features["cell_id"].to_numpy()[selected]
        self._queue("phenotype_reassign", {"cell_ids": [int(i) for i in ids], "phenotype": str(phenotype)})
        self._restyle()

    def _restyle(self, *_) -> None:
        """Colour the points shown: phenotype or gate colours, then every reassignment not yet in the table."""
        points = self._layer(POINTS_LAYER)
        if points is None or not len(points.data):
            return
        gating = self._values is not None
        points.face_color = review_colors(points.features, points.metadata.get("phenotype_colors", {}),
                                          [*self._saved_reassignments, *self.pending],
                                          gate_values=self._values if gating else None,
                                          gate=float(self.gate.value) if gating else None)

    def _load_marker(self, marker) -> None:
        folder = self.folder
        if not marker or folder is None:
            return
        self._values = marker_values(folder, marker)
        gates = _stored_gates(folder)
        hi = float(np.nanpercentile(self._values, 99.9)) or 1.0
        self.gate.max = hi
        self.gate.value = min(float(gates.get(marker, hi / 2)), hi)
        counts, edges = gate_histogram(self._values)
        axes = self._figure.axes[0]
        axes.clear()
        # arcsinh axis, as the gating sees the intensities; ticks stay in X units
        axes.stairs(counts, np.arcsinh(edges), fill=True, color="0.6")
        axes.set_yscale("symlog")
        axes.set_xlabel(f"{marker} (arcsinh of X)", fontsize=7)
        axes.tick_params(labelsize=6)
        self._gate_line = axes.axvline(np.arcsinh(self.gate.value), color="gold", lw=1.5)
        self._recolour(self.gate.value)

    def _histogram_canvas(self) -> None:
        from matplotlib.backends.backend_qtagg import FigureCanvasQTAgg
        from matplotlib.figure import Figure

        self._figure = Figure(figsize=(3.0, 1.4), dpi=100, layout="constrained")
        self._figure.add_subplot()
        self._canvas = FigureCanvasQTAgg(self._figure)
        self._gate_line = None
        layout = self.native.layout()
        layout.insertWidget(self.index(self.gate_info) + 1, self._canvas)

    def _recolour(self, gate) -> None:
        if self._gate_line is not None:
            self._gate_line.set_xdata([np.arcsinh(float(gate))] * 2)
            self._canvas.draw_idle()
        points = self._layer(POINTS_LAYER)
        if points is None or self._values is None:
            return
        self._restyle()
        n = int((self._values > float(gate)).sum())
        total = len(self._values)
        self.gate_info.value = f"{self.marker.value}+ : {n} of {total} cells ({100 * n / total:.1f} %)"

    def keep_gate(self, *_) -> None:
        """Queue the slider's gate for the chosen marker."""
        if not self.marker.value:
            raise ValueError("choose a marker first")
        self._queue("gate", {"marker": self.marker.value, "gate": float(self.gate.value)})

    # --- save and recompute -------------------------------------------------------------------------

    def _queue(self, kind: str, payload: dict) -> None:
        self.pending.append((kind, payload))
        self._show_pending()
        self._say(f"{kind} queued; {len(self.pending)} correction(s) not saved")

    def _show_pending(self) -> None:
        lines = [f"{i}. {describe_correction(k, p)}" for i, (k, p) in enumerate(self.pending, start=1)]
        self.pending_info.value = "\n".join(lines) or "none"

    def undo(self, *_) -> tuple[str, dict] | None:
        """Drop the last correction not yet saved (a reassignment's colours go back); returns it, or None."""
        if not self.pending:
            self._say("nothing to undo")
            return None
        kind, payload = self.pending.pop()
        if kind == "phenotype_reassign":
            self._restyle()
        self._show_pending()
        self._say(f"undid {kind}; {len(self.pending)} correction(s) not saved")
        return kind, payload

    def save(self, *_) -> list:
        """Append the queued corrections to the slide's ``corrections.json``; returns the saved entries."""
        from tme_pipeline.corrections import append_corrections
        from tme_pipeline.results import corrections_file

        folder = self._require_folder()
        if not self.pending:
            self._say("nothing to save")
            return []
        saved = append_corrections(corrections_file(folder.parent.parent, folder.name), folder.name, self.pending,
                                   who=self.reviewer.value or None)
        self._saved_reassignments += [(k, p) for k, p in self.pending if k == "phenotype_reassign"]
        self.pending = []
        self._show_pending()
        self._say(f"saved {', '.join(c.id for c in saved)}; press Recompute to update the results")
        return list(saved)

    def recompute(self, *_):
        """Re-run the stale stages of this slide in a worker thread, then reload its layers; returns the worker."""
        from napari.qt.threading import create_worker
        from tme_pipeline.recompute import recompute

        folder = self._require_folder()
        if self.pending:
            self.save()
        self.recompute_button.enabled = False
        self._say("recomputing ...")
        worker = create_worker(recompute, folder.parent.parent, slide_id=folder.name)
        worker.returned.connect(lambda result: self._recomputed(folder, result))
        worker.errored.connect(lambda error: self._say(f"recompute failed: {error}"))
        worker.finished.connect(lambda: setattr(self.recompute_button, "enabled", True))
        self._worker = worker
        worker.start()
        return worker

    def _recomputed(self, folder: Path, result) -> None:
        slide = result.slides[0]
        self.open(folder)
        self._say(f"recomputed: ran {', '.join(slide.ran) or 'nothing'}" if slide.status != "error"
                  else f"recompute failed: {slide.error}")


def describe_correction(kind: str, payload: dict) -> str:
    """One line for the pending list, e.g. ``"delete TLS 3"``, ``"12 cells -> CD8_T"``."""
    if kind == "tls_delete":
        return f"delete TLS {payload['tls_id']}"
    if kind == "tls_maturity":
        return f"TLS {payload['tls_id']} -> {payload['maturity']}"
    if kind == "tls_add":
        return f"add a {payload['maturity']} TLS ({len(payload['polygon_um'])} vertices)"
    if kind == "phenotype_reassign":
        return f"{len(payload['cell_ids'])} cells -> {payload['phenotype']}"
    if kind == "bed_edit":
        n_holes = sum(len(rings) for rings in payload.get("holes_um", []))
        return (f"tumour bed redrawn ({len(payload['polygons_um'])} polygon(s)"
                + (f", {n_holes} hole(s))" if n_holes else ")"))
    if kind == "gate":
        return f"{payload['marker']} gate -> {payload['gate']:.4g}"
    return kind


def _stored_gates(folder: Path) -> dict[str, float]:
    """Marker -> gate (``X`` units) of ``cells.h5ad``'s ``uns['gates']``."""
    from tme_pipeline.results import SlideResults

    cells = SlideResults(folder.name, folder).cells(backed=True)
    try:
        gates = cells.uns.get("gates", {})
        return {str(m): float(g["gate"]) for m, g in gates.items() if "gate" in g}
    finally:
        cells.file.close()
