# Verbs mirror CI. Run them inside the project's virtual environment (see README.md).
PYTEST ?= pytest

.PHONY: test test-gpu lint format bench-e2e bench-flux perf-table

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

# On a CUDA machine (~65 GB free disk, 20+ minutes; `--dry-run` shows the plan, `--only` splits it): qtool against
# diffusers/transformers + bitsandbytes and plain reads on a FLUX.1-dev-sized synthetic pipeline. Appends to
# benchmarks/results/e2e.csv; then `make perf-table`.
E2E_ARGS ?=
bench-e2e:
	python benchmarks/e2e_quantize.py $(E2E_ARGS)

# On a CUDA machine (about 5 minutes, at most 9; `--dry-run` shows the plan, `--variants` / `--no-compile` trim it):
# a FLUX.1-dev-shaped transformer step and a 28-step 1024x1024 generation in bf16, bnb NF4 and qtool NF4 / 8-bit,
# eager and compiled. Appends to benchmarks/results/flux.csv; then `make perf-table`.
FLUX_ARGS ?=
bench-flux:
	python benchmarks/bench_flux.py $(FLUX_ARGS)

# README's performance tables, regenerated from benchmarks/results/*.csv (tests/test_benchmarks.py checks them).
perf-table:
	python benchmarks/make_table.py
