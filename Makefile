# Parcours: the two commands are `make demo` and `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.installed
PORT ?= 8000
HOST ?= 127.0.0.1
export PARCOURS_HOME ?= $(CURDIR)/var

.PHONY: install demo test bench lint serve clean browsers

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet -e '.[test]'
	touch $(STAMP)

# Debian's Chromium for the browser tests (Playwright drives it; no browser download).
browsers:
	@if [ ! -x /usr/bin/chromium ]; then \
		echo "Installing Debian's chromium for browser tests"; \
		SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
		$$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq chromium >/dev/null; \
	fi

lint: install
	$(VENV)/bin/lint-imports

test: install browsers
	$(VENV)/bin/lint-imports
	$(VENV)/bin/pytest -p no:cacheprovider

demo: install
	$(VENV)/bin/parcours demo --host $(HOST) --port $(PORT)

serve: install
	$(VENV)/bin/parcours serve --host $(HOST) --port $(PORT)

bench: install
	$(PY) bench/run.py

clean:
	rm -rf $(VENV) var build *.egg-info
