# `make test` and `make demo` set up .venv/ themselves on a fresh machine.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# The local CPU wheel; a GPU machine keeps whatever torch is already in the venv.
TORCH_SPEC ?= torch==2.13.0

.PHONY: venv test demo clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

venv: $(VENV)/.installed

test: venv
	$(PY) -m pytest -q

demo: venv
	$(PY) -m dmc.demo

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
