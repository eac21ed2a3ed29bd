# Two commands do all set-up on a fresh machine:
#   make demo   vLLM serving the default model with the monitor attached, real traffic,
#               verdicts and metrics shown
#   make test   lint + the whole test suite (what CI runs)
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: env demo test test-fast test-archs lint bundle bench proto fuzz clean

env:
	bash scripts/setup_env.sh $(VENV)

demo: env
	$(PY) -m monitor.tools.demo

test: env lint
	$(PY) -m pytest -q -rs --cov=monitor --cov=probes --cov-report=term

test-fast: env
	$(PY) -m pytest -q -rs -m "not vllm and not slow"

test-archs: env
	SAFETY_MONITOR_ARCHS_ALL=1 $(PY) -m pytest -q -rs tests/test_archs.py

lint: env
	$(PY) -m ruff check .
	$(PY) -m mypy

bundle: env
	$(PY) -m probes build-default --out bundles/default
	$(PY) -m probes add-sae-detector --bundle bundles/default

bench: env
	$(PY) bench/bench_scorer.py
	$(PY) bench/bench_sae.py
	$(PY) bench/bench_ingest.py
	$(PY) bench/bench_vllm.py
	$(PY) bench/bench_alerts.py

FUZZ_SECONDS ?= 300
fuzz: env  # coverage-guided (atheris) fuzzing of decode_frame and the policy parser
	$(PY) -m monitor.tools.fuzz --seconds $(FUZZ_SECONDS)

proto: env
	PATH=$(VENV)/bin:$$PATH bash scripts/gen_proto.sh

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .mypy_cache .coverage
