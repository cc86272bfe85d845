"""An analyst opens cells.h5ad in their own environment and runs squidpy on it as written.

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


@pytest.fixture(scope="module")
def squidpy_python() -> Path:
    python = VENV_SQ / "bin" / "python"
    if not python.exists():
        reason = f"analyst environment {VENV_SQ} not found; `make test` builds it (squidpy)"
        if os.environ.get("TME_REQUIRE_SQUIDPY"):
            pytest.fail(reason)
        pytest.skip(reason)
    return python


def test_squidpy_neighbours_and_enrichment_run_on_cells_h5ad(tmp_path, squidpy_python):
    slide = tmp_path / "S.ome.tif"
    synth_slide(slide, size_mm=(0.6, 0.5), seed=11)
    out = tmp_path / "S"
    run_slide(slide, out, config=load_config())
    run = subprocess.run([str(squidpy_python), "-c", ANALYST, str(out / "cells.h5ad")], capture_output=True,
                         text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    n_types = len(result["categories"])
    assert result["categories"][-1] == "other" and "CD8_T" in result["categories"]
    assert result["zscore_shape"] == [n_types, n_types]
    # Neighbours within 30 µm exist for a tissue of packed cells: the µm coordinates were read as µm.
    assert result["n_edges"] > 2 * result["n_obs"]
