"""Screenshots of a slide's result folder in napari: each layer set, and the review widget.

    xvfb-run -a .venv/bin/python scripts/make_napari_screenshots.py OUT/slides/<slide_id> docs/images

Writes ``napari_markers.png`` (the marker channels), ``napari_labels.png`` (nuclei and cells
labels over DAPI, zoomed in), ``napari_phenotypes.png`` (cells as points by phenotype over their
overview raster),
``napari_regions_tls.png`` (the regions labels grid and TLS shapes over the markers) and ``napari_review.png``
(the whole window with the review widget, a TLS chosen and the CD8 gate recolouring the cells).
"""

from __future__ import annotations

import argparse
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("images", type=Path)
    args = parser.parse_args()

    import napari
    from imageio.v3 import imwrite
    from napari.settings import get_settings
    from qtpy.QtWidgets import QApplication, QWidget

    get_settings().application.gui_notification_level = "none"  # no toasts over the pictures
    viewer = napari.Viewer(show=True)
    viewer.window.resize(1500, 950)
    layers = viewer.open(str(args.folder), plugin="tme-napari")
    viewer.scale_bar.visible = True
    names = [layer.name for layer in layers]
    images = [layer.name for layer in layers if layer._type_string == "image" and layer.name != "cells (overview)"]

    def only(visible):
        for name in names:
            viewer.layers[name].visible = name in visible

    def shot(name, *, canvas=True):
        for _ in range(3):
            QApplication.processEvents()
        for toast in viewer.window._qt_window.findChildren(QWidget):
            if type(toast).__name__ == "NapariQtNotification":
                toast.close()
        imwrite(args.images / name, viewer.screenshot(canvas_only=canvas, flash=False))

    viewer.reset_view()
    only(images)
    shot("napari_markers.png")
    points = viewer.layers["cells (phenotype)"]
    centre = points.data[len(points.data) // 2]
    only([images[0], "nuclei", "cells"])
    viewer.layers["cells"].visible = True
    viewer.scene.camera.center, viewer.scene.camera.zoom = tuple(centre), 8.0
    shot("napari_labels.png")
    viewer.reset_view()
    only([images[0], "cells (overview)", "cells (phenotype)"])
    shot("napari_phenotypes.png")
    only([*images, "regions", "TLS"])
    shot("napari_regions_tls.png")

    _, widget = viewer.window.add_plugin_dock_widget("tme-napari", "Review and correct")
    only([*images, "regions", "TLS", "cells (phenotype)"])
    markers = list(widget.marker.choices)
    widget.marker.value = "CD8" if "CD8" in markers else markers[1]
    widget.show_tls(0)
    viewer.layers.selection.active = points
    shot("napari_review.png", canvas=False)
    viewer.close()


if __name__ == "__main__":
    main()
