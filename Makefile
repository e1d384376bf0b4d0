# make reproduce : run notebooks 01-05 headless with the full configuration, write figures/
# make test      : unit tests plus every notebook in FAST mode
# Both create .venv and install requirements.txt first when needed.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: reproduce test clean

$(VENV)/installed: requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -r requirements.txt
	touch $@

reproduce: $(VENV)/installed
	$(PY) tools/run_notebooks.py

test: $(VENV)/installed
	$(PY) -m pytest

clean:
	rm -rf build figures/fast data/checkpoints/*-fast.pt
