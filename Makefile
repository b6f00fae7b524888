# `make help` lists the targets. Everything runs inside .venv (created by `make setup`).
SHELL := /bin/bash
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(abspath $(VENV))/bin
export PATH := $(BIN):$(PATH)
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export PREFECT_HOME ?= $(abspath .prefect)
PYTEST_ARGS ?=
NPROC ?= 2

.DEFAULT_GOAL := help
.PHONY: help setup pipeline test bench ui history train-ddp flow serve clean tutorial pytorch-example

help: ## list the targets
	@grep -hE '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-16s %s\n", $$1, $$2}'

$(VENV)/.installed: requirements.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet torch==2.14.1 torchvision==0.29.1 -r requirements.txt
	$(BIN)/pip install --quiet --no-deps -e .
	touch $@

setup: $(VENV)/.installed ## create .venv with pip (torch, DVC, MLflow, Prefect, ...) and install the package

pipeline: setup ## run download -> train -> evaluate -> register with `dvc repro`
	dvc repro

test: setup ## run the whole test suite (slow end-to-end tests included)
	pytest $(PYTEST_ARGS)

bench: setup ## measure training speed against a DataLoader baseline; writes reports/bench.json
	python -m vae_mlops.bench

UI_PORT ?= 5000
ui: setup ## the MLflow UI on http://127.0.0.1:$(UI_PORT) (runs, images, registered models)
	mlflow ui --backend-store-uri sqlite:///$(abspath mlflow.db) --default-artifact-root $(abspath mlartifacts) \
		--host 127.0.0.1 --port $(UI_PORT)

history: setup ## the Model Registry's promotion log: who was champion when
	python -m vae_mlops registry history

# DVC's train cmd is one process, so the DDP run is recorded with `dvc commit`: then `dvc repro`
# goes on to evaluate and register, and `dvc push` ships the model. docs/distributed.md
train-ddp: setup ## the train stage as DDP on this machine (torchrun), recorded in dvc.lock: make train-ddp NPROC=2
	dvc repro download
	torchrun --standalone --nproc_per_node=$(NPROC) -m vae_mlops train
	dvc commit --force train

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
