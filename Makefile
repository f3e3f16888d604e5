# The two commands of the README: `make run` and `make test`. Both build .venv first.
PYTHON ?= $(shell for p in python3.12 python3.11 python3.10 python3; do \
	command -v $$p >/dev/null 2>&1 && $$p -c 'import sys; sys.exit(not (3, 10) <= sys.version_info[:2] <= (3, 12))' 2>/dev/null && echo $$p && break; done)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test lint format train-cifar10 ablate-cifar10 jpeg-quality profile-train bench-serve clean

$(STAMP): pyproject.toml
	@test -n "$(PYTHON)" || { echo "imagerec needs Python 3.10, 3.11 or 3.12 on PATH" >&2; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $@

run: $(STAMP)
	$(BIN)/imagerec serve

test: $(STAMP)
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks

format: $(STAMP)
	$(BIN)/ruff format src tests benchmarks
	$(BIN)/ruff check --fix src tests benchmarks

# DATA: 'cifar10' (downloads) or a folder such as the extracted shared JPEG images.
DATA ?= cifar10
train-cifar10: $(STAMP)
	$(BIN)/python benchmarks/train_cifar10.py --data $(DATA) --seeds 0 1 2 --compare-epochs 10 20 40 --final

ablate-cifar10: $(STAMP)
	$(BIN)/python benchmarks/ablate_cifar10.py --data $(DATA)

# DATA must be an image folder here: the images are encoded again at lower qualities.
jpeg-quality: $(STAMP)
	$(BIN)/python benchmarks/jpeg_quality.py --data $(DATA)

profile-train: $(STAMP)
	$(BIN)/python benchmarks/profile_train.py

bench-serve: $(STAMP)
	$(BIN)/python benchmarks/serve.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
