# Set-up and checks. Both entry points work on a fresh Debian machine as root:
#   make demo   venv + install + build a small image + unpack it
#   make test   venv + test deps (pip and apt) + lint + type check + pytest
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
APT_PKGS := gcc libssl-dev libfuse3-dev pkg-config fuse3 fuse-overlayfs umoci skopeo runc attr tar gzip zstd util-linux docker-registry btrfs-progs xfsprogs e2fsprogs jq
STAMP   := $(VENV)/.installed

.PHONY: demo test lint typecheck unit integration bench apt-deps clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(STAMP): $(BIN)/python pyproject.toml setup.py src/lamina/_fastpath.c
	$(BIN)/pip install -q -e '.[test]'
	@# byte-compile as a regular install does (an editable one under
	@# PYTHONDONTWRITEBYTECODE would recompile every module on every run)
	$(BIN)/python -m compileall -q src/lamina
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

lint: $(STAMP)
	$(BIN)/ruff check src tests $(wildcard bench)
	$(BIN)/mypy

test: apt-deps $(STAMP) lint
	$(BIN)/pytest -q -ra tests

unit: $(STAMP)
	$(BIN)/pytest -q tests/unit

bench: $(STAMP) apt-deps
	$(BIN)/python bench/unpack.py

clean:
	rm -rf $(VENV) demo build dist src/*.egg-info
