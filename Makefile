# The two commands a new user needs: `make demo` and `make test`. Both set up the environment first.
VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: venv demo test test-all test-stress bench clean

venv:
	@tools/bootstrap.sh

demo: venv
	$(VENV)/bin/smp-ros demo $(DEMO_ARGS)

test: venv
	$(PY) -m pytest $(PYTEST_ARGS)

test-all: venv
	$(PY) -m pytest -m "not gpu" $(PYTEST_ARGS)

# The default suite with every core saturated by a busy-loop process (killed at the end): tests must
# hold on a busy machine.
test-stress: venv
	$(PY) test/stress.py $(PYTEST_ARGS)

bench: venv
	$(VENV)/bin/smp-ros bench --preset sim --backend compiled --device cpu --json runs/bench_sim_cpu.json

clean:
	rm -rf $(VENV) build install log runs
