import numpy as np

from slide_writers import write_ome_tiff
from tme_pipeline.cli import main


def test_info_describes_slide(tmp_path, capsys):
    data = np.zeros((3, 600, 800), dtype=np.uint16)
    path = write_ome_tiff(tmp_path / "s.ome.tif", data, pixel_um=0.5, channel_names=["DAPI", "PDL1", "Opal 690"])
    assert main(["info", str(path)]) == 0
    out = capsys.readouterr().out
    assert "ome-tiff" in out and "0.5 µm at level 0" in out
    assert "0.400 × 0.300 mm" in out  # width × height
    assert "800 × 600 px" in out and "400 × 300 px, 1 µm/px" in out
    assert "PDL1" in out and "-> PD-L1" in out and "(not in panel)" in out


def test_errors_are_one_clear_line(tmp_path, capsys):
    assert main(["info", str(tmp_path / "absent.ome.tif")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("tme info: error: ") and "absent.ome.tif" in err
    (tmp_path / "m.csv").write_text("patient_id,timepoint,slide\nP1,pre,a.tif\n")
    (tmp_path / "bad.yaml").write_text("segmentation: {tile_um: 0}\n")
    assert main(["run", str(tmp_path / "m.csv"), "--out", str(tmp_path / "o"), "--config", str(tmp_path / "bad.yaml")]) == 2
    err = capsys.readouterr().err
    assert "bad.yaml" in err and "segmentation.tile_um" in err
