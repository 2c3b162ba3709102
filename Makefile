VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
# torch's CPU wheel lies in /opt/wheels on our machines; pip also finds it there via pip.conf.
PIP_FIND_LINKS ?= $(wildcard /opt/wheels)
export PIP_FIND_LINKS

.PHONY: venv run test lint bench clean

venv: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e '.[trainer,dev]'
	touch $(STAMP)

run: venv
	$(VENV)/bin/nightshift up

test: venv lint
	$(VENV)/bin/pytest -q

lint: venv
	$(VENV)/bin/ruff check services trainer tests
	$(VENV)/bin/mypy

bench: venv
	$(VENV)/bin/nightshift bench fleet --slots 16 --experiments 200
	$(VENV)/bin/nightshift bench fleet --slots 256 --experiments 1024

clean:
	rm -rf $(VENV) .nightshift .pytest_cache .mypy_cache .ruff_cache
