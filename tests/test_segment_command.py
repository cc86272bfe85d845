import numpy as np
import pytest
import tifffile
from skimage.io import imsave

from blobs import make_nuclei
from slide_writers import write_ome_tiff
from tme_pipeline.cli import main
from tme_pipeline.config import load_config
from tme_pipeline.segment.metrics import match_labels
from tme_pipeline.segment_command import segment_file


@pytest.fixture(scope="module")
def nuclei():
    image, truth = make_nuclei((600, 700), seed=5)
    return image, truth


def _classic():
    config = load_config()
    return config.model_copy(
        update={"segmentation": config.segmentation.model_copy(update={"method": "classic"})}
    )


def test_png_needs_pixel_size_then_segments(tmp_path, nuclei):
    image, truth = nuclei
    png = tmp_path / "dapi.png"
    imsave(png, (image / image.max() * 255).astype(np.uint8), check_contrast=False)
    with pytest.raises(ValueError, match=r"dapi\.png: a PNG/JPEG records no pixel size"):
        segment_file(png, tmp_path / "x.tif", config=_classic())
    n = segment_file(png, tmp_path / "labels.tif", config=_classic(), pixel_um=0.5)
    labels = tifffile.imread(tmp_path / "labels.tif")
    assert labels.shape == truth.shape and labels.dtype == np.uint32 and labels.max() == n
    assert match_labels(truth, labels, iou_threshold=0.5).f1 >= 0.9
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no leftovers


def test_cli_segment_multichannel_slide_by_alias(tmp_path, nuclei, capsys):
    image, truth = nuclei
    data = np.stack([np.zeros_like(image), image])
    path = write_ome_tiff(tmp_path / "s.ome.tif", data, pixel_um=0.5, channel_names=["CD3", "Hoechst"])
    out = tmp_path / "s_nuclei.tif"
    assert main(["segment", str(path), "--out", str(out), "--method", "classic"]) == 0
    assert "nuclei ->" in capsys.readouterr().out
    with tifffile.TiffFile(out) as tif:
        assert tif.is_ome
        labels = tif.asarray()
    assert match_labels(truth, labels, iou_threshold=0.5).f1 >= 0.9
    assert main(["segment", str(path), "--out", str(out), "--channel", "SYTO13"]) == 2
    assert "no channel 'SYTO13'" in capsys.readouterr().err


def test_label_tiff_is_the_run_segment_stage_bit_for_bit(tmp_path, nuclei):
    """`tme segment` leaves out the pyramid and overview, never a pixel of the nuclei."""
    from tme_pipeline.io.slides import open_slide
    from tme_pipeline.results import SlideResults
    from tme_pipeline.stages import SlideInputs, segment_stage
    from tme_pipeline.tiling import tile_grid

    image, _ = nuclei
    path = write_ome_tiff(tmp_path / "s.ome.tif", image[None], pixel_um=0.5, channel_names=["DAPI"])
    config = _classic()
    # 256-px tiles: stitching across 3 x 3 tiles, and label TIFF bands (512 rows) that end mid-image.
    config = config.model_copy(update={"segmentation": config.segmentation.model_copy(update={"tile_um": 128.0})})
    n = segment_file(path, tmp_path / "labels.tif", config=config)
    with tifffile.TiffFile(tmp_path / "labels.tif") as tif:
        exported = tif.asarray()
        assert tif.is_ome and "PhysicalSizeX=\"0.5\"" in tif.ome_metadata
    slide = open_slide(path)
    seg = config.segmentation
    inputs = SlideInputs(slide=slide, slide_id="s", config=config, nuclear_channel=0,
                         grid=tile_grid(slide.shape_yx, pixel_um=0.5, tile_um=seg.tile_um, overlap_um=seg.overlap_um))
    assert inputs.grid.n_tiles == 9
    info = segment_stage(inputs, tmp_path / "run").info
    stage_labels = SlideResults("s", tmp_path / "run").labels("nuclei").compute()
    assert info["n_nuclei"] == n and exported.dtype == np.uint32
    np.testing.assert_array_equal(exported, stage_labels)
