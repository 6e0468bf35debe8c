# Two set-up-free entry points: `make train` and `make test`. Each bootstraps .venv on first use.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
# Extra options for the training run, e.g. `make train ARGS="--num_train_epochs 5"`.
ARGS   ?=

.PHONY: venv train test lint bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip 2>&1 | grep -v "is ignored: it is neither" || true
	$(BIN)/python -m pip install --quiet -e '.[dev]' 2>&1 | grep -v "is ignored: it is neither" || true
	$(BIN)/python -c "import vivit_medmnist, transformers, datasets, medmnist, accelerate" 
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
