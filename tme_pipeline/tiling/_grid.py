"""The tile grid: square cores that partition a slide, each with a window around it.

A *core* is the part of the slide a tile answers for; its *padded* window (core +
overlap on every side, clipped to the image) is what the segmenter sees, so that an
object centred in the core lies whole inside it. Later stages read other windows of
the same grid (core + their own margin) through :func:`window_box`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["Box", "Tile", "TileGrid", "box_slices", "tile_grid", "window_box"]

#: ``(y0, x0, y1, x1)``, half-open, level-0 px.
Box = tuple[int, int, int, int]


@dataclass(frozen=True)
class Tile:
    """One tile of a :class:`TileGrid`.

    Attributes
    ----------
    index : int
        Position in the grid, row-major; the order of global ids.
    row, col : int
        Grid row and column.
    core : (int, int, int, int)
        ``(y0, x0, y1, x1)`` in level-0 px, half-open; cores partition the image.
    padded : (int, int, int, int)
        ``(py0, px0, py1, px1)``: the core grown by the overlap, clipped to the image.
    """

    index: int
    row: int
    col: int
    core: Box
    padded: Box

    @property
    def core_slices(self) -> tuple[slice, slice]:
        y0, x0, y1, x1 = self.core
        return slice(y0, y1), slice(x0, x1)

    @property
    def padded_slices(self) -> tuple[slice, slice]:
        y0, x0, y1, x1 = self.padded
        return slice(y0, y1), slice(x0, x1)

    @property
    def padded_shape(self) -> tuple[int, int]:
        y0, x0, y1, x1 = self.padded
        return y1 - y0, x1 - x0


@dataclass(frozen=True)
class TileGrid:
    """Square tiles with overlap covering a (Y, X) image.

    Attributes
    ----------
    shape_yx : (int, int)
        Image shape, px.
    pixel_um : float
        Pixel size, µm.
    tile_px, overlap_px : int
        Core side and overlap (per side), px.
    grid_shape : (int, int)
        Number of tile rows and columns.
    tiles : tuple of Tile
        Row-major.
    """

    shape_yx: tuple[int, int]
    pixel_um: float
    tile_px: int
    overlap_px: int
    grid_shape: tuple[int, int]
    tiles: tuple[Tile, ...]

    @property
    def n_tiles(self) -> int:
        return len(self.tiles)

    @property
    def window_px(self) -> tuple[int, int]:
        """Largest padded window, px (Y, X)."""
        side = self.tile_px + 2 * self.overlap_px
        return min(side, self.shape_yx[0]), min(side, self.shape_yx[1])

    def tiles_touching(self, box: Box) -> list[Tile]:
        """Tiles whose padded window intersects `box` ``(y0, x0, y1, x1)``, by index."""
        rows = self._range(box[0], box[2], self.grid_shape[0])
        cols = self._range(box[1], box[3], self.grid_shape[1])
        n_cols = self.grid_shape[1]
        return [self.tiles[r * n_cols + c] for r in rows for c in cols]

    def _range(self, lo: int, hi: int, n: int) -> range:
        # Window of tile r spans [r*T - ov, (r+1)*T + ov).
        t, ov = self.tile_px, self.overlap_px
        first = max((lo - ov) // t, 0)
        last = min((hi + ov - 1) // t, n - 1)
        return range(first, last + 1)


def tile_grid(
    shape_yx: Sequence[int],
    *,
    pixel_um: float,
    tile_um: float = 512.0,
    overlap_um: float = 40.0,
    max_object_um: float = 30.0,
) -> TileGrid:
    """Cut an image into square tile cores with overlapping padded windows.

    Parameters
    ----------
    shape_yx : (int, int)
        Image shape, px.
    pixel_um : float
        Pixel size, µm.
    tile_um : float, optional
        Core side, µm (rounded to whole px). Last row/column cores are smaller.
    overlap_um : float, optional
        Overlap added on each side of a core, µm (rounded up to whole px).
    max_object_um : float, optional
        Largest object diameter expected, µm (tumour nuclei reach ~16 µm). The
        overlap must be at least this, so an object whose centre lies in a core
        fits whole in that tile's window.

    Returns
    -------
    TileGrid

    Raises
    ------
    ValueError
        If the overlap is smaller than `max_object_um` or larger than the tile.

    Examples
    --------
    >>> g = tile_grid((1000, 600), pixel_um=0.5, tile_um=256.0, overlap_um=40.0)
    >>> g.grid_shape, g.tiles[0].core, g.tiles[0].padded
    ((2, 2), (0, 0, 512, 512), (0, 0, 592, 592))
    """
    ny, nx = (int(s) for s in shape_yx)
    if ny <= 0 or nx <= 0:
        raise ValueError(f"image shape must be positive, got {tuple(shape_yx)}")
    if not pixel_um > 0 or not tile_um > 0 or not overlap_um >= 0:
        raise ValueError(
            f"pixel_um and tile_um must be positive and overlap_um >= 0, got "
            f"pixel_um={pixel_um}, tile_um={tile_um}, overlap_um={overlap_um}"
        )
    if overlap_um < max_object_um:
        raise ValueError(
            f"overlap_um={overlap_um} is smaller than the largest object "
            f"(max_object_um={max_object_um}): an object centred near a tile's edge "
            f"would reach past its padded window and be cut at the seam; use "
            f"overlap_um >= {max_object_um}"
        )
    tile_px = max(int(round(tile_um / pixel_um)), 1)
    overlap_px = int(math.ceil(overlap_um / pixel_um - 1e-9))
    if overlap_px > tile_px:
        raise ValueError(
            f"overlap_um={overlap_um} ({overlap_px} px) exceeds tile_um={tile_um} "
            f"({tile_px} px): a window must not reach beyond its neighbouring tiles"
        )
    n_rows, n_cols = -(-ny // tile_px), -(-nx // tile_px)
    tiles = []
    for r in range(n_rows):
        for c in range(n_cols):
            y0, x0 = r * tile_px, c * tile_px
            y1, x1 = min(y0 + tile_px, ny), min(x0 + tile_px, nx)
            padded = (max(y0 - overlap_px, 0), max(x0 - overlap_px, 0),
                      min(y1 + overlap_px, ny), min(x1 + overlap_px, nx))
            tiles.append(Tile(len(tiles), r, c, (y0, x0, y1, x1), padded))
    return TileGrid((ny, nx), float(pixel_um), tile_px, overlap_px, (n_rows, n_cols), tuple(tiles))


def window_box(grid: TileGrid, tile: Tile, margin_px: int) -> Box:
    """``tile``'s core grown by `margin_px` on every side, clipped to the image.

    Parameters
    ----------
    grid : TileGrid
    tile : Tile
        A tile of `grid`.
    margin_px : int
        Margin, px (>= 0); ``grid.overlap_px`` gives the tile's padded window.

    Returns
    -------
    (int, int, int, int)
        ``(y0, x0, y1, x1)``, px, half-open.

    >>> g = tile_grid((1000, 600), pixel_um=0.5, tile_um=256.0, overlap_um=40.0)
    >>> window_box(g, g.tiles[3], 10)
    (502, 502, 1000, 600)
    """
    y0, x0, y1, x1 = tile.core
    ny, nx = grid.shape_yx
    return max(y0 - margin_px, 0), max(x0 - margin_px, 0), min(y1 + margin_px, ny), min(x1 + margin_px, nx)


def box_slices(box: Box) -> tuple[slice, slice]:
    """The (Y, X) slices of a box ``(y0, x0, y1, x1)``.

    >>> box_slices((1, 2, 3, 4))
    (slice(1, 3, None), slice(2, 4, None))
    """
    return slice(box[0], box[2]), slice(box[1], box[3])
