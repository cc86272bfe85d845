"""Tiles: the grid a slide is cut into, per-tile Dask work, and stitched segmentation.

- :func:`tile_grid`, :class:`TileGrid`, :class:`Tile`, :func:`window_box`,
  :func:`box_slices`: square cores that partition the slide, and the windows
  around them that each stage reads (``_grid.py``);
- :func:`map_tiles`: one Dask task per tile, reading its own windows of lazy
  arrays; :func:`label_array` and :func:`output_array`: the label images the
  tiled stages read and write (``_tasks.py``);
- :func:`segment_tiled`: segment tile by tile and stitch one label image in which
  no object is cut or counted twice at a seam (``_stitch.py``).
"""

from ._grid import Box, Tile, TileGrid, box_slices, tile_grid, window_box
from ._stitch import StitchResult, segment_tiled
from ._tasks import WindowSource, label_array, map_tiles, output_array, window_source

__all__ = ["Box", "StitchResult", "Tile", "TileGrid", "box_slices", "label_array", "map_tiles", "output_array",
           "segment_tiled", "tile_grid", "window_box", "WindowSource", "window_source"]
