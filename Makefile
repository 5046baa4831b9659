# tb-lightning: every target builds .venv first when it is missing or older than pyproject.toml.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# Pinned to the torch/torchvision this project is tested with (local wheels on the dev machines).
TORCH_PINS := torch==2.14.1 torchvision==0.29.1
ARGS ?=
# Import this checkout's code even when .venv was installed editable from another checkout.
export PYTHONPATH := $(CURDIR)/src

.PHONY: help install train test test-slow test-all lint format tensorboard mlflow screenshots bench bench-scale chaos clean distclean

## This list: every target with what it does (the `##` lines above it).
help:
	@awk '/^## /{doc = doc (doc ? " " : "") substr($$0, 4); next} /^[a-z-]+:/{if (doc) printf "  make %-12s %s\n", substr($$1, 1, length($$1) - 1), doc; doc = ""; next} {doc = ""}' $(MAKEFILE_LIST)

## Build .venv (torch pins, then this package editable with its dev tools and every extra).
install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --disable-pip-version-check -q $(TORCH_PINS)
	$(BIN)/pip install --disable-pip-version-check -q -e ".[dev,dicom,export,mlflow,saliency,sweeps,timm]"
	touch $(STAMP)

## The main job, offline: phantom data (generated on first use), ~4.5 minutes on 2 idle CPU cores.
train: $(STAMP)
	$(BIN)/python -m tb_lightning.train experiment=quickstart $(ARGS)

## The default test suite, on every core (pytest-xdist): every feature end to end, 1-3 minutes on
## 2 idle CPU cores; the tests marked slow are left out (make test-slow).
test: $(STAMP)
	$(BIN)/python -m pytest -q -n auto --maxprocesses=4 -m "not slow" $(ARGS)

## Only the tests marked slow (signals and resumes, races, DDP, launchers, full sweeps, real
## images); CI runs them after make test.
test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -n auto --maxprocesses=4 -m slow $(ARGS)

## Every test, slow ones included: make test and make test-slow in one run.
test-all: $(STAMP)
	$(BIN)/python -m pytest -q -n auto --maxprocesses=4 $(ARGS)

## ruff: lint and format check (CI runs it before the tests).
lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks scripts
	$(BIN)/ruff format --check src tests benchmarks scripts

## ruff: fix what it can and format.
format: $(STAMP)
	$(BIN)/ruff check --fix src tests benchmarks scripts
	$(BIN)/ruff format src tests benchmarks scripts

## TensorBoard on every run; every epoch's confusion-matrix image kept (its default keeps 4).
tensorboard: $(STAMP)
	$(BIN)/tensorboard --logdir outputs/ --samples_per_plugin images=100 $(ARGS)

## MLflow's web UI on the runs of logger=mlflow (the embedded store in outputs/mlruns), port 5000.
mlflow: $(STAMP)
	$(BIN)/mlflow ui --backend-store-uri sqlite:///outputs/mlruns/mlflow.db $(ARGS)

## A 6-job sweep (6 epochs each, logged to TensorBoard and MLflow), eval and Grad-CAM, TensorBoard's
## tabs and MLflow's Compare page captured in headless Chromium into docs/img/ (34 minutes on 2
## shared AMD EPYC cores; needs `apt-get install chromium` and ../shared/data; not part of make test).
screenshots: $(STAMP)
	$(BIN)/pip install --disable-pip-version-check -q -e ".[screenshots]"
	$(BIN)/python scripts/screenshots.py $(ARGS)

## Start-up times, and the seed's way vs the fast path vs cached features; writes docs/benchmarks.md.
bench: $(STAMP)
	$(BIN)/python benchmarks/startup.py
	$(BIN)/python benchmarks/bench.py $(ARGS)

## Time per image and peak memory per stage at N = 1k, 4k, 16k synthetic images, then a
## fine-tuning epoch with and without the decoded-image cache (~10 minutes); writes their
## sections of docs/benchmarks.md.
bench-scale: $(STAMP)
	$(BIN)/python benchmarks/scale.py $(ARGS)
	$(BIN)/python benchmarks/image_cache.py

## Kill short runs at random moments, resume them, check nothing was lost (not part of make test).
chaos: $(STAMP)
	$(BIN)/python scripts/chaos.py $(ARGS)

## Remove run outputs and caches (keeps .venv and the phantom data).
clean:
	rm -rf outputs/train outputs/eval outputs/predict outputs/export .pytest_cache .ruff_cache
	find . -name __pycache__ -type d -prune -not -path "./$(VENV)/*" -exec rm -rf {} +

## Also removes the virtualenv and the generated phantom data.
distclean: clean
	rm -rf $(VENV) data/phantom data/phantom-quickstart
