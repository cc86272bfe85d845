"""StarDist training targets of a label patch: object probability and ray distances.

Computed exactly as the official ``StarDistData2D.__getitem__`` does without
shape completion (stardist 0.9, ``stardist/models/model2d.py``):

- ``prob = edt_prob(labels[::gy, ::gx])``: the label image is subsampled to
  the output grid first, then each object's Euclidean distance transform is
  normalised to 1 at its most interior pixel;
- ``dist = star_dist(labels, n_rays, grid=grid)``: ray lengths from every
  grid pixel, measured on the full-resolution labels, in input pixels;
- the distance loss is weighted by ``prob`` (``dist_mask = prob``).

The geometry is stardist's C++ (``stardist.geometry.star_dist``,
``stardist.utils.edt_prob``); this module only fixes the conventions.
"""

from __future__ import annotations

import numpy as np

__all__ = ["stardist_targets"]


def stardist_targets(
    label_image: np.ndarray, *, n_rays: int, grid: tuple[int, int] = (2, 2)
) -> tuple[np.ndarray, np.ndarray]:
    """Object probability and ray distances of one label patch on the output grid.

    Parameters
    ----------
    label_image : (Y, X) int ndarray
        Instance labels, 0 background; Y and X multiples of ``grid``.
    n_rays : int
        Number of rays (evenly spaced in angle, stardist's order).
    grid : (int, int)
        Output subsampling (gy, gx) of the net.

    Returns
    -------
    prob : (Y/gy, X/gx) float32 ndarray
        Normalised distance to the object's border, in [0, 1]: 1 at object
        centres, 0 on background.
    dist : (Y/gy, X/gx, n_rays) float32 ndarray
        Ray lengths from each grid pixel to its object's border, input px;
        0 on background.

    Examples
    --------
    >>> lbl = np.zeros((32, 32), np.int32); lbl[8:24, 8:24] = 1
    >>> prob, dist = stardist_targets(lbl, n_rays=8, grid=(2, 2))
    >>> prob.shape, dist.shape
    ((16, 16), (16, 16, 8))
    >>> float(prob.max())
    1.0
    """
    from stardist.geometry import star_dist
    from stardist.utils import edt_prob

    lbl = np.asarray(label_image)
    if lbl.ndim != 2:
        raise ValueError(f"stardist_targets: expected a 2-D label image, got shape {lbl.shape}")
    if not np.issubdtype(lbl.dtype, np.integer):
        raise ValueError(f"stardist_targets: labels must be integers, got {lbl.dtype}")
    gy, gx = grid
    if lbl.shape[0] % gy or lbl.shape[1] % gx:
        raise ValueError(f"stardist_targets: shape {lbl.shape} is not a multiple of grid {grid}")
    if lbl.min(initial=0) < 0:
        raise ValueError("stardist_targets: negative labels are not supported")
    # Consecutive ids: stardist's C++ casts labels to uint16 and edt_prob's
    # find_objects allocates one entry per id up to the largest, while the
    # synthetic truth's ids run to the slide's cell count.
    ids, inverse = np.unique(lbl, return_inverse=True)
    if len(ids) > np.iinfo(np.uint16).max:
        raise ValueError(f"stardist_targets: {len(ids) - 1} objects in one patch; at most 65534 supported")
    offset = 0 if ids[0] == 0 else 1
    lbl = (inverse.reshape(lbl.shape) + offset).astype(np.int32)
    prob = edt_prob(lbl[::gy, ::gx]).astype(np.float32, copy=False)
    dist = star_dist(lbl, n_rays, grid=grid).astype(np.float32, copy=False)
    return prob, dist
