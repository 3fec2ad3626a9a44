# Every target installs into .venv first if it is missing, so a fresh clone needs nothing else.
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
STUDIES := positions objectives instruct distill lora scaling   # experiments/studies/<name>.toml

.PHONY: install demo demo-curve cards studies $(addprefix study-,$(STUDIES)) test test-fast test-all clean

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools  # setuptools>=77 builds the wheel (tests/test_wheel.py)
	$(PY) -m pip install -q -e '.[test,tpu]'
	touch $(STAMP)

install: $(STAMP)

# Pre-train once; fine-tune on 2,000 en->es verse pairs with and without it (2 seeds; each arm's learning rate
# chosen from a 2-point grid on validation); compare on held-out test verses (13 min 50 s measured, 2 CPU cores).
# Finished stages are skipped on a re-run; `make demo DEMO_ARGS=--fresh` starts over.
demo: $(STAMP)
	$(PY) -m t5lite.demos.demo $(DEMO_ARGS)

# The same comparison at 500, 2,000, 8,000 and all ~30k pairs: runs/demo/curve.{md,png} (40 min measured after
# `make demo`, whose runs it reuses; 54 min for both, 2 CPU cores).
demo-curve: $(STAMP)
	$(PY) -m t5lite.demos.curve $(DEMO_ARGS)

# Three LoRA adapter cards (en->es, KJV->WEB, WordNet definitions) on the demo's pre-trained base, each scored
# against the base on its task, then one decode batch mixing the three cards and the base: runs/cards/results.md
# (14 min 51 s measured on 2 CPU cores after `make demo`; without it, the demo's pre-training runs first).
# Finished stages are skipped on a re-run; `make cards CARDS_ARGS=--fresh` starts the cards over.
cards: $(STAMP)
	$(PY) -m t5lite.demos.cards $(CARDS_ARGS)

# The studies (experiments/studies/*.toml; each header: the question, the paper's answer, the budget): each trains
# its points under runs/studies/<name> (a re-run skips finished points and only rebuilds the page) and writes
# docs/results/<name>.md + .png. Each is designed for <= 20 min on 2 idle CPU cores (estimates, not yet timed).
studies: $(addprefix study-,$(STUDIES))

study-positions: $(STAMP)
	$(PY) -m t5lite.cli sweep run experiments/studies/positions.toml --root runs/studies/positions $(STUDY_ARGS)

study-objectives: $(STAMP)
	$(PY) -m t5lite.cli sweep run experiments/studies/objectives.toml --root runs/studies/objectives $(STUDY_ARGS)

study-instruct: $(STAMP)
	$(PY) -m t5lite.cli sweep run experiments/studies/instruct.toml --root runs/studies/instruct $(STUDY_ARGS)

study-distill: $(STAMP)
	$(PY) -m t5lite.cli sweep run experiments/studies/distill.toml --root runs/studies/distill $(STUDY_ARGS)

study-lora: $(STAMP)
	$(PY) -m t5lite.cli sweep run experiments/studies/lora.toml --root runs/studies/lora $(STUDY_ARGS)

study-scaling: $(STAMP)
	$(PY) -m t5lite.cli sweep run experiments/studies/scaling.toml --root runs/studies/scaling --fit $(STUDY_ARGS)

# Lint first (ruff: [tool.ruff] in pyproject.toml), then the suite on 2 pytest-xdist workers: XLA's
# compiles are single-threaded, so two test processes keep both cores busy. `make test` leaves out only
# the `extended` tests (the base and large C4 recipes' pod compiles, ~6 min more); `make test-all` runs
# them too, `make test-fast` also skips the `slow` ones.
test: $(STAMP)
	$(VENV)/bin/ruff check t5lite tests launch
	$(PY) -m pytest -q -n 2 --dist worksteal -m "not extended"

test-fast: $(STAMP)
	$(VENV)/bin/ruff check t5lite tests launch
	$(PY) -m pytest -q -n 2 --dist worksteal -m "not slow and not extended"

test-all: $(STAMP)
	$(VENV)/bin/ruff check t5lite tests launch
	$(PY) -m pytest -q -n 2 --dist worksteal

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
