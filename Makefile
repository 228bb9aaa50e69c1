# Two commands: `make test` and `make demo`. Both set up .venv on a fresh machine first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: test demo eval-demo finetune-demo bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# CPU wheel of torch: a plain `torch` would pull a multi-GB CUDA build.
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest

# The main job: the Python standard library of the interpreter in .venv -> MDS -> dbrx-tiny pretrained within a
# wall-clock budget (configs/demo.yaml: the whole command under 10 minutes on any 2-core machine) ->
# runs/demo/loss.png and a Hugging Face checkpoint in runs/demo/hf -> the held-out loss against the corpus'
# unigram entropy, and greedy completions of three prompts.
STDLIB = $$($(BIN)/python -c 'import sysconfig; print(sysconfig.get_paths()["stdlib"])')
# The modules that `make eval-demo` tests on, and their tests, stay out of the training data (dbrx.eval.suite).
HELD_OUT = $$($(BIN)/python -m dbrx.eval.suite --exclude-patterns)

demo: $(STAMP)
	$(BIN)/dbrx convert text "$(STDLIB)" --glob '*.py' --exclude "site-packages,$(HELD_OUT)" \
		--out runs/data/stdlib --concat-tokens 64 --val-fraction 0.01 --overwrite
	$(BIN)/dbrx train configs/demo.yaml
	@echo "--- held-out loss and plot: runs/demo/metrics.jsonl, runs/demo/loss.png; greedy completions: ---"
	$(BIN)/dbrx generate --model runs/demo/hf --max-new-tokens 40 --echo \
		"def fibonacci(n):" "class Stack:" "    for i in range("

# After `make demo`: the offline suite (docs/eval.md): next-line multiple choice, line ends and doctest code
# problems from the held-out modules, each beside its random baseline, with the rows' 13-gram overlap with
# runs/data/stdlib. A few minutes on 2 cores.
eval-demo: $(STAMP)
	$(BIN)/dbrx eval --suite stdlib --model runs/demo/hf --out runs/demo/eval --allow-code-execution

# Fine-tuning after `make demo`: first the end-to-end run (prompt = a standard-library function's docstring and
# body, response = its signature); then prompt (signature + docstring) / response (body) from the three sources of
# the DBRX article: local JSONL, a hub-style dataset, MDS; and LoRA (configs/finetune_*.yaml).
finetune-demo: $(STAMP)
	$(BIN)/python -m dbrx.data.stdlib_sft --task signature --out runs/data/stdlib_sig
	$(BIN)/dbrx train configs/finetune_signature.yaml
	$(BIN)/python -m dbrx.data.stdlib_sft --out runs/data/stdlib_sft
	$(BIN)/dbrx convert finetuning --dataset json --data-dir runs/data/stdlib_sft --splits train val \
		--out-root runs/data/stdlib_sft_mds --tokenizer cl100k_base --max-seq-len 512 --compression zstd --overwrite
	$(BIN)/dbrx train configs/finetune_jsonl.yaml
	$(BIN)/dbrx train configs/finetune_hub.yaml max_duration=20ba
	$(BIN)/dbrx train configs/finetune_mds.yaml max_duration=20ba
	$(BIN)/dbrx train configs/finetune_lora.yaml max_duration=20ba

bench: $(STAMP)
	$(BIN)/python bench/generate.py
	$(BIN)/python bench/moe.py
	$(BIN)/python bench/moe.py --dtype bfloat16
	$(BIN)/python bench/load.py
	$(BIN)/python bench/train.py
	$(BIN)/python bench/eval.py
	$(BIN)/python bench/serve.py

clean:
	rm -rf $(VENV) build src/*.egg-info
