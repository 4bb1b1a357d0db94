# Veilface: two commands do all set-up on a fresh machine.
#   make demo   install, then run the end-to-end scenario (gRPC server + SQLite store + client)
#   make test   install, then run the test suite
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.veilface-installed
SOURCES := pyproject.toml setup.py $(wildcard csrc/*.hpp csrc/*.cpp engine/*.pyx engine/*/*.pyx proto/veilface/v1/*.proto)

.PHONY: install demo test lint bench bench-full clean

install: $(STAMP)

$(STAMP): $(SOURCES)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

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

clean:
	rm -rf build $(VENV) *.egg-info engine/*.so engine/*/*.so engine/_proto
	find engine -name '*.cpp' -path '*pyx*' -delete
