"""Neighbour spillover: the share of a cell's signal that its touching neighbours put there.

In crowded tissue (a lymphoid follicle, where every B cell touches T cells) the pixels of a
cell next to a shared border also read the neighbour's membrane: blur and the segmentation's
cell boundary sit inside ~1 µm of both membranes. REDSEA (Bai et al. 2021, Front. Immunol.
12:652631) corrects this per channel with the cells' shared border lengths. A cell's boundary
signal, apportioned to each neighbour by the share of its perimeter that neighbour faces, is
taken as what it lost into that neighbour: it is given back to the cell and taken from the
neighbour. Across each shared border, each cell gains its own share and loses the other's; the
brighter side gains what the dimmer side loses (REDSEA's "subtract and reinforce").

For cell ``j`` with neighbours ``i``, on the pixels of a compartment (e.g. the perinuclear
band, where the pipeline reads CD3, CD8 and CD20)::

    corrected_j = total_j + sum_i (boundary_j * L_ij / L_j  -  boundary_i * L_ij / L_i)

``total`` is the sum of the channel over the cell's compartment pixels, ``boundary`` the sum
over those of its compartment pixels within ``boundary_px`` of another label (a neighbour or
background), ``L_ij`` the border length shared by ``i`` and ``j`` and ``L_j`` the cell's whole
perimeter, background included. REDSEA divides by the border shared with cells only and adds
back the whole boundary signal; dividing by the whole perimeter instead keeps two properties
exact: a lone cell (no neighbour) is unchanged, and the total over the cells is conserved
(every pair's exchange is antisymmetric). A cell whose compartment is empty takes part in no
exchange. Corrected values are not clipped at zero (that would break conservation): a cell
read mostly as its bright neighbour's border can fall below the channel's background.

Border lengths are pixel edges (4-connected cracks between two pixels of different labels), so
a straight border of n pixels has length n; edges at the array's border are not counted.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["Contacts", "SpilloverResult", "boundary_band", "cell_contacts", "correct_spillover"]


@dataclass(frozen=True)
class Contacts:
    """Which cells touch and over how long a border (pixel edges).

    labels : (k,) int64, the sorted non-zero labels of the image.
    perimeter_px : (k,) int64, each label's border with any other value, background included.
    label_a, label_b : (m,) int64, touching pairs with ``label_a < label_b``.
    border_px : (m,) int64, the border length each pair shares.
    """

    labels: np.ndarray
    perimeter_px: np.ndarray
    label_a: np.ndarray
    label_b: np.ndarray
    border_px: np.ndarray

    def neighbours_of(self, labels: np.ndarray) -> np.ndarray:
        """(m,) bool: pairs of which one member is in ``labels``."""
        return np.isin(self.label_a, labels) | np.isin(self.label_b, labels)


@dataclass(frozen=True)
class SpilloverResult:
    """Per-cell sums before and after the neighbour exchange, over the compartment's pixels.

    labels : (k,) int64; n_px : (k,) int64 compartment pixels; total, boundary, corrected :
    (k, C) float64 sums of each channel (raw intensity units x pixels); contacts : the table.
    """

    labels: np.ndarray
    n_px: np.ndarray
    total: np.ndarray
    boundary: np.ndarray
    corrected: np.ndarray
    contacts: Contacts

    @property
    def corrected_mean(self) -> np.ndarray:
        """(k, C) corrected means; NaN where the compartment is empty."""
        with np.errstate(invalid="ignore", divide="ignore"):
            return self.corrected / self.n_px[:, None]


def cell_contacts(label_image: np.ndarray) -> Contacts:
    """Shared border lengths of touching labels and each label's perimeter, in pixel edges.

    Parameters
    ----------
    label_image : ndarray, shape (Y, X), integer
        Cell labels, 0 background.

    Returns
    -------
    Contacts

    Examples
    --------
    >>> c = cell_contacts(np.array([[1, 1, 2], [1, 1, 2]]))
    >>> c.label_a.tolist(), c.label_b.tolist(), c.border_px.tolist(), c.perimeter_px.tolist()
    ([1], [2], [2], [2, 2])
    """
    lab = np.asarray(label_image)
    if lab.ndim != 2 or not np.issubdtype(lab.dtype, np.integer):
        raise ValueError(f"label_image must be a 2-D integer array, got {lab.dtype} {lab.shape}")
    lab = lab.astype(np.int64)
    a = np.concatenate([lab[:, :-1].ravel(), lab[:-1, :].ravel()])
    b = np.concatenate([lab[:, 1:].ravel(), lab[1:, :].ravel()])
    cut = a != b
    a, b = a[cut], b[cut]
    labels = np.unique(lab[lab > 0])
    ends = np.concatenate([a, b])
    ends = ends[ends > 0]
    perimeter = np.bincount(np.searchsorted(labels, ends), minlength=labels.size).astype(np.int64)
    both = (a > 0) & (b > 0)
    lo, hi = np.minimum(a[both], b[both]), np.maximum(a[both], b[both])
    pairs, border = np.unique(np.stack([lo, hi], axis=1), axis=0, return_counts=True)
    pairs = pairs.reshape(-1, 2)
    return Contacts(labels, perimeter, pairs[:, 0], pairs[:, 1], border.astype(np.int64))


def boundary_band(label_image: np.ndarray, width_px: float) -> np.ndarray:
    """Labelled pixels with another value (label or background) closer than ``width_px``.

    Distances are between pixel centres; at least the pixels touching another value (8-connected)
    are in the band. Pixels beyond the array do not count as another value. (Y, X) bool.
    """
    from scipy import ndimage as ndi

    lab = np.asarray(label_image)
    r = max(int(np.ceil(width_px)) - 1, 1) if width_px > 1 else 1
    dy, dx = np.mgrid[-r:r + 1, -r:r + 1]
    disk = dy * dy + dx * dx < max(width_px, np.sqrt(2) + 1e-6) ** 2
    differs = ndi.maximum_filter(lab, footprint=disk, mode="nearest") != ndi.minimum_filter(
        lab, footprint=disk, mode="nearest")
    return differs & (lab > 0)


def correct_spillover(
    label_image: np.ndarray,
    intensity_image: np.ndarray,
    *,
    compartment_image: np.ndarray | None = None,
    boundary_px: float = 2.0,
) -> SpilloverResult:
    """Give each cell back its boundary signal and take its neighbours' (REDSEA, whole perimeter).

    Parameters
    ----------
    label_image : ndarray, shape (Y, X), integer
        Cell labels, 0 background: contacts and perimeters come from it.
    intensity_image : ndarray, shape (C, Y, X) or (Y, X)
        Intensities, any units; each channel is corrected on its own.
    compartment_image : ndarray, shape (Y, X), integer, optional
        The pixels each cell is measured on, labelled with its cell label (e.g. the
        perinuclear band); defaults to the whole cell (``label_image``).
    boundary_px : float
        A compartment pixel closer than this to another value of ``label_image`` (pixel
        centres) is a boundary pixel; at least the pixels touching one.

    Returns
    -------
    SpilloverResult
        Per label of ``label_image``: sums over its compartment pixels, before and after.

    Examples
    --------
    >>> cells = np.array([[1, 1, 2, 2]])
    >>> r = correct_spillover(cells, np.array([[0., 10., 3., 0.]]), boundary_px=1)
    >>> r.corrected[:, 0].tolist()  # 10 + 10 - 3 and 3 + 3 - 10: the total, 13, is kept
    [17.0, -4.0]
    """
    lab = np.asarray(label_image)
    img = np.asarray(intensity_image, dtype=np.float64)
    img = img[None] if img.ndim == 2 else img
    comp = lab if compartment_image is None else np.asarray(compartment_image)
    if img.ndim != 3 or img.shape[1:] != lab.shape or comp.shape != lab.shape:
        raise ValueError(f"intensity_image must be (C, Y, X) or (Y, X) and compartment_image (Y, X), matching "
                         f"label_image {lab.shape}; got {np.shape(intensity_image)} and {comp.shape}")
    if not boundary_px > 0:
        raise ValueError(f"boundary_px must be > 0, got {boundary_px}")
    contacts = cell_contacts(lab)
    labels, k = contacts.labels, contacts.labels.size
    inside = (comp > 0) & (comp == lab)  # a compartment pixel belongs to the cell it lies in
    flat = np.flatnonzero(inside)
    idx = np.searchsorted(labels, lab.ravel()[flat])
    edge = boundary_band(lab, boundary_px).ravel()[flat]
    n_px = np.bincount(idx, minlength=k).astype(np.int64)
    pix = img.reshape(img.shape[0], -1)[:, flat]
    total = np.stack([np.bincount(idx, weights=c, minlength=k) for c in pix], axis=1).reshape(k, -1)
    boundary = np.stack([np.bincount(idx[edge], weights=c[edge], minlength=k) for c in pix],
                        axis=1).reshape(k, -1)
    # Exchange over each pair whose two compartments are non-empty: j gains its own boundary
    # share at the border with i and loses i's share at the border with j.
    ia, ib = np.searchsorted(labels, contacts.label_a), np.searchsorted(labels, contacts.label_b)
    live = (n_px[ia] > 0) & (n_px[ib] > 0)
    ia, ib, length = ia[live], ib[live], contacts.border_px[live].astype(np.float64)
    per = contacts.perimeter_px.astype(np.float64)
    a_to_b = boundary[ia] * (length / per[ia])[:, None]
    b_to_a = boundary[ib] * (length / per[ib])[:, None]
    corrected = total.copy()
    np.add.at(corrected, ia, a_to_b - b_to_a)
    np.add.at(corrected, ib, b_to_a - a_to_b)
    return SpilloverResult(labels, n_px, total, boundary, corrected, contacts)
