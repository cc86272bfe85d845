import pytest

from tme_pipeline.config import MarkerSpec, load_config
from tme_pipeline.panel import match_panel, normalise_name


def test_aliases_match_ignoring_case_and_separators():
    config = load_config()
    names = ["DAPI", "cd3", "CD8a", "MS4A1", "CD21", "FoxP3", "CD274", "SATB2"]
    match = match_panel(names, config.panel, source="s.tif")
    assert match.channels == {
        "DAPI": 0, "CD3": 1, "CD8": 2, "CD20": 3, "CD21": 4, "FOXP3": 5, "PD-L1": 6, "SATB2": 7,
    }
    assert normalise_name("PD-L1") == normalise_name("pd_l1") == normalise_name("PDL1")


def test_explicit_channel_map_for_opal_names():
    panel = {"DAPI": MarkerSpec(aliases=("DAPI",)), "CD8": MarkerSpec(aliases=("CD8",))}
    match = match_panel(["DAPI", "Opal 520"], panel, channel_map={"Opal 520": "CD8"})
    assert match.channels == {"DAPI": 0, "CD8": 1}


def test_missing_marker_names_slide_and_marker():
    config = load_config()
    names = ["DAPI", "CD3", "CD8", "CD20", "CD21", "FOXP3", "PDL1"]
    with pytest.raises(ValueError, match=r"P07_post\.qptiff.*'SATB2' not found.*'PDL1'"):
        match_panel(names, config.panel, source="P07_post.qptiff")


def test_optional_marker_may_be_missing():
    panel = {"DAPI": MarkerSpec(), "CD21": MarkerSpec(optional=True)}
    match = match_panel(["DAPI"], panel)
    assert match.channels == {"DAPI": 0}
    assert match.missing_optional == ("CD21",)


def test_two_channels_for_one_marker_refused():
    panel = {"PD-L1": MarkerSpec(aliases=("PDL1", "CD274"))}
    with pytest.raises(ValueError, match=r"'PDL1', 'CD274' all match panel marker 'PD-L1'"):
        match_panel(["PDL1", "CD274"], panel, source="x")
