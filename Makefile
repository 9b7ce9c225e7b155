# The two README commands, `make demo` and `make test`, each create .venv first.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export FLWR_TELEMETRY_ENABLED := 0
export FLWR_DISABLE_UPDATE_CHECK := 1

.PHONY: demo test lint bench clean

# Reinstall whenever pyproject.toml changes (the stamp is older than it).
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	@# fedhosp server puts nginx in front of the SuperLink (Fleet API only); its tests need it too.
	command -v nginx >/dev/null || (apt-get update -qq && apt-get install -y -qq nginx-light) \
		|| echo "warning: nginx is missing and could not be installed: fedhosp server and its tests need it"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/fedhosp simulate --sites 5 --out runs/demo

test: $(STAMP)
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check .

# Every benchmark in bench/: one table, and bench/results.json. QUICK=1: a shorter, noisier pass.
bench: $(STAMP)
	$(BIN)/python -m bench $(if $(QUICK),--quick)

clean:
	rm -rf runs .pytest_cache .ruff_cache
