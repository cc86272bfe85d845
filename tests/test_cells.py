"""Nuclei -> cells (tme_pipeline.cells): tiled growth equals skimage's expand_labels."""

import dask.array as da
import numpy as np
import pytest
import zarr
from scipy import ndimage as ndi
from skimage.segmentation import expand_labels

from blobs import make_nuclei
from tme_pipeline.cells import expand_nuclei_tiled
from tme_pipeline.synth import SlideCondition
from tme_pipeline.synth.cells import make_cells
from tme_pipeline.synth.layout import make_layout
from tme_pipeline.synth.raster import CellGeometry, rasterize
from tme_pipeline.tiling import tile_grid

PIXEL_UM = 0.5


def _grid(shape):
    # 110 px cores: the 330 x 310 blobs below make 3 x 3 tiles.
    return tile_grid(shape, pixel_um=PIXEL_UM, tile_um=55.0, overlap_um=20.0, max_object_um=16.0)


@pytest.fixture(scope="module")
def nuclei():
    # Dense, touching blobs: many pixels equidistant from two nuclei.
    return make_nuclei((330, 310), pixel_um=PIXEL_UM, density=1.5, seed=1)[1].astype(np.uint32)


@pytest.mark.parametrize("expand_um", [3.0, 2.3, 6.0])
def test_tiled_equals_untiled_expand_labels(nuclei, expand_um):
    grid = _grid(nuclei.shape)
    assert grid.grid_shape == (3, 3)
    cells = expand_nuclei_tiled(nuclei, grid=grid, pixel_um=PIXEL_UM, expand_um=expand_um,
                                store=zarr.group(), component="cells")
    np.testing.assert_array_equal(cells[:], expand_labels(nuclei, distance=expand_um / PIXEL_UM))


def test_cells_contain_their_nucleus_and_stay_within_reach(nuclei):
    expand_um = 3.0
    cells = expand_nuclei_tiled(da.from_array(nuclei, chunks=100), grid=_grid(nuclei.shape), pixel_um=PIXEL_UM,
                                expand_um=expand_um, store=zarr.group(), component="c")[:]
    assert cells.dtype == np.uint32
    np.testing.assert_array_equal(cells[nuclei > 0], nuclei[nuclei > 0])
    assert set(np.unique(cells)) == set(np.unique(nuclei))
    # Background within reach of some nucleus is covered; beyond it, not.
    reach = ndi.distance_transform_edt(nuclei == 0) * PIXEL_UM
    assert np.all((cells > 0) == (reach <= expand_um))
    # Every cell pixel is within expand_um of its own nucleus.
    for i, sl in enumerate(ndi.find_objects(cells), start=1):
        own = ndi.distance_transform_edt(nuclei[sl] != i) * PIXEL_UM
        assert own[cells[sl] == i].max() <= expand_um + 1e-9, i


def test_zero_growth_copies_nuclei_into_existing_array(nuclei):
    root = zarr.group()
    target = root.create_array("cells", shape=nuclei.shape, chunks=(55, 55), dtype="uint32", fill_value=7)
    out = expand_nuclei_tiled(nuclei, grid=_grid(nuclei.shape), pixel_um=PIXEL_UM, expand_um=0.0,
                              store=root, component="cells")
    assert out.chunks == target.chunks
    np.testing.assert_array_equal(out[:], nuclei)


def test_refuses_labels_of_another_shape(nuclei):
    with pytest.raises(ValueError, match="grid's shape"):
        expand_nuclei_tiled(nuclei[:-1], grid=_grid(nuclei.shape), pixel_um=PIXEL_UM, expand_um=3.0,
                            store=zarr.group(), component="c")


def test_growing_true_nuclei_approaches_true_cells():
    """Against the synthetic truth, whose cytoplasm widths vary (median ~1.4 µm).

    A fixed growth cannot reproduce every cell, so this checks a level: growing
    the true nuclei of seed 3 by 1.5 µm gave a mean IoU with the true cells of
    0.835 (seeds 4, 5: 0.75, 0.82) against 0.59 for no growth and 0.57 for a
    10x (px-for-µm) growth.
    """
    cond = SlideCondition()
    table = make_cells(make_layout((0.3, 0.3), condition=cond, seed=3), cond, seed=3)
    owner, v = rasterize(CellGeometry.from_table(table, PIXEL_UM), (0, 600, 0, 600))
    true_nuclei = np.where(v < 0, owner, 0).astype(np.uint32)
    ids = np.unique(true_nuclei)[1:]

    def mean_iou(expand_um):
        cells = expand_nuclei_tiled(true_nuclei, grid=tile_grid(owner.shape, pixel_um=PIXEL_UM, tile_um=100.0),
                                    pixel_um=PIXEL_UM, expand_um=expand_um, store=zarr.group(), component="c")[:]
        n = int(max(cells.max(), owner.max())) + 1
        inter = np.bincount(cells[cells == owner], minlength=n)
        union = np.bincount(cells.ravel(), minlength=n) + np.bincount(owner.ravel(), minlength=n) - inter
        return float(np.mean(inter[ids] / union[ids]))

    grown, bare = mean_iou(1.5), mean_iou(0.0)
    assert grown > 0.78
    assert grown - bare > 0.2
