"""Cell tables from a small generative model mirroring tme_pipeline.synth (cells + render).

A positive cell's stain is log-normal around the marker's level (sd 0.35 in log), 12 % of
positives dim at 0.15-0.35x; a negative's is 1-2 % of the level (log-normal); every
compartment layer adds the channel's dark offset (150-400 counts) and Gaussian noise, then
optional spillover ``observed = S @ true`` over the markers.
"""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd

MARKERS = ("DAPI", "CD3", "CD8", "CD20", "CD21", "FOXP3", "PD-L1", "SATB2")
COMPARTMENT = {"DAPI": "nuclear", "CD3": "membrane", "CD8": "membrane", "CD20": "membrane", "CD21": "membrane",
               "FOXP3": "nuclear", "PD-L1": "membrane", "SATB2": "nuclear"}
LEVEL = {"DAPI": 3000.0, "CD3": 4000.0, "CD8": 3600.0, "CD20": 4000.0, "CD21": 3000.0, "FOXP3": 3000.0,
         "PD-L1": 3000.0, "SATB2": 3000.0}
LAYERS = ("nucleus", "membrane", "cytoplasm", "cell")
#: Share of a marker's stain that each layer sees, by the marker's compartment.
_SHARE = {"membrane": {"nucleus": 0.1, "membrane": 1.0, "cytoplasm": 0.3, "cell": 0.5},
          "nuclear": {"nucleus": 1.0, "membrane": 0.05, "cytoplasm": 0.1, "cell": 0.5}}
_TYPES = {  # cell type -> positive markers
    "tumor": ("SATB2",), "fibroblast": (), "macrophage": (), "cd8_t": ("CD3", "CD8"),
    "cd4_t": ("CD3",), "treg": ("CD3", "FOXP3"), "b_cell": ("CD20",),
}


def make_cells(truth: dict[str, np.ndarray], *, seed: int, markers=MARKERS, scale: float = 1.0,
               spill: np.ndarray | None = None, dim_fraction: float = 0.12) -> tuple[ad.AnnData, dict]:
    """AnnData as the quantify stage delivers it, plus the true (pre-spillover) layers.

    truth : marker -> (n,) bool positivity (markers not in it are negative; DAPI always positive).
    spill : (M, M) over ``markers``, optional.
    """
    rng = np.random.default_rng(seed)
    n = len(next(iter(truth.values())))
    m = len(markers)
    stain = np.empty((n, m))
    for k, marker in enumerate(markers):
        pos = np.ones(n, bool) if marker == "DAPI" else truth.get(marker, np.zeros(n, bool))
        level = LEVEL[marker] * rng.lognormal(0.0, 0.35, n)
        dim = rng.random(n) < dim_fraction
        level = np.where(dim, level * rng.uniform(0.15, 0.35, n), level)
        neg = LEVEL[marker] * rng.uniform(0.01, 0.02) * rng.lognormal(0.0, 0.5, n)
        stain[:, k] = np.where(pos, level, neg)
    offset = rng.uniform(150, 400, m)
    true = {}
    for layer in LAYERS:
        share = np.array([_SHARE[COMPARTMENT[mk]][layer]
                          for mk in markers])
        signal = stain * share
        true[layer] = (signal + offset + rng.normal(0, 1, (n, m)) * (8.0 + 0.03 * signal)) * scale
    observed = {k: (v if spill is None else v @ np.asarray(spill).T).astype(np.float32) for k, v in true.items()}
    layer_of = {"nuclear": "nucleus", "membrane": "membrane", "cytoplasm": "cytoplasm", "whole": "cell"}
    x = np.column_stack([observed[layer_of[COMPARTMENT[mk]]][:, k] for k, mk in enumerate(markers)])
    obs = pd.DataFrame({"cell_id": np.arange(1, n + 1), "x_um": rng.uniform(0, 1000, n),
                        "y_um": rng.uniform(0, 1000, n), "area_um2": rng.uniform(40, 120, n)},
                       index=pd.Index([str(i) for i in range(1, n + 1)], name="cell"))
    var = pd.DataFrame({"compartment": [COMPARTMENT[mk] for mk in markers]},
                       index=pd.Index(list(markers), name="marker"))
    cells = ad.AnnData(X=x.astype(np.float32), obs=obs, var=var, layers=observed)
    cells.obsm["spatial"] = obs[["x_um", "y_um"]].to_numpy()
    return cells, true


def cell_types(n: int, *, seed: int, fractions: dict[str, float] | None = None) -> tuple[np.ndarray, dict]:
    """Cell types and the positivity they imply (SATB2 on 92 % of tumour cells)."""
    rng = np.random.default_rng([seed, 1])
    fractions = fractions or {"tumor": 0.4, "fibroblast": 0.2, "macrophage": 0.07, "cd8_t": 0.1,
                              "cd4_t": 0.1, "treg": 0.03, "b_cell": 0.1}
    names = list(fractions)
    p = np.array([fractions[k] for k in names])
    types = np.array(names)[rng.choice(len(names), n, p=p / p.sum())]
    truth = {mk: np.zeros(n, bool) for mk in MARKERS if mk != "DAPI"}
    for t, pos in _TYPES.items():
        for mk in pos:
            truth[mk] |= types == t
    truth["SATB2"] &= rng.random(n) < 0.92
    truth["PD-L1"] = (types == "tumor") & (rng.random(n) < 0.3)
    return types, truth
