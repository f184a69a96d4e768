# μOmni: `make demo` trains on the built-in demo world and answers; `make test` runs the tests;
# `make lint` checks the code with ruff (ruff.toml).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: install demo lint test test-fast clean

install: $(VENV)/.installed

# The demo needs only the runtime requirements; tests, lint and the exports need the rest too.
$(VENV)/.runtime: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	touch $@

$(VENV)/.installed: $(VENV)/.runtime requirements-extra.txt requirements-dev.txt
	$(PY) -m pip install --quiet -r requirements.txt -r requirements-extra.txt -r requirements-dev.txt
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
