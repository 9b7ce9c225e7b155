# The two README commands, `make demo` and `make test`, each create .venv first.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint bench gpu-check lock clean

LOCK := requirements.lock
BOOTSTRAP := $(VENV)/bootstrap.lock

# Every install is the committed lock, hash-checked: the whole tree at exact versions. First pip,
# setuptools and wheel from the lock (the venv's own pip predates the lock's), then everything with
# builds that use those (grad-cam ships only an sdist), then our own code, no dependency resolution.
# Reinstall whenever the lock or pyproject.toml changes (the stamp is older than them).
$(STAMP): pyproject.toml $(LOCK)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	awk '/^[A-Za-z0-9]/{keep=($$0 ~ /^(pip|setuptools|wheel)==/)} keep' $(LOCK) > $(BOOTSTRAP)
	$(BIN)/python -m pip install --quiet --require-hashes --no-deps -r $(BOOTSTRAP)
	$(BIN)/python -m pip install --quiet --require-hashes --no-deps --no-build-isolation -r $(LOCK)
	$(BIN)/python -m pip install --quiet --no-deps --no-build-isolation -e .
	$(BIN)/python -m pip check
	@# fedhosp server puts nginx in front of the SuperLink (Fleet API only); its tests need it too.
	command -v nginx >/dev/null || (apt-get update -qq && apt-get install -y -qq nginx-light) \
		|| echo "warning: nginx is missing and could not be installed: fedhosp server and its tests need it"
	touch $(STAMP)

# Refresh the lock deliberately, in a commit of its own: the newest releases inside pyproject's ranges
# (UPGRADE=1), or only what a changed pyproject needs (default). Needs the index, as any install does.
lock: $(STAMP)
	$(BIN)/pip-compile --quiet --generate-hashes --allow-unsafe --all-build-deps --extra dev --strip-extras \
		--no-emit-index-url --no-emit-find-links $(if $(UPGRADE),--upgrade) --output-file $(LOCK) pyproject.toml

demo: $(STAMP)
	$(BIN)/fedhosp simulate --sites 5 --out runs/demo

# The suite on both cores (pytest-xdist), one test file per worker at a time: a file's module fixtures
# (each one simulation) run once, and one file's idle waits (Flower's heartbeat) overlap another's work.
# The ten slowest tests close the report: where the suite's time goes, in every CI log.
TEST_WORKERS ?= 2
test: $(STAMP)
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile --durations=10

lint: $(STAMP)
	$(BIN)/ruff check .

# Every benchmark in bench/: one table, and bench/results.json. QUICK=1: a shorter, noisier pass.
bench: $(STAMP)
	$(BIN)/python -m bench $(if $(QUICK),--quick)

# On a machine with a GPU (<= 5 min): GPU against CPU for every model's plain and DP steps, DP cost there,
# and a 3-site simulation with --gpus-per-site; non-zero exit on any mismatch (bench/gpu_check.py).
gpu-check: $(STAMP)
	$(BIN)/python -m bench.gpu_check

clean:
	rm -rf runs .pytest_cache .ruff_cache
