# μOmni: `make demo` trains on the built-in demo world and answers; `make test` runs the tests;
# `make lint` checks the code with ruff (rules in pyproject.toml).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: install demo lint test test-fast clean

install: $(VENV)/.installed

# The package (pyproject.toml) is installed editable, so `import omni` works from any folder.
# The demo needs only its runtime dependencies; tests, lint and the exports need the dev extra too
# (every optional extra plus the dev tools).
$(VENV)/.runtime: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e .
	touch $@

$(VENV)/.installed: $(VENV)/.runtime pyproject.toml
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $@

demo: $(VENV)/.runtime
	$(PY) -m omni.pipeline configs/pipeline_demo.json
	$(PY) infer.py --image data/demo/images/test_00000.png --text "how many shapes are there?" --audio_out answer.wav

lint: install
	$(VENV)/bin/ruff check .

test: install
	$(PY) -m pytest -q

test-fast: install
	$(PY) -m pytest -q -m "not slow"

clean:
	rm -rf checkpoints runs
