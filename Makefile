# The two commands a user needs: `make demo` and `make test`. Each sets up .venv itself.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# torch first, pinned to the CPU build, so that the loose `torch>=2.2` of the project
# does not pull a multi-GB CUDA build; GPU servers install their own torch beforehand.
TORCH_SPEC ?= torch==2.13.0

VENV_TF := .venv-tf
# Official TensorFlow StarDist: only for the equivalence test and the benchmark, never at run time.
TF_SPECS ?= tensorflow-cpu==2.21.0 tf-keras==2.21.0 stardist==0.9.2

VENV_SQ := .venv-squidpy
# An analyst's own environment (squidpy pins its own anndata and dask): the interop test
# opens our cells.h5ad there as it is written. setuptools<81 keeps pkg_resources, which
# xarray-schema (a squidpy dependency) still imports.
SQUIDPY_SPECS ?= squidpy==1.8.2 "setuptools<81"

.PHONY: venv demo test bench-segment clean

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip show torch >/dev/null 2>&1 || $(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -c constraints.txt -e ".[test]"
	touch $@

venv: $(VENV)/.installed

$(VENV_TF)/.installed:
	$(PYTHON) -m venv $(VENV_TF)
	$(VENV_TF)/bin/python -m pip install -q --upgrade pip
	$(VENV_TF)/bin/python -m pip install -q $(TF_SPECS)
	touch $@

$(VENV_SQ)/.installed:
	$(PYTHON) -m venv $(VENV_SQ)
	$(VENV_SQ)/bin/python -m pip install -q --upgrade pip
	$(VENV_SQ)/bin/python -m pip install -q $(SQUIDPY_SPECS)
	touch $@

# The cohort is written once: rewriting its slides would make every stage of demo/out stale.
# `make demo DEMO_CONFIG=my.yaml` re-runs with a changed config; tme run recomputes only the
# stages the change makes stale and prints, per slide, which it reused and which it ran.
DEMO_CONFIG ?=

demo/data/manifest.csv: | venv
	$(VENV)/bin/tme synth --out demo/data --patients 2 --seed 7 --size-mm 2 1.5

demo: venv demo/data/manifest.csv
	$(VENV)/bin/tme run demo/data/manifest.csv --out demo/out $(if $(DEMO_CONFIG),--config $(DEMO_CONFIG))
	@echo
	@echo "Demo cohort:  demo/data/manifest.csv (truth in demo/data/truth/)"
	@echo "Outputs:      demo/out/run.json and demo/out/slides/<slide_id>/"

test: venv $(VENV_TF)/.installed $(VENV_SQ)/.installed
	TME_REQUIRE_TF_REFERENCE=1 TME_REQUIRE_SQUIDPY=1 $(PY) -m pytest -q tests

bench-segment: venv $(VENV_TF)/.installed
	$(PY) scripts/bench_segment.py --out bench_out/segment.json

clean:
	rm -rf $(VENV) $(VENV_TF) $(VENV_SQ) demo
