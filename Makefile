# Two commands from a fresh clone: `make run` (set up and serve), `make test`.
# torch is installed on its own: the CPU build by default (TORCH_SPEC), since a
# bare `torch` requirement pulls a multi-GB CUDA wheel. For a GPU, see README.
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX ?=
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: install run test demo-checkpoint deploy host-api test-api bench batch clean

install: $(STAMP)

$(STAMP): requirements.txt requirements-dev.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH_SPEC)" $(TORCH_INDEX)
	$(PY) -m pip install --quiet -r requirements.txt -r requirements-dev.txt
	touch $(STAMP)

run: install
	$(PY) app.py

test: install
	$(PY) -m pytest $(PYTEST_ARGS)

demo-checkpoint: install
	$(PY) -m api.engine.demo_checkpoint --out models/demo

# Side-by-side serving benchmark (bench/RESULTS.md); e.g. BENCH_ARGS="--model DIR".
# llama.cpp joins when given a GGUF of the same checkpoint and a llama-server binary, e.g.
# BENCH_ARGS="--model DIR --gguf DIR-Q8_0.gguf --llama-server PATH" (skipped, with the reason, otherwise).
bench: install
	$(PY) -m bench.run_benchmark $(BENCH_ARGS)

# Production helpers (deploy/); pass flags with ARGS="...", e.g. make deploy ARGS="--domain api.example.com"
ARGS ?=

host-api: install
	$(PY) deploy/host_model.py $(ARGS)

test-api: install
	$(PY) deploy/test_api_client.py $(ARGS)

deploy: install
	$(PY) deploy/setup_production.py $(ARGS)

# Many texts at once, in-process: make batch ARGS="docs.csv summaries.csv" (python -m api.batch --help)
batch: install
	$(PY) -m api.batch $(ARGS)

clean:
	rm -rf $(VENV) models/demo test-artifacts .pytest_cache
