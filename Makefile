# Two commands do everything on a fresh machine with Python 3.11+:
#   make demo   set up .venv, run experiment 01: what changes when I fine-tune, fully or with LoRA?
#   make test   set up .venv, run the tests
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# make test installs the test extra too: torch (CPU), transformers and peft, the interop tests' oracles
TEST_STAMP := $(VENV)/.installed-test
# glibc's tunables for XLA's step memory (huge pages, kept between steps): ~20% faster steps on Linux.
# minilm/allocator.py says which and why; it needs nothing beyond the standard library.
export GLIBC_TUNABLES := $(shell $(PYTHON) -c 'from minilm.allocator import environment; print(environment()["GLIBC_TUNABLES"])')

.PHONY: demo test test-core bench clean

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "minilm needs Python 3.11 or newer; run e.g. make PYTHON=python3.11 ...")'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -e '.[dev]'
	@touch $@

$(TEST_STAMP): $(STAMP)
	$(BIN)/pip install --quiet --disable-pip-version-check -e '.[dev,test]'
	@touch $@

demo: $(STAMP)
	$(BIN)/python experiments/01_what_changes.py --out runs/01_what_changes

# Two workers (pytest-xdist), one test file each at a time: most tests are bound by single-threaded
# compilation, so two files at once use both cores (core suite: 289 -> 225 s here).
TESTS := $(BIN)/python -m pytest -q -n 2 --dist loadfile

test: $(TEST_STAMP)
	$(TESTS)

test-core: $(TEST_STAMP)
	$(TESTS) -m "not experiments and not browser and not mesh"

bench: $(STAMP)
	$(BIN)/python -m pytest benchmarks --benchmark-columns=median,rounds --benchmark-sort=name

clean:
	rm -rf $(VENV) runs .pytest_cache
