# One-command set-up: each target creates .venv when missing and installs what it needs.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
WORKDIR ?= demo-out
# make test runs the tests in two processes (pytest-xdist; most tests wait on sockets and subprocesses
# for part of their time); work stolen between them so that neither idles at the end. PYTEST_WORKERS=
# runs them in one.
PYTEST_WORKERS ?= -n 2 --dist worksteal

.PHONY: demo test lint pytest bench clean viewer

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# The node alone: no torch.
$(VENV)/.node-installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e .
	touch $@

# Everything: trainer, PostgreSQL driver, test tools.
$(VENV)/.all-installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[train,postgres,dev]'
	touch $@ $(VENV)/.node-installed

demo: $(VENV)/.node-installed
	$(BIN)/segnode demo --workdir $(WORKDIR)

# The linters beside the tests: mypy uses one core for about a minute, which the tests' two processes
# leave free part of the time. Either failing fails the target (make -j waits for the other to end).
test: $(VENV)/.all-installed
	$(MAKE) --no-print-directory -j2 lint pytest

pytest: $(VENV)/.all-installed
	$(BIN)/python -m pytest $(PYTEST_WORKERS)

# OHIF over Orthanc (DICOMweb) with the node on loopback, the demo case sent through; prints the URL.
# Needs the Debian packages orthanc, orthanc-dicomweb and npm (.ci/run installs them). Ctrl-C stops it.
viewer: $(VENV)/.node-installed
	bash deploy/viewer/install.sh
	$(BIN)/python deploy/viewer/stack.py

lint: $(VENV)/.all-installed
	$(BIN)/ruff check .
	$(BIN)/mypy
	$(BIN)/mypy benchmarks/*.py

# Every benchmark (about 10 minutes; results in build/bench/), then docs/benchmarks.md and its chart.
bench: $(VENV)/.all-installed
	@for b in inference ingest end_to_end price train_throughput; do \
		echo "== benchmarks/$$b.py"; $(BIN)/python benchmarks/$$b.py || exit 1; done
	$(BIN)/python benchmarks/brain_extraction.py --grids 256,192 --repeat 3
	$(BIN)/python benchmarks/registration.py --model models/candidates/segnode-brats-regions-1.2.0
	$(BIN)/python benchmarks/node_memory.py
	$(BIN)/python benchmarks/fine_series.py
	$(BIN)/python benchmarks/report.py

clean:
	rm -rf $(VENV) $(WORKDIR) var .pytest_cache .mypy_cache .ruff_cache

# Deploy checks alone (helm lint/template, rendered manifests, yamllint, checkov, image build contexts);
# `make test` runs the same tests. Installs helm and the checkers into .tools/ and .venv-tools/.
.PHONY: deploy-check
deploy-check: $(VENV)/.all-installed
	bash deploy/ci/install-tools.sh
	$(BIN)/python -m pytest tests/deploy
