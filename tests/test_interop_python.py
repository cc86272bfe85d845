"""An analyst reads every file of the data contract with anndata, json and pandas alone (no
tme_pipeline import), after a real run of a tiny cohort; and the README's Python snippet runs.

The run leaves out the picture stages (``qc``, ``report``): they write no file of the tables'
contract and are most of a small slide's time.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from test_interop_r import readme_block
from tme_pipeline.cohort import run_cohort
from tme_pipeline.stages import STAGES
from tme_pipeline.synth import synth_slide

UNITS = ["mm2", "cells/mm2", "%", "ratio", "count", "1/mm2", "score"]  # the contract's unit strings

ANALYST = r"""
import json, sys
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd

out = Path(sys.argv[1])
units_allowed = set(json.loads(sys.argv[2]))
run = json.loads((out / "run.json").read_text())
assert run["status"] == "complete" and run["cohort_tables"]["error"] is None, run.get("cohort_tables")
slide_ids = [s["slide_id"] for s in run["slides"]]
metrics = {}
for slide_id in slide_ids:
    folder = out / "slides" / slide_id
    stages = json.loads((folder / "stages.json").read_text())
    assert stages["slide_id"] == slide_id and "metrics" in stages["stages"], list(stages["stages"])
    cells = ad.read_h5ad(folder / "cells.h5ad")
    assert {"region", "tls_id", "in_tumor", "border_distance_um", "phenotype"} <= set(cells.obs.columns)
    assert cells.obsm["spatial"].shape == (cells.n_obs, 2)
    for name in ("regions", "tls"):
        geo = json.loads((folder / f"{name}.geojson").read_text())
        assert geo["type"] == "FeatureCollection" and geo["properties"]["pixel_size_um"] > 0
        json.loads((folder / f"{name}.json").read_text())
    assert set(json.loads((folder / "regions.json").read_text())["areas_mm2"]) >= {"tissue", "tumor", "margin"}
    m = json.loads((folder / "metrics.json").read_text())
    assert set(m["metrics"]) <= set(m["units"]) and set(m["units"].values()) <= units_allowed
    assert all(m["absent"].get(k) for k, v in m["metrics"].items() if v is None)  # null has a reason
    metrics[slide_id] = {k: np.nan if v is None else v for k, v in m["metrics"].items()}

cohort = ad.read_h5ad(out / "cohort.h5ad")
assert list(cohort.obs_names) == slide_ids and (cohort.obs["status"] == "done").all()
for i, slide_id in enumerate(slide_ids):
    expected = np.array([metrics[slide_id][k] for k in cohort.var_names])
    np.testing.assert_array_equal(cohort.X[i], expected)
patients = ad.read_h5ad(out / "patients.h5ad")
pre, post = patients.obs.loc["A", "pre_slide_id"], patients.obs.loc["A", "post_slide_id"]
assert bool(patients.obs.loc["A", "complete"]) and patients.obs.loc["A", "reason"] == ""
np.testing.assert_array_equal(patients.layers["pre"][0], cohort[pre].X[0])
np.testing.assert_array_equal(patients.layers["post"][0], cohort[post].X[0])
np.testing.assert_array_equal(patients.X, patients.layers["post"] - patients.layers["pre"])
table = pd.read_csv(out / "metrics.csv", keep_default_na=False, na_values={"value": [""]},
                    float_precision="round_trip")
assert list(table.columns) == ["patient_id", "timepoint", "slide_id", "metric", "value", "unit"]
assert len(table) == cohort.n_obs * cohort.n_vars and set(table["unit"]) <= units_allowed
wide = table.pivot(index="slide_id", columns="metric", values="value").loc[slide_ids, list(cohort.var_names)]
np.testing.assert_array_equal(wide.to_numpy(), cohort.X)
assert "tme_pipeline" not in sys.modules
print(json.dumps({"n_metrics": cohort.n_vars, "units": sorted(set(cohort.var["unit"])),
                  "n_null": int(np.isnan(cohort.X).sum())}))
"""


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("interop")
    synth_slide(root / "A_pre.ome.tif", size_mm=(0.4, 0.4), seed=3)
    synth_slide(root / "A_post.ome.tif", size_mm=(0.4, 0.4), seed=4)
    (root / "m.csv").write_text("patient_id,timepoint,slide,response\n"
                                "A,pre,A_pre.ome.tif,responder\nA,post,A_post.ome.tif,responder\n")
    (root / "c.yaml").write_text("segmentation: {method: classic}\n")
    stages = tuple(s for s in STAGES if s.name not in ("qc", "report"))
    run_cohort(root / "m.csv", root / "out", config_path=root / "c.yaml", stages=stages)
    return root / "out"


def test_every_contract_file_reads_with_anndata_json_pandas_alone(tiny_run):
    run = subprocess.run([sys.executable, "-c", ANALYST, str(tiny_run), json.dumps(UNITS)], capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    summary = json.loads(run.stdout.strip().splitlines()[-1])
    assert summary["n_metrics"] > 50 and {"cells/mm2", "mm2", "%"} <= set(summary["units"])


def test_readme_python_snippet_runs(tiny_run):
    snippet = readme_block("python")
    assert '"demo/out"' in snippet
    namespace: dict = {}
    exec(compile(snippet.replace('"demo/out"', repr(str(tiny_run))), "README.md", "exec"), namespace)
    assert namespace["pre"].shape == (1, namespace["patients"].n_vars)
    assert list(namespace["metrics"].columns) == ["patient_id", "timepoint", "slide_id", "metric", "value", "unit"]
    assert namespace["slides"].n_obs == 2 and namespace["units"].notna().all()
