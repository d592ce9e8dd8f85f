# Two commands for a new user: `make demo` and `make test`. Both create .venv when it is missing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-dev

.PHONY: demo test install bench lint clean notebooks

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip >/dev/null

$(STAMP): $(PY) setup.cfg pyproject.toml
	$(PY) -m pip install -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m stability.apps.demo $(DEMO_ARGS)

test: $(STAMP)
	$(PY) -m pytest -q

bench: $(STAMP)
	$(PY) benchmarks/bench_siblings.py
	$(PY) benchmarks/bench_interpolation.py
	$(PY) benchmarks/bench_hessian.py
	$(PY) benchmarks/bench_align.py
	$(PY) benchmarks/bench_neq.py
	$(PY) benchmarks/bench_lmc.py
	$(PY) benchmarks/bench_landscape.py
	$(PY) benchmarks/bench_streaming.py

# Execute notebooks/*.ipynb in place (small settings, embedded data, ~2 minutes) so they are committed with their
# figures; STABILITY_SMALL=0 runs the real settings (hours on a CPU).
notebooks: $(STAMP)
	$(PY) notebooks/refresh.py

lint: $(STAMP)
	$(PY) -m ruff check stability analysis tests benchmarks

clean:
	rm -rf $(VENV) results/runs results/demo
