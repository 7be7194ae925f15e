# tongkuan — `make help` lists the targets. Every target sets up the venv it needs.
SHELL := /bin/bash
PY_BOOT ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# The dataset: shared/datasets/grocery beside the checkout (or beside a parent of it) unless DATA=DIR.
DATA ?=
DATA_ARG = $(if $(DATA),--data $(abspath $(DATA)))
SPLIT ?= val
export HF_HUB_OFFLINE := 1
export PYTHONDONTWRITEBYTECODE := 1

.DEFAULT_GOAL := help
.PHONY: help venv model demo test test-all serving-install eval train bench-embed bench-ingest \
	bench-query-search bench-query drill simulate bench-rerank up down \
	config lint clean browser

help: ## list the targets
	@grep -hE '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk 'BEGIN{FS=":.*## "}{printf "  %-20s %s\n", $$1, $$2}'

# The development venv: every pinned dependency of the serving install and of its extras
# (train, bench, dev: torch 2.13.0 CPU, matplotlib, scikit-learn, pytest, ...).
$(STAMP): pyproject.toml requirements.lock
	@test -x $(PY) || $(PY_BOOT) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.lock
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	@touch $(STAMP)

venv: $(STAMP) ## create .venv with the pinned dependencies and every extra (torch 2.13.0 CPU)

model: $(STAMP) ## export the ImageNet EfficientNet-Lite0 to ONNX (cached, checksummed); verify shipped models
	$(PY) -m offline model
	$(PY) -m offline text-model

demo: model ## ingest the grocery catalog into a fresh embedded index, search val photos, apply events, print metrics
	$(PY) -m offline demo $(DATA_ARG)

test: model browser ## the fast, complete test suite (CPU, local services, < 10 min)
	$(PY) -m pytest -q -m "not slow"

test-all: model browser ## every test, slow ones included
	$(PY) -m pytest -q

serving-install: ## `pip install .` into an empty venv: the API and the worker import without torch
	rm -rf var/serving-venv && $(PY_BOOT) -m venv var/serving-venv
	var/serving-venv/bin/python -m pip install -q --constraint requirements.lock .
	cd /tmp && $(abspath var/serving-venv/bin/python) -c "import tongkuan.api, tongkuan.worker, \
	tongkuan.dispatcher, tongkuan.features, tongkuan.cli; print('serving install imports: ok')"
	cd /tmp && ! $(abspath var/serving-venv/bin/python) -c "import torch" 2>/dev/null
	cd /tmp && ! $(abspath var/serving-venv/bin/python) -c "import matplotlib" 2>/dev/null
	@echo "serving install: no torch, no matplotlib"
	rm -rf var/serving-venv

eval: model ## Recall@K/mAP/category accuracy; offers with the active re-ranker (SIMULATED offers): make eval DATA=DIR SPLIT=NAME
	@test -f var/simulate/state.json || $(MAKE) --no-print-directory simulate
	$(PY) -m offline eval $(DATA_ARG) --split $(SPLIT)

train: model ## fine-tune the same-product embedding on DATA's train split (CPU ~30 min), export + register
	$(PY) -m offline train $(DATA_ARG) $(TRAIN_ARGS)

bench-embed: model ## images/s torch vs ONNX Runtime, per-stage query latency -> reports/bench-embed.json
	$(PY) -m offline bench-embed $(DATA_ARG)

bench-ingest: model ## event published -> searchable items/s vs the embedding ceiling; latency at half rate (BENCH_ARGS="--data DIR --split train": real photos)
	$(PY) -m offline bench-ingest $(BENCH_ARGS)

bench-query-search: model ## search only at 81/100k/1M items: Qdrant Edge float/int8/binary vs numpy, faiss, hnswlib -> reports/bench-query-search.json (BENCH_ARGS="--sizes 81,10000": quick)
	$(PY) -m offline bench-query-search $(DATA_ARG) --split $(SPLIT) $(BENCH_ARGS)

bench-query: model ## end to end by stage at 81/100k/1M items, QPS at p99 <= 100 ms via the API, engines side by side -> reports/bench-query.json (BENCH_ARGS="--sizes 81,10000 --qps-steps 5,10": quick)
	$(PY) -m offline bench-query $(DATA_ARG) --split $(SPLIT) $(BENCH_ARGS)

drill: model ## reliability drill on the real broker/Redis/workers -> reports/drill.json
	$(PY) -m offline drill

# The SIMULATED closed loop (offline/simulate/): val photos searched through the real ingest, index and
# model over simulated offers, features through the real Feast store (SQLite online, a temporary data
# dir), a model registry of its own emptied on every run, and the end state make eval reads.
simulate: model ## SIMULATED closed loop: val photos through the real index over simulated offers, Feast store, 8 days x 600 searches (~2 min) -> reports/simulate.json + simulate-ndcg.png, var/simulate/ (SIM_ARGS="--store memory --search simulated")
	$(PY) -m offline simulate loop $(DATA_ARG) --report reports/simulate.json --models var/simulate/models --fresh $(SIM_ARGS)

bench-rerank: $(STAMP) ## re-rank of 60 candidates incl. the Feast online read, Redis (127.0.0.1:6379/15) vs SQLite -> reports/bench-rerank.json + .png (BENCH_ARGS="--stores sqlite": no Redis)
	$(PY) -m offline bench-rerank --out reports/bench-rerank.json $(BENCH_ARGS)

up: model ## start the local stack (Tansu broker, Celery worker, dispatcher, feature consumer, API) with health checks
	$(PY) -m infra.stack start

down: ## stop the local stack
	$(PY) -m infra.stack stop

# Headless Chromium and its driver for the web page's browser test (tests/query/test_page_browser.py),
# and a small CJK font (5 MB) so the page's 同款 renders in its screenshots; Debian packages,
# installed only when missing (needs root; no browser is downloaded from anywhere else).
browser: ## install Debian chromium + chromium-driver (+ a CJK font) for the page's browser test, when missing
	@if [ ! -x /usr/bin/chromium ] || [ ! -x /usr/bin/chromedriver ] || ! fc-list :lang=zh 2>/dev/null | grep -q .; then \
		SUDO=$$([ "$$(id -u)" = 0 ] || echo sudo); \
		$$SUDO env DEBIAN_FRONTEND=noninteractive apt-get update -q && \
		$$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
			chromium chromium-driver fonts-wqy-microhei; \
	fi
	@/usr/bin/chromium --version && /usr/bin/chromedriver --version

config: $(STAMP) ## print the configuration reference (every TONGKUAN_* setting)
	@$(PY) -m tongkuan.config

lint: $(STAMP) ## ruff
	$(VENV)/bin/ruff check .

clean: ## remove runtime state and reports (keeps .venv and models)
	rm -rf var reports
