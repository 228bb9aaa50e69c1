# Two commands: `make test` and `make demo`. Both set up .venv on a fresh machine first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: test demo bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# CPU wheel of torch: a plain `torch` would pull a multi-GB CUDA build.
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest

# Until the training job lands, the demo shows the sizes of the real model (computed on the meta device) and a
# generation from a small *randomly initialised* model: the pipeline is real, the text is noise.
demo: $(STAMP)
	$(BIN)/dbrx info --preset dbrx-instruct
	$(BIN)/dbrx init --preset dbrx-tiny --out runs/random-tiny --seed 0
	@echo "--- a completion from the randomly initialised dbrx-tiny (untrained: expect noise) ---"
	$(BIN)/dbrx generate --model runs/random-tiny --max-new-tokens 32 --ignore-eos --stats --echo "def fibonacci(n):"

bench: $(STAMP)
	$(BIN)/python bench/generate.py
	$(BIN)/python bench/moe.py
	$(BIN)/python bench/moe.py --dtype bfloat16
	$(BIN)/python bench/load.py

clean:
	rm -rf $(VENV) build src/*.egg-info
