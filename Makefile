# Two commands do all the set-up: `make run` (the main job) and `make test` (the whole suite).
# `make test-fast` is the inner loop: every package, without the tests marked `slow` (< 2 min).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# On this project's machines the CPU torch wheel lies in /opt/wheels; elsewhere pip uses PyPI.
FIND_LINKS := $(if $(wildcard /opt/wheels),--find-links /opt/wheels,)
PIP_FLAGS := -q --disable-pip-version-check $(FIND_LINKS) -c $(CURDIR)/constraints.txt
PIP_INSTALL := $(PY) -m pip install $(PIP_FLAGS)

.PHONY: setup run test test-fast lint clean plain-smoke
setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	@echo "setup: installing this project into $(VENV) with its dependencies from pyproject.toml, pinned by constraints.txt:"
	@echo "setup:   torch (CPU build), onnx, onnxruntime, openvino + nncf, numpy, scikit-learn, matplotlib; pytest, ruff (about a minute, once)"
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP_INSTALL) -e ".[dev]"
	@$(PY) -m pip list --disable-pip-version-check --format=freeze 2>/dev/null \
		| grep -iE '^(torch|onnx|onnxruntime|openvino|nncf|numpy)==' | tr '\n' ' ' | sed 's/^/setup: installed /'; echo
	touch $@

run: setup
	$(PY) -m pipeline run $(ARGS)

test: setup
	$(PY) -m pytest -q $(ARGS)

# The slowest tests (end-to-end runs, kills, DDP, device round trips; marked `slow`) left out.
test-fast: setup
	$(PY) -m pytest -q -m "not slow" --durations=5 $(ARGS)

lint: setup
	$(PY) -m ruff check .

# CI: `pip install .` without extras into a fresh venv runs the main job (.ci/plain-install-smoke).
plain-smoke:
	PIP_FLAGS="$(PIP_FLAGS)" PYTHON="$(PYTHON)" bash .ci/plain-install-smoke

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
