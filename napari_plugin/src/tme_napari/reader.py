"""The npe2 reader: a slide's result folder, or a slide file, dropped on napari."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

__all__ = ["napari_get_reader", "is_result_folder", "read_result_folder", "read_slide_file"]

_SLIDE_SUFFIXES = (".tif", ".tiff", ".qptiff", ".btf", ".zarr")


def is_result_folder(path: str | Path) -> bool:
    """Whether ``path`` is one slide's result folder (``OUT/slides/<slide_id>/`` with ``cells.h5ad``)."""
    from tme_pipeline.results import CELLS

    path = Path(path)
    return path.is_dir() and (path / CELLS).is_file()


def read_result_folder(path: str | Path) -> list[tuple]:
    """All layers of a result folder; see :func:`tme_napari.layers.result_folder_layers`.

    When a viewer is open and the slide has more cells than the Points layer holds at
    open, that layer follows the camera (:func:`tme_napari.cells_view.follow_points_layer`)
    once napari has added it.
    """
    from .layers import result_folder_layers

    layers = result_folder_layers(path)
    data, kwargs, _ = layers[-1]
    if kwargs["metadata"].get("n_cells", 0) > len(data):
        _follow_once_added(kwargs["metadata"]["cells_file"])
    return layers


def _follow_once_added(cells_file: str) -> None:
    # npe2 readers are not given the viewer: the current one is the one opening the folder.
    try:
        import napari
    except ImportError:
        return
    viewer = napari.current_viewer()
    if viewer is None:
        return
    from .cells_view import POINTS_LAYER, follow_points_layer

    def added(event) -> None:
        layer = event.value
        if layer.name.startswith(POINTS_LAYER) and layer.metadata.get("cells_file") == cells_file:
            viewer.layers.events.inserted.disconnect(added)
            follow_points_layer(viewer, layer)

    viewer.layers.events.inserted.connect(added)


def read_slide_file(path: str | Path) -> list[tuple]:
    """One lazy multiscale image layer per channel of a slide file, in µm."""
    from tme_pipeline.io.slides import open_slide

    from .layers import slide_layers

    return slide_layers(open_slide(path))


def napari_get_reader(path: str | list[str]) -> Callable[[str | list[str]], list[tuple]] | None:
    """npe2 ``get_reader``: the function that reads ``path``, or None for paths not ours.

    Parameters
    ----------
    path : str or list of str
        What was dropped; a list is ours only if it holds exactly one path we read.

    Returns
    -------
    callable or None
        Called with ``path``, returns a list of ``(data, kwargs, layer_type)`` tuples.
    """
    if isinstance(path, (list, tuple)):
        if len(path) != 1:
            return None
        path = path[0]
    path = Path(path)
    if is_result_folder(path):
        return lambda p: read_result_folder(p[0] if isinstance(p, (list, tuple)) else p)
    if path.name.lower().endswith(_SLIDE_SUFFIXES) and path.exists() and _opens_as_slide(path):
        return lambda p: read_slide_file(p[0] if isinstance(p, (list, tuple)) else p)
    return None


def _opens_as_slide(path: Path) -> bool:
    # Only metadata is read; a TIFF without channel names or pixel size is left to other
    # readers rather than shown at a wrong scale.
    from tme_pipeline.io.slides import SlideError, open_slide

    try:
        open_slide(path)
    except (SlideError, ValueError, OSError):
        return False
    return True
