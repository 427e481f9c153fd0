# The two commands a new user needs: `make demo` and `make test`. Both set up the environment first.
VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: venv demo lint test test-random test-all test-stress bench train-sim gpu-wheels gpu-check clean

venv:
	@tools/bootstrap.sh

demo: venv
	$(VENV)/bin/smp-ros demo $(DEMO_ARGS)

lint: venv
	$(VENV)/bin/ruff check smp_ros test tools

test: lint
	$(PY) -m pytest $(PYTEST_ARGS)

# The default suite runs in random order (pytest.ini); this target runs it on three fixed seeds.
test-random: lint
	for seed in 101 202 303; do $(PY) -m pytest --randomly-seed=$$seed $(PYTEST_ARGS) || exit 1; done

test-all: lint
	$(PY) -m pytest -m "not gpu" $(PYTEST_ARGS)
	OUT=runs/gpu_check_dry tools/gpu_check.sh --dry-run

# The GPU check (BENCHMARKS.md, "GPU check"): `make gpu-wheels` here, then `make gpu-check` (or
# `bash tools/gpu_check.sh`) on the GPU machine with .whl/ carried. No venv target: the GPU machine
# has no network, the check builds its own environment from the image and .whl/.
gpu-wheels: venv
	tools/fetch_gpu_wheels.sh

gpu-check:
	tools/gpu_check.sh $(GPU_CHECK_ARGS)

# The default suite with every core saturated by a busy-loop process (killed at the end): tests must
# hold on a busy machine.
test-stress: venv
	$(PY) test/stress.py $(PYTEST_ARGS)

# The shipped model's recipe (README, "The shipped model"); rerun it to continue where it stopped.
train-sim: venv
	tools/train_sim.sh

bench: venv
	$(VENV)/bin/smp-ros bench --preset sim --backend compiled --device cpu --json runs/bench_sim_cpu.json

clean:
	rm -rf $(VENV) build install log runs
