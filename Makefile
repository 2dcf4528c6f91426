# hotknob — the two commands a fresh machine needs are `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# The CPU build of torch; the local-version pin means pip can never resolve a CUDA build.
TORCH_SPEC ?= torch==2.13.0+cpu
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu
PYTEST_ARGS ?=

.PHONY: venv test lint typecheck unit demo bench faults clean install-check

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	@if $(BIN)/python -c "import torch" 2>/dev/null; then \
		echo "torch already importable: $$($(BIN)/python -c 'import torch; print(torch.__version__)')"; \
	elif $(PYTHON) -c "import torch" 2>/dev/null && [ -n "$$HOTKNOB_REUSE_SYSTEM_TORCH" ]; then \
		echo "using the system torch"; \
	else \
		$(BIN)/python -m pip install -q "$(TORCH_SPEC)" \
		|| $(BIN)/python -m pip install -q "$(TORCH_SPEC)" --extra-index-url $(TORCH_CPU_INDEX); \
	fi
	$(BIN)/python -m pip install -q -e '.[torch,dev]'
	touch $(STAMP)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy config daemon model_runtime
	$(BIN)/hadolint Dockerfile

unit: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test: lint unit

demo: $(STAMP)
	$(BIN)/hotknob demo

bench: $(STAMP)
	$(BIN)/python -m benchmarks

faults: $(STAMP)
	HOTKNOB_FAULT_EPISODES=$${HOTKNOB_FAULT_EPISODES:-100} $(BIN)/python -m pytest tests/test_faults.py -p no:randomly

# Installs the project non-editable into a throwaway venv and checks that the packages and the
# console script work from site-packages (CI runs this beside the editable install).
install-check: $(STAMP)
	rm -rf build/install-check
	$(PYTHON) -m venv --system-site-packages build/install-check
	build/install-check/bin/python -m pip install -q --no-deps .
	cd /tmp && $(CURDIR)/build/install-check/bin/python -c "import hotknob.config, hotknob.daemon, hotknob.model_runtime, sys; assert 'site-packages' in hotknob.config.__file__, hotknob.config.__file__"
	build/install-check/bin/hotknob --help >/dev/null

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache demo.png
