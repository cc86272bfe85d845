"""StarDist inside the pipeline: tiles agree with the whole image, provenance records the model."""

import dask.array as da
import numpy as np
import pytest
import tifffile
import zarr

from tme_pipeline.cohort import run_cohort
from tme_pipeline.config import load_config
from tme_pipeline.results import open_results
from tme_pipeline.segment.metrics import match_labels
from tme_pipeline.segment.registry import model_folder
from tme_pipeline.segment.weights import load_model
from tme_pipeline.stages import segmentation_function
from tme_pipeline.synth import synth_slide
from tme_pipeline.tiling import segment_tiled, tile_grid


def _stardist_config(**segmentation):
    config = load_config()
    return config.model_copy(
        update={"segmentation": config.segmentation.model_copy(update={"method": "stardist", **segmentation})}
    )


@pytest.fixture(scope="module")
def slide(tmp_path_factory):
    path = tmp_path_factory.mktemp("sd") / "S.ome.tif"
    synth_slide(path, size_mm=(0.5, 0.45), seed=31)
    return path


def test_tiles_give_the_same_nuclei_as_one_piece(slide, tmp_path):
    with tifffile.TiffFile(slide) as tif:
        dapi = tif.series[0].levels[0].asarray()[0]
        lowres = tif.series[0].levels[-1].asarray()[0].astype(np.float32)
    config = _stardist_config(tile_um=128.0)
    segment = segmentation_function(config, pixel_um=0.5, nuclear_lowres=lowres)
    whole = segment(dapi)
    grid = tile_grid(dapi.shape, pixel_um=0.5, tile_um=128.0, overlap_um=40.0)
    assert grid.n_tiles >= 9
    result = segment_tiled(
        da.from_array(dapi, chunks=512), segment, grid=grid, store=zarr.open_group(str(tmp_path / "l.zarr"), mode="w")
    )
    tiled = np.asarray(result.labels[:])
    assert whole.max() > 200
    stats = match_labels(whole, tiled, iou_threshold=0.9)
    assert stats.recall >= 0.995 and stats.precision >= 0.995


def test_run_records_model_hash(slide, tmp_path):
    (tmp_path / "m.csv").write_text(f"patient_id,timepoint,slide\nP,pre,{slide}\n")
    (tmp_path / "c.yaml").write_text("segmentation: {method: stardist}\n")
    result = run_cohort(tmp_path / "m.csv", tmp_path / "out", config_path=tmp_path / "c.yaml")
    assert [s.status for s in result.slides] == ["done"]
    run = open_results(tmp_path / "out").run
    shipped = load_model(model_folder("stardist_fluo_real"))
    assert run["models"]["stardist"]["sha256"] == shipped.sha256
    assert run["config"]["segmentation"]["method"] == "stardist"
    assert result.slides[0].n_nuclei > 200
