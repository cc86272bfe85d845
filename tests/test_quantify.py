import dask.array as da
import numpy as np
import pytest

from tme_pipeline.quantify import measure_objects


def _example():
    labels = np.zeros((6, 8), dtype=np.uint32)
    labels[0:2, 0:3] = 1  # 6 px, rows 0-1, cols 0-2
    labels[3:6, 5:8] = 7  # 9 px, rows 3-5, cols 5-7
    image = np.zeros((2, 6, 8), dtype=np.uint16)
    image[0][labels == 1] = 10
    image[0][labels == 7] = np.arange(9).reshape(3, 3).ravel() * 2  # mean 8
    image[1] = 100
    image[1, 0, 0] = 106  # object 1 mean = 101
    return labels, image


@pytest.mark.parametrize("chunks", [(6, 8), (2, 3), (4, 5)])
def test_hand_computed_means_and_centroids_any_chunking(chunks):
    labels, image = _example()
    adata = measure_objects(
        da.from_array(labels, chunks=chunks),
        da.from_array(image, chunks=(1, 3, 3)),
        pixel_um=0.5,
        markers={"CD8": 0, "DAPI": 1},
        channel_names=("Opal 520", "DAPI"),
    )
    assert list(adata.obs["cell_id"]) == [1, 7]
    assert list(adata.var_names) == ["CD8", "DAPI"]
    assert list(adata.var["channel"]) == ["Opal 520", "DAPI"]
    np.testing.assert_allclose(adata.X, [[10, 101], [8, 100]])
    np.testing.assert_allclose(adata.obs["area_um2"], [6 * 0.25, 9 * 0.25])
    # centroids (x, y) in µm: object 1 at (1, 0.5) px, object 7 at (6, 4) px
    np.testing.assert_allclose(adata.obsm["spatial"], [[0.5, 0.25], [3.0, 2.0]])
    assert adata.uns["spatial_unit"] == "um"


def test_empty_label_image_gives_empty_table():
    adata = measure_objects(
        da.zeros((5, 5), dtype=np.uint32, chunks=2),
        da.ones((1, 5, 5), chunks=2),
        pixel_um=1.0,
        markers={"DAPI": 0},
    )
    assert adata.n_obs == 0 and adata.n_vars == 1


def test_shape_mismatch_refused():
    with pytest.raises(ValueError, match="differ in shape"):
        measure_objects(da.zeros((5, 5), dtype=int), da.zeros((1, 5, 6)), pixel_um=1.0, markers={"DAPI": 0})
