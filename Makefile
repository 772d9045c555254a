# The two commands of the README: `make demo` (set up, then run the main job) and `make test`.
# A fresh machine needs only Python 3.11 and make. Both targets create .venv on first use.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU build of torch. On this project's machines `pip install torch==2.13.0` takes a local CPU wheel;
# elsewhere on Linux add TORCH_INDEX=--index-url=https://download.pytorch.org/whl/cpu to avoid a CUDA download,
# or install the CUDA build you want into .venv before running make (see README, "GPU").
TORCH ?= torch==2.13.0
TORCH_INDEX ?=

.PHONY: demo test test-slow setup clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install --quiet $(TORCH_INDEX) "$(TORCH)"
	$(BIN)/pip install --quiet -e ".[test]"
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(BIN)/fedmeta simulate

# pytest exits 5 when it collects no test; make treats that, like any failure, as an error.
test: setup
	$(BIN)/python -m pytest

# The long deployments behind the `slow` marker (the README's gRPC blocks run as written, a SuperNode killed
# mid-round, TLS with node authentication): about 25 minutes on 2 cores. `.ci/run` runs them after `make test`.
test-slow: setup
	$(BIN)/python -m pytest -m slow

clean:
	rm -rf $(VENV) runs .pytest_cache
