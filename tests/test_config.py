from pathlib import Path

import pytest

from tme_pipeline.config import default_config_path, load_config


def test_default_config_is_the_promis_panel():
    config = load_config()
    assert list(config.panel) == ["DAPI", "CD3", "CD8", "CD20", "CD21", "FOXP3", "PD-L1", "SATB2"]
    assert "CD274" in config.panel["PD-L1"].aliases
    assert config.panel["FOXP3"].compartment == "nuclear"
    assert config.timepoints == ("pre", "post")
    assert config.segmentation.method == "stardist"
    assert config.panel["CD8"].compartment == "perinuclear" and config.panel["PD-L1"].compartment == "membrane"
    assert config.cells.perinuclear_um == 1.0 and config.gating.within == {"PD-L1": "tumor"}
    assert config.segmentation.stardist.model == "stardist_fluo_real"


def test_packaged_default_is_the_repository_file():
    repo_default = Path(__file__).parents[1] / "configs" / "default.yaml"
    assert default_config_path().read_text() == repo_default.read_text()


def test_user_file_merges_over_defaults(tmp_path):
    path = tmp_path / "lab.yaml"
    path.write_text("segmentation:\n  tile_um: 256\nchannel_map:\n  Opal 520: CD8\n")
    config = load_config(path)
    assert config.segmentation.tile_um == 256
    assert config.segmentation.overlap_um == 40  # untouched default
    assert config.channel_map == {"Opal 520": "CD8"}
    assert "SATB2" in config.panel


def test_gating_within_is_replaced_whole_and_checked(tmp_path):
    path = tmp_path / "within.yaml"
    path.write_text("gating:\n  within: {}\n  min_quality: 0.4\n")
    config = load_config(path)
    assert config.gating.within == {} and config.gating.min_quality == 0.4
    for text, message in [
        ("gating:\n  within: {PD-L1: macrophage}\n", r"'macrophage', which is not a phenotype"),
        ("gating:\n  within: {CD8: tumor}\n", r"'CD8' takes part in the phenotype rules"),
        ("gating:\n  within: {Ki67: tumor}\n", r"'Ki67', which is not a panel marker"),
    ]:
        path.write_text(text)
        with pytest.raises(ValueError, match=rf"(?s)within\.yaml.*{message}"):
            load_config(path)


def test_unknown_key_names_key_and_file(tmp_path):
    path = tmp_path / "typo.yaml"
    path.write_text("segmentation:\n  tile_size: 256\n")
    with pytest.raises(ValueError, match=r"typo\.yaml.*\n.*segmentation\.tile_size: unknown key"):
        load_config(path)


def test_bad_value_names_key(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("segmentation:\n  tile_um: -5\n")
    with pytest.raises(ValueError, match=r"(?s)bad\.yaml.*segmentation\.tile_um"):
        load_config(path)


def test_channel_map_to_unknown_marker_refused(tmp_path):
    path = tmp_path / "map.yaml"
    path.write_text("channel_map:\n  Opal 690: CD68\n")
    with pytest.raises(ValueError, match=r"(?s)map\.yaml.*'CD68'.*not a panel marker"):
        load_config(path)


def test_invalid_yaml_and_missing_file(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("panel: [unclosed\n")
    with pytest.raises(ValueError, match=r"broken\.yaml: not valid YAML"):
        load_config(path)
    with pytest.raises(FileNotFoundError, match="nowhere.yaml"):
        load_config(tmp_path / "nowhere.yaml")


def test_yaml_is_loaded_safely(tmp_path):
    path = tmp_path / "evil.yaml"
    path.write_text("run: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(ValueError, match="not valid YAML"):
        load_config(path)


def test_reading_a_config_imports_no_analysis_libraries():
    """`tme segment` and every worker read the config: it must not pull pandas, scipy or anndata."""
    import subprocess
    import sys

    code = ("import sys; from tme_pipeline.config import load_config; load_config(); "
            "print(sorted(m for m in ('pandas', 'scipy', 'anndata', 'shapely', 'torch') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"


def test_config_sections_are_the_analysis_modules_own():
    """The moved sections are the very classes the analysis modules export."""
    from tme_pipeline import analysis, config, metrics, regions, report, tls

    assert config.TLSConfig is tls.TLSConfig and config.RegionsConfig is regions.RegionsConfig
    assert config.MetricsConfig is metrics.MetricsConfig and config.AnalysisConfig is analysis.AnalysisConfig
    assert config.ReportConfig is report.ReportConfig
    assert report.DEFAULT_KEY_METRICS == config.ReportConfig().key_metrics
