# The two commands: `make demo` and `make test` (each sets up .venv first).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.tokfleet-installed
EXTRAS ?= dev,s3,distributed,meg,video
# Ray, SLURM and S3 servers must stay on loopback on these machines: run confined when root.
CONFINED := $(PY) -m core.netns --

.PHONY: setup demo test bench clean ops

# DeepSpeed's CPU Adam (ZeRO optimizer offload) is compiled on first use (~2-3 min here, then cached in
# ~/.cache/torch_extensions): build it before the tests, outside any test's time limit
ops: setup
	DS_ACCELERATOR=cpu $(PY) -c "from deepspeed.accelerator import get_accelerator as a; a().create_op_builder('CPUAdamBuilder').load(verbose=False)"

$(STAMP): pyproject.toml constraints.txt Makefile
	$(PYTHON) -m venv $(VENV)
	# the CPU build of torch first (on this machine's disk); a bare `torch` would pull CUDA
	$(PY) -m pip install -q torch==2.13.0 -c constraints.txt
	$(PY) -m pip install -q -e ".[$(EXTRAS)]" -c constraints.txt
	touch $(STAMP)

setup: $(STAMP)

demo: setup
	RAY_USAGE_STATS_ENABLED=0 WANDB_MODE=offline $(VENV)/bin/tokfleet demo

test: setup ops
	# SLURM and Ceph radosgw from apt, while the network is there (the suite runs without it)
	$(PY) tests/system_packages.py
	RAY_USAGE_STATS_ENABLED=0 WANDB_MODE=offline $(CONFINED) $(PY) -m pytest -q --durations=20 tests --ignore=tests/bench

bench: setup ops
	$(PY) tests/system_packages.py
	RAY_USAGE_STATS_ENABLED=0 WANDB_MODE=offline $(CONFINED) $(PY) -m pytest -q -s tests/bench

clean:
	rm -rf $(VENV) demo runs
