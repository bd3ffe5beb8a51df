# Two commands on a fresh clone: `make train` (set up + main job) and `make test` (set up + tests).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
BIN := $(VENV)/bin
TORCHREC := torchrec==1.8.0
DATASET ?= data/synthetic-small
CONFIG ?= configs/default.yaml
NPROC ?= 2
ARGS ?=

.PHONY: setup setup-gpu train compare test bench-setup bench typecheck lint clean

setup: $(VENV)/.installed-cpu

$(VENV)/.installed-cpu: requirements/cpu.txt requirements/common.txt requirements/dev.txt setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -r requirements/cpu.txt -r requirements/dev.txt
	$(PY) -m pip install -q --no-deps $(TORCHREC)
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	rm -f $(VENV)/.installed-gpu
	touch $@

# GPU nodes: CUDA torch + fbgemm-gpu into the same .venv (replaces the CPU build).
setup-gpu: $(VENV)/.installed-gpu

$(VENV)/.installed-gpu: requirements/gpu.txt requirements/common.txt requirements/dev.txt setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip uninstall -q -y fbgemm-gpu-cpu || true
	$(PY) -m pip install -q -r requirements/gpu.txt -r requirements/dev.txt
	$(PY) -m pip install -q --no-deps $(TORCHREC)
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	rm -f $(VENV)/.installed-cpu
	touch $@

# The main job: generate the built-in synthetic click log (once), then a 2-process torchx training job.
train: setup
	$(BIN)/compactrec generate small --out $(DATASET)
	$(BIN)/compactrec prepare $(CONFIG) $(ARGS)
	PATH=$(abspath $(BIN)):$$PATH $(BIN)/compactrec train $(CONFIG) --nproc $(NPROC) $(ARGS)

# Full tables vs the compressed methods on the same data, side by side (issue evidence, not a benchmark).
COMPARE_CONFIGS ?= configs/default.yaml configs/memrec_small.yaml configs/lma_small.yaml configs/robe_small.yaml \
	configs/hash_small.yaml configs/qr_small.yaml
compare: setup
	$(BIN)/compactrec generate small --out $(DATASET)
	for c in $(COMPARE_CONFIGS); do $(BIN)/compactrec prepare $$c && \
		PATH=$(abspath $(BIN)):$$PATH $(BIN)/compactrec train $$c --nproc $(NPROC) $(ARGS) || exit 1; done
	$(BIN)/compactrec compare $(foreach c,$(COMPARE_CONFIGS),runs/$(basename $(notdir $(c))))

# The whole test suite, after the linter (ruff, pyproject.toml) and the type check (mypy with
# check_untyped_defs on the library packages, setup.cfg). pytest's exit code 5 (no tests collected) is a failure
# here, said plainly.
test: setup lint typecheck
	@PATH=$(abspath $(BIN)):$$PATH $(BIN)/pytest tests -q -ra --durations=15; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test: pytest collected no tests (exit 5) - treating as failure"; exit 1; fi; \
	exit $$rc

# Benchmarks (not part of the tests): plotting needs matplotlib. See docs/results/ for the commands.
bench-setup: setup
	$(PY) -m pip install -q -r requirements/bench.txt

bench: bench-setup
	PYTHONPATH=. $(PY) benchmarks/embedding_stage.py --quick

typecheck: setup
	$(BIN)/mypy

lint: setup
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) runs *.egg-info
