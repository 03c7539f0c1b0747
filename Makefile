# Set-up and checks. Both entry points work on a fresh Debian machine as root:
#   make demo   venv + install + build a small image + unpack it
#   make test   venv + test deps (pip and apt) + lint + type check + pytest
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
APT_PKGS := gcc libssl-dev libfuse3-dev pkg-config fuse3 fuse-overlayfs umoci skopeo runc attr tar gzip zstd util-linux docker-registry btrfs-progs xfsprogs e2fsprogs jq
STAMP   := $(VENV)/.installed
TSTAMP  := $(VENV)/.installed-test

.PHONY: demo test lint typecheck unit integration bench apt-deps clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# lamina itself (its C fast path is optional: without gcc/libssl-dev it is skipped)
$(STAMP): $(BIN)/python pyproject.toml setup.py src/lamina/_fastpath.c
	$(BIN)/pip install -q -e .
	@# byte-compile as a regular install does (an editable one under
	@# PYTHONDONTWRITEBYTECODE would recompile every module on every run)
	$(BIN)/python -m compileall -q src/lamina
	touch $@

# what the tests need from PyPI (pyfuse3 builds against libfuse3-dev: after apt-deps)
$(TSTAMP): $(STAMP) pyproject.toml | apt-deps
	$(BIN)/pip install -q -e '.[test]'
	touch $@

apt-deps:
	@missing=""; for p in $(APT_PKGS); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    echo "installing Debian packages:$$missing"; \
	    apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $$missing >/dev/null; \
	  else echo "warning: missing Debian packages (need root to install):$$missing"; fi; \
	fi

demo: $(STAMP)
	$(BIN)/python -m lamina.demo demo

lint: $(TSTAMP)
	$(BIN)/ruff check src tests $(wildcard bench)
	$(BIN)/mypy

test: apt-deps $(TSTAMP) lint
	$(BIN)/pytest -q -ra tests

unit: $(TSTAMP)
	$(BIN)/pytest -q tests/unit

bench: $(TSTAMP) apt-deps
	$(BIN)/python bench/unpack.py

clean:
	rm -rf $(VENV) demo build dist src/*.egg-info
