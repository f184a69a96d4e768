# μOmni: `make demo` trains on the built-in demo world and answers; `make test` runs the tests.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: install demo test test-fast clean

install: $(VENV)/.installed

$(VENV)/.installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	touch $@

demo: install
	$(PY) train_text.py --config configs/thinker_tiny.json
	$(PY) infer.py --ckpt_dir checkpoints/thinker_tiny --text "a small red circle"

test: install
	$(PY) -m pytest -q

test-fast: install
	$(PY) -m pytest -q -m "not slow"

clean:
	rm -rf checkpoints runs
