# Verbs mirror CI. Run them inside the project's virtual environment (see README.md).
PYTEST ?= pytest

.PHONY: test test-gpu lint format

# CPU: the Triton kernels run in Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1 without CUDA).
test:
	HF_HUB_OFFLINE=1 $(PYTEST) -q

# On a CUDA machine: the GPU tests only (FLUX-sized shapes, bitsandbytes CUDA as the oracle).
test-gpu:
	HF_HUB_OFFLINE=1 $(PYTEST) -q -m gpu

lint:
	ruff check .
	ruff format --check .

format:
	ruff format .
	ruff check --fix .
