"""Object-level agreement between two label images (IoU matching).

Used to score a segmentation against the synthetic truth, to compare tiled and
untiled runs, and to evaluate StarDist models.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

__all__ = ["MatchStats", "match_labels", "matched_pairs", "overlap_table", "pooled_scores"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class MatchStats:
    """Counts and scores of a one-to-one IoU matching.

    Attributes
    ----------
    tp, fp, fn : int
        Matched pairs, unmatched predicted objects, unmatched true objects.
    precision, recall, f1 : float
        ``tp / (tp + fp)``, ``tp / (tp + fn)`` and their harmonic mean; 1.0 when
        both images are empty (nothing to find, nothing wrongly found).
    mean_matched_iou : float
        Mean IoU over the matched pairs; NaN when there are none.
    iou_threshold : float
        The threshold the matching used.
    """

    tp: int
    fp: int
    fn: int
    precision: float
    recall: float
    f1: float
    mean_matched_iou: float
    iou_threshold: float


def overlap_table(
    label_a: np.ndarray, label_b: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Sparse contingency table of two label images.

    Parameters
    ----------
    label_a, label_b : (...) int ndarray
        Label images of the same shape; 0 is background. Ids need not be
        consecutive.

    Returns
    -------
    pairs : (P, 2) int64 ndarray
        ``(id_a, id_b)`` of every pair of foreground objects sharing a pixel,
        sorted lexicographically.
    intersection : (P,) int64 ndarray
        Shared pixels of each pair.
    ids_a, ids_b : (Na,), (Nb,) int64 ndarray
        Sorted foreground ids present in each image (areas via :func:`np.unique`
        on the caller's side when needed).
    """
    a = np.asarray(label_a).ravel()
    b = np.asarray(label_b).ravel()
    if a.shape != b.shape:
        raise ValueError(f"label images differ in shape: {np.shape(label_a)} vs {np.shape(label_b)}")
    both = (a != 0) & (b != 0)
    # One combined key per shared pixel; np.unique on it is the sparse table.
    ids_a = np.unique(a[a != 0]).astype(np.int64)
    ids_b = np.unique(b[b != 0]).astype(np.int64)
    ia = np.searchsorted(ids_a, a[both])
    ib = np.searchsorted(ids_b, b[both])
    key, counts = np.unique(ia.astype(np.int64) * max(len(ids_b), 1) + ib, return_counts=True)
    pairs = np.stack([ids_a[key // max(len(ids_b), 1)], ids_b[key % max(len(ids_b), 1)]], axis=1)
    return pairs.reshape(-1, 2), counts.astype(np.int64), ids_a, ids_b


def match_labels(
    truth: np.ndarray, pred: np.ndarray, *, iou_threshold: float = 0.5
) -> MatchStats:
    """Match objects of two label images one-to-one by intersection over union.

    A pair can match when its IoU is at least `iou_threshold`. For thresholds
    above 0.5 every object has at most one such partner, so the matching is
    unique and computed without search; otherwise conflicts are resolved
    greedily by decreasing IoU (ties by lower truth id, then lower predicted
    id), which is deterministic and, at these thresholds, within a hair of the
    optimal (Hungarian) assignment.

    Parameters
    ----------
    truth, pred : (...) int ndarray
        Label images of the same shape; 0 is background, ids need not be
        consecutive.
    iou_threshold : float, optional
        Minimum IoU of a match, in (0, 1].

    Returns
    -------
    MatchStats
        Counts, precision, recall, F1 and mean IoU of the matched pairs.

    Examples
    --------
    >>> t = np.array([[1, 1, 0, 2, 2, 2]])
    >>> p = np.array([[3, 3, 0, 0, 0, 4]])
    >>> s = match_labels(t, p)
    >>> (s.tp, s.fp, s.fn)
    (1, 1, 1)
    """
    matched_t, _, iou, n_t, n_p = _match(truth, pred, iou_threshold)
    tp = int(len(matched_t))
    fp = n_p - tp
    fn = n_t - tp
    precision = tp / (tp + fp) if tp + fp else 1.0
    recall = tp / (tp + fn) if tp + fn else 1.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    mean_iou = float(iou.mean()) if tp else float("nan")
    return MatchStats(tp, fp, fn, precision, recall, f1, mean_iou, float(iou_threshold))


def matched_pairs(
    truth: np.ndarray, pred: np.ndarray, *, iou_threshold: float = 0.5
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The one-to-one matches :func:`match_labels` counts, as id pairs.

    Parameters
    ----------
    truth, pred : (...) int ndarray
        Label images of the same shape; 0 is background.
    iou_threshold : float, optional
        Minimum IoU of a match, in (0, 1].

    Returns
    -------
    truth_ids, pred_ids : (M,) int64 ndarray
        Matched ids, pair by pair.
    iou : (M,) float64 ndarray
        IoU of each pair.

    >>> matched_pairs(np.array([[1, 1, 0, 2, 2, 2]]), np.array([[3, 3, 0, 0, 0, 4]]))[:2]
    (array([1]), array([3]))
    """
    matched_t, matched_p, iou, _, _ = _match(truth, pred, iou_threshold)
    return matched_t, matched_p, iou


def _match(truth, pred, iou_threshold):
    """Matched truth ids, predicted ids, IoUs, and the object counts of both images."""
    if not 0.0 < iou_threshold <= 1.0:
        raise ValueError(f"iou_threshold must lie in (0, 1], got {iou_threshold}")
    pairs, inter, ids_t, ids_p = overlap_table(truth, pred)
    t = np.asarray(truth).ravel()
    p = np.asarray(pred).ravel()
    area_t = np.bincount(np.searchsorted(ids_t, t[t != 0]), minlength=len(ids_t))
    area_p = np.bincount(np.searchsorted(ids_p, p[p != 0]), minlength=len(ids_p))
    it = np.searchsorted(ids_t, pairs[:, 0])
    ip = np.searchsorted(ids_p, pairs[:, 1])
    iou = inter / (area_t[it] + area_p[ip] - inter)

    ok = iou >= iou_threshold
    it, ip, iou = it[ok], ip[ok], iou[ok]
    if iou_threshold <= 0.5 and (_has_repeats(it) or _has_repeats(ip)):
        keep = _greedy_unique(it, ip, iou)
        it, ip, iou = it[keep], ip[keep], iou[keep]
    return ids_t[it], ids_p[ip], iou, len(ids_t), len(ids_p)


def _has_repeats(idx: np.ndarray) -> bool:
    return len(np.unique(idx)) < len(idx)


def _greedy_unique(it: np.ndarray, ip: np.ndarray, iou: np.ndarray) -> np.ndarray:
    """Indices of a greedy one-to-one selection of candidate pairs.

    Loops over candidate pairs only (about one per object), never over pixels.
    """
    order = np.lexsort((ip, it, -iou))
    used_t: set[int] = set()
    used_p: set[int] = set()
    keep = []
    for k in order:
        a, b = int(it[k]), int(ip[k])
        if a in used_t or b in used_p:
            continue
        used_t.add(a)
        used_p.add(b)
        keep.append(k)
    return np.asarray(keep, dtype=np.int64)


def pooled_scores(
    truths: list[np.ndarray], preds: list[np.ndarray], *, iou_thresholds: tuple[float, ...] = (0.5,)
) -> dict[float, dict]:
    """Object-matching scores pooled over images.

    Parameters
    ----------
    truths, preds : list of (Y, X) int ndarray
        True and predicted label images, pairwise of equal shape.
    iou_thresholds : tuple of float

    Returns
    -------
    dict of iou_threshold -> {"tp", "fp", "fn", "precision", "recall", "f1", "mean_matched_iou"}
        Counts summed over images, scores from the sums; mean matched IoU
        weighted by matches (NaN without any).
    """
    out = {}
    for t in iou_thresholds:
        stats = [match_labels(y, p, iou_threshold=t) for y, p in zip(truths, preds)]
        tp, fp, fn = (int(sum(getattr(s, k) for s in stats)) for k in ("tp", "fp", "fn"))
        precision, recall = tp / max(tp + fp, 1), tp / max(tp + fn, 1)
        miou = sum(s.tp * s.mean_matched_iou for s in stats if s.tp) / tp if tp else float("nan")
        out[t] = {"tp": tp, "fp": fp, "fn": fn, "precision": precision, "recall": recall,
                  "f1": 2 * precision * recall / max(precision + recall, 1e-12), "mean_matched_iou": float(miou)}
    return out
