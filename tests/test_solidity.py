"""convex_hull_px against skimage's convex_hull_image, object by object (the oracle)."""

import numpy as np
import pytest
from scipy import ndimage as ndi
from skimage.measure import regionprops
from skimage.morphology import convex_hull_image

from tme_pipeline.solidity import convex_hull_px


def _reference(labels: np.ndarray, k: int) -> np.ndarray:
    boxes = ndi.find_objects(labels, max_label=k)
    return np.array([0 if sl is None else convex_hull_image(labels[sl] == i + 1).sum() for i, sl in enumerate(boxes)])


def _blobs(seed: int, shape=(160, 200), n=60) -> np.ndarray:
    """Random touching non-convex objects: thresholded noise, labelled, some cut apart."""
    rng = np.random.default_rng(seed)
    field = ndi.gaussian_filter(rng.standard_normal(shape), 2.5)
    labels, _ = ndi.label(field > 0.05)
    labels[:, ::37] = 0  # straight cuts give objects flat sides, whose pixel centres lie on hull edges
    labels, count = ndi.label(labels > 0)
    return labels[:, :], min(count, n * 10)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_equals_convex_hull_image_on_random_objects(seed):
    labels, k = _blobs(seed)
    assert k > 20
    np.testing.assert_array_equal(convex_hull_px(labels, k), _reference(labels, k))


def test_small_and_degenerate_objects():
    labels = np.zeros((12, 14), np.int32)
    labels[1, 1] = 1  # one pixel
    labels[3, 2:9] = 2  # a row
    labels[5:11, 1] = 3  # a column
    labels[6, 4] = labels[7, 5] = labels[8, 6] = 4  # a diagonal, not 4-connected
    labels[6:11, 9:13] = 5  # a rectangle
    labels[10, 12] = 0
    ours = convex_hull_px(labels, 6)  # label 6 absent
    np.testing.assert_array_equal(ours[:5], _reference(labels, 5))
    assert ours[5] == 0
    assert ours[0] == 1 and ours[1] == 7 and ours[2] == 6


def test_solidity_as_regionprops():
    labels, k = _blobs(5)
    area = np.bincount(labels.ravel(), minlength=k + 1)[1:]
    ours = area / convex_hull_px(labels, k)
    expected = np.array([r.solidity for r in regionprops(labels)])
    np.testing.assert_array_equal(ours, expected)


def test_labels_above_n_ignored_and_bad_input():
    labels = np.array([[1, 1, 0, 2], [1, 0, 0, 2]])
    # the 3-px L's hull cuts its 2 x 2 box's fourth centre off (x + y = 1.5 < 2); label 2 not counted
    assert convex_hull_px(labels, 1).tolist() == [3]
    with pytest.raises(ValueError, match="2-D integer"):
        convex_hull_px(labels.astype(float), 2)
