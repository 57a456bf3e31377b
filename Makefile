# Two commands do all the set-up: `make demo` runs the main job, `make test` runs the tests.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
EXTRAS := test,hf,plot,video,coreml,peers,sweep
STAMP := $(VENV)/.installed
# glibc: keep malloc's mmap/trim thresholds at their 128 KiB defaults from the first allocation, so freed
# activations leave RSS and peak_rss_delta matches the ledger (README, "Memory"); no effect elsewhere
export MALLOC_MMAP_THRESHOLD_ = 131072
export MALLOC_TRIM_THRESHOLD_ = 131072

.PHONY: demo test bench bench-page clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -c constraints.txt torch==2.13.0
	$(PY) -m pip install -q -c constraints.txt -e ".[$(EXTRAS)]"
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/blockrt generate --trace --out out/demo

test: $(STAMP)
	$(PY) -m pytest -q

bench: $(STAMP)
	$(PY) benchmarks/overlap.py --out out/bench
	$(PY) benchmarks/retention.py --out out/bench/retention

bench-page: $(STAMP)
	$(PY) benchmarks/results_page.py

clean:
	rm -rf out .pytest_cache
