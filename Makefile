# The two commands a user needs: `make demo` and `make test`. Each sets up .venv itself.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# torch first, pinned to the CPU build, so that the loose `torch>=2.2` of the project
# does not pull a multi-GB CUDA build; GPU servers install their own torch beforehand.
TORCH_SPEC ?= torch==2.13.0

.PHONY: venv demo test clean

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip show torch >/dev/null 2>&1 || $(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -c constraints.txt -e ".[test]"
	touch $@

venv: $(VENV)/.installed

demo: venv
	$(VENV)/bin/tme synth --out demo/data --patients 2 --seed 7 --size-mm 2 1.5
	$(VENV)/bin/tme run demo/data/manifest.csv --out demo/out
	@echo
	@echo "Demo cohort:  demo/data/manifest.csv (truth in demo/data/truth/)"
	@echo "Outputs:      demo/out/run.json and demo/out/slides/<slide_id>/"

test: venv
	$(PY) -m pytest -q tests

clean:
	rm -rf $(VENV) demo
