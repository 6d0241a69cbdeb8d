# Two commands do everything on a fresh machine with Python 3.11+:
#   make demo   set up .venv, train a tiny GPT on a toy corpus, print samples
#   make test   set up .venv, run the tests
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test bench clean

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "minilm needs Python 3.11 or newer; run e.g. make PYTHON=python3.11 ...")'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -e '.[dev]'
	@touch $@

demo: $(STAMP)
	$(BIN)/minilm train --preset tiny --corpus associations --out runs/demo --overwrite
	$(BIN)/minilm sample runs/demo --prompt "the people spoke of" --num-samples 3 --max-new-tokens 40

test: $(STAMP)
	$(BIN)/python -m pytest -q

bench: $(STAMP)
	$(BIN)/python -m pytest benchmarks --benchmark-columns=median,rounds --benchmark-sort=name

clean:
	rm -rf $(VENV) runs .pytest_cache
