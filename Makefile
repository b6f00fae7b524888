# `make help` lists the targets. Everything runs inside .venv (created by `make setup`).
SHELL := /bin/bash
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(abspath $(VENV))/bin
export PATH := $(BIN):$(PATH)
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export PREFECT_HOME ?= $(abspath .prefect)
# pytest-xdist: one worker per core (a third on 2 cores was slower: 19.5 against 18.7 min), each test file on
# one worker (its module fixtures built once), one thread per worker
TEST_WORKERS ?= auto
PYTEST_ARGS ?=
NPROC ?= 2
SUDO := $(if $(filter 0,$(shell id -u)),,sudo)

.DEFAULT_GOAL := help
.PHONY: help setup pipeline test bench ui history compare train-ddp flow serve clean tutorial pytorch-example sweep services services-stop serve-model bench-serve

help: ## list the targets
	@grep -hE '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-16s %s\n", $$1, $$2}'

$(VENV)/.installed: requirements.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet torch==2.14.1 torchvision==0.29.1 -r requirements.txt
	$(BIN)/pip install --quiet --no-deps -e .
	touch $@

setup: $(VENV)/.installed ## create .venv with pip (torch, DVC, MLflow, Prefect, ...) and install the package
	@command -v initdb >/dev/null || ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || \
		{ $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq postgresql; } >&2  # for `make services`
	@test -x /usr/bin/chromium || \
		{ $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq chromium; } >&2  # renders compare.html in tests

pipeline: setup ## run download -> train -> evaluate -> register with `dvc repro`
	dvc repro

test: setup ## run the whole test suite (slow end-to-end tests included)
	pytest -n $(TEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

bench: setup ## measure training speed against a DataLoader baseline; writes reports/bench.json
	python -m benchmarks.train_speed

UI_PORT ?= 5000
ui: setup ## the MLflow UI on http://127.0.0.1:$(UI_PORT) (runs, images, registered models)
	mlflow ui --backend-store-uri sqlite:///$(abspath mlflow.db) --default-artifact-root $(abspath mlartifacts) \
		--host 127.0.0.1 --port $(UI_PORT)

history: setup ## every registration decision in the store (all experiments and sweeps): who was champion when
	python -m vae_mlops registry history --registry

A ?=
B ?=
compare: setup ## a report comparing two runs (run ids, DVC experiments, models:/...): make compare A=... B=...
	@test -n "$(A)" -a -n "$(B)" || { echo "usage: make compare A=<baseline> B=<candidate> (run id, DVC experiment or models:/NAME/VERSION)" >&2; exit 2; }
	python -m vae_mlops compare "$(A)" "$(B)"

GRID ?=
JOBS ?= 1
sweep: setup ## a grid of DVC experiments, queued and run: make sweep GRID="model.latent_dim=2,10 model.likelihood=bernoulli"
	python -m pipeline.sweep --jobs $(JOBS) $(GRID)

# train.nproc > 1: the train stage's command relaunches itself under torchrun, so DVC runs and records
# the DDP run itself; `dvc repro` then goes on to evaluate and register. docs/distributed.md
train-ddp: setup ## the train stage as DDP on this machine (torchrun), a DVC experiment: make train-ddp NPROC=2
	dvc exp run -S train.nproc=$(NPROC) train

# Prints `export` lines on stdout (the rest goes to stderr), so `eval "$$(make -s services)"` points a shell
# at the stack. Settings: VAE_SERVICES_DIR (default .services/), VAE_PG_PORT, VAE_MLFLOW_PORT, VAE_PREFECT_PORT.
services: setup ## PostgreSQL + MLflow + Prefect, auth on, 127.0.0.1; prints exports to eval (docs/team.md)
	python -m pipeline.services start

services-stop: ## stop what `make services` started; the data stays
	python -m pipeline.services stop

# MLflow's scoring server (/ping, /version, /invocations) on the champion; the model re-reads the alias every
# VAE_SERVE_POLL_S seconds and swaps in a new champion's weights without a restart. README "Serving the champion".
MODEL_PORT ?= 5001
MODEL_NAME ?= vae-mnist
VAE_SERVE_POLL_S ?= 10
serve-model: setup ## serve models:/$(MODEL_NAME)@champion on http://127.0.0.1:$(MODEL_PORT): make serve-model MODEL_PORT=5001
	MLFLOW_TRACKING_URI="$${MLFLOW_TRACKING_URI:-sqlite:///$(abspath mlflow.db)}" MLFLOW_ALLOW_PICKLE_DESERIALIZATION=false \
	VAE_SERVE_FOLLOW=$(MODEL_NAME)@champion VAE_SERVE_POLL_S=$(VAE_SERVE_POLL_S) \
		mlflow models serve -m models:/$(MODEL_NAME)@champion --env-manager local --host 127.0.0.1 --port $(MODEL_PORT)

bench-serve: setup ## load test of serve-model's server on loopback vs in-process pyfunc; prints a table
	python -m benchmarks.serve_load

flow: setup ## the whole pipeline as a Prefect flow on Prefect's ephemeral API
	python -m pipeline.flows

serve: setup ## scheduled retraining on this machine against a local Prefect server on 127.0.0.1
	python -m pipeline.serve

clean: ## remove outputs that can be rebuilt (keeps .venv, data and the DVC cache)
	rm -rf reports models/vae.pt models/checkpoints

tutorial: setup ## the tutorial's setting as a DVC experiment: 784-200-10, gaussian, 100 epochs
	dvc exp run -S model.hidden_dim=200 -S model.latent_dim=10 -S model.likelihood=gaussian \
		-S train.batch_size=128 -S train.lr=0.001 -S train.epochs=100 -S train.image_every=10

pytorch-example: setup ## the PyTorch example's setting as a DVC experiment: 784-400-20, bernoulli, 10 epochs
	dvc exp run -S model.hidden_dim=400 -S model.latent_dim=20 -S model.likelihood=bernoulli \
		-S train.batch_size=128 -S train.lr=0.001 -S train.epochs=10
