import numpy as np
import pytest
from phenotype_fixtures import cell_types, make_cells

from tme_pipeline.config import GatingConfig, load_config
from tme_pipeline.phenotype import phenotype_cells
from tme_pipeline.qc_plots import plot_cd3_cd8, plot_gates


@pytest.fixture(scope="module")
def cells():
    types, truth = cell_types(2000, seed=21)
    cells, _ = make_cells(truth, seed=21)
    cells.X[:, list(cells.var_names).index("CD21")] = 0.0  # a 'none' gate must plot too
    # PD-L1 gated within tumour cells, as by default: its panel shows those cells
    phenotype_cells(cells, gating=GatingConfig(within={"PD-L1": "tumor"}), phenotypes=load_config().phenotypes,
                    slide_id="S")
    assert cells.uns["gates"]["PD-L1"]["population"] == "tumor"
    return cells


def _read(path):
    from matplotlib.image import imread

    return imread(path)[..., :3]


def test_plot_gates_writes_a_png_with_gate_lines(cells, tmp_path):
    out = plot_gates(cells, tmp_path / "qc" / "gates.png")
    assert out == tmp_path / "qc" / "gates.png" and out.stat().st_size > 0
    assert [p.name for p in out.parent.iterdir()] == ["gates.png"]  # no temporary left
    rgb = _read(out)
    assert rgb.shape[0] > 200 and rgb.shape[1] > 600
    assert len(np.unique(rgb.reshape(-1, 3), axis=0)) > 2
    gate_red = (rgb[..., 0] > 0.75) & (rgb[..., 1] < 0.3) & (rgb[..., 2] < 0.3)
    assert gate_red.mean(axis=0).max() > 0.25  # a red gate line spans a column of a panel row


def test_plot_cd3_cd8_writes_a_png(cells, tmp_path):
    out = plot_cd3_cd8(cells, tmp_path / "cd3_cd8.png")
    rgb = _read(out)
    assert len(np.unique(rgb.reshape(-1, 3), axis=0)) > 10  # several phenotype colours
    red = (rgb[..., 0] > 0.75) & (rgb[..., 1] < 0.3) & (rgb[..., 2] < 0.3)
    assert red.mean(axis=0).max() > 0.3  # the dashed CD3 gate: a red column (phenotypes avoid red)
    assert red.mean(axis=1).max() > 0.3  # the CD8 gate: a red row
    for profile in (red.mean(axis=0), red.mean(axis=1)):  # the dotted weak gates, fainter
        assert ((profile > 0.1) & (profile < 0.3)).any()


def test_plots_refuse_cells_without_gates(tmp_path):
    types, truth = cell_types(50, seed=22)
    bare, _ = make_cells(truth, seed=22)
    with pytest.raises(ValueError, match="phenotype_cells"):
        plot_gates(bare, tmp_path / "g.png")
    assert not (tmp_path / "g.png").exists()
