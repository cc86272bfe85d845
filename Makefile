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
	$(PY) -m pip install -q -c constraints.txt -e ".[test,cluster]"
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

# --- napari plugin (tme-napari, issue 14) -----------------------------------------------------
# The reader (and later the review widget) is its own distribution in napari_plugin/, installed
# editable into .venv beside the package, with pytest-qt for its tests; napari's pins are in
# constraints.txt. Its tests open a napari viewer, which needs an X server and OpenGL: they run
# under `xvfb-run -a` with Mesa's software renderer, from these Debian packages, installed only
# when one is missing (apt-get as root, else through sudo).
NAPARI_DEBS := xvfb xauth libgl1-mesa-dri libgl1 libegl1 libdbus-1-3 libfontconfig1 \
	libxkbcommon-x11-0 libxcb-icccm4 libxcb-image0 libxcb-keysyms1 libxcb-randr0 \
	libxcb-render-util0 libxcb-xinerama0 libxcb-xfixes0 libxcb-shape0 libxcb-cursor0 libxcb-xkb1
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

$(VENV)/.napari-installed: $(VENV)/.installed napari_plugin/pyproject.toml constraints.txt
	$(PY) -m pip install -q -c constraints.txt -e "./napari_plugin[test]"
	touch $@

napari-debs:
	@if [ "$$(dpkg-query -W -f='$${Status}\n' $(NAPARI_DEBS) 2>/dev/null | grep -c 'ok installed')" \
	    -ne $(words $(NAPARI_DEBS)) ]; then \
	  $(SUDO) apt-get update -q && $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -q $(NAPARI_DEBS); \
	fi

napari: $(VENV)/.napari-installed napari-debs

.PHONY: napari napari-debs
# --- end napari plugin ------------------------------------------------------------------------

# --- R interop (issue 13) ----------------------------------------------------------------------
# Analysts open patients.h5ad and metrics.csv in R: tests/test_interop_r.py runs the README's R
# snippet with Rscript and rhdf5, from these Debian packages, installed only when one is missing.
R_DEBS := r-base-core r-bioc-rhdf5

r-debs:
	@if [ "$$(dpkg-query -W -f='$${Status}\n' $(R_DEBS) 2>/dev/null | grep -c 'ok installed')" \
	    -ne $(words $(R_DEBS)) ]; then \
	  $(SUDO) apt-get update -q && $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -q $(R_DEBS); \
	fi

.PHONY: r-debs
# --- end R interop ----------------------------------------------------------------------------

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

test: venv napari r-debs $(VENV_TF)/.installed $(VENV_SQ)/.installed
	TME_REQUIRE_TF_REFERENCE=1 TME_REQUIRE_SQUIDPY=1 TME_REQUIRE_R=1 xvfb-run -a $(PY) -m pytest -q tests

bench-segment: venv $(VENV_TF)/.installed
	$(PY) scripts/bench_segment.py --out bench_out/segment.json

clean:
	rm -rf $(VENV) $(VENV_TF) $(VENV_SQ) demo
