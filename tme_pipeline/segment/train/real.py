"""Real annotated nuclei for training and validation: read, group, split by group, rescale.

The shared set (``shared/data/dsb2018-fluo-train``: the 2018 Data Science Bowl
stage-1 fluorescence images with hand-drawn instance masks) records no pixel
size, and near-identical fields of one experiment recur in it. So:

- each image is **rescaled** so that its median nucleus diameter (from
  ``index.csv``, measured on the masks) becomes ``target_diameter_px`` at the
  model's pixel size: 16 px = 8 µm at 0.5 µm/px, a lymphocyte-to-tumour-cell
  nucleus; the training zoom (0.6–1.6) then spreads sizes around it;
- images are **grouped** by appearance (image shape, nucleus size, intensity,
  contrast, crowding) with Ward clustering, and validation and test images are
  whole groups, never single images: near-duplicate fields of one experiment
  land on one side only.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .training import SynthImage

__all__ = ["RealRecord", "read_index", "appearance_groups", "split_by_group", "real_images", "rescale_pair"]

# Model pixel size the images are brought to, µm, and the nucleus size they get there.
MODEL_PIXEL_UM = 0.5
TARGET_DIAMETER_PX = 16.0


@dataclass(frozen=True)
class RealRecord:
    """One image of the index.

    Attributes
    ----------
    image_id : str
    height, width : int
        Image shape, px.
    n_nuclei : int
    mean_intensity : float
        Mean of the uint8 image.
    median_diameter_px : float
        Median equivalent diameter of its nuclei, px (from the masks).
    """

    image_id: str
    height: int
    width: int
    n_nuclei: int
    mean_intensity: float
    median_diameter_px: float


def read_index(folder: str | Path) -> list[RealRecord]:
    """The images of a shared real-nuclei folder, from its ``index.csv``.

    Raises
    ------
    FileNotFoundError
        When ``index.csv``, ``images/`` or ``masks/`` is missing.
    """
    folder = Path(folder)
    index = folder / "index.csv"
    for path in (index, folder / "images", folder / "masks"):
        if not path.exists():
            raise FileNotFoundError(f"{path}: missing (expected index.csv, images/ and masks/ in {folder})")
    with index.open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    try:
        return [RealRecord(r["image_id"], int(r["height"]), int(r["width"]), int(r["n_nuclei"]),
                           float(r["mean_intensity"]), float(r["median_equiv_diameter_px"])) for r in rows]
    except (KeyError, ValueError) as exc:
        raise ValueError(f"{index}: unreadable row ({exc})") from exc


def _appearance(folder: Path, rec: RealRecord) -> np.ndarray:
    import tifffile

    img = tifffile.imread(folder / "images" / f"{rec.image_id}.tif").astype(np.float32)
    mask = tifffile.imread(folder / "masks" / f"{rec.image_id}.tif") > 0
    fg = img[mask] if mask.any() else img.ravel()
    bg = img[~mask] if (~mask).any() else img.ravel()
    area = rec.height * rec.width
    return np.array([
        np.log(rec.height), np.log(rec.width), np.log(rec.median_diameter_px),
        np.log1p(float(np.median(fg))), np.log1p(float(np.median(bg))),
        float(np.std(fg) / (np.mean(fg) + 1e-3)),  # chromatin texture
        float(mask.mean()),  # crowding
        np.log1p(rec.n_nuclei / area * 1e4),
    ])


def appearance_groups(folder: str | Path, records: list[RealRecord], *, n_groups: int = 40) -> np.ndarray:
    """Group images by appearance (Ward clustering of standardised features).

    Parameters
    ----------
    folder : str or Path
        The shared folder (images and masks are read for the features).
    records : list of RealRecord
    n_groups : int
        Clusters to cut the tree into.

    Returns
    -------
    (N,) int ndarray
        Group number of each record, 1..n_groups.
    """
    from scipy.cluster.hierarchy import fcluster, linkage

    feats = np.stack([_appearance(Path(folder), r) for r in records])
    z = (feats - feats.mean(0)) / (feats.std(0) + 1e-9)
    return fcluster(linkage(z, method="ward"), t=n_groups, criterion="maxclust").astype(int)


def split_by_group(groups: np.ndarray, *, val_fraction: float = 0.1, test_fraction: float = 0.15,
                   seed: int = 0) -> dict[str, np.ndarray]:
    """Assign whole groups to test, validation and training.

    Groups are taken in a seeded random order; the first ones go to test until
    at least ``test_fraction`` of the images are there, the next to
    validation until ``val_fraction``, the rest to training.

    Returns
    -------
    dict
        ``{"train", "val", "test"}`` -> sorted indices into ``groups``.
    """
    ids = np.unique(groups)
    order = np.random.default_rng(seed).permutation(ids)
    n = len(groups)
    split = {"train": [], "val": [], "test": []}
    counts = {"val": 0, "test": 0}
    for g in order:
        members = np.flatnonzero(groups == g)
        if counts["test"] < test_fraction * n:
            side = "test"
        elif counts["val"] < val_fraction * n:
            side = "val"
        else:
            side = "train"
        split[side].extend(members.tolist())
        if side in counts:
            counts[side] += len(members)
    return {k: np.array(sorted(v), dtype=int) for k, v in split.items()}


def rescale_pair(image: np.ndarray, labels: np.ndarray, factor: float) -> tuple[np.ndarray, np.ndarray]:
    """Zoom an image (linear, anti-aliased) and its instance labels (nearest) by ``factor``."""
    from skimage.transform import resize

    shape = (max(1, round(image.shape[0] * factor)), max(1, round(image.shape[1] * factor)))
    img = resize(image.astype(np.float32), shape, order=1, anti_aliasing=factor < 1, preserve_range=True)
    lbl = resize(labels, shape, order=0, anti_aliasing=False, preserve_range=True).astype(np.uint32)
    return img.astype(np.float32), lbl


def real_images(folder: str | Path, records: list[RealRecord], *, target_diameter_px: float = TARGET_DIAMETER_PX,
                min_edge_px: int = 0, seed0: int = 0) -> list[SynthImage]:
    """Read and rescale real images for training or evaluation at the model's pixel size.

    Parameters
    ----------
    folder : str or Path
    records : list of RealRecord
    target_diameter_px : float
        Median nucleus diameter each image is brought to, px.
    min_edge_px : int
        Images smaller than this on a side are padded to it with their
        background (the 1st percentile) and empty labels, so that training
        windows fit.
    seed0 : int
        ``SynthImage.seed`` of image ``i`` is ``seed0 + i`` (an identifier only).

    Returns
    -------
    list of SynthImage
        At ``MODEL_PIXEL_UM`` (their ``tissue`` is the whole image).
    """
    import tifffile

    folder = Path(folder)
    out = []
    for i, rec in enumerate(records):
        img = tifffile.imread(folder / "images" / f"{rec.image_id}.tif")
        lbl = tifffile.imread(folder / "masks" / f"{rec.image_id}.tif")
        if img.shape != lbl.shape:
            raise ValueError(f"{folder / 'images' / rec.image_id}.tif: shape {img.shape} differs from its mask "
                             f"{lbl.shape}")
        img, lbl = rescale_pair(img, lbl, target_diameter_px / rec.median_diameter_px)
        pad = [(0, max(0, min_edge_px - s)) for s in img.shape]
        if any(p[1] for p in pad):
            img = np.pad(img, pad, constant_values=float(np.percentile(img, 1)))
            lbl = np.pad(lbl, pad, constant_values=0)
        out.append(SynthImage.from_arrays(img, lbl, tissue=np.ones((1, 1), bool), tissue_px=float(max(img.shape)),
                                          pixel_um=MODEL_PIXEL_UM, seed=seed0 + i))
    return out
