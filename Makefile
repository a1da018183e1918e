# The README's two set-up commands: `make demo` and `make test`. Both create or reuse .venv/.
# Environment: PYTHON (interpreter), DETECTRON2_SRC (build detectron2 from this source checkout),
# SMCA_D2_SYSTEM_SITE=1 (on top of PYTHON's own packages); see scripts/bootstrap.sh.
PYTHON ?= python3
VENV_PY := .venv/bin/python
PYTEST_ARGS ?=
# make test runs the tests in this many pytest-xdist worker processes (0: in one process). Two
# keep both cores of a 2-core machine busy while the other worker's test starts a process (most of
# a train_net.py test is interpreter and import time, on one core); each worker gets its share
# of the cores as torch threads (tests/conftest.py).
TEST_WORKERS ?= 2
XDIST = -n $(TEST_WORKERS) --dist worksteal

.PHONY: install demo test test-fast test-long lint clean

install:
	@PYTHON=$(PYTHON) bash scripts/bootstrap.sh

# Train SMCA on the generated dataset on the CPU, evaluate it (the COCO AP table), then draw
# what it detects, SMCA's maps and the learning curve into output/demo/ and print what to run next.
DEMO_CONFIG := configs/demo/smca_r18_synthetic.py
demo: install
	$(VENV_PY) datasets/prepare_synthetic.py
	$(VENV_PY) train_net.py --config-file $(DEMO_CONFIG) --num-gpus 1
	$(VENV_PY) tools/demo_report.py --config-file $(DEMO_CONFIG)

# Lint and formatting (ruff, configured in pyproject.toml), then every test, the small
# end-to-end runs (marked `slow`) included; not the long runs (marked `long`: the full-size
# benchmarks and the end-to-end runs of every derived config, which `make test` covers in a
# smaller form).
test: install lint
	$(VENV_PY) -m pytest tests -m "not long" $(XDIST) $(PYTEST_ARGS)

lint: install
	$(VENV_PY) -m ruff check .
	$(VENV_PY) -m ruff format --check .

# Unit tests only.
test-fast: install
	$(VENV_PY) -m pytest tests -m "not slow and not long" $(XDIST) $(PYTEST_ARGS)

# The long runs only (minutes each on a CPU).
test-long: install
	$(VENV_PY) -m pytest tests -m long $(PYTEST_ARGS)

clean:
	rm -rf .venv output .pytest_cache
