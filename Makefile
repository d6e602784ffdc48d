# Two commands from a fresh clone: `make run` (set up and serve), `make test`.
# torch is installed on its own: the CPU build by default (TORCH_SPEC), since a
# bare `torch` requirement pulls a multi-GB CUDA wheel. For a GPU, see README.
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX ?=
# One stamp per torch choice: `make install TORCH_SPEC=... TORCH_INDEX=...` after a first
# install replaces torch (pip alone would keep a CPU build that satisfies the same version).
TORCH_STAMP := $(VENV)/.torch-$(shell printf '%s %s' '$(TORCH_SPEC)' '$(TORCH_INDEX)' | cksum | cut -d' ' -f1)
RUN_STAMP := $(VENV)/.installed-run
TEST_STAMP := $(VENV)/.installed-test
PYTEST_ARGS ?=

.PHONY: install install-dev run test test-full docs demo-checkpoint deploy host-api test-api bench batch clean

# Serving needs requirements.txt only; the test and benchmark stack is for `make test`.
install: $(RUN_STAMP)

install-dev: $(TEST_STAMP)

$(TORCH_STAMP):
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	if ls $(VENV)/.torch-* >/dev/null 2>&1; then \
	  $(PY) -m pip install --quiet --force-reinstall --no-deps "$(TORCH_SPEC)" $(TORCH_INDEX); fi
	$(PY) -m pip install --quiet "$(TORCH_SPEC)" $(TORCH_INDEX)
	rm -f $(VENV)/.torch-*
	touch $@

$(RUN_STAMP): requirements.txt $(TORCH_STAMP)
	$(PY) -m pip install --quiet -r requirements.txt
	touch $@

$(TEST_STAMP): requirements-dev.txt requirements-dev-nodeps.txt $(RUN_STAMP)
	$(PY) -m pip install --quiet -r requirements-dev.txt
	$(PY) -m pip install --quiet --no-deps -r requirements-dev-nodeps.txt
	touch $@

run: install
	$(PY) app.py

# The project's compiled bytecode is cached (__pycache__/, ignored by git) even where the shell
# sets PYTHONDONTWRITEBYTECODE: a run starts hundreds of Python processes (test workers, servers,
# CLIs), and each would otherwise compile the project's modules again (~10 CPU s per worker).
TEST_ENV := PYTHONDONTWRITEBYTECODE=

# In parallel worker processes (pytest.ini); THAI_TEST_WORKERS=N sets how many, PYTEST_ARGS=-n0 none.
test: install-dev
	$(TEST_ENV) $(PY) -m pytest $(PYTEST_ARGS)

# The sweeps that take minutes (marker `slow`, e.g. the soak), which `make test` leaves out; CI runs both.
test-full: install-dev
	$(TEST_ENV) $(PY) -m pytest -m slow $(PYTEST_ARGS)

# docs/configuration.md from the settings' own descriptions (a test checks it is current)
docs: install
	$(PY) -m api.settings_doc

demo-checkpoint: install
	$(PY) -m api.engine.demo_checkpoint --out models/demo

# Side-by-side serving benchmark (bench/RESULTS.md); e.g. BENCH_ARGS="--model DIR".
# llama.cpp joins when given a GGUF of the same checkpoint and a llama-server binary, e.g.
# BENCH_ARGS="--model DIR --gguf DIR-Q8_0.gguf --llama-server PATH" (skipped, with the reason, otherwise).
bench: install-dev
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
