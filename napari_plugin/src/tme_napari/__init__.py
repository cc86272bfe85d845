"""tme-napari: open tme-pipeline results in napari (reader; review widgets to come)."""

from .layers import (
    cell_points_layer,
    contrast_limits,
    label_layers,
    overview_layer,
    result_folder_layers,
    shapes_layer,
    slide_layers,
)
from .reader import napari_get_reader

__all__ = [
    "cell_points_layer", "contrast_limits", "label_layers", "napari_get_reader", "overview_layer",
    "result_folder_layers", "shapes_layer", "slide_layers",
]
