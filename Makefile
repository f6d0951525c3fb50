# Two commands on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
DEMO_DIR ?= runs/demo
# glibc's malloc asks for transparent huge pages where the kernel grants them only on request
# ("madvise"): XLA allocates a CPU step's temporaries afresh every step, and with 4 KiB pages each
# is faulted in again (docs/performance.md). Opt in for your own runs the same way.
HUGE_PAGES := GLIBC_TUNABLES=glibc.malloc.hugetlb=1

.PHONY: setup setup-dev demo test bench bench-gpu lint clean sweep

setup: $(VENV)/.runtime
setup-dev: $(VENV)/.dev

$(VENV)/.runtime: requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	touch $@

$(VENV)/.dev: requirements-dev.txt $(VENV)/.runtime
	$(PY) -m pip install -q -r requirements-dev.txt
	touch $@

# Trains GPT-1 tiny (post-LN, bytes) on CPython's documentation text, then prints the result,
# plots the losses and says what to try next.
demo: setup
	rm -rf $(DEMO_DIR)
	$(HUGE_PAGES) $(PY) -m experiments.train --config=configs/gpt1.py:tiny --workdir=$(DEMO_DIR)
	$(PY) -m experiments.sample --workdir=$(DEMO_DIR) --prompt="The with statement" \
		--max_new_tokens=100 --temperature=0.8 --top_k=40
	$(PY) -m experiments.plot --workdir=$(DEMO_DIR)
	@echo
	@echo "The run is in $(DEMO_DIR): config.json, metrics.jsonl, loss.png, tensorboard/, checkpoints/."
	@echo "Next:"
	@echo "  GPT-2's pre-LN block on the same data:"
	@echo "    $(PY) -m experiments.train --config=configs/gpt2.py:tiny --workdir=runs/gpt2_tiny"
	@echo "  both runs on one plot:"
	@echo "    $(PY) -m experiments.plot --workdir=$(DEMO_DIR) runs/gpt2_tiny"
	@echo "  watch runs live in TensorBoard (make setup-dev installs it):"
	@echo "    $(VENV)/bin/tensorboard --logdir=runs"
	@echo "  every program's flags: $(PY) -m experiments.train --help"

# Runs a sweep and its report (default: pre- vs post-LN, 15-30 min on 2 CPU cores); rerun to resume.
SWEEP ?= configs/sweeps/norm_placement.py:tiny
SWEEP_DIR ?= runs/norm_placement_tiny
sweep: setup
	$(PY) -m experiments.sweep --config=$(SWEEP) --workdir=$(SWEEP_DIR)

# Two workers: the tests are mostly single-threaded compiles and subprocess start-ups (8m on 2
# cores, against 12m41s on one worker).
TEST_WORKERS ?= 2
test: setup-dev
	$(PY) -m pytest -q -n $(TEST_WORKERS) tests

# The train step at GPT-2 small (seq 512, batch 4) and at a tiny shape, beside Hugging Face's
# PyTorch GPT-2 eager and under torch.compile, in three rounds that take turns (ratios: medians of
# the rounds'), plus sampling and the data pipeline at small; ratios ours/peer. About 13 minutes
# on 2 CPU cores. JSON in bench_results/. On a shared machine BENCH_FLAGS=--cpus=1 pins both
# sides to one core (see experiments/bench.py).
BENCH_FLAGS ?=
BENCH_SMALL := --config=configs/gpt2.py:small --config.data.seq_len=512 --config.data.batch_size=4
BENCH_TINY := --config=configs/gpt2.py:small --config.model.n_layer=4 --config.model.d_model=256 \
	--config.model.n_head=4 --config.model.d_ff=1024 --config.data.seq_len=256 --config.data.batch_size=8
bench: setup-dev
	$(HUGE_PAGES) $(PY) -m experiments.bench $(BENCH_SMALL) --peer --compile_peer --warmup=1 --repeats=3 --rounds=3 $(BENCH_FLAGS)
	$(HUGE_PAGES) $(PY) -m experiments.bench $(BENCH_TINY) --what=train --peer --compile_peer --warmup=2 --repeats=5 --rounds=3 $(BENCH_FLAGS)

# The same shapes on a GPU in bf16 (needs jax[cuda12]==0.10.2 in $(VENV)); no peer.
bench-gpu: setup
	PY=$(PY) tools/bench_gpu.sh

lint: setup-dev
	$(VENV)/bin/ruff check gpt experiments configs tests tools

# The virtualenv and the prepared corpora; never runs/, which holds your runs.
clean:
	rm -rf $(VENV) data
