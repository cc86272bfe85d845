"""An analyst opens patients.h5ad and metrics.csv in R (rhdf5, read.csv), with the README's own
snippet, and reads exactly what Python wrote.

R and rhdf5 are Debian packages (``r-base-core``, ``r-bioc-rhdf5``) that ``make test`` installs
when missing and then requires (``TME_REQUIRE_R=1``); elsewhere the test skips without them.
"""

import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from test_cohort_tables import SLIDES, UNITS, write_results
from tme_pipeline.cohort_tables import write_cohort_tables
from tme_pipeline.results import open_results

ROOT = Path(__file__).resolve().parents[1]
README_SECTION = "### Open the metrics in R / Python"


def readme_block(language: str) -> str:
    """The README's ``language`` code block in the section on opening the metrics."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text.split(README_SECTION, 1)[1].split("\n### ", 1)[0]
    match = re.search(rf"```{language}\n(.*?)```", section, re.S)
    assert match, f"README.md: no {language} block under {README_SECTION!r}"
    return match.group(1)


@pytest.fixture(scope="module")
def rscript() -> str:
    reason = ""
    rscript = shutil.which("Rscript")
    if rscript is None:
        reason = "Rscript not found; `make test` installs r-base-core and r-bioc-rhdf5"
    else:
        probe = subprocess.run([rscript, "-e", "library(rhdf5)"], capture_output=True, text=True, timeout=120)
        if probe.returncode != 0:
            reason = f"R has no rhdf5 (`make r-debs` installs r-bioc-rhdf5): {probe.stderr[-500:]}"
    if reason:
        if os.environ.get("TME_REQUIRE_R"):
            pytest.fail(reason)
        pytest.skip(reason)
    return rscript


def _read(path: Path) -> pd.DataFrame:
    return pd.read_csv(path, dtype=str, keep_default_na=False)


def test_r_reads_patients_layers_obs_and_metrics_csv_as_written(tmp_path, rscript):
    out, written = write_results(tmp_path)
    write_cohort_tables(out)
    dump = tmp_path / "from_r"
    dump.mkdir()
    snippet = readme_block("r")
    assert '"demo/out"' in snippet
    program = tmp_path / "analyst.R"
    program.write_text(snippet.replace('"demo/out"', f'"{out}"') + f'\ndump <- "{dump}"\n'
                       + (ROOT / "tests" / "r" / "check_tables.R").read_text(), encoding="utf-8")
    run = subprocess.run([rscript, str(program)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]

    patients = open_results(out).patients()
    for layer in ("pre", "post", "delta", "log2_fold_change"):
        table = _read(dump / f"layer_{layer}.csv")
        from_r = table.pivot(index="patient", columns="metric", values="value").astype(float)
        from_r = from_r.loc[list(patients.obs_names), list(patients.var_names)]
        np.testing.assert_array_equal(from_r.to_numpy(), patients.layers[layer], err_msg=layer)  # NaN == NaN
    assert np.isnan(patients["P3"].layers["delta"]).all()  # the one-sided patient came through as NaN

    obs = _read(dump / "obs.csv").set_index("patient")
    assert list(obs.index) == list(patients.obs_names)
    assert obs["complete"].tolist() == ["TRUE" if c else "FALSE" for c in patients.obs["complete"]]
    assert obs["transition"].tolist() == [str(t) if isinstance(t, str) else "<NA>"
                                          for t in patients.obs["immune_transition"]]
    assert obs["reason"].tolist() == patients.obs["reason"].tolist()
    assert obs["response"].tolist() == ["responder", "non_responder", "responder", "NA"]
    assert obs["pre_slide_id"].tolist() == ["P1_pre", "P2_pre", "", "P4_pre"]
    assert obs["immune_class_post"].tolist() == ["inflamed", "<NA>", "<NA>", "inflamed"]
    var = _read(dump / "var.csv")
    assert dict(zip(var["metric"], var["unit"])) == UNITS

    metrics = _read(dump / "metrics.csv")
    assert len(metrics) == len(SLIDES) * len(UNITS)
    for slide_id, values in written.items():
        rows = metrics[metrics["slide_id"] == slide_id].set_index("metric")
        got = rows.loc[list(UNITS), "value"].astype(float).to_numpy()
        expected = [np.nan if values["metrics"][n] is None else values["metrics"][n] for n in UNITS]
        np.testing.assert_array_equal(got, expected, err_msg=slide_id)
    assert (metrics.loc[metrics["slide_id"] == "P2_post", "value"] == "NaN").all()  # the failed slide: NA in R
