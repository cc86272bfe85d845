"""A read-only dock widget that lists the TLS of the ``TLS`` shapes layer and zooms to each.

The views are computed by :func:`tls_views`, a plain function of the layer's polygons and
features; the widget only fills a list and moves the camera. Nothing here writes files.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from magicgui.widgets import ComboBox, Container, Label, PushButton

if TYPE_CHECKING:
    import napari

__all__ = ["TLSView", "tls_views", "zoom_to", "TLSBrowser"]

TLS_LAYER = "TLS"


@dataclass(frozen=True)
class TLSView:
    """Where to look at one TLS.

    Attributes
    ----------
    label : str
        What the list shows: id, maturity and area (µm²) when known.
    center_yx_um : tuple of float
        Centre of the TLS's bounding box (all its parts), µm.
    size_yx_um : tuple of float
        Bounding box height and width plus the margin on each side, µm.
    """

    label: str
    center_yx_um: tuple[float, float]
    size_yx_um: tuple[float, float]

    def zoom(self, canvas_yx_px: Sequence[int]) -> float:
        """Camera zoom (screen px per µm) that fits the view in a canvas of ``canvas_yx_px`` px."""
        return float(min(canvas_yx_px[0] / self.size_yx_um[0], canvas_yx_px[1] / self.size_yx_um[1]))


def tls_views(polygons: Sequence[np.ndarray], features, *, margin_um: float = 50.0) -> list[TLSView]:
    """One view per TLS, its parts grouped by ``tls_id`` (else one TLS per polygon).

    Parameters
    ----------
    polygons : sequence of numpy.ndarray, each (V, 2) (y, x) in µm
        The shapes layer's data.
    features : pandas.DataFrame
        The layer's features, one row per polygon: ``name`` (maturity), optionally ``tls_id``
        and ``area_um2``.
    margin_um : float
        Context kept around each TLS, µm.

    Returns
    -------
    list of TLSView
        In order of first appearance.
    """
    if len(polygons) != len(features):
        raise ValueError(f"{len(polygons)} polygons but {len(features)} feature rows")
    if margin_um < 0:
        raise ValueError(f"margin_um must be >= 0, got {margin_um}")
    keys = features["tls_id"].to_numpy() if "tls_id" in features.columns else np.arange(len(polygons))
    views = []
    for key in dict.fromkeys(keys.tolist()):
        rows = np.flatnonzero(keys == key)
        points = np.concatenate([np.asarray(polygons[i], dtype=np.float64) for i in rows])
        lo, hi = points.min(axis=0), points.max(axis=0)
        row = features.iloc[rows[0]]
        label = f"TLS {key} · {row.get('name', '')}"
        if "area_um2" in features.columns and np.isfinite(row["area_um2"]):
            label += f" · {row['area_um2']:.0f} µm²"
        views.append(TLSView(label, tuple((lo + hi) / 2), tuple(hi - lo + 2 * margin_um)))
    return views


def zoom_to(viewer, view: TLSView) -> None:
    """Centre the viewer's camera on one TLS and zoom so that it fills the canvas (``viewer.canvas.size``)."""
    from .cells_view import canvas_size_px

    camera = viewer.scene.camera
    camera.center = view.center_yx_um
    camera.zoom = view.zoom(canvas_size_px(viewer))


class TLSBrowser(Container):
    """Dock widget: choose a TLS in the list (or press Next) and the view zooms to it.

    Parameters
    ----------
    viewer : napari.viewer.Viewer
        Injected by napari; the widget reads its ``TLS`` shapes layer.
    """

    def __init__(self, viewer: napari.viewer.Viewer):
        super().__init__()
        self._viewer = viewer
        self._views: list[TLSView] = []
        self._shown: int | None = None
        self._status = Label(value="")
        self._choice = ComboBox(label="TLS", choices=[])
        self._next = PushButton(text="Next")
        self._refresh = PushButton(text="Refresh list")
        self.extend([self._choice, self._next, self._refresh, self._status])
        self._choice.changed.connect(self._zoom_to_choice)
        self._next.clicked.connect(self.next)
        self._refresh.clicked.connect(self.refresh)
        viewer.layers.events.inserted.connect(self.refresh)
        self.refresh()

    @property
    def views(self) -> list[TLSView]:
        """The TLS listed, in order."""
        return list(self._views)

    def refresh(self, *_) -> None:
        """Re-read the ``TLS`` layer (e.g. after opening a folder)."""
        layer = next((ly for ly in self._viewer.layers if ly.name == TLS_LAYER), None)
        self._views = [] if layer is None else tls_views(layer.data, layer.features)
        self._shown = None
        # Filling the list selects its first entry; that must not move the camera.
        with self._choice.changed.blocked():
            self._choice.choices = [(v.label, i) for i, v in enumerate(self._views)]
        self._status.value = f"{len(self._views)} TLS" if layer is not None else "no TLS layer"

    def show(self, index: int) -> None:
        """Centre and zoom the camera on TLS number ``index`` of :attr:`views`."""
        if not 0 <= index < len(self._views):
            raise ValueError(f"TLS index {index} out of range: {len(self._views)} TLS listed")
        zoom_to(self._viewer, self._views[index])
        self._shown = index
        with self._choice.changed.blocked():
            self._choice.value = index

    def next(self, *_) -> None:
        """Go to the next TLS of the list (wrapping around)."""
        if self._views:
            self.show(0 if self._shown is None else (self._shown + 1) % len(self._views))

    def _zoom_to_choice(self, index) -> None:
        if index is not None:
            self.show(index)
