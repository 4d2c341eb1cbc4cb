# Two commands do all set-up on a fresh machine:
#   make run    create .venv, install, then train GRPO on the built-in task (CPU is enough)
#   make test   create .venv, install, then run the test suite (the command CI runs)
# On a machine without CUDA, torch==2.13.0 (a CPU build) is installed first, so pip
# never pulls a multi-GB CUDA build; with CUDA, pip picks the matching torch itself.

VENV   ?= .venv
PYTHON ?= python3
PY      = $(VENV)/bin/python
STAMP   = $(VENV)/.installed
TORCH_CPU = torch==2.13.0

.PHONY: install run test test-slow bench browser clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	if command -v nvidia-smi >/dev/null 2>&1; then $(PY) -m pip install -q torch; \
	else $(PY) -m pip install -q $(TORCH_CPU); fi
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

run: install
	$(VENV)/bin/rlflow run pipelines/grpo.py

test: install
	$(PY) -m pytest -q

# headless Chromium for the test that renders `rlflow report --html` (Debian/Ubuntu as root;
# elsewhere install it yourself). Without it that one test skips.
browser:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || \
	  { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
	    apt-get update -qq && apt-get install -y -qq chromium >/dev/null; } || \
	  echo "no chromium: the HTML report test will skip"

test-slow: install
	$(PY) -m pytest -q -m slow

bench: install
	$(PY) benchmarks/learning.py --pipelines grpo --seeds 0 1 2

clean:
	rm -rf $(VENV) runs build *.egg-info
