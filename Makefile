# Two commands on a fresh machine:  `make demo` (set up + full default pipeline), `make test` (set up + tests).
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: install demo test tiny bench clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	# torch first, pinned: it takes the CPU wheel; anything unpinned could pull a CUDA build
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -c constraints.txt -e '.[dev]'
	$(BIN)/python -c "import torch, sys; v = torch.__version__; sys.exit(0 if v.startswith('2.13.0') else f'torch {v} != 2.13.0')"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/lmforge run -c default

tiny: $(STAMP)
	$(BIN)/lmforge run -c tiny --workspace workspace-tiny

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q -n 2 --dist loadfile --durations=15

bench: $(STAMP)
	$(BIN)/python -m bench pipeline

clean:
	rm -rf $(VENV) workspace workspace-tiny

.PHONY: browser-deps ui
# optional: Debian's Chromium for tests/integration/test_browser.py (skipped without it); no browser download from a CDN
browser-deps:
	$(if $(shell command -v apt-get),,$(error browser-deps needs apt-get (Debian/Ubuntu); install chromium by hand))
	$(if $(filter 0,$(shell id -u)),,sudo) apt-get install -y chromium

ui: $(STAMP)
	$(BIN)/lmforge ui --workspace workspace
