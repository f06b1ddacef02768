# `make demo`: set everything up and run the main job on built-in data.
# `make test`: set everything up and run the test suite.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
BL := $(VENV)/bin/batchlab
OUT ?= batchlab-out

.PHONY: setup setup-test demo test bench clean

setup: $(VENV)/.installed
setup-test: $(VENV)/.installed-test

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first and pinned, so no dependency resolution can pull a CUDA build
	$(PY) -m pip install -q -c constraints.txt torch==2.13.0
	$(PY) -m pip install -q -c constraints.txt -e ".[test]"
	touch $@

# the tests also exercise the optional Ray, Lightning and Hugging Face adapters
$(VENV)/.installed-test: $(VENV)/.installed
	$(PY) -m pip install -q -c constraints.txt -e ".[test,ray,lightning,hf]"
	touch $@

demo: setup
	$(BL) suggest --task digits-mlp --threads 1 --out $(OUT)/suggest
	$(BL) reproduce --quick --out $(OUT)/reproduce

test: setup-test
	$(PY) -m pytest -q

bench: setup
	$(PY) benchmarks/fit_overhead.py
	$(PY) benchmarks/norm_speed.py
	$(PY) benchmarks/noise_overhead.py

clean:
	rm -rf $(VENV) $(OUT) .pytest_cache
