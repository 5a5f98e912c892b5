# `make repro` installs into .venv and runs the whole pipeline; `make test` runs the tests (`make test-fast`: those
# that start no subprocess, server or `dvc repro`).
VENV ?= .venv
PYTHON ?= python3
export PATH := $(abspath $(VENV))/bin:$(PATH)

.PHONY: install install-dev repro test test-fast study frontier

$(VENV)/.installed: requirements.txt requirements-embedded.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q -r requirements.txt
	$(VENV)/bin/pip install -q --no-deps -r requirements-embedded.txt
	touch $@

# llama-cpp-python builds from source: GGML_NATIVE=OFF makes a portable build (a native one, built on a CPU with
# AMX, crashed with SIGSEGV on its first completion); --no-cache-dir keeps pip from reusing a native wheel it cached.
$(VENV)/.installed-dev: $(VENV)/.installed requirements-dev.txt
	CMAKE_ARGS="-DGGML_NATIVE=OFF" $(VENV)/bin/pip install -q --no-cache-dir -r requirements-dev.txt
	touch $@

install: $(VENV)/.installed
install-dev: $(VENV)/.installed-dev

repro: install
	dvc repro

test: install-dev
	python -m pytest -q

test-fast: install-dev
	python -m pytest -q -m "not slow"

# The error dial as a study: SEEDS x RATES experiments through DVC's queue, one at a time (2 cores), then one table of
# those experiments alone (other experiments in the repo would be pooled into the arms).
# Every experiment runs all its stages: DVC does not restore stages with `persist` outputs from its run cache.
SEEDS ?= 1234 1235 1236
RATES ?= 0 0.33
STUDY_EXPS = $(foreach seed,$(SEEDS),$(foreach rate,$(RATES),dial-s$(seed)-r$(rate)))
study: install
	for seed in $(SEEDS); do for rate in $(RATES); do \
	  dvc exp run --queue -n dial-s$$seed-r$$rate -S seed=$$seed -S synth.error_rate=$$rate || exit 1; done; done
	dvc exp run --run-all --jobs 1
	python -m relaytune.compare --by synth.error_rate $(foreach e,$(STUDY_EXPS),--exp $(e)) --out reports/study

# The learning-forgetting frontier: every train.method x every evaluated epoch, run in the workspace one after another
# so that each method trains once (its first experiment) and its other epochs rerun only the eval stages (a queued
# run would start from HEAD's dvc.lock and retrain). Every param a run changes is set in every run, because a
# workspace run leaves its params in params.yaml. Full fine-tuning takes its own, lower learning rate (Biderman et
# al. tune each method's). qlora runs last, ending on the default (epoch 3); params.yaml is then restored from git.
FRONTIER_METHODS ?= lora full qlora
LORA_LR ?= 0.001
FULL_LR ?= 0.0001
EPOCHS ?= 1 2 3
FRONTIER_EXPS = $(foreach m,$(FRONTIER_METHODS),$(foreach e,$(EPOCHS),front-$(m)-e$(e)))
frontier: install
	for method in $(FRONTIER_METHODS); do lr=$(LORA_LR); [ $$method = full ] && lr=$(FULL_LR); \
	  for epoch in $(EPOCHS); do \
	    dvc exp run -n front-$$method-e$$epoch -S train.method=$$method -S eval.adapter_epoch=$$epoch \
	      -S train.learning_rate=$$lr || exit 1; done; done
	git checkout -- params.yaml && dvc repro
	python -m relaytune.compare --frontier --by train.method --by eval.adapter_epoch \
	  $(foreach e,$(FRONTIER_EXPS),--exp $(e)) --out reports/study/frontier
