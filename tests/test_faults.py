"""The fault suite: every bad input fails clearly, alone, and leaves nothing that looks complete.

A slide-level fault is recorded in ``run.json`` (status ``error``, the message naming the file
and the problem) while the other slides of the same batch finish; a manifest-, config- or
model-level fault stops ``tme run`` before any slide with exit status 2 and one clear line.
The runs use tiny slides, the classical segmenter and only the stages a case needs; the one
StarDist run is the glass slide, whose emptiness only a real nucleus model can show.
"""

from __future__ import annotations

import errno
import json
import logging
import re
import shutil
from pathlib import Path

import anndata
import numpy as np
import pytest
import tifffile

from blobs import make_nuclei
from slide_writers import write_ome_tiff, write_plain_tiff
from tme_pipeline.cli import main
from tme_pipeline.cohort import run_cohort
from tme_pipeline.io.manifest import read_manifest
from tme_pipeline.results import open_results
from tme_pipeline.segment.registry import model_folder
from tme_pipeline.stages import STAGES
from tme_pipeline.synth import synth_slide

NAMES = ["DAPI", "CD3", "CD8", "CD20", "CD21", "FOXP3", "PDL1", "SATB2"]
UP_TO_MEASURE = STAGES[:3]
UP_TO_REGIONS = STAGES[:6]
# The margin (3 mm) is wider than any slide here (<= 0.4 mm): it is clipped to the tissue.
CLASSIC = (
    "channel_names: [" + ", ".join(NAMES) + "]\n"
    "segmentation: {method: classic}\n"
    "regions: {margin_um: 3000, min_region_area_mm2: 0.01}\n"
)
# Intensity scale of the uint16 slides against the float image (0 .. ~1.2).
U16_GAIN, U8_GAIN = 4000.0, 200.0


def _image(seed: int = 3) -> np.ndarray:
    """(8, 256, 256) float32: blob nuclei in DAPI, CD8 bright on every nucleus, faint noise elsewhere."""
    dapi, truth = make_nuclei((256, 256), seed=seed)
    rng = np.random.default_rng(seed)
    others = rng.uniform(0.0, 0.05, size=(7, *dapi.shape)).astype(np.float32)
    others[1][truth > 0] += 0.4
    return np.concatenate([dapi[None], others])


def _scaled(data: np.ndarray, gain: float, dtype) -> np.ndarray:
    info = np.iinfo(dtype)
    return np.clip(np.rint(data * gain), info.min, info.max).astype(dtype)


def _ome(path: Path, data: np.ndarray, *, names=NAMES, pixel_um: float | None = 0.5) -> str:
    write_ome_tiff(path, data, pixel_um=pixel_um, channel_names=names, pyramid_levels=1, tile=None)
    return path.name


def _manifest(root: Path, slides: dict[str, str], name: str = "m.csv") -> Path:
    lines = ["patient_id,timepoint,slide,slide_id"]
    lines += [f"P_{slide_id},pre,{file},{slide_id}" for slide_id, file in slides.items()]
    (root / name).write_text("\n".join(lines) + "\n")
    return root / name


def _records(out: Path) -> dict[str, dict]:
    return {s["slide_id"]: s for s in json.loads((out / "run.json").read_text())["slides"]}


def _assert_complete(out: Path, slide_id: str, stages) -> None:
    """The slide finished: run.json says done, and every file its stages.json lists is there."""
    record = _records(out)[slide_id]
    assert record["status"] == "done" and record["error"] is None, record["error"]
    assert record["stages"]["ran"] == [s.name for s in stages]
    written = json.loads((out / "slides" / slide_id / "stages.json").read_text())["stages"]
    assert list(written) == [s.name for s in stages]
    for stage in written.values():
        for entry in stage["files"]:
            assert (out / "slides" / slide_id / entry["path"]).exists(), entry


def _assert_nothing_partial(out: Path) -> None:
    """No hidden partial folder; every slide folder there is has its stages.json."""
    slides = out / "slides"
    assert [p.name for p in slides.iterdir() if p.name.startswith(".")] == []
    for folder in slides.iterdir():
        assert (folder / "stages.json").is_file(), folder
    assert not list(out.glob(".*.tmp"))


# --- one batch of good and bad slides ---------------------------------------------------------


@pytest.fixture(scope="module")
def batch(tmp_path_factory):
    root = tmp_path_factory.mktemp("faults")
    data = _image()
    u16 = _scaled(data, U16_GAIN, np.uint16)
    slides = {
        "good": _ome(root / "good.ome.tif", u16),
        "float": _ome(root / "float.ome.tif", data),
        "uint8": _ome(root / "uint8.ome.tif", _scaled(data, U8_GAIN, np.uint8)),
        "missing": "missing.ome.tif",
        "garbage": "garbage.tif",
        "truncated": "truncated.ome.tif",
        "no_names": _ome(root / "no_names.ome.tif", u16, names=None),
        "dup_names": _ome(root / "dup_names.ome.tif", u16, names=["DAPI", "CD3", "CD3", *NAMES[3:]]),
        "no_cd8": _ome(root / "no_cd8.ome.tif", u16, names=["DAPI", "CD3", "Opal 570", *NAMES[3:]]),
        "no_pixel": _ome(root / "no_pixel.ome.tif", u16, pixel_um=None),
        "int64": "int64.tif",
        "complex": "complex.tif",
        "plain_2d": "plain_2d.tif",
        "ome_2d": _ome(root / "ome_2d.ome.tif", u16[:1], names=["DAPI"]),
        "rgb": "rgb.tif",
        "black": "black.ome.tif",
        "tumour": "tumour.ome.tif",
    }
    (root / "garbage.tif").write_text("patient 12, pre-treatment biopsy\n")
    whole = (root / "good.ome.tif").read_bytes()
    (root / "truncated.ome.tif").write_bytes(whole[: len(whole) // 2])
    # OME-XML holds no int64 or complex pixels: plain TIFFs, named by the config's channel_names.
    write_plain_tiff(root / "int64.tif", u16.astype(np.int64), pixel_um=0.5)
    write_plain_tiff(root / "complex.tif", u16.astype(np.complex64), pixel_um=0.5)
    write_plain_tiff(root / "plain_2d.tif", u16[:1], pixel_um=0.5)
    tifffile.imwrite(root / "rgb.tif", _scaled(data[:3].transpose(1, 2, 0), U8_GAIN, np.uint8), photometric="rgb",
                     resolution=(2e4, 2e4), resolutionunit="CENTIMETER")
    black = u16.copy()
    black[NAMES.index("CD8")] = 0
    _ome(root / "black.ome.tif", black)
    synth_slide(root / "tumour.ome.tif", size_mm=(0.4, 0.4), seed=3)
    _manifest(root, slides)
    (root / "c.yaml").write_text(CLASSIC)
    result = run_cohort(root / "m.csv", root / "out", config_path=root / "c.yaml", stages=UP_TO_REGIONS)
    return root, result


GOOD = ("good", "float", "uint8", "black", "tumour")

SLIDE_FAULTS = {
    "missing": r"missing\.ome\.tif: slide file does not exist",
    "garbage": r"garbage\.tif: not a TIFF image \(file does not start with a TIFF header\)",
    "truncated": r"truncated\.ome\.tif: file is truncated or corrupted",
    "no_names": r"no_names\.ome\.tif \(slide no_names\): panel marker\(s\) 'DAPI', .* not found among the slide's "
                r"channels \('C0', .*C0, C1, .* have no name in the slide's metadata",
    "dup_names": r"dup_names\.ome\.tif: duplicate channel names \['CD3'\] at channels \{'CD3': \[1, 2\]\}.*"
                 r"in the file's metadata",
    "no_cd8": r"no_cd8\.ome\.tif \(slide no_cd8\): panel marker\(s\) 'CD8' not found among the slide's channels "
              r"\('DAPI', 'CD3', 'Opal 570'.*channel_map",
    "no_pixel": r"no_pixel\.ome\.tif: no pixel size in the file's metadata; give it .* as pixel_um in the manifest",
    "int64": r"int64\.tif: pixel type int64 is not supported; expected integers of at most 32 bits",
    "complex": r"complex\.tif: pixel type complex64 is not supported",
    "plain_2d": r"plain_2d\.tif: channel_names gives 8 names but the slide has 1 channel "
                r"\(a single 2-D image, not a multichannel slide\)",
    "ome_2d": r"ome_2d\.ome\.tif \(slide ome_2d\): panel marker\(s\) 'CD3', .* \(the slide has a single channel: "
              r"a 2-D image, not a multiplex slide\)",
    "rgb": r"rgb\.tif: RGB or multi-sample pixels \(axes 'YXS'",
}


@pytest.mark.parametrize("slide_id", sorted(SLIDE_FAULTS))
def test_bad_slide_is_recorded_and_names_file_and_problem(batch, slide_id):
    root, _ = batch
    record = _records(root / "out")[slide_id]
    assert record["status"] == "error"
    assert re.search(SLIDE_FAULTS[slide_id], record["error"]), record["error"]
    assert not (root / "out" / "slides" / slide_id).exists()


def test_the_good_slides_of_the_batch_are_complete(batch):
    root, result = batch
    out = root / "out"
    run = json.loads((out / "run.json").read_text())
    assert run["status"] == "complete"
    assert {s.slide_id for s in result.slides if s.status == "error"} == set(SLIDE_FAULTS)
    for slide_id in GOOD:
        _assert_complete(out, slide_id, UP_TO_REGIONS)
    _assert_nothing_partial(out)
    assert sorted(p.name for p in (out / "slides").iterdir()) == sorted(GOOD)


def test_float_and_uint8_slides_run_in_their_own_units(batch):
    root, _ = batch
    runs = _records(root / "out")
    results = open_results(root / "out")
    n = {k: runs[k]["n_nuclei"] for k in ("good", "float", "uint8")}
    assert n["good"] > 40
    # the same image at three scales and depths: the same nuclei, give or take quantisation
    assert abs(n["float"] - n["good"]) <= 0.1 * n["good"] and abs(n["uint8"] - n["good"]) <= 0.1 * n["good"]
    gates = {k: runs[k]["info"]["phenotyping"]["gates"]["CD8"]["gate"] for k in n}
    # gates are in each slide's own intensity units, so they scale with the gain
    assert gates["float"] * U16_GAIN == pytest.approx(gates["good"], rel=0.15)
    assert gates["uint8"] * U16_GAIN / U8_GAIN == pytest.approx(gates["good"], rel=0.15)
    share = {k: results.slide(k).phenotyped().obs["CD8_pos"].mean() for k in n}
    assert share["good"] > 0.2
    assert share["float"] == pytest.approx(share["good"], abs=0.1)
    assert share["uint8"] == pytest.approx(share["good"], abs=0.1)


def test_all_black_channel_runs_with_the_marker_flagged(batch):
    root, _ = batch
    record = _records(root / "out")["black"]
    gate = record["info"]["phenotyping"]["gates"]["CD8"]
    assert gate["gate"] is None  # no gate on a channel without signal (NaN is written as null)
    stages = json.loads((root / "out" / "slides" / "black" / "stages.json").read_text())["stages"]
    assert any("'CD8'" in w and "empty or constant channel" in w for w in stages["phenotype"]["warnings"])
    cells = open_results(root / "out").slide("black").phenotyped()
    assert cells.n_obs == record["n_nuclei"] > 40
    assert not cells.obs["CD8_pos"].any()


def test_margin_wider_than_the_tissue_is_clipped_not_refused(batch):
    root, _ = batch
    regions = _records(root / "out")["tumour"]["info"]["regions"]
    areas = regions["areas_mm2"]
    assert areas["tumor"] > 0.01  # a bed the 3 mm margin could surround
    assert areas["margin"] <= areas["tissue"] + 1e-9
    assert areas["tissue"] == pytest.approx(areas["tumor_core"] + areas["margin"] + areas["stroma"], abs=1e-6)
    # the band covers the bed: no core left, and run.json says why
    assert areas["tumor_core"] == 0 and "tumor_core" in regions["absent"]


def test_one_timepoint_patient_is_accepted_with_a_warning(tmp_path, caplog):
    (tmp_path / "m.csv").write_text("patient_id,timepoint,slide\nA,pre,a.tif\nA,post,b.tif\nB,post,c.tif\n")
    with caplog.at_level(logging.WARNING, logger="tme_pipeline.io.manifest"):
        manifest = read_manifest(tmp_path / "m.csv")
    assert [r.slide_id for r in manifest.rows] == ["a", "b", "c"]
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1
    assert re.search(r"m\.csv: patient 'B' has no pre slide \(only post\)", warnings[0])
    caplog.clear()
    (tmp_path / "m.csv").write_text("patient_id,timepoint,slide\nA,post,b.tif\nB,post,c.tif\n")
    with caplog.at_level(logging.WARNING, logger="tme_pipeline.io.manifest"):
        read_manifest(tmp_path / "m.csv", timepoints=("post",))
    assert caplog.records == []  # one timepoint configured: nobody lacks a pair


# --- faults that stop the run before any slide (exit status 2) --------------------------------


@pytest.fixture
def one_slide(tmp_path):
    _ome(tmp_path / "good.ome.tif", _scaled(_image(), U16_GAIN, np.uint16))
    (tmp_path / "c.yaml").write_text(CLASSIC)
    return tmp_path


def _refused(root: Path, capsys, manifest: str = "m.csv", config: str = "c.yaml", out: Path | None = None) -> str:
    out = out or root / "out"
    code = main(["run", str(root / manifest), "--out", str(out), "--config", str(root / config)])
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("tme run: error: ")
    assert not (out / "run.json").exists() and not (out / "slides").exists()
    return err


MANIFEST_FAULTS = {
    "missing_column": ("patient_id,slide\nA,good.ome.tif\n",
                       r"m\.csv: manifest lacks column\(s\) timepoint \(required: patient_id, timepoint, slide"),
    "duplicate_slide": ("patient_id,timepoint,slide\nA,pre,good.ome.tif\nA,post,good.ome.tif\n",
                        r"m\.csv: line 3: duplicate slide id 'good' \(first on line 2\)"),
    "unknown_timepoint": ("patient_id,timepoint,slide\nA,during,good.ome.tif\n",
                          r"m\.csv: line 2: unknown timepoint 'during' \(expected one of pre, post\)"),
}


@pytest.mark.parametrize("case", sorted(MANIFEST_FAULTS))
def test_bad_manifest_stops_before_any_slide(one_slide, capsys, case):
    text, pattern = MANIFEST_FAULTS[case]
    (one_slide / "m.csv").write_text(text)
    assert re.search(pattern, _refused(one_slide, capsys))


CONFIG_FAULTS = {
    "negative_tile": ("segmentation: {method: classic, tile_um: -256}\n",
                      r"bad\.yaml: invalid configuration:\n  segmentation\.tile_um: Input should be greater than 0"),
    "overlap_wider_than_tile": ("segmentation: {method: classic, tile_um: 30, overlap_um: 40}\n",
                                r"bad\.yaml: segmentation: overlap_um=40\.0 \(\d+ px\) exceeds tile_um=30\.0"),
    "overlap_below_a_nucleus": ("segmentation: {method: classic, overlap_um: 5}\n",
                                r"bad\.yaml: segmentation: overlap_um=5\.0 is smaller than the largest object"),
    "negative_margin": ("regions: {margin_um: -250}\n",
                        r"bad\.yaml: invalid configuration:\n  regions\.margin_um: Input should be greater than 0"),
}


@pytest.mark.parametrize("case", sorted(CONFIG_FAULTS))
def test_bad_config_stops_before_any_slide(one_slide, capsys, case):
    text, pattern = CONFIG_FAULTS[case]
    _manifest(one_slide, {"good": "good.ome.tif"})
    (one_slide / "bad.yaml").write_text(text)
    assert re.search(pattern, _refused(one_slide, capsys, config="bad.yaml"))


class _Payload:
    """Any Python object: ``torch.load(weights_only=True)`` must refuse to unpickle it."""

    def __init__(self) -> None:
        self.note = "not a tensor"


def _model_copy(folder: Path) -> Path:
    shipped = model_folder("stardist_fluo_real")
    folder.mkdir()
    for name in ("config.json", "thresholds.json"):
        shutil.copy(shipped / name, folder / name)
    return folder


def _missing(folder: Path) -> None:
    (folder / "weights.pt").unlink(missing_ok=True)


def _corrupt(folder: Path) -> None:
    (folder / "weights.pt").write_bytes(np.random.default_rng(0).bytes(4096))


def _truncated(folder: Path) -> None:
    shipped = (model_folder("stardist_fluo_real") / "weights.pt").read_bytes()
    (folder / "weights.pt").write_bytes(shipped[: len(shipped) // 3])


def _pickle(folder: Path) -> None:
    import torch

    torch.save({"layers.prob.weight": _Payload()}, folder / "weights.pt")


WEIGHT_FAULTS = {
    "missing": (_missing, r"StarDist model folder .*/model has no weights file \(looked for weights\.safetensors, "
                          r"weights\.pt\)"),
    "corrupt": (_corrupt, r"model/weights\.pt: not a readable torch weights file"),
    "truncated": (_truncated, r"model/weights\.pt: not a readable torch weights file, corrupt or truncated"),
    "pickle": (_pickle, r"model/weights\.pt: not a plain state dict of tensors; it holds pickled Python objects, "
                        r"which are refused"),
}


@pytest.mark.parametrize("case", sorted(WEIGHT_FAULTS))
def test_bad_weights_stop_before_any_slide(one_slide, capsys, case):
    damage, pattern = WEIGHT_FAULTS[case]
    damage(_model_copy(one_slide / "model"))
    _manifest(one_slide, {"good": "good.ome.tif"})
    model = one_slide / "model"
    (one_slide / "bad.yaml").write_text(f"segmentation: {{method: stardist, stardist: {{model: {model}}}}}\n")
    assert re.search(pattern, _refused(one_slide, capsys, config="bad.yaml"))


def test_model_that_does_not_exist_stops_before_any_slide(one_slide, capsys):
    _manifest(one_slide, {"good": "good.ome.tif"})
    (one_slide / "bad.yaml").write_text("segmentation: {method: stardist, stardist: {model: no_such_model}}\n")
    assert re.search(r"nucleus model 'no_such_model' not found \(looked in: ",
                     _refused(one_slide, capsys, config="bad.yaml"))


def test_output_folder_that_cannot_be_created_stops_before_any_slide(one_slide, capsys):
    # We run as root, so chmod stops no write: a folder under /proc is one no one can create.
    _manifest(one_slide, {"good": "good.ome.tif"})
    out = Path("/proc/tme-faults/out")
    assert re.search(r"/proc/tme-faults/out: output folder cannot be written \(",
                     _refused(one_slide, capsys, out=out))


# --- writes that fail mid-run: a full disk, a refused write ------------------------------------


@pytest.fixture(scope="module")
def write_faults(tmp_path_factory):
    """Three slides; the disk fills while B is written, C's writes are refused, then run.json's last write fails."""
    root = tmp_path_factory.mktemp("writes")
    u16 = _scaled(_image(), U16_GAIN, np.uint16)
    slides = {k: _ome(root / f"{k}.ome.tif", u16) for k in ("A", "B", "C")}
    _manifest(root, slides)
    (root / "c.yaml").write_text(CLASSIC)
    write_h5ad = anndata.AnnData.write_h5ad
    write_text = Path.write_text

    def failing_h5ad(self, filename, *args, **kwargs):
        filename = Path(filename)
        if filename.parent.name == ".B.partial":
            # a full disk: part of the file is on disk, then write() fails; it names no file
            filename.write_bytes(b"\x89HDF\r\n\x1a\n" + bytes(1000))
            raise OSError(errno.ENOSPC, "No space left on device")
        if filename.parent.name == ".C.partial":
            raise PermissionError(errno.EACCES, "Permission denied", str(filename))
        return write_h5ad(self, filename, *args, **kwargs)

    def failing_text(self, text, *args, **kwargs):
        if self.name == ".run.json.tmp" and '"status": "complete"' in text:
            write_text(self, text[: len(text) // 2], *args, **kwargs)
            raise OSError(errno.ENOSPC, "No space left on device")
        return write_text(self, text, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(anndata.AnnData, "write_h5ad", failing_h5ad)
        patch.setattr(Path, "write_text", failing_text)
        with pytest.raises(OSError) as raised:
            run_cohort(root / "m.csv", root / "out", config_path=root / "c.yaml", stages=UP_TO_MEASURE)
    return root / "out", raised.value


def test_disk_full_while_writing_a_slide(write_faults):
    out, _ = write_faults
    record = _records(out)["B"]
    assert record["status"] == "error"
    assert re.search(r"OSError: \[Errno 28\] No space left on device \(slide folder .*/out/slides/B\) "
                     r"\[in stage measure\]", record["error"]), record["error"]
    assert not (out / "slides" / "B").exists()
    _assert_complete(out, "A", UP_TO_MEASURE)
    _assert_nothing_partial(out)


def test_refused_write_names_the_file(write_faults):
    # PermissionError raised by the patched h5ad writer (root ignores chmod, so a real refusal cannot be staged)
    out, _ = write_faults
    record = _records(out)["C"]
    assert record["status"] == "error"
    assert re.search(r"PermissionError: \[Errno 13\] Permission denied: '.*/out/slides/\.C\.partial/measured\.h5ad'",
                     record["error"]), record["error"]
    assert not (out / "slides" / "C").exists()
    _assert_complete(out, "A", UP_TO_MEASURE)


def test_disk_full_on_run_json_leaves_it_not_complete(write_faults):
    out, error = write_faults
    assert error.errno == errno.ENOSPC and error.filename == str(out / "run.json")
    assert re.search(r"cannot write run\.json: No space left on device", str(error))
    run = json.loads((out / "run.json").read_text())
    assert run["status"] == "running" and run["finished"] is None
    assert [s["status"] for s in run["slides"]] == ["done", "error", "error"]
    _assert_nothing_partial(out)


# --- a slide of glass, on the default (StarDist) path -----------------------------------------


def test_glass_slide_runs_with_empty_regions_and_reasons(tmp_path):
    rng = np.random.default_rng(5)
    glass = rng.normal(100.0, 5.0, size=(len(NAMES), 256, 256)).clip(0).astype(np.uint16)
    slides = {"glass": _ome(tmp_path / "glass.ome.tif", glass),
              "good": _ome(tmp_path / "good.ome.tif", _scaled(_image(), U16_GAIN, np.uint16))}
    _manifest(tmp_path, slides)
    (tmp_path / "c.yaml").write_text("segmentation: {stardist: {device: cpu}}\n")
    run_cohort(tmp_path / "m.csv", tmp_path / "out", config_path=tmp_path / "c.yaml", stages=UP_TO_REGIONS)
    out = tmp_path / "out"
    for slide_id in slides:
        _assert_complete(out, slide_id, UP_TO_REGIONS)
    record = _records(out)["glass"]
    assert record["n_nuclei"] == 0
    regions = record["info"]["regions"]
    assert regions["areas_mm2"]["tissue"] == 0 and regions["percent_necrosis"] is None
    assert "glass" in regions["absent"]["tissue"]
    assert record["info"]["tls"]["count"] == 0 and record["info"]["tls"]["reason"]
    assert _records(out)["good"]["n_nuclei"] > 40
