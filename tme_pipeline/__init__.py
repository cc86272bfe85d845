"""tme-pipeline: multiplex immunofluorescence slides to tumour-microenvironment biomarkers.

The public API is imported lazily so that ``import tme_pipeline`` and the ``tme``
command start fast; torch, dask and anndata load only when a stage needs them.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_API = {
    "Config": "config",
    "load_config": "config",
    "open_slide": "io.slides",
    "Slide": "io.slides",
    "read_manifest": "io.manifest",
    "match_panel": "panel",
    "run_slide": "pipeline",
    "run_cohort": "cohort",
    "open_results": "results",
    "Results": "results",
    "SlideResults": "results",
    "STAGES": "stages",
    "Stage": "stages",
    "expand_nuclei_tiled": "cells",
    "measure_cells": "quantify",
    "phenotype_cells": "phenotype",
    "tile_grid": "tiling",
    "segment_tiled": "tiling",
    "synth_slide": "synth",
    "synth_cohort": "synth",
    "write_cohort_tables": "cohort_tables",
    "write_cohort_report": "cohort_report",
    "analyze": "analysis",
}

__all__ = ["__version__", *_API]


def __getattr__(name: str):
    if name in _API:
        module = importlib.import_module(f".{_API[name]}", __name__)
        return getattr(module, name)
    raise AttributeError(f"module 'tme_pipeline' has no attribute {name!r}")


def __dir__():
    return sorted(__all__)
