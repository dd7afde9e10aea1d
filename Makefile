# Each target creates .venv and installs the project when needed (README.md, "Quick start").
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install test test-all bench bench-all bench-gpu gpu-check nft-study leaderboard lint clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

# test: the default tier (everything that guards correctness); test-all adds the slow tier. PYTEST_ARGS: extra
# pytest options (CI: --durations=15).
test: $(STAMP)
	$(PY) -m pytest -q -m "not slow" $(PYTEST_ARGS)

test-all: $(STAMP)
	$(PY) -m pytest -q $(PYTEST_ARGS)

# The quick preset computed afresh (victims included) into runs/bench (git-ignored), printed beside the committed
# reference results/quick with cells beyond 2 percentage points flagged (benchmarks/compare.py says why).
bench: $(STAMP)
	rm -rf runs/bench
	$(VENV)/bin/nftbench bench --preset quick --runs-dir runs/bench --out runs/bench/quick --compare results/quick

bench-all: $(STAMP)
	$(VENV)/bin/nftbench sweep benchmarks/configs/paper.yaml --out results/paper

# GPU box: CIFAR-10 victim training throughput, then NFT, ANP and I-BAU wall times (defaults) on one victim.
# Needs DATA_ROOT with CIFAR-10; the victim is trained once (SCALE=paper: ResNet-18) and cached under runs/.
SCALE ?= paper
bench-gpu: $(STAMP)
	@test -n "$(DATA_ROOT)" || { echo "bench-gpu: set DATA_ROOT to the folder holding CIFAR-10"; exit 2; }
	$(VENV)/bin/nftbench perf --dataset cifar10 --data-root "$(DATA_ROOT)" --device cuda --scale $(SCALE) \
		--defenses nft,anp,i-bau --json results/perf/cifar10-$(SCALE)-cuda.json

# Issue 21's ten-minute GPU check (benchmarks/gpu_check.py): versions, PreAct-ResNet-18 and airbench training
# throughput, NFT/ANP/I-BAU at paper defaults on a step-capped victim, one NFT cell through the sweep executor, GPU
# utilisation -> results/perf/gpu-check-<device>.json. DEVICE=cpu: the same on digits with tiny caps (seconds).
DEVICE ?= cuda
gpu-check: $(STAMP)
	@test "$(DEVICE)" = cpu || test -n "$(DATA_ROOT)" || { echo "gpu-check: set DATA_ROOT to the folder holding CIFAR-10"; exit 2; }
	$(PY) -m benchmarks.gpu_check --device $(DEVICE) $(if $(DATA_ROOT),--data-root "$(DATA_ROOT)")

# Issue 9's NFT study: the development grid (digits, always available), then the CIFAR-10 variant, budget and
# scale grids (DATA_ROOT with CIFAR-10), then its tables and plots (results/ablations/study.md). Resumable.
nft-study: $(STAMP)
	@test -n "$(DATA_ROOT)" || { echo "nft-study: set DATA_ROOT to the folder holding CIFAR-10"; exit 2; }
	$(VENV)/bin/nftbench sweep nft-dev-digits --out results/ablations/dev-digits
	$(VENV)/bin/nftbench sweep nft-ablations --out results/ablations/variants --data-root "$(DATA_ROOT)"
	$(VENV)/bin/nftbench sweep nft-budgets --out results/ablations/budgets --data-root "$(DATA_ROOT)" \
		--reuse results/ablations/variants
	$(VENV)/bin/nftbench sweep nft-scale --out results/ablations/scale --data-root "$(DATA_ROOT)" \
		--reuse results/ablations/variants
	$(VENV)/bin/nftbench perf --variants nft-ablations --dataset cifar10 --data-root "$(DATA_ROOT)" \
		--json results/ablations/perf.json
	$(PY) -m benchmarks.study results/ablations

# Every committed record -> results/LEADERBOARD.md, results/<task>/<dataset>.csv, results/plots/ and the static site
# results/site/ (open results/site/index.html).
leaderboard: $(STAMP)
	$(VENV)/bin/nftbench leaderboard results --out results
	$(VENV)/bin/nftbench leaderboard results --html --out results/site

lint: $(STAMP)
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) runs
