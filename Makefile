# Set-up and runs. Each target first makes (or reuses) a virtual environment and installs what it needs into it,
# so nothing else installed on the machine can interfere. torch is pinned to the local CPU build through
# constraints.txt, so a fresh machine never pulls a multi-GB CUDA wheel.
PY ?= python3
VENV ?= .venv
VPY = $(VENV)/bin/python
PIP = $(VPY) -m pip install -q -c constraints.txt

.PHONY: venv install-test install-examples install-bench test example example-accelerate lint bench bench-quick

$(VPY):
	$(PY) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip setuptools wheel

venv: $(VPY)

install-test: venv
	$(PIP) torch==2.13.0
	$(PIP) -e ".[test]"

install-examples: venv
	$(PIP) torch==2.13.0
	$(PIP) -e ".[examples]"

test: install-test
	HF_HUB_OFFLINE=1 $(VPY) -m pytest -q

lint: install-test
	$(VPY) -m ruff check .

example: install-examples
	HF_HUB_OFFLINE=1 $(VPY) examples/train_trainer.py

# Post-hoc EMA: trains once, then synthesises and evaluates a range of sigma_rel (runs/digits_posthoc/posthoc_sweep.png).
.PHONY: example-posthoc
example-posthoc: install-examples
	HF_HUB_OFFLINE=1 $(VPY) examples/train_posthoc.py

# Two CPU processes: `--multi_gpu` only selects the torchrun launcher; with CUDA hidden the script forms a gloo CPU
# group. (`accelerate launch --cpu --num_processes 2` starts a single process in Accelerate 1.x.)
example-accelerate: install-examples
	CUDA_VISIBLE_DEVICES="" HF_HUB_OFFLINE=1 $(VENV)/bin/accelerate launch --multi_gpu --num_processes 2 \
		examples/train_accelerate.py --ema

# The benchmarks time hf_ema next to timm, diffusers, ema-pytorch and torch_ema, in their own environment with the
# same CPU torch (constraints.txt). timm requires torchvision, whose PyPI wheels are built for the matching PyPI
# (CUDA) torch; its EMA classes need neither, so timm comes without its dependencies (its light ones are in the
# `bench` extra) and benchmarks/_common.py loads timm/utils/model_ema.py without importing the timm package.
# `make bench-quick`: every script with --quick in the same environment (seconds per script; a smoke test).
BENCH_VPY = .venv-bench/bin/python

install-bench:
	$(MAKE) VENV=.venv-bench venv
	$(BENCH_VPY) -m pip install -q -c constraints.txt torch==2.13.0
	$(BENCH_VPY) -m pip install -q -c constraints.txt -e ".[bench,examples]"
	$(BENCH_VPY) -m pip install -q -c constraints.txt --no-deps "timm>=1.0"

bench: install-bench
	HF_HUB_OFFLINE=1 $(BENCH_VPY) benchmarks/run_all.py

bench-quick: install-bench
	HF_HUB_OFFLINE=1 $(BENCH_VPY) benchmarks/run_all.py --quick
