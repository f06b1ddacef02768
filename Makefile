# `make demo`: set everything up and run the main job on built-in data.
# `make test`: set everything up and run the test suite.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
BL := $(VENV)/bin/batchlab
OUT ?= batchlab-out

.PHONY: setup demo test bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first and pinned, so no dependency resolution can pull a CUDA build
	$(PY) -m pip install -q -c constraints.txt torch==2.13.0
	$(PY) -m pip install -q -c constraints.txt -e ".[test]"
	touch $@

demo: setup
	$(BL) train --task digits-cnn --epochs 5 --out $(OUT)/train
	$(BL) report $(OUT)/train

test: setup
	$(PY) -m pytest -q

bench: setup
	$(PY) benchmarks/fit_overhead.py

clean:
	rm -rf $(VENV) $(OUT) .pytest_cache
