# Two set-up-free entry points: `make train` and `make test`. Each bootstraps .venv on first use.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
# Extra options for the training run, e.g. `make train ARGS="--num_train_epochs 5"`.
ARGS   ?=
# A failed step fails the target, also inside a pipe (the pip lines filter a warning through grep).
SHELL  := /bin/bash
.SHELLFLAGS := -o pipefail -ec

.PHONY: venv train test lint bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip 2>&1 | { grep -v "is ignored: it is neither" || true; }
	$(BIN)/python -m pip install --quiet -e '.[dev]' 2>&1 | { grep -v "is ignored: it is neither" || true; }
	# every import the suite needs, the extras included: a missing one fails here, not as a skipped test
	$(BIN)/python -c "import vivit_medmnist, transformers, datasets, medmnist, accelerate, nibabel, xdist, captum, gradio, playwright"
	touch $@

venv: $(STAMP)

# The main job: ViViT on OrganMNIST3D (downloaded and MD5-checked on first run), publishable folder in outputs/.
train: $(STAMP)
	$(BIN)/python scripts/train.py --recipe recipes/organmnist3d.yaml --output_dir outputs/organmnist3d $(ARGS)

test: $(STAMP)
	$(BIN)/python -m pytest $(ARGS)

lint: $(STAMP)
	$(BIN)/ruff check src scripts tests benchmarks

bench: $(STAMP)
	$(BIN)/python benchmarks/speed.py $(ARGS)

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache
