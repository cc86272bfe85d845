"""An analyst opens cells.h5ad in their own environment and runs squidpy on it as written:
neighbourhoods by phenotype, by region (``region``) and around the TLS (``tls_id``).

squidpy pins its own anndata and dask, so it lives in a separate environment,
``.venv-squidpy`` (``make test`` builds it), as it would on an analyst's laptop.
"""

import json
import os
import subprocess
from pathlib import Path

import pytest

from tme_pipeline.config import load_config
from tme_pipeline.pipeline import run_slide
from tme_pipeline.stages import STAGES
from tme_pipeline.synth import synth_slide

ROOT = Path(__file__).resolve().parents[1]
VENV_SQ = Path(os.environ.get("TME_VENV_SQUIDPY", ROOT / ".venv-squidpy"))

ANALYST = """
import json, sys
import anndata as ad
import squidpy as sq

cells = ad.read_h5ad(sys.argv[1])
sq.gr.spatial_neighbors(cells, coord_type="generic", radius=30.0)
sq.gr.nhood_enrichment(cells, cluster_key="phenotype", n_perms=20, seed=0, show_progress_bar=False)
z = cells.uns["phenotype_nhood_enrichment"]["zscore"]
print(json.dumps({"n_obs": cells.n_obs, "zscore_shape": list(z.shape),
                  "categories": list(cells.obs["phenotype"].cat.categories),
                  "n_edges": int(cells.obsp["spatial_connectivities"].nnz)}))
"""

# Regions and TLS, in the same session: `region` is categorical as written; `tls_id` (int,
# 0 = no TLS) becomes one.
REGIONS_AND_TLS = """
import numpy as np
import pandas as pd

sq.gr.nhood_enrichment(cells, cluster_key="region", n_perms=50, seed=0, show_progress_bar=False)
cells.obs["tls"] = pd.Categorical(np.where(cells.obs["tls_id"] > 0, "TLS", "outside"))
sq.gr.co_occurrence(cells, cluster_key="tls", interval=np.array([0.0, 20.0, 400.0]), show_progress_bar=False)
occ = cells.uns["tls_co_occurrence"]["occ"]          # (clusters, clusters, distance bins)
tls = list(cells.obs["tls"].cat.categories).index("TLS")
print(json.dumps({"regions": list(cells.obs["region"].cat.categories),
                  "region_counts": cells.obs["region"].value_counts().to_dict(),
                  "zscore": cells.uns["region_nhood_enrichment"]["zscore"].tolist(),
                  "n_tls_cells": int((cells.obs["tls_id"] > 0).sum()),
                  "tls_with_tls_near": float(occ[tls, tls, 0]), "tls_with_tls_far": float(occ[tls, tls, -1])}))
"""


@pytest.fixture(scope="module")
def squidpy_python() -> Path:
    python = VENV_SQ / "bin" / "python"
    if not python.exists():
        reason = f"analyst environment {VENV_SQ} not found; `make test` builds it (squidpy)"
        if os.environ.get("TME_REQUIRE_SQUIDPY"):
            pytest.fail(reason)
        pytest.skip(reason)
    return python


@pytest.fixture(scope="module")
def cells_h5ad(tmp_path_factory) -> Path:
    """A small slide with tumour core, margin, stroma and TLS: a 50 µm margin leaves room for
    all three on 0.6 x 0.5 mm; the picture stages are left out (no file squidpy reads)."""
    root = tmp_path_factory.mktemp("squidpy")
    synth_slide(root / "S.ome.tif", size_mm=(0.6, 0.5), seed=11)
    (root / "c.yaml").write_text("segmentation: {method: classic}\nregions: {margin_um: 50}\n")
    stages = tuple(s for s in STAGES if s.name not in ("qc", "report"))
    run_slide(root / "S.ome.tif", root / "S", config=load_config(root / "c.yaml"), stages=stages)
    return root / "S" / "cells.h5ad"


@pytest.fixture(scope="module")
def analyst(cells_h5ad, squidpy_python) -> list[dict]:
    """One analyst session (squidpy's import is most of its time): what each script printed."""
    run = subprocess.run([str(squidpy_python), "-c", ANALYST + REGIONS_AND_TLS, str(cells_h5ad)],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    return [json.loads(line) for line in run.stdout.strip().splitlines()[-2:]]


def test_squidpy_neighbours_and_enrichment_run_on_cells_h5ad(analyst):
    result = analyst[0]
    n_types = len(result["categories"])
    assert result["categories"][-1] == "other" and "CD8_T" in result["categories"]
    assert result["zscore_shape"] == [n_types, n_types]
    # Neighbours within 30 µm exist for a tissue of packed cells: the µm coordinates were read as µm.
    assert result["n_edges"] > 2 * result["n_obs"]


def test_squidpy_by_region_and_around_tls(analyst):
    result = analyst[1]
    assert result["regions"] == ["tumor_core", "margin", "stroma"]
    assert min(result["region_counts"].values()) > 20, result["region_counts"]
    z = result["zscore"]
    # each region is one contiguous area: its cells neighbour their own region far above chance
    assert all(z[i][i] > 3 for i in range(3)), z
    # the core and the stroma lie on either side of a 2 x 50 µm margin: no 30 µm neighbours
    assert z[0][2] < -3 and z[2][0] < -3, z
    # TLS cells are clustered: within 20 µm of a TLS cell, TLS cells are over-represented
    # (co-occurrence = P(TLS | near a TLS cell) / P(TLS)), less so further away
    assert result["n_tls_cells"] > 50
    assert result["tls_with_tls_near"] > 1.2 and result["tls_with_tls_near"] > result["tls_with_tls_far"]
