"""The planted pre->post CD8 effect of the synthetic generator (``SlideCondition.cd8_factor``).

What a planted factor must mean for the trial's endpoint: the CD8 T-cell density of the
tumour bed and of its invasive margin (and so of tumour + margin), measured as the metrics
define them (bed = the tumour compartment, margin = tissue within 250 µm of the bed's border
on both sides, necrosis out of area and counts; ``scripts/eval_metrics.truth_densities``),
is the factor times what the same slide would hold without it, on a biopsy as on a
resection. Same seed, factor 1 against factor 2: the layout is the same, the cell draws are
not, so counts are pooled over several seeds to keep the Poisson noise (a few %) well inside
the tolerance.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from scipy import ndimage as ndi

from tme_pipeline.synth import SlideCondition
from tme_pipeline.synth.cells import effect_pieces, make_cells
from tme_pipeline.synth.condition import CD8_EFFECT_BAND_UM
from tme_pipeline.synth.layout import Layout, make_layout

MARGIN_UM = 250.0  # the pipeline's regions.margin_um default
# (timepoint of the condition, slide size in mm, seeds pooled): a 2 x 1.5 mm biopsy, a 3 x 2 mm resection.
# A biopsy's bed holds few CD8 T cells and T-cell clusters straddling its border make the
# counts lumpy: 40 biopsies pool ~1500 of them (16 pooled gave a bed ratio 1.77 for a planted 2).
SAMPLES = {"biopsy": ("pre", (2.0, 1.5), range(300, 340)), "resection": ("post", (3.0, 2.0), range(200, 206))}


def _measured_regions(layout: Layout) -> dict[str, np.ndarray]:
    """Viable bed, margin, tumour + margin, core and outer stroma, as the metrics define them."""
    m = layout.masks
    tissue, bed = m["tissue"], layout.tumor_comp & m["tissue"]
    other = tissue & ~bed
    d_in = ndi.distance_transform_edt(~other) * layout.coarse_um
    d_out = ndi.distance_transform_edt(~bed) * layout.coarse_um
    margin = tissue & ((bed & (d_in <= MARGIN_UM)) | (other & (d_out <= MARGIN_UM)))
    viable = ~m["necrosis"]
    return {"bed": bed & viable, "margin": margin & viable, "tumor_margin": (bed | margin) & viable,
            "core": bed & ~margin & viable, "outer_stroma": other & ~margin}


def _counts(layout: Layout, cells, regions: dict[str, np.ndarray]) -> dict[str, int]:
    """Cells per (region, kind): CD8 and CD4 T anywhere, and CD8 / CD4 + CD8 inside TLS."""
    g = layout.coarse_um
    shape = layout.masks["tissue"].shape
    jj = np.clip((cells["x_um"].to_numpy() // g).astype(np.int64), 0, shape[1] - 1)
    ii = np.clip((cells["y_um"].to_numpy() // g).astype(np.int64), 0, shape[0] - 1)
    t = cells["cell_type"].astype(str).to_numpy()
    in_tls = cells["tls_id"].to_numpy() > 0
    out = {}
    for name, mask in regions.items():
        inside = mask[ii, jj]
        out[(name, "cd8")] = int(np.count_nonzero(inside & (t == "cd8_t")))
        out[(name, "cd4")] = int(np.count_nonzero(inside & (t == "cd4_t")))
        out[(name, "tls_cd8")] = int(np.count_nonzero(inside & in_tls & (t == "cd8_t")))
        out[(name, "tls_t")] = int(np.count_nonzero(inside & in_tls & np.isin(t, ("cd8_t", "cd4_t"))))
    return out


@pytest.fixture(scope="module", params=list(SAMPLES))
def pooled(request):
    """Counts pooled over seeds at cd8_factor 1 and 2, same layouts."""
    timepoint, size, seeds = SAMPLES[request.param]
    base = SlideCondition.for_sample(timepoint, "responder")
    totals = {1.0: {}, 2.0: {}}
    for seed in seeds:
        layout = make_layout(size, condition=base, seed=seed)
        regions = _measured_regions(layout)
        for f, acc in totals.items():
            cells = make_cells(layout, dataclasses.replace(base, cd8_factor=f), seed=seed)
            for k, v in _counts(layout, cells, regions).items():
                acc[k] = acc.get(k, 0) + v
    return request.param, totals


@pytest.mark.parametrize("region", ["bed", "margin", "tumor_margin"])
def test_planted_factor_multiplies_measured_cd8_density(pooled, region):
    name, totals = pooled
    base, planted = totals[1.0][(region, "cd8")], totals[2.0][(region, "cd8")]
    assert base >= 200, f"{name} {region}: too few CD8 T cells pooled ({base}) to measure a factor"
    assert planted / base == pytest.approx(2.0, rel=0.1), f"{name} {region}: {base} -> {planted}"


def test_tls_and_clusters_keep_their_cells(pooled):
    """The effect is carried by the diffuse CD8 T cells: TLS in the measured region keep their T cells."""
    name, totals = pooled
    base, planted = totals[1.0], totals[2.0]
    assert base[("tumor_margin", "tls_t")] >= 300, name
    for kind in ("tls_t", "tls_cd8"):
        key = ("tumor_margin", kind)
        assert planted[key] / base[key] == pytest.approx(1.0, rel=0.12), f"{name} {key}: {base[key]} -> {planted[key]}"


def test_planted_factor_leaves_the_rest_alone(pooled):
    """Stroma beyond the margin keeps its CD8 T cells; the tumour core keeps its CD4 T cells (a null metric)."""
    name, totals = pooled
    base, planted = totals[1.0], totals[2.0]
    for key in (("outer_stroma", "cd8"), ("core", "cd4"), ("tumor_margin", "cd4")):
        if base[key] < 100:
            continue  # a biopsy's core can be too small to hold a pooled measure
        assert planted[key] / base[key] == pytest.approx(1.0, rel=0.12), f"{name} {key}: {base[key]} -> {planted[key]}"
    assert base[("outer_stroma", "cd8")] >= 100, name


def test_effect_pieces_are_core_inner_and_outer_band():
    """On a hand-made layout: core, the bed's band, the other tissue's band, nothing beyond."""
    shape, g = (60, 200), 5.0  # 1 mm x 0.3 mm at 5 µm
    code = np.full(shape, 3, np.uint8)  # stroma everywhere
    comp = np.zeros(shape, bool)
    comp[:, :120] = True  # a tumour compartment on the left 600 µm
    code[comp] = 1
    code[:, 190:] = 0  # glass on the right
    layout = Layout(size_um=(1000.0, 300.0), coarse_um=g, region_code=code, tumor_comp=comp,
                    soft=np.zeros((4, 30, 100), np.float16), flow_angle=None, immune=None, pdl1=None)
    pieces = effect_pieces(layout)
    band = int(CD8_EFFECT_BAND_UM / g)  # 50 px
    assert (pieces[:, :120 - band - 1] == 1).all()
    assert (pieces[:, 120 - band + 1:120] == 2).all()
    assert (pieces[:, 120:120 + band - 1] == 3).all()
    assert (pieces[:, 120 + band + 1:] == 0).all()
    no_tumour = dataclasses.replace(layout, tumor_comp=np.zeros(shape, bool))
    assert not effect_pieces(no_tumour).any()
