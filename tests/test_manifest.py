from pathlib import Path

import pytest

from tme_pipeline.io.manifest import read_manifest, slide_id_from_path


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "manifest.csv"
    path.write_text(text)
    return path


def test_relative_paths_extra_columns_and_pixel_size(tmp_path):
    path = _write(
        tmp_path,
        "patient_id,timepoint,slide,pixel_um,response\n"
        "P01,pre,slides/P01_pre.ome.tif,,responder\n"
        "P01,post,/data/P01_post.qptiff,0.4977,responder\n",
    )
    manifest = read_manifest(path)
    first, second = manifest.rows
    assert first.path == (tmp_path / "slides" / "P01_pre.ome.tif").resolve()
    assert first.slide_id == "P01_pre" and first.pixel_um is None
    assert second.path == Path("/data/P01_post.qptiff") and second.pixel_um == pytest.approx(0.4977)
    assert first.extra == {"response": "responder"}
    frame = manifest.to_frame()
    assert list(frame.index) == ["P01_pre", "P01_post"] and set(frame["response"]) == {"responder"}


def test_missing_column_refused(tmp_path):
    path = _write(tmp_path, "patient,timepoint,slide\nP1,pre,a.tif\n")
    with pytest.raises(ValueError, match=r"manifest\.csv: manifest lacks column\(s\) patient_id"):
        read_manifest(path)


def test_unknown_timepoint_names_line(tmp_path):
    path = _write(tmp_path, "patient_id,timepoint,slide\nP1,pre,a.tif\nP1,after,b.tif\n")
    with pytest.raises(ValueError, match=r"line 3: unknown timepoint 'after'"):
        read_manifest(path)


def test_duplicate_slide_id_names_both_lines(tmp_path):
    path = _write(tmp_path, "patient_id,timepoint,slide\nP1,pre,x/a.tif\nP2,pre,y/a.ome.tif\n")
    with pytest.raises(ValueError, match=r"line 3: duplicate slide id 'a' \(first on line 2\)"):
        read_manifest(path)


def test_bad_pixel_size_and_empty_value(tmp_path):
    path = _write(tmp_path, "patient_id,timepoint,slide,pixel_um\nP1,pre,a.tif,-1\n")
    with pytest.raises(ValueError, match=r"line 2: pixel_um must be a positive number"):
        read_manifest(path)
    path = _write(tmp_path, "patient_id,timepoint,slide\n,pre,a.tif\n")
    with pytest.raises(ValueError, match=r"line 2: empty 'patient_id'"):
        read_manifest(path)


def test_custom_timepoints_and_missing_manifest(tmp_path):
    path = _write(tmp_path, "patient_id,timepoint,slide\nP1,baseline,a.tif\n")
    assert read_manifest(path, timepoints=("baseline", "week6")).rows[0].timepoint == "baseline"
    with pytest.raises(FileNotFoundError, match="nope.csv"):
        read_manifest(tmp_path / "nope.csv")


def test_slide_id_from_path():
    assert slide_id_from_path("a/P01_pre.ome.tiff") == "P01_pre"
    assert slide_id_from_path("P01.qptiff") == "P01"
    assert slide_id_from_path("P01.ome.zarr") == "P01"
