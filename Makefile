# `make help` lists the targets. Everything runs inside .venv (created by `make setup`).
SHELL := /bin/bash
# Any Python from 3.11 to 3.14 (pyproject.toml's requires-python); python3.11 where there is one (what CI runs)
PYTHON ?= $(shell command -v python3.11 >/dev/null 2>&1 && echo python3.11 || echo python3)
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
# A relative VAE_DATA_MIRROR means relative to where `make` ran, also inside DVC's temporary copies (queued
# experiments, `make sweep`): made absolute here, once.
ifneq ($(strip $(VAE_DATA_MIRROR)),)
ifeq ($(filter /%,$(VAE_DATA_MIRROR))$(findstring ://,$(VAE_DATA_MIRROR)),)
override VAE_DATA_MIRROR := $(abspath $(VAE_DATA_MIRROR))
endif
export VAE_DATA_MIRROR
endif
# The values `make help` shows in place of their $(NAME)
HELP_VARS = PYTHON UI_PORT MODEL_PORT MODEL_NAME NPROC JOBS LOOP_EPOCHS BURDA_EPOCHS VADE_CONV_EPOCHS

.DEFAULT_GOAL := help
.PHONY: loop-demo help setup pipeline test bench ui history compare train-ddp flow serve clean tutorial pytorch-example vade vade-conv conv burda sweep services services-stop serve-model bench-serve monitor
.PHONY: postgresql chromium stack stack-stop scheduler rollback

help: ## list the targets
	@grep -hE '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | $(foreach v,$(HELP_VARS),$(v)='$($(v))') awk -F':.*## ' \
		'{ d = $$2; while (match(d, /\$$\([A-Z_]+\)/)) d = substr(d, 1, RSTART - 1) ENVIRON[substr(d, RSTART + 2, RLENGTH - 3)] substr(d, RSTART + RLENGTH); \
		   printf "  make %-16s %s\n", $$1, d }'

$(VENV)/.installed: requirements.txt pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "error: $(PYTHON) not found: install Python 3.11 to 3.14, or say which: make setup PYTHON=python3.12" >&2; exit 2; }
	@$(PYTHON) -c 'import sys; sys.exit(not ((3, 11) <= sys.version_info[:2] <= (3, 14)))' || \
		{ echo "error: $(PYTHON) is Python $$($(PYTHON) -c 'import platform; print(platform.python_version())'); this project needs 3.11 to 3.14 (torch 2.14's range): make setup PYTHON=python3.11" >&2; exit 2; }
	@$(PYTHON) -m venv $(VENV) || { echo "error: '$(PYTHON) -m venv' failed: on Debian/Ubuntu install python3-venv" >&2; exit 2; }
	@echo "installing the pinned requirements into $(VENV) (about 250 packages, about 6.5 GB on disk with torch's CUDA libraries; several minutes)" >&2
	$(BIN)/pip install --progress-bar on torch==2.14.1 torchvision==0.29.1 -r requirements.txt
	$(BIN)/pip install --progress-bar on --no-deps -e .
	touch $@

setup: $(VENV)/.installed ## create .venv with pip (torch, DVC, MLflow, Prefect, ...) and install the package

# Debian packages only some targets need, installed when they first do: `apt_need,CHECK,PACKAGE,WHY`.
# Without apt-get, or without root and sudo, a clear error says what to install by hand.
define apt_need
@$(1) >/dev/null 2>&1 || { \
	echo "$(3): installing Debian's $(2) (apt-get; needs root or sudo)" >&2; \
	command -v apt-get >/dev/null || { echo "error: $(2) is missing and this system has no apt-get: install $(2) yourself, then rerun" >&2; exit 2; }; \
	if [ "$$(id -u)" = 0 ]; then S=; elif command -v sudo >/dev/null; then S=sudo; \
	else echo "error: $(2) is missing and installing it needs root: ask an administrator to install $(2), then rerun" >&2; exit 2; fi; \
	{ $$S apt-get update -qq && $$S apt-get install -y -qq $(2); } >&2 || { echo "error: apt-get could not install $(2)" >&2; exit 2; }; }
endef

postgresql: ## install Debian's PostgreSQL if missing (the team stack and the tests need it, `make pipeline` does not)
	$(call apt_need,command -v initdb || ls /usr/lib/postgresql/*/bin/initdb,postgresql,the team stack and the tests run a PostgreSQL server)

chromium: ## install Debian's Chromium if missing (the tests render the comparison report and the MLflow UI in it)
	$(call apt_need,test -x /usr/bin/chromium,chromium,the tests render reports/compare.html and the MLflow UI headless)

pipeline: setup ## run download -> train -> evaluate -> register with `dvc repro`
	dvc repro

test: setup postgresql chromium ## run the whole test suite (slow end-to-end tests included)
	pytest -n $(TEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

bench: setup ## measure training speed against a DataLoader baseline; writes reports/bench.json
	python -m benchmarks.train_speed

UI_PORT ?= 5000
# Basic auth: log in as admin, password in .credentials/local.env (generated once, 0600). docs/security.md
# With a tracking server exported (`eval "$$(make -s stack)"`, or a team's server), the UI is that server's.
ui: setup ## the MLflow UI on http://127.0.0.1:$(UI_PORT) (runs, images, registered models); login admin
ifneq ($(filter http://% https://%,$(MLFLOW_TRACKING_URI)),)
	@echo "MLflow UI: $(MLFLOW_TRACKING_URI) (the server MLFLOW_TRACKING_URI names; log in as $${MLFLOW_TRACKING_USERNAME:-your user}," \
		"password in MLFLOW_TRACKING_PASSWORD; the stack keeps both in $${VAE_SERVICES_DIR:-.services}/credentials.env)"
else
	VAE_CREDENTIALS_DIR="$${VAE_CREDENTIALS_DIR:-$(abspath .credentials)}" python -m pipeline.ui --port $(UI_PORT) \
		--store $(abspath mlflow.db) --artifacts $(abspath mlartifacts)
endif

history: setup ## every registration decision in the store (all experiments and sweeps): who was champion when
	python -m vae_mlops registry history --registry

VERSION ?=
REASON ?=
rollback: setup ## champion back to a version, recorded in the history: make rollback VERSION=3 REASON="v4 blurs digits"
	@test -n "$(VERSION)" -a -n "$(REASON)" || { echo 'usage: make rollback VERSION=<n> REASON="<why>" (`make history` lists the versions)' >&2; exit 2; }
	python -m vae_mlops registry rollback "$(VERSION)" --reason "$(REASON)"

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

# Prints `export` lines on stdout (the rest goes to stderr), so `eval "$$(make -s stack)"` points a shell
# at the stack. Settings: VAE_SERVICES_DIR (default .services/), VAE_PG_PORT, VAE_MLFLOW_PORT, VAE_PREFECT_PORT.
stack: setup postgresql ## the team stack: PostgreSQL + MLflow + Prefect, auth on, 127.0.0.1; prints exports to eval (docs/team.md)
	python -m pipeline.services start

stack-stop: ## stop what `make stack` started; the data stays
	python -m pipeline.services stop

# The old names, for one release: each says its new name on stderr (stdout stays the exports to eval).
services:
	@echo "note: \`make services\` is now \`make stack\`" >&2
	@$(MAKE) --no-print-directory stack
services-stop:
	@echo "note: \`make services-stop\` is now \`make stack-stop\`" >&2
	@$(MAKE) --no-print-directory stack-stop

# MLflow's scoring server (/ping, /version, /invocations) on a local copy of the champion rebuilt from its verified
# weights and the installed code (nothing stored in the registry runs); it re-reads the alias every VAE_SERVE_POLL_S
# seconds and swaps in a new champion's weights without a restart. docs/serving.md
MODEL_PORT ?= 5080
MODEL_NAME ?= vae-mnist
VAE_SERVE_POLL_S ?= 10
serve-model: setup ## serve the verified champion of MODEL_NAME on 127.0.0.1:MODEL_PORT (default 5080)
	python -m vae_mlops serve-model --model $(MODEL_NAME) --port $(MODEL_PORT) --poll-s $(VAE_SERVE_POLL_S)

# A scratch checkout under .loop-demo/ (its own git commit, DVC repo, MLflow store, Prefect server, scoring server);
# this checkout gains only reports/loop.html and reports/loop.json. docs/loop.md
LOOP_EPOCHS ?= 1
loop-demo: setup ## the closed loop here: MNIST traffic, a shift, drift, retraining, a new champion; reports/loop.html
	python -m pipeline.loop_demo --epochs $(LOOP_EPOCHS)

bench-serve: setup ## load test of serve-model's server on loopback vs in-process pyfunc; prints a table
	python -m benchmarks.serve_load

# The vae-monitor flow once, now: the traffic the scoring server recorded (.inference/, or VAE_MONITOR_DB_URI)
# against the served version's reference; drift -> the vae.drift.detected event. docs/monitoring.md
monitor: setup ## check the recorded traffic for drift now (what the vae-monitor deployment runs on its cron)
	python -m pipeline.monitor

S ?=
flow: setup ## the whole pipeline as one Prefect flow run (ephemeral API); overrides as in dvc exp run: make flow S="train.epochs=3"
	python -m pipeline.local_auth exec -- python -m pipeline.flows $(foreach o,$(S),-S '$(o)')

scheduler: setup ## a local Prefect server on 127.0.0.1, the deployments, the weekly retraining schedule and a worker
	python -m pipeline.serve

serve:
	@echo "note: \`make serve\` is now \`make scheduler\` (the scoring server is \`make serve-model\`)" >&2
	@$(MAKE) --no-print-directory scheduler

# Only what git neither tracks nor holds as source: ignored files under models/ and reports/, never a tracked
# file and never the promotion history (reports/promotions.jsonl, append-only).
clean: ## remove rebuildable outputs git does not track (keeps .venv, data, the DVC cache, reports/promotions.jsonl)
	@git ls-files -z --others --ignored --exclude-standard -- models reports dvc_plots \
		| grep -zv '^reports/promotions\.jsonl$$' | xargs -0r rm -fv --
	@find models reports -mindepth 1 -depth -type d -empty -delete 2>/dev/null || true

tutorial: setup ## the tutorial's setting as a DVC experiment: 784-200-10, gaussian, 100 epochs
	dvc exp run -S model.hidden_dim=200 -S model.latent_dim=10 -S model.likelihood=gaussian \
		-S train.batch_size=128 -S train.lr=0.001 -S train.epochs=100 -S train.image_every=10

pytorch-example: setup ## the PyTorch example's setting as a DVC experiment: 784-400-20, bernoulli, 10 epochs
	dvc exp run -S model.hidden_dim=400 -S model.latent_dim=20 -S model.likelihood=bernoulli \
		-S train.batch_size=128 -S train.lr=0.001 -S train.epochs=10

# VaDE (Jiang et al. 2017): their network and batch; a 25-epoch autoencoder whose codes N2D's UMAP grouping
# (code_partition.py) splits into the mixture's start, then VaDE at a gentler lr than the paper's 0.002 (docs/models.md).
# Override any of these, e.g. `make vade VADE_EPOCHS=20 VADE_SEED=1`
VADE_EPOCHS ?= 50
VADE_PRETRAIN_EPOCHS ?= 25
VADE_PARTITION ?= umap
VADE_LR ?= 0.0005
VADE_LR_DECAY ?= 0.9
VADE_LR_DECAY_EPOCHS ?= 10
VADE_SEED ?= 42

vade: setup ## VaDE as a DVC experiment: mlp-deep 500-500-2000, latent 10, gmm prior of 10 components (docs/models.md)
	dvc exp run -S model.arch=mlp-deep -S 'model.hidden_dims=[500,500,2000]' -S model.latent_dim=10 \
		-S model.likelihood=bernoulli -S model.prior=gmm -S model.n_components=10 \
		-S train.batch_size=100 -S train.lr=$(VADE_LR) -S train.lr_decay=$(VADE_LR_DECAY) \
		-S train.lr_decay_epochs=$(VADE_LR_DECAY_EPOCHS) -S train.pretrain_epochs=$(VADE_PRETRAIN_EPOCHS) \
		-S train.pretrain_partition=$(VADE_PARTITION) -S train.epochs=$(VADE_EPOCHS) -S train.seed=$(VADE_SEED) \
		-S train.image_every=10 -S evaluate.latent_map=tsne

# VaDE's mixture prior on the convolutional network: the paper's lr schedule, k-means' start, another encoder and decoder
VADE_CONV_EPOCHS ?= 100
VADE_CONV_LR ?= 0.002
VADE_CONV_PRETRAIN_EPOCHS ?= 10

vade-conv: setup ## VaDE's gmm prior (10 components, latent 10) on the conv network, $(VADE_CONV_EPOCHS) epochs (docs/models.md)
	dvc exp run -S model.arch=conv -S model.hidden_dim=256 -S model.latent_dim=10 -S model.likelihood=bernoulli \
		-S model.prior=gmm -S model.n_components=10 -S train.batch_size=100 -S train.lr=$(VADE_CONV_LR) \
		-S train.lr_decay=$(VADE_LR_DECAY) -S train.lr_decay_epochs=$(VADE_LR_DECAY_EPOCHS) \
		-S train.pretrain_epochs=$(VADE_CONV_PRETRAIN_EPOCHS) -S train.epochs=$(VADE_CONV_EPOCHS) -S train.seed=$(VADE_SEED) \
		-S train.image_every=10 -S evaluate.latent_map=tsne

conv: setup ## the convolutional VAE as a DVC experiment: 2 conv layers + 256 dense, latent 20, bernoulli, 20 epochs
	dvc exp run -S model.arch=conv -S model.hidden_dim=256 -S model.latent_dim=20 -S model.likelihood=bernoulli \
		-S model.prior=normal -S train.batch_size=128 -S train.lr=0.001 -S train.epochs=20 -S train.image_every=5

# Burda et al. 2016 (VAE, k = 1, one stochastic layer): their network, batch 20 and Adam at lr 1e-3, on dynamically
# binarised MNIST, scored by IWAE with k = 5000. They train 3,280 epochs (days here); docs/models.md has the figures.
BURDA_EPOCHS ?= 100
BURDA_BATCH ?= 20
BURDA_LR ?= 0.001

burda: setup ## Burda et al. 2016's VAE as a DVC experiment: 784-200-200-50, bernoulli, dynamic binarisation, $(BURDA_EPOCHS) epochs, IWAE k=5000
	dvc exp run -S model.arch=mlp-deep -S 'model.hidden_dims=[200,200]' -S model.latent_dim=50 \
		-S model.likelihood=bernoulli -S model.prior=normal -S data.binarize=dynamic -S train.pretrain_epochs=0 \
		-S train.batch_size=$(BURDA_BATCH) -S train.lr=$(BURDA_LR) -S train.lr_decay=1.0 -S train.epochs=$(BURDA_EPOCHS) \
		-S train.image_every=10 -S evaluate.iwae_samples=5000 -S evaluate.batch_size=100
