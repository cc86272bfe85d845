import numpy as np
import pytest

from tme_pipeline.segment.metrics import match_labels, matched_pairs, overlap_table


def test_perfect_match_with_other_ids():
    t = np.array([[1, 1, 0, 2], [1, 1, 0, 2]])
    p = np.array([[7, 7, 0, 3], [7, 7, 0, 3]])
    s = match_labels(t, p)
    assert (s.tp, s.fp, s.fn) == (2, 0, 0)
    assert s.f1 == 1.0 and s.mean_matched_iou == 1.0


def test_known_ious_and_threshold():
    # truth 1: 4 px; pred 5 covers 3 of them + 1 more -> IoU 3/5 = 0.6
    t = np.array([[1, 1, 1, 1, 0, 0]])
    p = np.array([[0, 5, 5, 5, 5, 0]])
    assert match_labels(t, p, iou_threshold=0.5).tp == 1
    assert match_labels(t, p, iou_threshold=0.5).mean_matched_iou == pytest.approx(0.6)
    s = match_labels(t, p, iou_threshold=0.7)
    assert (s.tp, s.fp, s.fn) == (0, 1, 1)
    assert s.precision == 0.0 and s.recall == 0.0 and s.f1 == 0.0


def test_split_and_merge_count_once():
    # truth 1 split into two predictions of 3 and 1 px: only the big one matches.
    t = np.array([[1, 1, 1, 1, 0, 2, 2]])
    p = np.array([[3, 3, 3, 4, 0, 6, 6]])
    s = match_labels(t, p)
    assert (s.tp, s.fp, s.fn) == (2, 1, 0)
    assert s.precision == pytest.approx(2 / 3) and s.recall == 1.0
    assert s.f1 == pytest.approx(0.8)


def test_low_threshold_is_one_to_one():
    # truth 1 overlaps pred 3 (IoU 0.5) and pred 4 (IoU 0.25); at 0.2 both qualify.
    t = np.array([[1, 1, 1, 1, 2, 2]])
    p = np.array([[3, 3, 4, 0, 4, 4]])
    s = match_labels(t, p, iou_threshold=0.2)
    assert (s.tp, s.fp, s.fn) == (2, 0, 0)


def test_empty_images():
    z = np.zeros((3, 3), int)
    s = match_labels(z, z)
    assert (s.tp, s.fp, s.fn, s.f1) == (0, 0, 0, 1.0)
    s = match_labels(z, np.eye(3, dtype=int))
    assert (s.tp, s.fp, s.fn) == (0, 1, 0)


def test_overlap_table_and_validation():
    t = np.array([[1, 1, 2], [0, 2, 2]])
    p = np.array([[5, 0, 5], [5, 5, 0]])
    pairs, inter, ids_t, ids_p = overlap_table(t, p)
    assert pairs.tolist() == [[1, 5], [2, 5]] and inter.tolist() == [1, 2]
    assert ids_t.tolist() == [1, 2] and ids_p.tolist() == [5]
    with pytest.raises(ValueError):
        match_labels(t, p[:, :2])
    with pytest.raises(ValueError):
        match_labels(t, p, iou_threshold=0.0)


def test_matched_pairs_are_the_matches_match_labels_counts():
    truth = np.zeros((20, 30), np.int32)
    truth[2:8, 2:8] = 5
    truth[10:18, 10:18] = 7
    truth[2:6, 20:28] = 9
    pred = np.zeros_like(truth)
    pred[2:8, 3:8] = 1  # IoU 30/36 with 5
    pred[10:14, 10:18] = 2  # IoU 0.5 with 7
    pred[12:19, 22:29] = 3  # overlaps nothing
    t_ids, p_ids, iou = matched_pairs(truth, pred, iou_threshold=0.5)
    assert t_ids.tolist() == [5, 7] and p_ids.tolist() == [1, 2]
    np.testing.assert_allclose(iou, [30 / 36, 0.5])
    assert match_labels(truth, pred, iou_threshold=0.5).tp == len(t_ids)
    t_ids, p_ids, _ = matched_pairs(truth, pred, iou_threshold=0.6)
    assert t_ids.tolist() == [5] and p_ids.tolist() == [1]
