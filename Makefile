# The README's commands. Each sets itself up from nothing: a virtual environment in .venv,
# installed with constraints.txt (torch==2.13.0, so no CUDA packages are pulled on CPU machines).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
VENV_TL2 := .venv-tl2
PY_TL2 := $(VENV_TL2)/bin/python
VENV_TL4 := .venv-tl4
PY_TL4 := $(VENV_TL4)/bin/python
PYTEST_FLAGS ?= -q

.PHONY: test test-tl2 test-tl4 demo lint bench setup clean

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt torch==2.13.0
	$(PY) -m pip install -q -c constraints.txt -e '.[dev]'
	touch $@

$(VENV_TL2)/.installed: pyproject.toml constraints-tl2.txt
	$(PYTHON) -m venv $(VENV_TL2)
	$(PY_TL2) -m pip install -q --upgrade pip
	$(PY_TL2) -m pip install -q -c constraints-tl2.txt torch==2.13.0
	$(PY_TL2) -m pip install -q -c constraints-tl2.txt -e '.[dev]'
	touch $@

$(VENV_TL4)/.installed: pyproject.toml constraints-tl4.txt
	$(PYTHON) -m venv $(VENV_TL4)
	$(PY_TL4) -m pip install -q --upgrade pip
	$(PY_TL4) -m pip install -q -c constraints-tl4.txt torch==2.13.0
	$(PY_TL4) -m pip install -q -c constraints-tl4.txt -e '.[dev]'
	touch $@

setup: $(VENV)/.installed

test: $(VENV)/.installed
	$(PY) -m pytest $(PYTEST_FLAGS)

# The same suite on TransformerLens 2.18.x.
test-tl2: $(VENV_TL2)/.installed
	$(PY_TL2) -m pytest $(PYTEST_FLAGS)

# The suite on TransformerLens 4.x (TransformerBridge backend); tests that need a capability the
# bridge lacks skip by feature with the reason.
test-tl4: $(VENV_TL4)/.installed
	$(PY_TL4) -m pytest $(PYTEST_FLAGS)

demo: $(VENV)/.installed
	$(VENV)/bin/bayesmanifold demo

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check bayesmanifold tests examples benchmarks

bench: $(VENV)/.installed
	$(PY) benchmarks/overhead.py

clean:
	rm -rf $(VENV) $(VENV_TL2) $(VENV_TL4) .pytest_cache
