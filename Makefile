# The two commands of the README: `make run` and `make test`. Both build the virtual environment
# first. PYTHON is the newest supported interpreter on PATH that runs (a pyenv shim for a version
# that is not enabled does not); `make test PYTHON=python3.11` picks another, and .venv is made
# anew when its Python is not that one.
SUPPORTED := (3, 11) <= sys.version_info[:2] <= (3, 13)
PYTHON ?= $(shell for p in python3.13 python3.12 python3.11 python3; do \
	$$p -c 'import sys; sys.exit(not ($(SUPPORTED)))' 2>/dev/null && echo $$p && break; done)
PYVER := $(shell $(PYTHON) -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null)
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(PYVER)
NEEDS := imagerec needs Python 3.11, 3.12 or 3.13 (3.14 waits for TensorFlow, whose 3.14 wheels are only a release candidate)

.PHONY: run test fuzz wheel print-python lint format train-cifar10 ablate-cifar10 jpeg-quality profile-train bench-serve bench-bulk bench-ray-floor bench-decode clean

$(STAMP): pyproject.toml
	@test -n "$(PYTHON)" || { echo "$(NEEDS): none of them is on PATH" >&2; exit 1; }
	@$(PYTHON) -c 'import sys; sys.exit(not ($(SUPPORTED)))' 2>/dev/null || \
		{ echo "$(NEEDS); $(PYTHON) is $(or $(PYVER),not runnable)" >&2; exit 1; }
	@[ "$$($(BIN)/python -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null)" = \
		"$(PYVER)" ] || { rm -rf $(VENV) && $(PYTHON) -m venv $(VENV); }
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test]'
	@# The tests' TF Serving gRPC client. It names the `tensorflow` distribution, which would add a
	@# second copy of the TensorFlow that `tensorflow-cpu` already installed: hence --no-deps.
	$(BIN)/python -m pip install -q --no-deps 'tensorflow-serving-api>=2.21,<2.22'
	touch $@

run: $(STAMP)
	$(BIN)/imagerec serve

test: $(STAMP)
	$(BIN)/ruff check src tests benchmarks setup.py
	$(BIN)/ruff format --check src tests benchmarks setup.py
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# The fuzz suites' properties with many more generated requests (minutes; FUZZ_EXAMPLES each):
# requests to the app in process, and framings on the wire to the real server.
FUZZ_EXAMPLES ?= 20000
fuzz: $(STAMP)
	IMAGEREC_FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) $(BIN)/python -m pytest tests/test_fuzz.py tests/test_framing.py -q

# The interpreter that .venv is made with (for .ci/run).
print-python:
	@echo $(PYTHON)

# dist/imagerec-VERSION-py3-none-any.whl, with the bundled model inside (setup.py).
wheel: $(STAMP)
	$(BIN)/python -m build --wheel --outdir dist .

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks setup.py

format: $(STAMP)
	$(BIN)/ruff format src tests benchmarks setup.py
	$(BIN)/ruff check --fix src tests benchmarks setup.py

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

# DATA must be a folder of CIFAR-10 JPEGs here (the extracted shared images).
bench-bulk: $(STAMP)
	$(BIN)/python benchmarks/bulk.py --data $(DATA)

# DATA as for bench-bulk: the photos are made from it.
bench-ray-floor: $(STAMP)
	$(BIN)/python benchmarks/ray_floor.py --data $(DATA)

# DATA as for bench-bulk: the photos are made from it.
bench-decode: $(STAMP)
	$(BIN)/python benchmarks/decode.py --data $(DATA)

clean:
	rm -rf $(VENV) .venv-* .pytest_cache .ruff_cache build dist
