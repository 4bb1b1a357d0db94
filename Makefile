# Veilface: two commands do all set-up on a fresh machine.
#   make demo   install, then run the end-to-end scenario (gRPC server + SQLite store + client)
#   make test   install, then run the test suite
# The venv gets every extra (.[all,test]); the CLI is $(VENV)/bin/veilface (`make cli` says how
# to put it on PATH). `make wheel` builds a wheel into dist/ (see docs/contributing.md).
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.veilface-installed
SOURCES := pyproject.toml setup.py $(wildcard csrc/*.hpp csrc/*.cpp engine/*.pyx engine/*/*.pyx proto/veilface/v1/*.proto)

.PHONY: install demo test lint bench bench-full cli wheel wheel-smoke clean

install: $(STAMP)

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

$(STAMP): $(SOURCES) | $(PY)
	$(PY) -m pip install --quiet -e '.[all,test]'
	touch $(STAMP)
	@$(MAKE) --no-print-directory cli

# where the CLI is: make does not change the caller's PATH
cli:
	@test -x $(VENV)/bin/veilface || { echo "veilface is not installed yet: run make install"; exit 1; }
	@echo "veilface CLI: $(abspath $(VENV))/bin/veilface"
	@echo "  on PATH for this shell: . $(VENV)/bin/activate   (or call $(VENV)/bin/veilface)"

demo: install
	$(VENV)/bin/veilface demo

test: install lint
	$(PY) -m pytest -q

lint: install
	$(VENV)/bin/ruff check engine tests bench models setup.py

bench: install
	$(PY) -m bench --quick --json bench-quick.json

bench-full: install
	$(PY) -m bench --json bench-full.json

# PEP 517 wheel with the compiled extensions -> dist/ (manylinux tag via auditwheel when it works here)
wheel: | $(PY)
	.ci/build-wheel $(PY)

# the CI step: build the wheel, install it with [server] only into a fresh venv, smoke-test it
wheel-smoke: | $(PY)
	.ci/wheel-smoke

clean:
	rm -rf build dist $(VENV) *.egg-info engine/*.so engine/*/*.so engine/_proto
	find engine -name '*.cpp' -path '*pyx*' -delete
