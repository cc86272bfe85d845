"""Tests of the slide styles (tme_pipeline.synth.style): the external-lab validation look."""

from __future__ import annotations

import json

import numpy as np
import pytest
import tifffile

from tme_pipeline.synth import SlideCondition, synth_slide
from tme_pipeline.synth.render import Acquisition
from tme_pipeline.synth.style import STYLES, SlideStyle, draw_style

SIZE = (0.4, 0.3)
COND = SlideCondition(min_tls=1, tls_per_mm2=4.0, maturity_p=(0.0, 0.5, 0.5), necrosis_fraction=0.2)


def test_default_style_draws_nothing():
    look, acq = draw_style("default", seed=7)
    assert look == SlideStyle() and acq == {}
    assert Acquisition.draw(seed=7, look=look, overrides=acq).to_dict() == Acquisition.draw(seed=7).to_dict()


@pytest.mark.parametrize("seed", range(20))
def test_external_lab_within_documented_priors(seed):
    look, o = draw_style("external_lab", seed=seed)
    assert 1.6 <= look.shape_scale <= 3.0 and 0.72 <= look.pack_factor <= 0.86
    assert 0.35 <= look.chromatin_amp <= 0.7 and 0.3 <= look.chromatin_um <= 0.9
    assert all(0.5 <= s <= 2.5 for s in look.af_scale) and 2.0 <= look.rbc_green_yellow <= 6.0
    assert 1.0 <= look.collagen_scale <= 3.0 and 1.0 <= look.debris_scale <= 3.0
    assert np.all((o["gain"] >= 0.7) & (o["gain"] <= 1.3)) and np.all((o["offset"] >= 80) & (o["offset"] <= 1200))
    assert np.all((o["spill_red"] >= 0.02) & (o["spill_red"] <= 0.12))
    assert np.all((o["spill_blue"] >= 0.005) & (o["spill_blue"] <= 0.05))
    assert 0.55 <= o["psf_sigma_um"] <= 1.2 and 1.0 <= o["shot_k"] <= 4.0 and 5.0 <= o["read_sd"] <= 25.0
    acq = Acquisition.draw(seed=seed, look=look, overrides=o)
    assert np.allclose(np.diag(acq.spill), 1.0) and np.count_nonzero(acq.spill) == 8 + 2 * 7
    look2, o2 = draw_style("external_lab", seed=seed)
    assert look2 == look and all(np.array_equal(o[k], o2[k]) for k in o)
    assert look != draw_style("external_lab", seed=seed + 1)[0]


def test_external_lab_priors_are_wider_than_default():
    """Across seeds the external look covers values the default never takes."""
    gains = np.concatenate([draw_style("external_lab", seed=s)[1]["gain"] for s in range(30)])
    default_gains = np.concatenate([Acquisition.draw(seed=s).gain for s in range(30)])
    assert gains.min() < 0.75 and gains.max() > 1.25
    assert np.mean(np.abs(np.log(gains))) > np.mean(np.abs(np.log(default_gains)))
    psf = [draw_style("external_lab", seed=s)[1]["psf_sigma_um"] for s in range(30)]
    assert max(psf) > 0.8 and min(psf) < 0.6


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("style")
    out = {}
    for name, style in (("d", "default"), ("e", "external_lab"), ("e2", "external_lab")):
        truth = synth_slide(root / f"{name}.ome.tif", size_mm=SIZE, seed=11, condition=COND, style=style,
                            truth_dir=root / name)
        out[name] = (tifffile.imread(root / f"{name}.ome.tif"), truth, root / name)
    return out


def test_external_lab_deterministic_and_recorded(pair):
    img, truth, folder = pair["e"]
    img2, truth2, _ = pair["e2"]
    assert np.array_equal(img, img2)
    assert truth.cells.equals(truth2.cells)
    meta = json.loads((folder / "truth.json").read_text())
    assert meta["style"]["name"] == "external_lab"
    assert meta["style"] == draw_style("external_lab", seed=11)[0].to_dict()
    assert meta["acquisition"]["stain_gain"] == draw_style("external_lab", seed=11)[1]["gain"].tolist()


def test_external_lab_changes_look_and_shapes(pair):
    img_d, truth_d, _ = pair["d"]
    img_e, truth_e, _ = pair["e"]
    assert img_d.shape == img_e.shape and not np.array_equal(img_d, img_e)
    look, o = draw_style("external_lab", seed=11)
    # The dark level follows the style's offsets: the 1st percentile sits near each offset.
    low = np.percentile(img_e.reshape(8, -1), 1, axis=1)
    assert np.all(np.abs(low - o["offset"]) < 0.15 * o["offset"] + 60)
    # Irregularity: harmonic amplitudes are scaled by the style.
    amp = lambda t: t.cells[["h2_amp", "h3_amp", "h4_amp"]].to_numpy().sum(axis=1).mean()  # noqa: E731
    assert amp(truth_e) / amp(truth_d) == pytest.approx(look.shape_scale, rel=0.15)


def test_unknown_style_raises(tmp_path):
    assert "external_lab" in STYLES
    with pytest.raises(ValueError, match="unknown style"):
        synth_slide(tmp_path / "x.ome.tif", size_mm=SIZE, style="lab3")
