VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
# torch's CPU wheel lies in /opt/wheels on our machines; pip also finds it there via pip.conf.
PIP_FIND_LINKS ?= $(wildcard /opt/wheels)
export PIP_FIND_LINKS

# Lock files, both made by pip-tools from pyproject.toml (`make lock` regenerates them):
#   requirements.lock      the services' runtime dependencies and the skypilot extra (its caps on
#                          click and uvicorn hold for both files); deploy/Dockerfile installs it.
#   requirements-dev.lock  runtime + the trainer, skypilot and dev extras; `make venv` installs it.
#                          torch is pinned to the local CPU build (constraints.txt, found in /opt/wheels), and
#                          every package shared with requirements.lock keeps the same version there.
# `make lock` keeps the versions already pinned where they still fit; to move everything to the
# newest releases: make lock LOCK_ARGS=--upgrade (one package: LOCK_ARGS='-P stamina').
PIP_COMPILE := $(VENV)/bin/pip-compile --quiet --strip-extras --no-emit-index-url --no-emit-find-links
LOCK_ARGS ?=

.PHONY: venv lock run test lint bench clean

venv: $(STAMP)

$(STAMP): pyproject.toml requirements-dev.lock constraints.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements-dev.lock
	$(PY) -m pip install --quiet --no-deps -e .
	touch $(STAMP)

# Regenerate both lock files:
#   pip-compile --strip-extras --no-emit-index-url --no-emit-find-links \
#       --extra skypilot -o requirements.lock pyproject.toml
#   pip-compile --strip-extras --no-emit-index-url --no-emit-find-links \
#       --extra trainer --extra skypilot --extra dev -c constraints.txt -c requirements.lock \
#       --find-links /opt/wheels -o requirements-dev.lock pyproject.toml
# Then `make venv` installs the new requirements-dev.lock.
lock: venv
	$(PIP_COMPILE) $(LOCK_ARGS) --extra skypilot -o requirements.lock pyproject.toml
	$(PIP_COMPILE) $(LOCK_ARGS) --extra trainer --extra skypilot --extra dev -c constraints.txt -c requirements.lock \
		$(if $(PIP_FIND_LINKS),--find-links $(PIP_FIND_LINKS)) -o requirements-dev.lock pyproject.toml

run: venv
	$(VENV)/bin/nightshift up

test: venv lint
	$(VENV)/bin/pytest -q

lint: venv
	$(VENV)/bin/ruff check services trainer tests
	$(VENV)/bin/ruff format --check services trainer tests
	$(VENV)/bin/mypy

bench: venv
	$(VENV)/bin/nightshift bench fleet --slots 16 --experiments 200
	$(VENV)/bin/nightshift bench fleet --slots 256 --experiments 1024

clean:
	rm -rf $(VENV) .nightshift .pytest_cache .mypy_cache .ruff_cache
