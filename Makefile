# Every target installs into .venv first if it is missing, so a fresh clone needs nothing else.
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install demo test test-fast clean

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test,tpu]'
	touch $(STAMP)

install: $(STAMP)

# Pre-train, fine-tune and fine-tune from scratch on the shipped Bible text, then compare (~15 min, 2 CPU cores).
# Finished stages are skipped on a re-run; `make demo DEMO_ARGS=--fresh` starts over.
demo: $(STAMP)
	$(PY) -m t5lite.demo $(DEMO_ARGS)

test: $(STAMP)
	$(PY) -m pytest -q

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
