import functools
import json

import dask.array as da
import numpy as np
import pytest

from blobs import make_nuclei
from tme_pipeline.cells import expand_nuclei_tiled
from tme_pipeline.io.labels import LABEL_NAMES, create_labels_zarr, write_label_pyramid, write_overview_image
from tme_pipeline.segment.classic import segment_nuclei_classic
from tme_pipeline.tiling import segment_tiled, tile_grid

ome_zarr = pytest.importorskip("ome_zarr")
from ome_zarr.io import parse_url  # noqa: E402
from ome_zarr.reader import Reader  # noqa: E402

PIXEL_UM = 0.5


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    image, _ = make_nuclei((700, 900), pixel_um=PIXEL_UM, seed=2)
    grid = tile_grid(image.shape, pixel_um=PIXEL_UM, tile_um=128.0)
    path = tmp_path_factory.mktemp("labels") / "labels.ome.zarr"
    root = create_labels_zarr(path, shape_yx=image.shape, pixel_um=PIXEL_UM, chunk_px=grid.tile_px)
    segment = functools.partial(segment_nuclei_classic, pixel_um=PIXEL_UM, threshold=0.3)
    result = segment_tiled(da.from_array(image, chunks=256), segment, grid=grid,
                           store=root["labels/nuclei"], component="0")
    expand_nuclei_tiled(result.labels, grid=grid, pixel_um=PIXEL_UM, expand_um=3.0,
                        store=root["labels/cells"], component="0")
    write_label_pyramid(root, "nuclei", pixel_um=PIXEL_UM)
    write_label_pyramid(root, "cells", pixel_um=PIXEL_UM)
    overview = image.reshape(175, 4, 225, 4).mean(axis=(1, 3))
    write_overview_image(root, overview, pixel_um=4 * PIXEL_UM, channel_names=("DAPI",))
    return path, result


def _nodes(url):
    return {n.metadata.get("name"): n for n in Reader(parse_url(url))()}


def test_reader_finds_nuclei_with_all_levels_in_um(store):
    path, result = store
    nodes = _nodes(str(path))
    assert {"overview", "nuclei", "cells"} <= set(nodes)
    nuclei = nodes["nuclei"]
    assert [d.shape for d in nuclei.data] == [(700, 900), (350, 450), (175, 225)]
    scales = [t[0]["scale"] for t in nuclei.metadata["coordinateTransformations"]]
    assert scales == [[0.5, 0.5], [1.0, 1.0], [2.0, 2.0]]
    assert [a["unit"] for a in nuclei.metadata["axes"]] == ["micrometer"] * 2
    assert all(d.dtype == np.uint32 for d in nuclei.data)
    np.testing.assert_array_equal(nuclei.data[0].compute(), result.labels[:])
    # The overview covers the same µm extent as the labels.
    overview = nodes["overview"]
    assert overview.data[0].shape == (1, 175, 225)
    assert overview.metadata["coordinateTransformations"][0][0]["scale"] == [1.0, 2.0, 2.0]


def test_reader_finds_cells_grown_from_the_nuclei(store):
    path, result = store
    cells = _nodes(str(path))["cells"]
    assert [d.shape for d in cells.data] == [(700, 900), (350, 450), (175, 225)]
    assert cells.metadata["coordinateTransformations"][1][0]["scale"] == [1.0, 1.0]
    level0 = cells.data[0].compute()
    nuclei = np.asarray(result.labels[:])
    np.testing.assert_array_equal(level0[nuclei > 0], nuclei[nuclei > 0])
    assert set(np.unique(level0)) == set(np.unique(nuclei))
    assert (level0 > 0).sum() > 1.5 * (nuclei > 0).sum()


def test_labels_readable_on_their_own(store):
    path, _ = store
    assert {"nuclei", "cells"} <= set(_nodes(str(path / "labels")))


def test_ngff_metadata_on_disk(store):
    path, _ = store
    assert json.loads((path / "labels" / ".zattrs").read_text()) == {"labels": ["nuclei", "cells"]}
    attrs = json.loads((path / "labels" / "nuclei" / ".zattrs").read_text())
    assert attrs["image-label"]["version"] == "0.4"
    ms = attrs["multiscales"][0]
    assert ms["version"] == "0.4" and [a["type"] for a in ms["axes"]] == ["space", "space"]
    assert LABEL_NAMES == ("nuclei", "cells")
    for name in LABEL_NAMES:
        zarray = json.loads((path / "labels" / name / "0" / ".zarray").read_text())
        assert zarray["zarr_format"] == 2 and zarray["chunks"] == [256, 256]
        assert zarray["dimension_separator"] == "/"


def test_mode_downsampling_majority_ties_to_top_left(tmp_path):
    root = create_labels_zarr(tmp_path / "l.zarr", shape_yx=(5, 6), pixel_um=1.0, chunk_px=2)
    lab = np.array([
        [1, 1, 0, 2, 3, 3],
        [1, 0, 2, 2, 4, 4],
        [0, 0, 5, 0, 0, 0],
        [0, 0, 0, 0, 0, 6],
        [7, 7, 0, 8, 9, 0],
    ], dtype=np.uint32)
    root["labels/nuclei/0"][:] = lab
    write_label_pyramid(root, "nuclei", pixel_um=1.0, n_levels=2)
    expected = np.array([[1, 2, 3], [0, 0, 0], [7, 0, 9]], dtype=np.uint32)
    np.testing.assert_array_equal(root["labels/nuclei/1"][:], expected)


def test_validation(tmp_path):
    with pytest.raises(ValueError, match="positive"):
        create_labels_zarr(tmp_path / "x.zarr", shape_yx=(0, 5), pixel_um=0.5, chunk_px=4)
    with pytest.raises(ValueError, match="unique"):
        create_labels_zarr(tmp_path / "x.zarr", shape_yx=(5, 5), pixel_um=0.5, chunk_px=4,
                           names=("a", "a"))
    root = create_labels_zarr(tmp_path / "y.zarr", shape_yx=(5, 5), pixel_um=0.5, chunk_px=4)
    with pytest.raises(ValueError, match="one name per channel"):
        write_overview_image(root, np.zeros((2, 3, 3)), pixel_um=2.0, channel_names=("DAPI",))
