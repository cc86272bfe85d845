"""Per-object measurements from a label image and the slide's channels, block by block."""

from __future__ import annotations

from collections.abc import Mapping

import anndata as ad
import dask
import dask.array as da
import numpy as np
import pandas as pd

__all__ = ["measure_objects"]


def _block_sums(labels: np.ndarray, image: np.ndarray, y0: int, x0: int) -> np.ndarray:
    """Per-label pixel count, coordinate sums and channel sums of one block.

    Returns an array of shape (n_labels_in_block, 4 + C): id, count, sum_y, sum_x, sums.
    """
    labels = np.asarray(labels)
    flat = labels.ravel()
    inside = flat > 0
    if not inside.any():
        return np.zeros((0, 4 + image.shape[0]), dtype=np.float64)
    ids, inverse = np.unique(flat[inside], return_inverse=True)
    n = ids.size
    yy, xx = np.nonzero(labels > 0)
    out = np.empty((n, 4 + image.shape[0]), dtype=np.float64)
    out[:, 0] = ids
    out[:, 1] = np.bincount(inverse, minlength=n)
    # np.nonzero walks in the same C order as ravel(), so inverse lines up with yy, xx
    out[:, 2] = np.bincount(inverse, weights=yy + y0, minlength=n)
    out[:, 3] = np.bincount(inverse, weights=xx + x0, minlength=n)
    pixels = np.asarray(image).reshape(image.shape[0], -1)[:, inside]
    for c in range(image.shape[0]):
        out[:, 4 + c] = np.bincount(inverse, weights=pixels[c].astype(np.float64), minlength=n)
    return out


def measure_objects(
    label_image: da.Array,
    intensity_image: da.Array,
    *,
    pixel_um: float,
    markers: Mapping[str, int],
    channel_names: tuple[str, ...] | None = None,
) -> ad.AnnData:
    """Measure every labelled object: centroid, area and mean intensity per marker.

    The label image is read block by block (its own chunks); partial sums of objects
    that straddle blocks are added up, so the answer does not depend on chunking and
    memory stays bounded by one block plus the per-object table.

    Parameters
    ----------
    label_image : dask array, shape (Y, X), integer
        Instance labels at level 0; 0 is background.
    intensity_image : dask array, shape (C, Y, X)
        The slide's level 0 (any chunking; it is aligned to the labels' chunks).
    pixel_um : float
        Level-0 pixel size (µm).
    markers : mapping of str to int
        Marker name -> channel index; the order is the order of ``var``.
    channel_names : tuple of str, optional
        The slide's channel names, recorded in ``var['channel']``.

    Returns
    -------
    AnnData
        One row per object, ordered by label id. ``obs``: ``cell_id`` (the label id),
        ``x_um``, ``y_um``, ``area_um2``. ``X`` (float32): mean intensity per marker,
        in the slide's units. ``obsm['spatial']``: (n, 2) centroids ``x, y`` in µm.
        ``uns['spatial_unit'] = 'um'``.
    """
    if label_image.ndim != 2 or intensity_image.ndim != 3:
        raise ValueError("measure_objects expects labels (Y, X) and an image (C, Y, X)")
    if label_image.shape != intensity_image.shape[1:]:
        raise ValueError(
            f"label image {label_image.shape} and intensity image {intensity_image.shape[1:]} differ in shape"
        )
    marker_names = list(markers)
    channels = [markers[m] for m in marker_names]
    image = intensity_image[channels].rechunk((len(channels), *label_image.chunks))

    label_blocks = label_image.to_delayed()
    image_blocks = image.to_delayed()[0]
    y_starts = np.concatenate([[0], np.cumsum(label_image.chunks[0])[:-1]])
    x_starts = np.concatenate([[0], np.cumsum(label_image.chunks[1])[:-1]])
    parts = [
        dask.delayed(_block_sums)(label_blocks[i, j], image_blocks[i, j], int(y0), int(x0))
        for i, y0 in enumerate(y_starts)
        for j, x0 in enumerate(x_starts)
    ]
    (tables,) = dask.compute(parts)
    table = np.concatenate(tables, axis=0) if tables else np.zeros((0, 4 + len(channels)))

    ids, inverse = np.unique(table[:, 0].astype(np.int64), return_inverse=True)
    sums = np.column_stack(
        [np.bincount(inverse, weights=table[:, k], minlength=ids.size) for k in range(1, table.shape[1])]
    ) if ids.size else np.zeros((0, table.shape[1] - 1))
    count = sums[:, 0]
    y_um = sums[:, 1] / np.maximum(count, 1) * pixel_um
    x_um = sums[:, 2] / np.maximum(count, 1) * pixel_um
    means = (sums[:, 3:] / np.maximum(count, 1)[:, None]).astype(np.float32)

    obs = pd.DataFrame(
        {
            "cell_id": ids,
            "x_um": x_um,
            "y_um": y_um,
            "area_um2": count * pixel_um**2,
        },
        index=pd.Index(ids.astype(str), name="cell"),
    )
    var = pd.DataFrame(index=pd.Index(marker_names, name="marker"))
    if channel_names is not None:
        var["channel"] = [channel_names[c] for c in channels]
    adata = ad.AnnData(X=means, obs=obs, var=var)
    adata.obsm["spatial"] = np.column_stack([x_um, y_um])
    adata.uns["spatial_unit"] = "um"
    adata.uns["pixel_um"] = float(pixel_um)
    return adata
