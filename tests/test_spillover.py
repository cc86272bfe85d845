"""Neighbour spillover correction (tme_pipeline.spillover): hand-computed cases, invariants, reference."""

import numpy as np
import pytest

from tme_pipeline.spillover import boundary_band, cell_contacts, correct_spillover

PIXEL_UM = 0.5


def test_three_cells_in_a_row_by_hand():
    # Columns: cell 1 = 0-1, cell 2 = 2-3, cell 3 = 4-5; two rows; no background.
    labels = np.repeat(np.array([[1, 1, 2, 2, 3, 3]]), 2, axis=0)
    image = np.repeat(np.array([[5.0, 8.0, 4.0, 6.0, 1.0, 0.0]]), 2, axis=0)
    r = correct_spillover(labels, image, boundary_px=1)
    # Borders: 1|2 and 2|3 are two pixel edges each; edges at the array's border do not count.
    assert r.contacts.label_a.tolist() == [1, 2] and r.contacts.label_b.tolist() == [2, 3]
    assert r.contacts.border_px.tolist() == [2, 2]
    assert r.contacts.perimeter_px.tolist() == [2, 4, 2]
    # Boundary pixels: column 1 (cell 1), columns 2-3 (cell 2), column 4 (cell 3).
    np.testing.assert_allclose(r.total[:, 0], [26, 20, 2])
    np.testing.assert_allclose(r.boundary[:, 0], [16, 20, 2])
    # 1: 26 + 16*2/2 - 20*2/4 = 32; 2: 20 + (20*2/4 - 16*2/2) + (20*2/4 - 2*2/2) = 22;
    # 3: 2 + 2*2/2 - 20*2/4 = -6. The total (48) is kept.
    np.testing.assert_allclose(r.corrected[:, 0], [32, 22, -6])
    np.testing.assert_allclose(r.corrected_mean[:, 0], [8, 5.5, -1.5])


def test_background_counts_in_the_perimeter():
    labels = np.zeros((3, 4), np.int32)
    labels[1, 1], labels[1, 2] = 1, 2
    image = np.zeros((3, 4))
    image[1, 1], image[1, 2] = 10.0, 2.0
    r = correct_spillover(labels, image, boundary_px=1)
    # Each cell: 3 edges to background and 1 to the other: a quarter of its boundary is exchanged.
    assert r.contacts.perimeter_px.tolist() == [4, 4] and r.contacts.border_px.tolist() == [1]
    np.testing.assert_allclose(r.corrected[:, 0], [10 + 10 / 4 - 2 / 4, 2 + 2 / 4 - 10 / 4])


def test_a_lone_cell_is_unchanged_and_an_empty_compartment_takes_no_part():
    labels = np.zeros((9, 9), np.int32)
    labels[1:4, 1:4] = 1
    labels[1:4, 4:7] = 2  # touches 1
    labels[6:8, 6:8] = 3  # alone
    rng = np.random.default_rng(0)
    image = rng.uniform(0, 100, (2, 9, 9))
    r = correct_spillover(labels, image, boundary_px=1.5)
    np.testing.assert_allclose(r.corrected[2], r.total[2])
    assert not np.allclose(r.corrected[:2], r.total[:2])
    compartment = np.where(labels == 2, 0, labels)  # cell 2 has no compartment pixels
    r = correct_spillover(labels, image, compartment_image=compartment, boundary_px=1.5)
    assert r.n_px[1] == 0
    np.testing.assert_allclose(r.corrected, r.total)
    assert np.isnan(r.corrected_mean[1]).all()


def _random_cells(seed, shape=(40, 48), n=25):
    from skimage.segmentation import expand_labels

    rng = np.random.default_rng(seed)
    seeds = np.zeros(shape, np.int32)
    seeds[rng.integers(0, shape[0], n), rng.integers(0, shape[1], n)] = np.arange(1, n + 1)
    labels = expand_labels(seeds, distance=5)
    return labels, rng.gamma(2.0, 50.0, (3, *shape))


@pytest.mark.parametrize("seed", [1, 2, 3])
@pytest.mark.parametrize("boundary_px", [1.0, 2.0, 3.0])
def test_total_is_conserved_and_correction_is_linear(seed, boundary_px):
    labels, image = _random_cells(seed)
    r = correct_spillover(labels, image, boundary_px=boundary_px)
    assert r.contacts.label_a.size > 0
    np.testing.assert_allclose(r.corrected.sum(axis=0), r.total.sum(axis=0), rtol=1e-12)
    # Each channel on its own, linearly: three times the image, three times the values.
    r3 = correct_spillover(labels, 3 * image[1], boundary_px=boundary_px)
    np.testing.assert_allclose(r3.corrected[:, 0], 3 * r.corrected[:, 1], rtol=1e-12)


def _reference(labels, image, boundary_px):
    """Pixel loops: contacts, band and exchange written out as REDSEA's pair sums."""
    h, w = labels.shape
    ids = sorted(int(v) for v in np.unique(labels) if v)
    perimeter = {i: 0 for i in ids}
    border = {}
    for y in range(h):
        for x in range(w):
            for yy, xx in ((y, x + 1), (y + 1, x)):
                if yy < h and xx < w and labels[y, x] != labels[yy, xx]:
                    a, b = int(labels[y, x]), int(labels[yy, xx])
                    for c in (a, b):
                        if c:
                            perimeter[c] += 1
                    if a and b:
                        key = (min(a, b), max(a, b))
                        border[key] = border.get(key, 0) + 1
    reach = max(int(np.ceil(boundary_px)), 1)
    radius2 = max(boundary_px, np.sqrt(2) + 1e-6) ** 2
    total = {i: 0.0 for i in ids}
    edge = {i: 0.0 for i in ids}
    for y in range(h):
        for x in range(w):
            lab = int(labels[y, x])
            if not lab:
                continue
            total[lab] += image[y, x]
            near = False
            for dy in range(-reach, reach + 1):
                for dx in range(-reach, reach + 1):
                    yy, xx = min(max(y + dy, 0), h - 1), min(max(x + dx, 0), w - 1)
                    if dy * dy + dx * dx < radius2 and labels[yy, xx] != lab:
                        near = True
            if near:
                edge[lab] += image[y, x]
    out = dict(total)
    for (a, b), length in border.items():
        give_a, give_b = edge[a] * length / perimeter[a], edge[b] * length / perimeter[b]
        out[a] += give_a - give_b
        out[b] += give_b - give_a
    return np.array([out[i] for i in ids]), border, perimeter


@pytest.mark.parametrize("boundary_px", [1.0, 2.5])
def test_matches_the_pixel_loop_reference(boundary_px):
    labels, image = _random_cells(7, shape=(24, 30), n=12)
    r = correct_spillover(labels, image[0], boundary_px=boundary_px)
    expected, border, perimeter = _reference(labels, image[0], boundary_px)
    np.testing.assert_allclose(r.corrected[:, 0], expected, rtol=1e-10)
    assert dict(zip(zip(r.contacts.label_a.tolist(), r.contacts.label_b.tolist()),
                    r.contacts.border_px.tolist())) == border
    assert r.contacts.perimeter_px.tolist() == [perimeter[i] for i in r.labels.tolist()]


def test_band_width():
    labels = np.zeros((1, 9), np.int32)
    labels[0, :] = 1
    labels[0, 4] = 2
    assert boundary_band(labels, 1).astype(int).tolist() == [[0, 0, 0, 1, 1, 1, 0, 0, 0]]
    assert boundary_band(labels, 2.5).astype(int).tolist() == [[0, 0, 1, 1, 1, 1, 1, 0, 0]]


def test_bad_input():
    with pytest.raises(ValueError, match="2-D integer"):
        cell_contacts(np.zeros((3, 3)))
    with pytest.raises(ValueError, match="matching"):
        correct_spillover(np.zeros((3, 3), int), np.zeros((2, 4, 4)))
    with pytest.raises(ValueError, match="boundary_px"):
        correct_spillover(np.zeros((3, 3), int), np.zeros((3, 3)), boundary_px=0)


# ----------------------------------------------------------------- inside measure_cells, tile by tile

@pytest.fixture(scope="module")
def crowded():
    """Dense touching cells over 3 x 3 tiles, 4 channels."""
    import zarr
    from blobs import make_nuclei

    from tme_pipeline.cells import expand_nuclei_tiled
    from tme_pipeline.tiling import tile_grid

    dapi, nuclei = make_nuclei((330, 310), pixel_um=PIXEL_UM, density=1.5, seed=1)
    nuclei = nuclei.astype(np.uint32)
    grid = tile_grid(nuclei.shape, pixel_um=PIXEL_UM, tile_um=55.0, overlap_um=20.0, max_object_um=16.0)
    cells = expand_nuclei_tiled(nuclei, grid=grid, pixel_um=PIXEL_UM, expand_um=3.0,
                                store=zarr.group(), component="cells")[:]
    rng = np.random.default_rng(0)
    image = np.concatenate([dapi[None], rng.gamma(2.0, 10.0, (3, *nuclei.shape)).astype(np.float32)])
    return nuclei, cells, image, grid


def test_measure_cells_applies_the_correction_tile_by_tile(crowded):
    import dask.array as da

    from tme_pipeline.quantify import measure_cells, perinuclear
    from tme_pipeline.tiling import tile_grid

    nuclei, cells, image, grid = crowded
    assert grid.grid_shape == (3, 3)
    args = {"markers": {"DAPI": 0, "CD3": 1, "CD8": 2, "PanCK": 3}, "pixel_um": PIXEL_UM, "nuclear_channel": 0,
            "compartments": {"DAPI": "nuclear", "CD3": "perinuclear", "CD8": "membrane", "PanCK": "cytoplasm"},
            "expand_um": 3.0, "membrane_um": 1.5, "perinuclear_um": 1.0}
    dimage = da.from_array(image, chunks=(1, 64, 64))
    plain = measure_cells(nuclei, cells, dimage, grid=grid, **args)
    fixed = measure_cells(nuclei, cells, dimage, grid=grid, neighbour_markers=("CD3", "CD8"),
                          neighbour_boundary_um=1.0, **args)
    one = tile_grid(nuclei.shape, pixel_um=PIXEL_UM, tile_um=200.0, overlap_um=20.0, max_object_um=16.0)
    assert one.grid_shape == (1, 1)
    whole = measure_cells(nuclei, cells, dimage, grid=one, neighbour_markers=("CD3", "CD8"),
                          neighbour_boundary_um=1.0, **args)
    np.testing.assert_allclose(fixed.X, whole.X, rtol=1e-6)  # the seams change nothing
    # Oracle: the correction on the whole image, in each marker's compartment.
    band = np.where((perinuclear(nuclei, 2.0) == cells) & (nuclei != cells), cells, 0)
    ref = correct_spillover(cells, image[1], compartment_image=band, boundary_px=2.0)
    pos = np.searchsorted(ref.labels, fixed.obs["cell_id"].to_numpy())
    seen = ref.n_px[pos] > 0
    np.testing.assert_allclose(fixed.X[seen, 1], ref.corrected_mean[pos[seen], 0], rtol=1e-5)
    np.testing.assert_array_equal(fixed.X[~seen, 1], plain.X[~seen, 1])  # no band: the membrane ring, as is
    assert not np.allclose(fixed.X[:, 2], plain.X[:, 2])
    np.testing.assert_array_equal(fixed.X[:, [0, 3]], plain.X[:, [0, 3]])  # markers not asked for
    np.testing.assert_array_equal(fixed.layers["cell"], plain.layers["cell"])
    # conserved: the band sums over all cells
    np.testing.assert_allclose((fixed.X[seen, 1] * ref.n_px[pos[seen]]).sum(), ref.total[:, 0].sum(), rtol=1e-5)
    assert fixed.uns["cells"]["neighbour_correction"] == {"markers": ["CD3", "CD8"], "boundary_um": 1.0}
    # a marker the slide lacks (an optional one) is left out; with none left, no correction
    absent = measure_cells(nuclei, cells, dimage, grid=grid, neighbour_markers=("CD20", "CD3"), **args)
    np.testing.assert_array_equal(absent.X[:, 1], fixed.X[:, 1])
    assert absent.uns["cells"]["neighbour_correction"]["markers"] == ["CD3"]
    none = measure_cells(nuclei, cells, dimage, grid=grid, neighbour_markers=("CD20",), **args)
    assert none.uns["cells"]["neighbour_correction"] is False
    with pytest.raises(ValueError, match="neighbour_boundary_um"):
        measure_cells(nuclei, cells, dimage, grid=grid, neighbour_markers=("CD3",), neighbour_boundary_um=5.0,
                      **args)
