# Set-up and runs. Every target installs what it needs first; torch is pinned to the local CPU build through
# constraints.txt so a fresh machine never pulls a multi-GB CUDA wheel.
PY ?= python3
PIP = $(PY) -m pip install -q -c constraints.txt

.PHONY: install-test install-examples test example example-accelerate lint bench

install-test:
	$(PIP) torch==2.13.0
	$(PIP) -e ".[test]"

install-examples:
	$(PIP) torch==2.13.0
	$(PIP) -e ".[examples]"

test: install-test
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q

lint: install-test
	$(PY) -m ruff check .

example: install-examples
	HF_HUB_OFFLINE=1 $(PY) examples/train_trainer.py

# Two CPU processes: `--multi_gpu` only selects the torchrun launcher; with CUDA hidden the script forms a gloo CPU
# group. (`accelerate launch --cpu --num_processes 2` starts a single process in Accelerate 1.x.)
example-accelerate: install-examples
	CUDA_VISIBLE_DEVICES="" HF_HUB_OFFLINE=1 accelerate launch --multi_gpu --num_processes 2 examples/train_accelerate.py --ema

bench:
	$(PIP) torch==2.13.0
	$(PIP) -e ".[bench,examples]"
	$(PY) benchmarks/run_all.py
