# hotknob — the two commands a fresh machine needs are `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# The CPU build of torch; the local-version pin means pip can never resolve a CUDA build.
TORCH_SPEC ?= torch==2.13.0+cpu
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu
PYTEST_ARGS ?=
# The suite runs in this many worker processes (most tests wait on etcd, daemons and
# timeouts, not on the CPU); each test file stays on one worker (module-wide fixtures and
# counts). TEST_WORKERS=0 runs it in this process.
TEST_WORKERS ?= 2

.PHONY: venv bytecode test lint typecheck unit demo bench faults clean install-check

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

lint: typecheck
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/hadolint Dockerfile

# mypy reads the packages by the names they are imported by (hotknob.config, ...), from a
# tree of links to their folders: the editable install maps those names with an import
# hook that mypy cannot follow, and a package it cannot find would be Any in every module
# that imports it (pyproject.toml makes that an error instead).
TYPECHECK_TREE := build/typecheck
typecheck: $(STAMP)
	rm -rf $(TYPECHECK_TREE)
	mkdir -p $(TYPECHECK_TREE)/hotknob
	for p in config daemon model_runtime; do ln -s ../../../$$p $(TYPECHECK_TREE)/hotknob/$$p; done
	MYPYPATH=$(TYPECHECK_TREE) $(BIN)/mypy -p hotknob.config -p hotknob.daemon -p hotknob.model_runtime -p benchmarks

# hotknob's own modules byte-compiled once, as installing a package does: the editable
# install leaves them as source, and where Python writes no bytecode
# (PYTHONDONTWRITEBYTECODE, as in some containers) every daemon and CLI process the
# tests and the demo start would otherwise compile them all again (~0.2 s of CPU each).
bytecode: $(STAMP)
	$(BIN)/python -m compileall -q config daemon model_runtime benchmarks tests examples

unit: bytecode
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

test: lint unit install-check

demo: bytecode
	$(BIN)/hotknob demo

bench: $(STAMP)
	$(BIN)/python -m benchmarks

faults: $(STAMP)
	HOTKNOB_FAULT_EPISODES=$${HOTKNOB_FAULT_EPISODES:-100} $(BIN)/python -m pytest tests/test_faults.py -p no:randomly

# Installs the project non-editable (a built wheel) into a folder of its own and checks that the
# three packages and the console script work from there, beside the editable install in .venv.
install-check: $(STAMP)
	rm -rf build/install-check
	$(BIN)/python -m pip install -q --no-deps --target build/install-check .
	cd /tmp && PYTHONPATH=$(CURDIR)/build/install-check $(CURDIR)/$(BIN)/python -c \
		"import hotknob.config as c, hotknob.daemon.cli, hotknob.model_runtime as r; \
		 assert '/build/install-check/' in c.__file__ and '/build/install-check/' in r.__file__, c.__file__; \
		 print('non-editable install OK:', c.__file__)"
	PYTHONPATH=$(CURDIR)/build/install-check build/install-check/bin/hotknob --help >/dev/null

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache demo.png
