import numpy as np
import pytest
from scipy import ndimage as ndi

from blobs import make_nuclei
from tme_pipeline.segment.classic import classic_threshold, segment_nuclei_classic
from tme_pipeline.segment.metrics import match_labels


@pytest.fixture(scope="module")
def nuclei():
    return make_nuclei((512, 512), pixel_um=0.5, seed=3)


def test_threshold_from_lowres_separates_nuclei(nuclei):
    image, truth = nuclei
    low = image.reshape(128, 4, 128, 4).mean(axis=(1, 3))
    thr = classic_threshold(low)
    assert np.median(image[truth == 0]) < thr < np.median(image[truth > 0])


def test_threshold_ignores_empty_padding(nuclei):
    image, _ = nuclei
    low = image.reshape(128, 4, 128, 4).mean(axis=(1, 3))
    padded = np.zeros((128, 1024), np.float32)
    padded[:, :128] = low
    assert classic_threshold(padded) == pytest.approx(classic_threshold(low), rel=0.1)


def test_constant_image():
    assert classic_threshold(np.full((8, 8), 3.0)) == 3.0
    lab = segment_nuclei_classic(np.full((32, 32), 3.0), 0.5, threshold=3.0)
    assert lab.dtype == np.int32 and lab.max() == 0
    assert segment_nuclei_classic(np.zeros((32, 32)), 0.5, threshold=0.1).max() == 0


def test_segments_touching_nuclei(nuclei):
    image, truth = nuclei
    thr = classic_threshold(image.reshape(128, 4, 128, 4).mean(axis=(1, 3)))
    lab = segment_nuclei_classic(image, 0.5, threshold=thr)
    assert lab.dtype == np.int32 and lab.shape == image.shape
    ids = np.unique(lab[lab > 0])
    np.testing.assert_array_equal(ids, np.arange(1, lab.max() + 1))
    stats = match_labels(truth, lab)
    assert stats.f1 > 0.9, stats


def test_two_touching_discs_are_split():
    yy, xx = np.mgrid[:64, :80]
    img = ((yy - 32) ** 2 + (xx - 28) ** 2 < 12**2) | ((yy - 32) ** 2 + (xx - 51) ** 2 < 12**2)
    lab = segment_nuclei_classic(img.astype(float), 0.5, threshold=0.5)
    assert lab.max() == 2
    assert lab[32, 28] != lab[32, 51]


def test_area_range_in_um2():
    img = np.zeros((80, 80))
    img[10:14, 10:14] = 1.0  # 16 px = 4 µm² at 0.5 µm/px: too small
    yy, xx = np.mgrid[:80, :80]
    img[(yy - 50) ** 2 + (xx - 50) ** 2 < 64] = 1.0  # ~50 µm²
    lab = segment_nuclei_classic(img, 0.5, threshold=0.5)
    assert lab.max() == 1 and lab[50, 50] == 1
    assert segment_nuclei_classic(img, 0.5, threshold=0.5, max_area_um2=20.0).max() == 0
    # The same object at a coarser pixel size keeps the same µm² area.
    coarse = ndi.zoom(img, 0.5, order=1)
    assert segment_nuclei_classic(coarse, 1.0, threshold=0.5).max() == 1


def test_validation():
    with pytest.raises(ValueError):
        segment_nuclei_classic(np.zeros((4, 4, 3)), 0.5, threshold=0.1)
    with pytest.raises(ValueError):
        segment_nuclei_classic(np.zeros((4, 4)), 0.0, threshold=0.1)
