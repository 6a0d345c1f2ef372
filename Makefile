# Set-up is two commands: `make demo` (venv + install + the default pipeline on the
# embedded offline suite) and `make test` (the test suite, offline).
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
SUITE ?= offline
# paper8 needs a CLIP backbone: vit_b32 unless BACKBONE= says otherwise
BACKBONE ?= $(if $(filter paper8,$(SUITE)),vit_b32,offline)
ARGS ?=
# SWEEP="correction.beta=0.1,1 merge=ties,task_arithmetic": a Hydra multirun over those values
SWEEP ?=
# FAST=1: preset=fast (every target in about 2 minutes once the suite is built; labelled "fast")
FAST ?=
export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1
export WANDB_MODE ?= offline
export WANDB_SILENT ?= true
# Hydra flags in ARGS (--multirun, --cfg job, ...) go before the overrides, where Hydra's
# parser accepts them; SWEEP adds hydra.mode=MULTIRUN and its values
PRESET = $(if $(FAST),preset=fast)
RUN = $(PY) -m pipeline.main $(filter -%,$(ARGS)) suite=$(SUITE) backbone=$(BACKBONE) $(PRESET) \
      $(if $(SWEEP),hydra.mode=MULTIRUN $(SWEEP))
HARGS = $(filter-out -%,$(ARGS))
SCRIPT_ARGS = suite=$(SUITE) backbone=$(BACKBONE) $(PRESET) $(ARGS)

.PHONY: venv demo test test-fast test-reliability bench lint format clean-cache \
        table1 table2 fig-pairwise fig-simplex fig-cost ablation-beta ablation-data \
        ablation-aggregation tsne compare diagnostics bounds docs-figures time-targets

$(VENV)/.installed: requirements.txt pyproject.toml
	test -d $(VENV) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch and torchvision through pip (which finds the CPU build wherever pip is configured to
	# look), the rest through uv, compiled to bytecode as pip does (without it every process
	# imports 8 s slower where PYTHONDONTWRITEBYTECODE is set); plain pip if uv fails
	$(PY) -m pip install -q $$(grep -E '^torch(vision)?==' requirements.txt) uv==0.13.8
	$(PY) -m uv pip install -q --compile-bytecode --python $(PY) -r requirements.txt || \
	  $(PY) -m pip install -q -r requirements.txt
	# animal-mnist declares a tensorflow dependency it does not need
	$(PY) -m pip install -q --no-deps animal-mnist==0.4
	# the project itself, editable, for the console command `react-merging` (its pins are above)
	$(PY) -m pip install -qq --no-deps --no-build-isolation -e . || \
	  $(PY) -m pip install -qq --no-deps -e .
	touch $@

venv: $(VENV)/.installed

demo: venv
	$(RUN) $(HARGS)

# --dist loadscope: each test module runs on one worker, so its module-scoped fixtures (a
# pipeline run, a sweep) are built once, not once per worker (BENCHMARKS.md: test suite)
test: venv
	$(PY) -m pytest -q -n 2 --dist loadscope --timeout 900 --durations=15 $(ARGS)

test-fast: venv
	$(PY) -m pytest -q -n 2 --dist loadscope -m "not slow" $(ARGS)

test-reliability: venv
	$(PY) -m pytest -q -m reliability $(ARGS)

bench: venv
	$(PY) bench/bench_react.py
	$(PY) bench/bench_merging.py
	$(PY) bench/bench_pipeline.py
	$(PY) bench/bench_preference_models.py
	$(PY) bench/bench_suite_data.py
	$(PY) bench/bench_forward_processes.py

lint: venv
	$(PY) -m ruff check .

format: venv
	$(PY) -m ruff format .

clean-cache:
	rm -rf outputs/cache

# ---- paper reproductions: each is one Hydra experiment config (configs/experiment/); the
# sweeps (table1, ablation-*) set hydra.mode: MULTIRUN there
table1: venv
	$(RUN) experiment=table1 $(HARGS)
table2: venv
	$(RUN) experiment=table2 $(HARGS)
fig-pairwise: venv
	$(RUN) experiment=fig_pairwise $(HARGS)
fig-simplex: venv
	$(RUN) experiment=fig_simplex $(HARGS)
fig-cost: venv
	$(PY) scripts/cost_vs_tasks.py $(SCRIPT_ARGS)
ablation-beta: venv
	$(RUN) experiment=ablation_beta $(HARGS)
ablation-data: venv
	$(RUN) experiment=ablation_data $(HARGS)
ablation-aggregation: venv
	$(RUN) experiment=ablation_aggregation $(HARGS)
tsne: venv
	$(PY) scripts/tsne.py $(SCRIPT_ARGS)
compare: venv
	$(RUN) experiment=compare $(HARGS)

# every README figure, regenerated into docs/figures (the runs above, then a copy of the
# newest complete outputs: scripts/docs_figures.py names any figure it could not find)
docs-figures: venv
	$(MAKE) compare tsne ablation-beta ablation-data ablation-aggregation
	$(MAKE) fig-cost ARGS="methods=[react,pref_ta,pareto_merging,map] num_threads=1 $(ARGS)"
	$(PY) scripts/docs_figures.py

# the suite's regime (zero-shot, experts, TA / TIES / AdaMerging, feature geometry, paper
# targets), no ReACT or baseline result; ARGS="--fast" for 100 AdaMerging steps
diagnostics: venv
	$(PY) scripts/suite_diagnostics.py $(SCRIPT_ARGS)
# oracle reference rows: ReACT on the whole test set, best linear maps trained with labels
bounds: venv
	$(PY) scripts/linear_bounds.py $(SCRIPT_ARGS)

# every paper target at full and FAST=1 settings, timed (TIME_ARGS="--targets compare ...");
# a markdown table in outputs/time_targets.md
time-targets: venv
	$(PY) scripts/time_targets.py $(TIME_ARGS)
