"""Nuclei of one image file into a label TIFF: `tme segment`, the runner with one stage.

The image goes through the same ``segment`` stage as `tme run` (same tiling, stitching and
slide-wide normalisation), in a scratch slide folder (level 0 only: no pyramid or overview,
which nothing reads there), and its nucleus labels are then streamed into a tiled OME-TIFF.
"""

from __future__ import annotations

import functools
import logging
import os
import shutil
import tempfile
from dataclasses import replace
from pathlib import Path

import dask.array as da
import numpy as np
import tifffile

from .config import Config
from .io.labels import open_label_level
from .io.slides import Slide, SlideError, open_slide
from .panel import normalise_name
from .pipeline import run_stages
from .results import LABELS
from .stages import STAGES, SlideInputs, segment_stage
from .tiling import tile_grid

__all__ = ["segment_file"]

log = logging.getLogger(__name__)

_PLAIN_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp")


def _open_plain_image(path: Path, pixel_um: float | None) -> Slide:
    """A PNG/JPEG as a one-channel slide; such files carry no pixel size."""
    from skimage.io import imread

    if pixel_um is None:
        raise SlideError(path, "a PNG/JPEG records no pixel size; give it with --pixel-um")
    image = imread(path)
    if image.ndim == 3:
        if image.shape[-1] in (3, 4) and np.ptp(image[..., :3].astype(np.int64), axis=-1).max() == 0:
            image = image[..., 0]  # grey stored as RGB(A)
        else:
            raise SlideError(path, f"expected a grey 2-D nuclear image, got shape {image.shape}")
    if image.ndim != 2:
        raise SlideError(path, f"expected a 2-D image, got shape {image.shape}")
    return Slide(
        path=path, format="image", levels=(da.from_array(image[None], chunks=(1, 1024, 1024)),),
        channel_names=("nuclei",), pixel_um=float(pixel_um),
    )


def _channel(slide: Slide, channel: str, config: Config) -> int:
    """Index of the nuclear channel: by name, by a panel alias, or the only channel."""
    if slide.n_channels == 1:
        return 0
    wanted = {normalise_name(channel)}
    if channel in config.panel:
        wanted |= {normalise_name(a) for a in config.panel[channel].aliases}
    for index, name in enumerate(slide.channel_names):
        if normalise_name(name) in wanted:
            return index
    raise SlideError(slide.path, f"no channel {channel!r} among {', '.join(slide.channel_names)}; use --channel")


def segment_file(
    image_path: str | Path,
    out_path: str | Path,
    *,
    config: Config,
    channel: str = "DAPI",
    pixel_um: float | None = None,
) -> int:
    """Segment the nuclei of one image and write them as a uint32 label TIFF.

    The image is segmented tile by tile exactly as `tme run` does (same stitching,
    memory bounded by the tile size), then written as a tiled OME-TIFF with the
    pixel size (µm) of the input, through a temporary name.

    Parameters
    ----------
    image_path : str or Path
        Any slide :func:`tme_pipeline.io.slides.open_slide` reads, or a 2-D
        PNG/JPEG (with ``pixel_um``).
    out_path : str or Path
        The label TIFF to write.
    config : Config
        Segmentation settings (method, model, tile size).
    channel : str
        Nuclear channel name or panel marker, for multichannel slides.
    pixel_um : float, optional
        Pixel size (µm) when the file has none.

    Returns
    -------
    int
        Number of nuclei.
    """
    image_path, out_path = Path(image_path), Path(out_path)
    if image_path.suffix.lower() in _PLAIN_IMAGE_SUFFIXES:
        slide = _open_plain_image(image_path, pixel_um)
    else:
        slide = open_slide(image_path, pixel_um=pixel_um)
    seg = config.segmentation
    inputs = SlideInputs(
        slide=slide, slide_id=image_path.name, config=config, nuclear_channel=_channel(slide, channel, config),
        grid=tile_grid(slide.shape_yx, pixel_um=slide.pixel_um, tile_um=seg.tile_um, overlap_um=seg.overlap_um),
    )
    out_path.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".tme-segment-", dir=out_path.parent))
    try:
        folder = work / "slide"
        # The segment stage of `tme run`, less the pyramid and overview that only viewers of
        # the (scratch) label store would use.
        stage = replace(STAGES[0], run=functools.partial(segment_stage, viewable=False))
        _, _, records = run_stages(inputs, folder, stages=[stage])
        n_nuclei = int(records["segment"]["info"]["n_nuclei"])
        tmp = out_path.with_name(f".{out_path.name}.partial")
        _write_label_tiff(tmp, open_label_level(folder / LABELS, "nuclei"), pixel_um=slide.pixel_um)
        os.replace(tmp, out_path)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    log.info("%s: %d nuclei -> %s", image_path, n_nuclei, out_path)
    return n_nuclei


def _write_label_tiff(path: Path, labels, *, pixel_um: float, tile: int = 512) -> None:
    """Stream a (Y, X) label array (zarr, dask or numpy) into a tiled OME-TIFF, one band of `tile` rows at a time."""
    height, width = labels.shape

    def tiles():
        for y in range(0, height, tile):
            # One band of tile rows at a time: reading tile by tile decoded every stored
            # chunk once per tile it holds (4 times for 1024-px chunks).
            band = np.asarray(labels[y : y + tile, :], dtype=np.uint32)
            for x in range(0, width, tile):
                block = np.zeros((tile, tile), dtype=np.uint32)
                data = band[:, x : x + tile]
                block[: data.shape[0], : data.shape[1]] = data
                yield block

    tifffile.imwrite(
        path,
        tiles(),
        shape=(height, width),
        dtype=np.uint32,
        tile=(tile, tile),
        compression="zlib",
        photometric="minisblack",
        metadata={"axes": "YX", "PhysicalSizeX": pixel_um, "PhysicalSizeXUnit": "µm",
                  "PhysicalSizeY": pixel_um, "PhysicalSizeYUnit": "µm"},
        ome=True,
    )
