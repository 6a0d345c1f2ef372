# Set-up is two commands: `make demo` (venv + install + the default pipeline on the
# embedded offline suite) and `make test` (the test suite, offline).
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
BACKBONE ?= offline
SUITE ?= offline
ARGS ?=
export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1
export WANDB_MODE ?= offline
export WANDB_SILENT ?= true
RUN := $(PY) -m pipeline.main suite=$(SUITE) backbone=$(BACKBONE)

.PHONY: venv demo test test-fast test-reliability bench lint format clean-cache \
        table1 table2 fig-pairwise fig-simplex fig-cost ablation-beta ablation-data \
        ablation-aggregation tsne compare diagnostics docs-figures

$(VENV)/.installed: requirements.txt
	test -d $(VENV) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	# animal-mnist declares a tensorflow dependency it does not need
	$(PY) -m pip install -q --no-deps animal-mnist==0.4
	touch $@

venv: $(VENV)/.installed

demo: venv
	$(RUN) $(ARGS)

test: venv
	$(PY) -m pytest -q -n 2 --timeout 900 $(ARGS)

test-fast: venv
	$(PY) -m pytest -q -n 2 -m "not slow" $(ARGS)

test-reliability: venv
	$(PY) -m pytest -q -m reliability $(ARGS)

bench: venv
	$(PY) bench/bench_react.py
	$(PY) bench/bench_merging.py
	$(PY) bench/bench_pipeline.py

lint: venv
	$(PY) -m ruff check .

format: venv
	$(PY) -m ruff format .

clean-cache:
	rm -rf outputs/cache

# ---- paper reproductions: each is one Hydra experiment config (configs/experiment/); the
# sweeps (table1, ablation-*) set hydra.mode: MULTIRUN there (a --multirun flag after the
# overrides of $(RUN) would be rejected by Hydra's argument parser)
table1: venv
	$(RUN) experiment=table1 $(ARGS)
table2: venv
	$(RUN) experiment=table2 $(ARGS)
fig-pairwise: venv
	$(RUN) experiment=fig_pairwise $(ARGS)
fig-simplex: venv
	$(RUN) experiment=fig_simplex $(ARGS)
fig-cost: venv
	$(PY) scripts/cost_vs_tasks.py suite=$(SUITE) backbone=$(BACKBONE) $(ARGS)
ablation-beta: venv
	$(RUN) experiment=ablation_beta $(ARGS)
ablation-data: venv
	$(RUN) experiment=ablation_data $(ARGS)
ablation-aggregation: venv
	$(RUN) experiment=ablation_aggregation $(ARGS)
tsne: venv
	$(PY) scripts/tsne.py suite=$(SUITE) backbone=$(BACKBONE) $(ARGS)
compare: venv
	$(RUN) experiment=compare $(ARGS)

# every README figure, regenerated into docs/figures (the runs above, then a copy of the
# newest complete outputs: scripts/docs_figures.py names any figure it could not find)
docs-figures: venv
	$(MAKE) compare tsne ablation-beta ablation-data ablation-aggregation
	$(MAKE) fig-cost ARGS="methods=[react,pref_ta,pareto_merging,map] num_threads=1 $(ARGS)"
	$(PY) scripts/docs_figures.py

# the suite's regime (zero-shot, experts, TA / TIES / AdaMerging, feature geometry, paper
# targets), no ReACT or baseline result; ARGS="--fast" for 100 AdaMerging steps
diagnostics: venv
	$(PY) scripts/suite_diagnostics.py suite=$(SUITE) backbone=$(BACKBONE) $(ARGS)
