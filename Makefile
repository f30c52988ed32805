# make demo  : set up .venv, then a short real training run (Zipf's LS, TinyImageNet subset)
# make test  : set up .venv, then the test suite (CPU; CUDA tests run via scripts/gpu_check.sh)
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
DATA   ?= ../shared/data
PYTEST_ARGS ?=

.PHONY: setup demo test test-all gpu-check clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip >/dev/null
	$(PY) -m pip install torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -e ".[test]"
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(PY) scripts/demo.py --data $(DATA)

test: setup
	$(PY) -m pytest -m "not cuda" $(PYTEST_ARGS)

# Everything, CUDA tests included (needs a GPU).
test-all: setup
	$(PY) -m pytest $(PYTEST_ARGS)

gpu-check: setup
	bash scripts/gpu_check.sh

clean:
	rm -rf $(VENV) outputs multirun
