PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# PyPI's Linux torch wheels bundle the CUDA libraries (several GB); without a visible NVIDIA GPU the venv first
# tries PyTorch's CPU-only wheels from here, and falls back to PyPI's when this index cannot be used
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu

.PHONY: test test-slow demo demo-lra selfcheck lint format benchmark gpu-check cpu-torch clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	@$(MAKE) --no-print-directory cpu-torch PY=$(PY)

# torch for a machine without a visible NVIDIA GPU (Linux): CPU-only wheels if TORCH_CPU_INDEX serves a torch and a
# torchvision that import together (pip's find-links can pair a local CPU torch with a torchvision built for another)
cpu-torch:
	@if [ "$$(uname -s)" != Linux ]; then \
		echo "torch from PyPI (its wheels for $$(uname -s) have no CUDA libraries)"; \
	elif nvidia-smi -L >/dev/null 2>&1; then \
		echo "NVIDIA GPU visible: torch from PyPI (with its CUDA libraries)"; \
	elif $(PY) -c "import torch" 2>/dev/null; then \
		echo "torch already installed: $$($(PY) -c 'import torch; print(torch.__version__)')"; \
	else \
		echo "no NVIDIA GPU visible: trying CPU-only torch from $(TORCH_CPU_INDEX)"; \
		if $(PY) -m pip install -q --timeout 30 --retries 1 --index-url $(TORCH_CPU_INDEX) torch torchvision \
			&& $(PY) -c "import sys, torch, torchvision; sys.exit(torch.version.cuda is not None)"; then \
			echo "torch $$($(PY) -c 'import torch; print(torch.__version__)'): CPU-only"; \
		else \
			$(PY) -m pip uninstall -q -y torch torchvision 2>/dev/null; \
			echo "$(TORCH_CPU_INDEX) could not be used; pip installs torch from PyPI (with CUDA libraries) instead"; \
		fi; \
	fi

$(VENV)/.installed: $(PY) pyproject.toml
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

# one pytest worker per core, each test file on one worker (its module fixtures built once), one torch
# thread per process: CPU tests in parallel, not OpenMP threads oversubscribing the cores
test: $(VENV)/.installed
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -n auto --dist loadfile

test-slow: $(VENV)/.installed
	$(PY) -m pytest -q -m slow

demo: $(VENV)/.installed
	$(PY) -m mrconvnext.demo

# ListOps generated with the LRA grammar in the release's TSV layout, then a small MRConv trained on it
DEMO_LRA ?= output/demo-lra
demo-lra: $(VENV)/.installed
	$(PY) -m mrconvnext.data.listops_generator $(DEMO_LRA)/listops-1000
	$(PY) train_sequence.py --task listops --data-dir $(DEMO_LRA)/listops-1000 --seq-len 128 --model-kwargs depth=4 embed_dim=64 --epochs 12 -j 0 --output $(DEMO_LRA)

selfcheck: $(VENV)/.installed
	$(PY) -m mrconvnext.selfcheck

benchmark: $(VENV)/.installed
	$(PY) benchmarks/benchmark.py
	$(PY) -m benchmarks.sequence_benchmark

# on a machine with a CUDA device: the layer's equivalence tests on CUDA, then the benchmark on CUDA
gpu-check: $(VENV)/.installed
	@$(PY) -c "import sys, torch; sys.exit(None if torch.cuda.is_available() else 'make gpu-check needs a CUDA device: torch.cuda.is_available() is False')"
	$(PY) -m pytest -q -rs tests/test_devices.py
	$(PY) benchmarks/benchmark.py --device cuda

lint: $(VENV)/.installed
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

format: $(VENV)/.installed
	$(PY) -m ruff check --fix .
	$(PY) -m ruff format .

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
