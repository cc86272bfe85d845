import functools

import dask
import dask.array as da
import numpy as np
import pytest
import zarr
from skimage.measure import label as connected

from blobs import make_nuclei
from tme_pipeline.segment.classic import classic_threshold, segment_nuclei_classic
from tme_pipeline.segment.metrics import match_labels
from tme_pipeline.tiling import (WindowSource, box_slices, map_tiles, segment_tiled, tile_grid, window_box,
                                 window_source)

PIXEL_UM = 0.5


def test_grid_cores_partition_image_and_windows_are_clipped():
    shape = (1000, 700)
    g = tile_grid(shape, pixel_um=PIXEL_UM, tile_um=128.0, overlap_um=40.0)
    assert (g.tile_px, g.overlap_px, g.grid_shape, g.n_tiles) == (256, 80, (4, 3), 12)
    cover = np.zeros(shape, int)
    for t in g.tiles:
        cover[t.core_slices] += 1
        y0, x0, y1, x1 = t.core
        py0, px0, py1, px1 = t.padded
        assert (py0, px0) == (max(y0 - 80, 0), max(x0 - 80, 0))
        assert (py1, px1) == (min(y1 + 80, 1000), min(x1 + 80, 700))
    assert (cover == 1).all()
    assert [t.index for t in g.tiles] == list(range(12))
    # A core is covered by the windows of its 3x3 neighbourhood only.
    assert [t.index for t in g.tiles_touching(g.tiles[4].core)] == [0, 1, 2, 3, 4, 5, 6, 7, 8]
    assert [t.index for t in g.tiles_touching(g.tiles[0].core)] == [0, 1, 3, 4]


def test_overlap_must_hold_the_largest_object():
    with pytest.raises(ValueError, match="max_object_um"):
        tile_grid((100, 100), pixel_um=PIXEL_UM, overlap_um=10.0, max_object_um=20.0)
    with pytest.raises(ValueError, match="exceeds tile_um"):
        tile_grid((100, 100), pixel_um=PIXEL_UM, tile_um=20.0, overlap_um=40.0)


@pytest.fixture(scope="module")
def slide():
    image, truth = make_nuclei((1536, 1536), pixel_um=PIXEL_UM, seed=1)
    thr = classic_threshold(image.reshape(384, 4, 384, 4).mean(axis=(1, 3)))
    segment = functools.partial(segment_nuclei_classic, pixel_um=PIXEL_UM, threshold=thr)
    # File-like chunks that do not align with the tile grid.
    return da.from_array(image, chunks=(700, 700)), truth, segment


def _run(slide, tmp_path, name, tile_um, scheduler="threads"):
    image, _, segment = slide
    grid = tile_grid(image.shape, pixel_um=PIXEL_UM, tile_um=tile_um, overlap_um=40.0)
    with dask.config.set(scheduler=scheduler):
        result = segment_tiled(image, segment, grid=grid, store=tmp_path / f"{name}.zarr")
    return grid, result


@pytest.fixture(scope="module")
def runs(slide, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tiling")
    return {
        "one": _run(slide, tmp, "one", 768.0),
        "nine": _run(slide, tmp, "nine", 256.0),
        "nine_sync": _run(slide, tmp, "nine_sync", 256.0, scheduler="synchronous"),
    }


def test_nine_tiles_equal_one_tile(runs, slide):
    (g1, one), (g9, nine) = runs["one"], runs["nine"]
    assert (g1.n_tiles, g9.n_tiles) == (1, 9)
    a, b = one.labels[:], nine.labels[:]
    stats = match_labels(a, b, iou_threshold=0.5)
    assert stats.recall >= 0.995 and stats.precision >= 0.995, stats
    # No seam cuts objects: every stitched object is one piece matching an untiled one.
    assert connected(b, connectivity=1).max() == nine.n_objects
    assert match_labels(a, b, iou_threshold=0.9).tp >= 0.995 * one.n_objects
    # And the untiled run is the segmenter itself.
    image, truth, segment = slide
    assert match_labels(segment(image.compute()), a).mean_matched_iou == 1.0
    assert match_labels(truth, b).f1 > 0.9


def test_ids_unique_consecutive_and_centroids(runs):
    _, nine = runs["nine"]
    lab = nine.labels[:]
    assert nine.labels.dtype == np.uint32 and nine.labels.chunks == (512, 512)
    np.testing.assert_array_equal(np.unique(lab[lab > 0]), np.arange(1, nine.n_objects + 1))
    assert nine.centroids_yx_px.shape == (nine.n_objects, 2)
    ids = lab[tuple(np.round(nine.centroids_yx_px).astype(int).T)]
    assert (ids == np.arange(1, nine.n_objects + 1)).mean() > 0.95


def test_deterministic_across_runs_and_schedulers(runs, slide, tmp_path):
    _, again = _run(slide, tmp_path, "again", 256.0)
    ref = runs["nine"][1].labels[:]
    np.testing.assert_array_equal(again.labels[:], ref)
    np.testing.assert_array_equal(runs["nine_sync"][1].labels[:], ref)
    # Stash removed, only the outputs remain.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["again.zarr"]


def test_distributed_client_gives_same_labels(tmp_path):
    distributed = pytest.importorskip("distributed")
    image, _ = make_nuclei((600, 600), pixel_um=PIXEL_UM, seed=5)
    segment = functools.partial(segment_nuclei_classic, pixel_um=PIXEL_UM, threshold=0.3)
    grid = tile_grid(image.shape, pixel_um=PIXEL_UM, tile_um=128.0)
    x = da.from_array(image, chunks=(250, 250))
    with dask.config.set(scheduler="synchronous"):
        ref = segment_tiled(x, segment, grid=grid, store=tmp_path / "ref.zarr").labels[:]
    with distributed.Client(processes=False, n_workers=2, threads_per_worker=1,
                            dashboard_address=None):
        out = segment_tiled(x, segment, grid=grid, store=tmp_path / "dist.zarr")
    np.testing.assert_array_equal(out.labels[:], ref)


def _shifted_at_edges(window, *, threshold):
    """A segmenter that sees objects 2 px further left in windows of odd width.

    Edge-column windows of the grid below have odd widths, the middle column an
    even one, so objects near the seams are claimed by two tiles.
    """
    lab = connected(window > threshold).astype(np.int32)
    if window.shape[1] % 2:
        lab = np.concatenate([lab[:, 2:], np.zeros_like(lab[:, :2])], axis=1)
    return lab


def test_duplicates_from_disagreeing_tiles_are_dropped(tmp_path):
    # Discs centred 1 px right of the seam at x = 200: the left tile (shifted
    # view) and the middle tile both own them.
    shape = (400, 600)
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    image = np.zeros(shape, np.float32)
    centres = [(60, 201), (140, 201), (250, 398.5), (330, 100)]
    for cy, cx in centres:
        image[(yy - cy) ** 2 + (xx - cx) ** 2 <= 36] = 1.0
    grid = tile_grid(shape, pixel_um=PIXEL_UM, tile_um=100.0, overlap_um=30.5, max_object_um=20.0)
    assert [t.padded_shape[1] % 2 for t in grid.tiles[:3]] == [1, 0, 1]
    segment = functools.partial(_shifted_at_edges, threshold=0.5)
    out = segment_tiled(da.from_array(image, chunks=128), segment, grid=grid, store=tmp_path / "d.zarr")
    lab = out.labels[:]
    assert out.n_objects == len(centres)
    np.testing.assert_array_equal(np.unique(lab[lab > 0]), np.arange(1, len(centres) + 1))
    assert connected(lab, connectivity=1).max() == len(centres)
    # The lower (left) tile won: its disc, seen 2 px left (x 193..205), is kept.
    assert lab[60, 193] > 0 and lab[60, 206] == 0 and lab[140, 193] > 0


def test_rejects_shape_mismatch(tmp_path):
    grid = tile_grid((100, 100), pixel_um=PIXEL_UM)
    with pytest.raises(ValueError, match="does not match"):
        segment_tiled(da.zeros((50, 100)), np.zeros_like, grid=grid, store=tmp_path / "x.zarr")


def test_writes_into_existing_group_array(tmp_path):
    image = np.zeros((300, 300), np.float32)
    image[100:110, 100:110] = 1.0
    grid = tile_grid(image.shape, pixel_um=PIXEL_UM, tile_um=64.0)
    root = zarr.open_group(tmp_path / "l.zarr", mode="w", zarr_format=2)
    root.create_array("labels/nuclei/0", shape=image.shape, chunks=(64, 64), dtype="uint32", fill_value=0)
    seg = functools.partial(_shifted_at_edges, threshold=2.0)
    out = segment_tiled(da.from_array(image), seg, grid=grid, store=root["labels/nuclei"], component="0")
    assert out.labels.path == "labels/nuclei/0" and out.n_objects == 0
    segment = functools.partial(segment_nuclei_classic, pixel_um=PIXEL_UM, threshold=0.5)
    out = segment_tiled(da.from_array(image), segment, grid=grid, store=root["labels/nuclei"])
    assert out.n_objects == 1 and root["labels/nuclei/0"][105, 105] == 1


def _window_report(*args):
    *windows, tile, box = args
    return tile.index, box, [np.asarray(w) for w in windows]


def test_map_tiles_hands_each_tile_its_windows_of_every_array():
    grid = tile_grid((10, 13), pixel_um=1.0, tile_um=4, overlap_um=1, max_object_um=1)
    rng = np.random.default_rng(0)
    stack, plane = rng.random((2, 10, 13)), rng.integers(0, 9, (10, 13))
    arrays = [da.from_array(stack, chunks=(1, 3, 5)), da.from_array(plane, chunks=4)]
    tasks = map_tiles(_window_report, arrays, grid=grid, margin_px=2)
    assert len(tasks) == grid.n_tiles == 12
    for tile, (index, box, (w_stack, w_plane)) in zip(grid.tiles, dask.compute(*tasks)):
        y0, x0, y1, x1 = tile.core
        assert index == tile.index
        assert box == window_box(grid, tile, 2) == (max(y0 - 2, 0), max(x0 - 2, 0), min(y1 + 2, 10), min(x1 + 2, 13))
        np.testing.assert_array_equal(w_stack, stack[:, box[0]:box[2], box[1]:box[3]])
        np.testing.assert_array_equal(w_plane, plane[box_slices(box)])
    # The overlap as margin gives the tiles' padded windows.
    padded = dask.compute(*map_tiles(_window_report, arrays[1:], grid=grid, margin_px=grid.overlap_px))
    assert [box for _, box, _ in padded] == [t.padded for t in grid.tiles]


def test_map_tiles_reads_windows_inside_the_task():
    # No slide chunk is a task of the outer graph, where it would wait in memory for every
    # tile that shares it: each tile's graph is its one task.
    grid = tile_grid((12, 12), pixel_um=1.0, tile_um=4, overlap_um=2, max_object_um=1)
    image = da.ones((12, 12), chunks=3)
    tasks = map_tiles(_window_report, [image], grid=grid, margin_px=2)
    assert [len(dict(t.__dask_graph__())) for t in tasks] == [1] * grid.n_tiles
    assert len({t.key for t in tasks}) == grid.n_tiles and all(t.key.startswith("_window_report-") for t in tasks)


def test_map_tiles_refuses_an_array_off_the_grid():
    grid = tile_grid((12, 12), pixel_um=1.0, tile_um=4, overlap_um=2, max_object_um=1)
    with pytest.raises(ValueError, match=r"\(12, 11\).*grid's \(12, 12\)"):
        map_tiles(_window_report, [da.zeros((12, 11))], grid=grid, margin_px=0)
    with pytest.raises(ValueError, match="margin_px"):
        map_tiles(_window_report, [da.zeros((12, 12))], grid=grid, margin_px=-1)


def _tiff_level(tmp_path, data):
    from slide_writers import write_ome_tiff
    from tme_pipeline.io.slides import open_slide

    path = write_ome_tiff(tmp_path / "s.ome.tif", data, pixel_um=PIXEL_UM, channel_names=["a", "b", "c", "d"],
                          pyramid_levels=1, tile=32)
    return open_slide(path).levels[0]


@pytest.mark.parametrize("lead", [None, 2, -1, slice(1, 3), [3, 1, 2]])
def test_window_source_reads_the_windows_dask_reads(tmp_path, lead):
    data = np.random.default_rng(1).integers(0, 60000, (4, 150, 170)).astype(np.uint16)
    level = _tiff_level(tmp_path, data)
    store = zarr.create_array(zarr.storage.LocalStore(tmp_path / "z.zarr"), shape=data.shape, chunks=(1, 64, 64),
                              dtype=data.dtype)
    store[:] = data
    grid = tile_grid((150, 170), pixel_um=1.0, tile_um=64, overlap_um=6, max_object_um=6)
    expected = data if lead is None else data[lead]
    for array in (level, da.from_zarr(store), data):
        source = window_source(array, lead)
        assert isinstance(source, WindowSource) and source.shape == expected.shape and source.dtype == data.dtype
        tasks = map_tiles(_window_report, [source], grid=grid, margin_px=5)
        for _, box, (window,) in dask.compute(*tasks, scheduler="synchronous"):
            np.testing.assert_array_equal(window, expected[(Ellipsis, *box_slices(box))])


def test_window_source_is_one_read_of_the_file_per_window_and_pickles(tmp_path, monkeypatch):
    import pickle

    from tme_pipeline.io import _tiffread

    data = np.random.default_rng(2).integers(0, 9, (4, 96, 96)).astype(np.uint16)
    level = _tiff_level(tmp_path, data)
    reads = []
    original = _tiffread.TiffLevel.__getitem__
    monkeypatch.setattr(_tiffread.TiffLevel, "__getitem__", lambda self, key: reads.append(key) or original(self, key))
    source = pickle.loads(pickle.dumps(window_source(level, [0, 1, 3])))  # as a distributed worker gets it
    grid = tile_grid((96, 96), pixel_um=1.0, tile_um=40, overlap_um=4, max_object_um=4)
    results = dask.compute(*map_tiles(_window_report, [source], grid=grid, margin_px=8), scheduler="synchronous")
    assert len(reads) == grid.n_tiles == 9  # through dask: one read per dask chunk of each window
    for _, box, (window,) in results:
        np.testing.assert_array_equal(window, data[[0, 1, 3]][(Ellipsis, *box_slices(box))])


def test_window_source_leaves_computed_dask_arrays_to_dask():
    data = np.arange(2 * 20 * 20).reshape(2, 20, 20)
    derived = da.from_array(data, chunks=10) * 2  # no store holds these values
    assert not isinstance(window_source(derived), WindowSource)
    np.testing.assert_array_equal(window_source(derived, 1).compute(), data[1] * 2)
    with pytest.raises(IndexError, match="out of range"):
        window_source(data, [0, 2])
