import numpy as np
import pytest
from shapely.geometry import Point, box

from tme_pipeline.io.slides import open_slide
from tme_pipeline.slide_plots import (DEFAULT_COLOURS, MATURITY_COLOURS, false_colour, plot_overview,
                                      plot_tls_closeups, read_window)
from tme_pipeline.synth import synth_slide


@pytest.fixture(scope="module")
def slide(tmp_path_factory):
    path = tmp_path_factory.mktemp("slide") / "S.ome.tif"
    synth_slide(path, size_mm=(0.6, 0.5), seed=5)
    return open_slide(path)


def _read(path):
    from matplotlib.image import imread

    return imread(path)[..., :3]


def _has_colour(rgb, colour, tol=0.06):
    target = np.asarray(colour, float) / 255.0
    return bool((np.abs(rgb - target).max(axis=-1) < tol).any())


# ---- false_colour ----------------------------------------------------------------------

def test_false_colour_maps_percentiles_to_black_and_the_tint():
    rng = np.random.default_rng(0)
    image = rng.uniform(0, 100, size=(3, 40, 50))
    tint = (0.2, 0.5, 0.9)
    rgb = false_colour(image, ["A", "B", "C"], {"B": tint}, percentiles=(5.0, 95.0))
    assert rgb.shape == (40, 50, 3) and rgb.dtype == np.float32
    lo, hi = np.percentile(image[1], [5.0, 95.0])
    top, bottom = image[1] >= hi, image[1] <= lo
    np.testing.assert_allclose(rgb[top], np.broadcast_to(tint, rgb[top].shape), atol=1e-6)
    assert np.all(rgb[bottom] == 0)
    mid = (image[1] > lo) & (image[1] < hi)
    expected = (image[1][mid] - lo) / (hi - lo)
    np.testing.assert_allclose(rgb[mid][:, 2], 0.9 * expected, atol=1e-6)
    # channels A and C are not in colours: changing them changes nothing
    image2 = image.copy()
    image2[[0, 2]] = 1e6
    np.testing.assert_array_equal(false_colour(image2, ["A", "B", "C"], {"B": tint}, percentiles=(5.0, 95.0)), rgb)


def test_false_colour_adds_channels_and_clips():
    image = np.ones((2, 4, 4))
    image[:, :2] = 0.0  # top half low, bottom half high in both channels
    rgb = false_colour(image, ["R", "G"], {"R": (1, 0.6, 0), "G": (0, 0.6, 1)}, percentiles=(0, 100))
    np.testing.assert_allclose(rgb[2:], np.broadcast_to([1.0, 1.0, 1.0], (2, 4, 3)))  # 0.6 + 0.6 clipped to 1
    assert np.all(rgb[:2] == 0)


def test_false_colour_flat_channel_is_black_and_limits_override():
    image = np.stack([np.full((5, 5), 7.0), np.arange(25.0).reshape(5, 5)])
    rgb = false_colour(image, ["flat", "ramp"], {"flat": (1, 1, 1)})
    assert np.all(rgb == 0) and np.all(np.isfinite(rgb))
    rgb = false_colour(image, ["flat", "ramp"], {"ramp": (0, 1, 0)}, limits={"ramp": (0.0, 50.0)})
    np.testing.assert_allclose(rgb[..., 1], np.arange(25.0).reshape(5, 5) / 50.0, rtol=1e-6)


def test_false_colour_rejects_bad_input():
    image = np.zeros((2, 3, 3))
    with pytest.raises(ValueError, match="SATB2"):
        false_colour(image, ["DAPI", "CD3"], {"DAPI": (0, 0, 1), "SATB2": (0, 1, 1)})
    with pytest.raises(ValueError, match="shape"):
        false_colour(image, ["DAPI"], {"DAPI": (0, 0, 1)})
    with pytest.raises(ValueError, match="percentiles"):
        false_colour(image, ["DAPI", "CD3"], {"DAPI": (0, 0, 1)}, percentiles=(99.0, 1.0))
    with pytest.raises(ValueError, match="colour of 'DAPI'"):
        false_colour(image, ["DAPI", "CD3"], {"DAPI": (0, 0, 255)})


def test_maturity_colours_are_distinct_rgb_ints():
    assert {"aggregate", "primary", "secondary", "unstaged"} <= set(MATURITY_COLOURS)
    values = list(MATURITY_COLOURS.values())
    assert len(set(values)) == len(values)
    assert all(len(c) == 3 and all(isinstance(v, int) and 0 <= v <= 255 for v in c) for c in values)
    assert all(len(c) == 3 and all(0 <= v <= 1 for v in c) for c in DEFAULT_COLOURS.values())


# ---- read_window -----------------------------------------------------------------------

def test_read_window_reads_the_right_place_and_level(slide):
    assert slide.level_pixel_um(1) == pytest.approx(1.0)
    window, um = read_window(slide, 100.0, 60.0, 180.0, 120.0, target_um=1.0)
    assert um == pytest.approx(1.0) and window.dtype == np.float32
    assert window.shape == (slide.n_channels, 60, 80)
    # level 0 (0.5 µm) block-averaged 2 x 2 over the same µm window
    level0 = np.asarray(slide.levels[0][:, 120:240, 200:360], np.float64)
    averaged = level0.reshape(slide.n_channels, 60, 2, 80, 2).mean(axis=(2, 4))
    assert np.abs(window - averaged).max() <= 1.0  # the pyramid rounds its means to integers
    assert window.std() > 0
    # a finer target reads level 0 itself, exactly
    fine, um0 = read_window(slide, 100.0, 60.0, 180.0, 120.0, target_um=0.5)
    assert um0 == pytest.approx(0.5)
    np.testing.assert_array_equal(fine, level0.astype(np.float32))


def test_read_window_clips_to_the_slide_and_selects_channels(slide):
    height_um, width_um = (s * 1000 for s in slide.size_mm)
    window, um = read_window(slide, width_um - 30.0, -50.0, width_um + 100.0, 20.0, target_um=1.0, channels=[0, 3])
    assert window.shape == (2, 20, 30)
    full, _ = read_window(slide, width_um - 30.0, 0.0, width_um, 20.0, target_um=1.0)
    np.testing.assert_array_equal(window, full[[0, 3]])
    empty, _ = read_window(slide, width_um + 10, 0.0, width_um + 50, 10.0)
    assert empty.shape[2] == 0
    with pytest.raises(ValueError, match="x1 > x0"):
        read_window(slide, 50.0, 0.0, 40.0, 10.0)


# ---- plot_overview ---------------------------------------------------------------------

def _lowres(seed=1, shape=(3, 60, 80)):
    rng = np.random.default_rng(seed)
    return rng.gamma(2.0, 50.0, size=shape).astype(np.float32)


def test_plot_overview_with_nothing_but_tissue(tmp_path):
    image = _lowres()
    out = tmp_path / "qc" / "overview.png"
    result = plot_overview(image, 4.0, ["DAPI", "CD3", "CD20"], out, colours={"DAPI": (0, 0, 1), "CD3": (0, 1, 0)},
                           region_masks=None, grid_um=None, tls=[], title="S")
    assert result is None and out.exists()
    assert [p.name for p in out.parent.iterdir()] == ["overview.png"]
    rgb = _read(out)
    assert rgb.shape[1] == 1000 and 300 < rgb.shape[0] < 1300
    assert rgb.std() > 0.05
    assert not any(_has_colour(rgb, c, tol=0.02) for c in MATURITY_COLOURS.values() if c != (160, 160, 160))


def test_plot_overview_draws_regions_and_tls_in_maturity_colours(tmp_path):
    image = _lowres(shape=(3, 100, 120))  # 4 µm -> 0.48 x 0.40 mm
    grid = np.zeros((40, 48), bool)  # 10 µm grid
    tumor = grid.copy(); tumor[8:30, 10:35] = True
    margin = grid.copy(); margin[5:33, 7:38] = True; margin[11:27, 13:32] = False
    necrosis = grid.copy(); necrosis[15:22, 18:26] = True
    tls = [(1, "secondary", Point(420, 80).buffer(30)), (2, "primary", box(40, 300, 100, 360))]
    out = tmp_path / "overview.png"
    plot_overview(image, 4.0, ["DAPI", "CD3", "CD20"], out, colours={"DAPI": (0, 0, 1)},
                  region_masks={"tumor": tumor, "margin": margin, "necrosis": necrosis, "tissue": ~grid},
                  grid_um=10.0, tls=tls, title="S")
    rgb = _read(out)
    assert _has_colour(rgb, MATURITY_COLOURS["secondary"]) and _has_colour(rgb, MATURITY_COLOURS["primary"])
    assert not _has_colour(rgb, MATURITY_COLOURS["aggregate"], tol=0.02)
    with pytest.raises(ValueError, match="grid_um"):
        plot_overview(image, 4.0, ["DAPI", "CD3", "CD20"], out, colours={"DAPI": (0, 0, 1)},
                      region_masks={"tumor": tumor}, grid_um=None, tls=[], title="S")


# ---- plot_tls_closeups -----------------------------------------------------------------

def test_plot_tls_closeups_writes_one_png_per_tls(slide, tmp_path):
    names = list(slide.channel_names)
    colours = {k: v for k, v in DEFAULT_COLOURS.items() if k in names}
    tls = [(3, "secondary", Point(150, 120).buffer(40), {"n_B": 120, "n_T": 80, "fdc_fraction": 0.42}),
           (7, "aggregate", box(5, 5, 60, 50), {})]  # near the corner: the window is clipped
    paths = plot_tls_closeups(slide, tls, tmp_path / "tls", colours=colours, channel_names=names, pad_um=50.0)
    assert [p.name for p in paths] == ["tls_3.png", "tls_7.png"]
    for p in paths:
        rgb = _read(p)
        assert 300 < rgb.shape[0] < 1000 and 300 < rgb.shape[1] < 1000
        assert rgb.std() > 0.05
        assert p.stat().st_size < 1_500_000
    assert _has_colour(_read(paths[0]), MATURITY_COLOURS["secondary"])
    assert plot_tls_closeups(slide, [], tmp_path / "none", colours=colours, channel_names=names) == []


def test_plot_tls_closeups_rejects_a_colour_the_slide_lacks(slide, tmp_path):
    with pytest.raises(ValueError, match="Ki67"):
        plot_tls_closeups(slide, [], tmp_path, colours={"Ki67": (1, 1, 1)}, channel_names=list(slide.channel_names))


def test_plot_overview_keeps_a_marker_without_signal_dim(tmp_path):
    # Glass at 100 in the top rows, tissue at 110 +- noise below, and no positive pixel:
    # plain percentiles would stretch that background to full white.
    rng = np.random.default_rng(3)
    noise = np.full((1, 120, 160), 100.0)
    noise[:, 30:] = 110.0 + rng.normal(0, 3, size=(1, 90, 160))
    stained = noise.copy()
    stained[:, 30:][:, rng.random((90, 160)) < 0.5] = 1100.0  # half the tissue 10x brighter
    centre = []
    for name, image in (("noise", noise), ("stained", stained)):
        out = tmp_path / f"{name}.png"
        plot_overview(image.astype(np.float32), 4.0, ["CD21"], out, colours={"CD21": (1, 1, 1)},
                      region_masks=None, grid_um=None, tls=[], title=name)
        rgb = _read(out)
        h, w = rgb.shape[:2]
        centre.append(rgb[int(0.45 * h):int(0.7 * h), int(0.2 * w):int(0.6 * w)].mean())
    assert centre[0] < 0.2 < 0.35 < centre[1]


def test_plot_tls_closeups_rejects_a_tls_outside_the_slide(slide, tmp_path):
    names = list(slide.channel_names)
    far = Point(5000, 5000).buffer(30)
    with pytest.raises(ValueError, match="TLS 9 lies outside"):
        plot_tls_closeups(slide, [(9, "primary", far, {})], tmp_path, colours={"DAPI": (0, 0, 1)}, channel_names=names)
