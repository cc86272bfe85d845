"""Tests of tme_pipeline.io.slides: every format, laziness, pickling, and every refusal."""

from __future__ import annotations

import os
import pickle
import re
import subprocess
import sys
from pathlib import Path

import cloudpickle
import numpy as np
import pytest
import tifffile
import zarr

from slide_writers import level_data, write_ome_tiff, write_ome_zarr, write_plain_tiff, write_qptiff
from tme_pipeline.io import _tiffread
from tme_pipeline.io.slides import Slide, SlideError, open_slide

NAMES = ("DAPI", "CD3", "CD8")


def _data(shape=(3, 512, 384), seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 65535, shape, dtype=np.uint16)


def _msg(path: Path, *words: str) -> str:
    """A match pattern: the path first, then the problem's words in order."""
    return re.escape(str(path)) + "".join(".*" + re.escape(w) for w in words)


def _check(slide: Slide, data: np.ndarray, *, fmt: str, names, pixel_um: float, n_levels: int) -> None:
    assert isinstance(slide, Slide)
    assert slide.format == fmt
    assert slide.channel_names == tuple(names)
    assert slide.pixel_um == pytest.approx(pixel_um, rel=1e-9)
    assert slide.n_channels == data.shape[0]
    assert slide.shape_yx == data.shape[1:]
    assert len(slide.levels) == n_levels
    for k, level in enumerate(slide.levels):
        assert level.shape == level_data(data, k).shape
        assert level.dtype == data.dtype
    assert slide.downsamples == tuple(2.0**k for k in range(n_levels))
    assert slide.level_pixel_um(n_levels - 1) == pytest.approx(pixel_um * 2 ** (n_levels - 1))
    assert slide.size_mm == pytest.approx((data.shape[1] * pixel_um / 1000, data.shape[2] * pixel_um / 1000))
    np.testing.assert_array_equal(slide.levels[0].compute(), data)
    if n_levels > 1:
        np.testing.assert_array_equal(slide.levels[1].compute(), level_data(data, 1))


# --- OME-TIFF -----------------------------------------------------------------------------


@pytest.mark.parametrize("tile", [256, None])
def test_ome_tiff_pyramidal(tmp_path, tile):
    data = _data()
    path = write_ome_tiff(tmp_path / "s.ome.tif", data, pixel_um=0.5, channel_names=NAMES, tile=tile)
    slide = open_slide(path)
    _check(slide, data, fmt="ome-tiff", names=NAMES, pixel_um=0.5, n_levels=3)
    assert slide.channel_index("CD8") == 2
    with pytest.raises(SlideError, match=_msg(path, "no channel named 'PD1'", "DAPI")):
        slide.channel_index("PD1")


def test_ome_tiff_flat(tmp_path):
    data = _data((2, 300, 200))
    path = write_ome_tiff(tmp_path / "flat.ome.tiff", data, pixel_um=0.325, channel_names=["a", "b"], pyramid_levels=1)
    _check(open_slide(path), data, fmt="ome-tiff", names=["a", "b"], pixel_um=0.325, n_levels=1)


@pytest.mark.parametrize(("unit", "expected"), [("nm", 0.5), ("µm", 0.5), ("mm", 0.5), ("cm", 0.5), ("m", 0.5)])
def test_ome_tiff_units(tmp_path, unit, expected):
    data = _data((3, 128, 128))
    path = write_ome_tiff(tmp_path / "u.ome.tif", data, pixel_um=0.5, channel_names=NAMES, unit=unit, pyramid_levels=1)
    assert open_slide(path).pixel_um == pytest.approx(expected)


def test_ome_tiff_as_the_synthetic_generator_writes_it(tmp_path):
    data = _data((3, 1024, 1024))
    path = tmp_path / "synth.ome.tif"
    with tifffile.TiffWriter(path, ome=True, bigtiff=True) as tw:
        tw.write(
            data, subifds=2, tile=(256, 256), photometric="minisblack",
            metadata={"axes": "CYX", "Channel": {"Name": list(NAMES)}, "PhysicalSizeX": 0.5,
                      "PhysicalSizeXUnit": "µm", "PhysicalSizeY": 0.5, "PhysicalSizeYUnit": "µm"},
        )
        for k in (1, 2):
            tw.write(level_data(data, k), subfiletype=1, tile=(256, 256), photometric="minisblack")
    _check(open_slide(path), data, fmt="ome-tiff", names=NAMES, pixel_um=0.5, n_levels=3)


def test_format_is_detected_by_content_not_extension(tmp_path):
    data = _data((3, 128, 128))
    ome = write_ome_tiff(tmp_path / "really_ome.tif", data, pixel_um=0.5, channel_names=NAMES, pyramid_levels=1)
    qp = write_qptiff(tmp_path / "really_qptiff.tiff", data, pixel_um=0.5, channel_names=NAMES, pyramid_levels=1, tile=64)
    zr = write_ome_zarr(tmp_path / "folder_without_suffix", data, pixel_um=0.5, channel_names=NAMES)
    assert [open_slide(p).format for p in (ome, qp, zr)] == ["ome-tiff", "qptiff", "ome-zarr"]


# --- QPTIFF -------------------------------------------------------------------------------


def test_qptiff_layout_names_pixel_size(tmp_path):
    data = _data((3, 1024, 768))
    path = write_qptiff(
        tmp_path / "s.qptiff", data, pixel_um=0.4977, channel_names=["DAPI", "Opal 520", "Opal 570"],
        biomarkers=[None, "CD8", ""],
    )
    # Biomarker when non-empty, else Name; thumbnail, overview and label are not levels.
    slide = open_slide(path)
    _check(slide, data, fmt="qptiff", names=["DAPI", "CD8", "Opal 570"], pixel_um=0.4977, n_levels=3)
    assert tifffile.TiffFile(path).pages[0].resolutionunit == tifffile.RESUNIT.CENTIMETER


def test_qptiff_inch_resolution(tmp_path):
    data = _data((2, 256, 256))
    path = write_qptiff(tmp_path / "i.qptiff", data, pixel_um=0.25, channel_names=["DAPI", "FITC"],
                        pyramid_levels=2, resolution_unit="INCH")
    _check(open_slide(path), data, fmt="qptiff", names=["DAPI", "FITC"], pixel_um=0.25, n_levels=2)


# --- OME-Zarr -----------------------------------------------------------------------------


@pytest.mark.parametrize("zarr_format", [2, 3])
@pytest.mark.parametrize("axes", ["cyx", "czyx", "tczyx"])
def test_ome_zarr(tmp_path, zarr_format, axes):
    data = _data((3, 512, 320))
    path = write_ome_zarr(tmp_path / "s.ome.zarr", data, pixel_um=0.5, channel_names=NAMES,
                          zarr_format=zarr_format, axes=axes)
    _check(open_slide(path), data, fmt="ome-zarr", names=NAMES, pixel_um=0.5, n_levels=3)


@pytest.mark.parametrize(("zarr_format", "unit"), [(2, "nanometer"), (3, "nanometer"), (3, "millimeter")])
def test_ome_zarr_units(tmp_path, zarr_format, unit):
    data = _data((3, 128, 128))
    path = write_ome_zarr(tmp_path / "u.zarr", data, pixel_um=0.65, channel_names=NAMES,
                          zarr_format=zarr_format, unit=unit, pyramid_levels=1)
    assert open_slide(path).pixel_um == pytest.approx(0.65)


def test_ome_zarr_written_by_ome_zarr_py(tmp_path):
    writer = pytest.importorskip("ome_zarr.writer")
    data = _data((3, 256, 256))
    group = zarr.open_group(str(tmp_path / "o.zarr"), mode="w", zarr_format=2)
    writer.write_multiscale([data, level_data(data, 1)], group, axes="cyx", scale={"y": 0.5, "x": 0.5},
                            axes_units={"y": "micrometer", "x": "micrometer"})
    group.attrs["omero"] = {"channels": [{"label": n} for n in NAMES]}
    _check(open_slide(tmp_path / "o.zarr"), data, fmt="ome-zarr", names=NAMES, pixel_um=0.5, n_levels=2)


# --- plain TIFF ---------------------------------------------------------------------------


@pytest.mark.parametrize("unit", ["CENTIMETER", "INCH"])
def test_plain_tiff(tmp_path, unit):
    data = _data((4, 300, 200))
    path = write_plain_tiff(tmp_path / "p.tif", data, pixel_um=0.5, resolution_unit=unit)
    _check(open_slide(path), data, fmt="tiff", names=["C0", "C1", "C2", "C3"], pixel_um=0.5, n_levels=1)
    named = open_slide(path, channel_names=["DAPI", "CD3", "CD8", "PanCK"])
    assert named.channel_names == ("DAPI", "CD3", "CD8", "PanCK")


def test_plain_tiff_single_page(tmp_path):
    data = _data((1, 200, 100))
    path = write_plain_tiff(tmp_path / "one.tiff", data, pixel_um=1.0)
    slide = open_slide(path)
    _check(slide, data, fmt="tiff", names=["C0"], pixel_um=1.0, n_levels=1)
    np.testing.assert_array_equal(slide.levels[0][0, 10:20, 5:7].compute(), data[0, 10:20, 5:7])


def test_overrides_win(tmp_path):
    data = _data((3, 128, 128))
    path = write_ome_tiff(tmp_path / "o.ome.tif", data, pixel_um=0.5, channel_names=NAMES, pyramid_levels=1)
    slide = open_slide(path, pixel_um=0.25, channel_names=["a", "b", "c"])
    assert (slide.pixel_um, slide.channel_names) == (0.25, ("a", "b", "c"))


# --- laziness -----------------------------------------------------------------------------

BIG = (3, 2048, 2048)


@pytest.fixture(scope="module")
def big(tmp_path_factory):
    folder = tmp_path_factory.mktemp("big")
    data = _data(BIG, seed=1)
    files = {
        "ome-tiff": write_ome_tiff(folder / "b.ome.tif", data, pixel_um=0.5, channel_names=NAMES, pyramid_levels=2),
        "qptiff": write_qptiff(folder / "b.qptiff", data, pixel_um=0.5, channel_names=NAMES, pyramid_levels=2),
        "tiff": write_plain_tiff(folder / "b.tif", data, pixel_um=0.5, rowsperstrip=64),
        "ome-zarr": write_ome_zarr(folder / "b.zarr", data, pixel_um=0.5, channel_names=NAMES,
                                   pyramid_levels=2, zarr_format=3),
    }
    return data, files


@pytest.fixture
def count_reads(monkeypatch):
    """Count tile/strip reads of TIFF files and chunk reads of zarr stores."""
    reads = {"n": 0}
    tiff_read = tifffile.FileCache.read

    def counting_tiff_read(self, *args, **kwargs):
        reads["n"] += 1
        return tiff_read(self, *args, **kwargs)

    zarr_get = zarr.storage.LocalStore.get

    async def counting_zarr_get(self, key, *args, **kwargs):
        if not key.rsplit("/", 1)[-1] in ("zarr.json", ".zarray", ".zattrs", ".zgroup", ".zmetadata"):
            reads["n"] += 1
        return await zarr_get(self, key, *args, **kwargs)

    monkeypatch.setattr(tifffile.FileCache, "read", counting_tiff_read)
    monkeypatch.setattr(zarr.storage.LocalStore, "get", counting_zarr_get)
    _tiffread.clear_handle_cache()
    return reads


@pytest.mark.parametrize("fmt", ["ome-tiff", "qptiff", "ome-zarr"])
def test_window_reads_only_its_tiles(big, count_reads, fmt):
    data, files = big
    slide = open_slide(files[fmt])
    assert count_reads["n"] == 0, "open_slide read pixels"
    window = slide.levels[0][:, 300:812, 1000:1512]  # straddles tile edges: 3x3 tiles per channel
    np.testing.assert_array_equal(window.compute(), data[:, 300:812, 1000:1512])
    assert 0 < count_reads["n"] <= (512 // 256 + 1) ** 2 * data.shape[0] < 64 * data.shape[0]


def test_window_of_striped_tiff_reads_few_strips(big, count_reads):
    data, files = big
    slide = open_slide(files["tiff"])
    assert count_reads["n"] == 0
    np.testing.assert_array_equal(slide.levels[0][:, 300:812, 0:512].compute(), data[:, 300:812, 0:512])
    # 512 rows of 64-row strips straddling an edge: 9 strips per channel of 32.
    assert 0 < count_reads["n"] <= 9 * data.shape[0]


# --- pickling and handles -----------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["ome-tiff", "qptiff", "tiff", "ome-zarr"])
def test_levels_pickle_to_a_worker(big, fmt):
    _, files = big
    arr = open_slide(files[fmt]).levels[0][:, :64, :64]
    np.testing.assert_array_equal(cloudpickle.loads(cloudpickle.dumps(arr)).compute(), arr.compute())


def test_graph_computes_in_a_fresh_process(big, tmp_path):
    data, files = big
    arr = open_slide(files["qptiff"]).levels[1][:, :64, :64]
    (tmp_path / "graph.pkl").write_bytes(cloudpickle.dumps(arr))
    code = (
        "import pickle, sys, numpy as np; "
        f"a = pickle.load(open({str(tmp_path / 'graph.pkl')!r}, 'rb')); "
        f"np.save({str(tmp_path / 'out.npy')!r}, a.compute())"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parent)
    np.testing.assert_array_equal(np.load(tmp_path / "out.npy"), level_data(data, 1)[:, :64, :64])


def test_levels_compute_on_a_distributed_worker_process(big):
    distributed = pytest.importorskip("distributed")
    data, files = big
    with distributed.LocalCluster(n_workers=1, threads_per_worker=2, processes=True,
                                  dashboard_address=None) as cluster, distributed.Client(cluster) as client:
        for fmt, path in files.items():
            window = open_slide(path).levels[0][:, 1000:1100, 2000:2048]
            np.testing.assert_array_equal(client.compute(window).result(), data[:, 1000:1100, 2000:2048], err_msg=fmt)


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd")) if os.path.isdir("/proc/self/fd") else 0


def test_open_file_handles_stay_bounded(tmp_path):
    _tiffread.clear_handle_cache()
    fds_before = _open_fds()
    data = _data((1, 64, 64))
    n = _tiffread.MAX_OPEN_FILES + 8
    for i in range(n):
        slide = open_slide(write_plain_tiff(tmp_path / f"{i}.tif", data, pixel_um=1.0))
        slide.levels[0][:, :8, :8].compute()
        assert _tiffread.open_handles() <= _tiffread.MAX_OPEN_FILES
    assert _open_fds() - fds_before <= _tiffread.MAX_OPEN_FILES
    _tiffread.clear_handle_cache()
    assert _tiffread.open_handles() == 0
    assert _open_fds() <= fds_before
    # A closed handle is reopened on the next read.
    np.testing.assert_array_equal(slide.levels[0].compute(), data)


# --- refusals -----------------------------------------------------------------------------


def test_missing_file(tmp_path):
    path = tmp_path / "nope.ome.tif"
    with pytest.raises(FileNotFoundError, match=_msg(path, "does not exist")):
        open_slide(path)


def test_not_an_image(tmp_path):
    path = tmp_path / "notes.tif"
    path.write_text("patient 12, pre-treatment biopsy\n")
    with pytest.raises(SlideError, match=_msg(path, "not a TIFF image")):
        open_slide(path)


def test_folder_that_is_not_ome_zarr(tmp_path):
    with pytest.raises(SlideError, match=_msg(tmp_path, "not an OME-Zarr")):
        open_slide(tmp_path)


@pytest.mark.parametrize("fraction", [0.05, 0.5, 0.9, 0.999])
@pytest.mark.parametrize("writer", ["ome-tiff", "qptiff", "tiff"])
def test_truncated_file(tmp_path, fraction, writer):
    data = _data((3, 512, 512))
    whole = tmp_path / "whole.tif"
    if writer == "ome-tiff":
        write_ome_tiff(whole, data, pixel_um=0.5, channel_names=NAMES)
    elif writer == "qptiff":
        write_qptiff(whole, data, pixel_um=0.5, channel_names=NAMES)
    else:
        write_plain_tiff(whole, data, pixel_um=0.5, tile=128)
    raw = whole.read_bytes()
    path = tmp_path / "cut.tif"
    path.write_bytes(raw[: int(len(raw) * fraction)])
    # tifffile notices the damage while parsing, so the refusal comes at open time.
    with pytest.raises(SlideError, match=_msg(path, "truncated")):
        open_slide(path, pixel_um=0.5)


def test_damage_found_only_at_read_is_a_slide_error(tmp_path):
    path = tmp_path / "z.tif"
    tifffile.imwrite(path, _data((2, 512, 512)), tile=(128, 128), compression="zlib", photometric="minisblack",
                     resolution=(2e4, 2e4), resolutionunit="CENTIMETER", metadata=None)
    slide = open_slide(path)
    before = path.stat()
    # Scramble channel 1's compressed tiles in place (same size, same mtime):
    # only decoding can notice.
    page = tifffile.TiffFile(path).pages[1]
    raw = bytearray(path.read_bytes())
    for offset, count in zip(page.dataoffsets, page.databytecounts):
        raw[offset:offset + count] = b"\xff" * count
    path.write_bytes(bytes(raw))
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    _tiffread.clear_handle_cache()
    np.testing.assert_array_equal(slide.levels[0][0, :64, :64].compute().shape, (64, 64))
    with pytest.raises(SlideError, match=_msg(path, "cannot read pixels", "corrupted")):
        slide.levels[0][1, :64, :64].compute()


def test_file_changed_after_open(tmp_path):
    data = _data((2, 128, 128))
    path = write_plain_tiff(tmp_path / "p.tif", data, pixel_um=0.5)
    slide = open_slide(path)
    write_plain_tiff(path, data[:, :64], pixel_um=0.5)
    with pytest.raises(SlideError, match=_msg(path, "changed on disk")):
        slide.levels[0].compute()
    path.unlink()
    with pytest.raises(FileNotFoundError, match=_msg(path, "no longer exists")):
        slide.levels[0].compute()


def test_slide_error_pickles():
    error = pickle.loads(pickle.dumps(SlideError("x.tif", "bad pixels")))
    assert isinstance(error, ValueError)
    assert (str(error), error.path, error.problem) == ("x.tif: bad pixels", Path("x.tif"), "bad pixels")


@pytest.mark.parametrize(
    ("shape", "axes", "words"),
    [((2, 3, 64, 64), "ZCYX", ["Z stack", "expected a 2-D multichannel image"]),
     ((2, 3, 64, 64), "TCYX", ["T stack"])],
)
def test_ome_tiff_wrong_axes(tmp_path, shape, axes, words):
    path = tmp_path / "stack.ome.tif"
    tifffile.imwrite(path, np.zeros(shape, np.uint16), ome=True, photometric="minisblack",
                     metadata={"axes": axes, "PhysicalSizeX": 0.5, "PhysicalSizeY": 0.5})
    with pytest.raises(SlideError, match=_msg(path, *words)):
        open_slide(path)


def test_rgb_tiff_refused(tmp_path):
    path = tmp_path / "he.tif"
    tifffile.imwrite(path, np.zeros((64, 64, 3), np.uint8), photometric="rgb")
    with pytest.raises(SlideError, match=_msg(path, "RGB")):
        open_slide(path, pixel_um=0.5)


def test_one_dimensional_tiff_refused(tmp_path):
    path = tmp_path / "line.tif"
    tifffile.imwrite(path, np.zeros(64, np.uint16))
    with pytest.raises(SlideError, match=_msg(path, "expected a 2-D multichannel image")):
        open_slide(path, pixel_um=0.5)


@pytest.mark.parametrize(("axes", "shape", "words"),
                         [("czyx", (3, 4, 64, 64), ["non-singleton z axis", "size 4"]),
                          ("tcyx", (2, 3, 64, 64), ["non-singleton t axis"]),
                          ("zx", (3, 64), ["unsupported OME-Zarr axes"])])
def test_ome_zarr_wrong_axes(tmp_path, axes, shape, words):
    path = write_ome_zarr(tmp_path / "w.zarr", np.zeros(shape, np.uint8), pixel_um=0.5, channel_names=None,
                          axes=axes, pyramid_levels=1)
    with pytest.raises(SlideError, match=_msg(path, *words)):
        open_slide(path)


def test_duplicate_channel_names(tmp_path):
    data = _data((3, 64, 64))
    path = write_ome_tiff(tmp_path / "d.ome.tif", data, pixel_um=0.5, channel_names=["DAPI", "CD8", "CD8"],
                          pyramid_levels=1)
    with pytest.raises(SlideError, match=_msg(path, "duplicate channel names", "CD8")):
        open_slide(path)
    assert open_slide(path, channel_names=["DAPI", "CD8", "CD8b"]).channel_names[2] == "CD8b"
    with pytest.raises(SlideError, match=_msg(path, "duplicate channel names", "x")):
        open_slide(path, channel_names=["x", "x", "y"])


def test_channel_names_length_mismatch(tmp_path):
    path = write_plain_tiff(tmp_path / "p.tif", _data((3, 64, 64)), pixel_um=0.5)
    with pytest.raises(SlideError, match=_msg(path, "2 names", "3 channels")):
        open_slide(path, channel_names=["DAPI", "CD8"])


@pytest.mark.parametrize("fmt", ["ome-tiff", "qptiff", "tiff", "ome-zarr"])
def test_no_pixel_size(tmp_path, fmt):
    data = _data((3, 64, 64))
    writers = {
        "ome-tiff": lambda p: write_ome_tiff(p, data, pixel_um=None, channel_names=NAMES, pyramid_levels=1),
        "qptiff": lambda p: write_qptiff(p, data, pixel_um=None, channel_names=NAMES, pyramid_levels=1, tile=64),
        "tiff": lambda p: write_plain_tiff(p, data, pixel_um=None),
        "ome-zarr": lambda p: write_ome_zarr(p, data, pixel_um=None, channel_names=NAMES, pyramid_levels=1),
    }
    path = writers[fmt](tmp_path / ("s.zarr" if fmt == "ome-zarr" else "s.tif"))
    with pytest.raises(SlideError, match=_msg(path, "no pixel size", "pixel_um", "manifest", "--pixel-um")):
        open_slide(path)
    assert open_slide(path, pixel_um=0.5).pixel_um == 0.5


def test_bad_pixel_um_given(tmp_path):
    path = write_plain_tiff(tmp_path / "p.tif", _data((1, 64, 64)))
    with pytest.raises(SlideError, match=_msg(path, "pixel_um must be a positive")):
        open_slide(path, pixel_um=-1.0)


def test_non_square_pixels(tmp_path):
    data = _data((3, 64, 64))
    ome = write_ome_tiff(tmp_path / "n.ome.tif", data, pixel_um=0.5, pixel_um_y=0.6, channel_names=NAMES,
                         pyramid_levels=1)
    with pytest.raises(SlideError, match=_msg(ome, "non-square pixels", "0.5", "0.6")):
        open_slide(ome)
    plain = write_plain_tiff(tmp_path / "n.tif", data, pixel_um=0.5, pixel_um_y=0.52)
    with pytest.raises(SlideError, match=_msg(plain, "non-square pixels")):
        open_slide(plain)
    # Within 1 % counts as square.
    nearly = write_plain_tiff(tmp_path / "s.tif", data, pixel_um=0.5, pixel_um_y=0.502)
    assert open_slide(nearly).pixel_um == pytest.approx(0.5)
