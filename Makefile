# Two commands on a fresh machine (CPU is enough):
#   make demo    set up .venv if needed, then run the main job: accelerate launch recipes/dpo.yaml
#   make test    set up .venv if needed, then run the tests:    python -m pytest -q -n 2 (the
#                training-outcome tests on this CPU's float path and under ATEN_CPU_CAPABILITY=default)
# The virtual environment is created once and reused; it is set up again when pyproject.toml changes.
# torch is pinned to the CPU build so that pip does not pull a CUDA build onto a CPU machine.

PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed
RUN := PATH="$(CURDIR)/$(VENV)/bin:$$PATH"

.PHONY: demo test venv chromium

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet "torch==2.13.0" -e ".[test]"
	touch $(STAMP)

demo: $(STAMP)
	$(RUN) accelerate launch recipes/dpo.yaml

# The report.html test renders the page in headless Chromium (Debian's package).
chromium:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || \
	  { echo "installing Debian's chromium for the report.html test"; apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; }

# The tests on every core (pytest-xdist, 2 workers) and, beside them, the training-outcome tests
# (marker `dynamics`) a second time under torch's portable CPU kernels (ATEN_CPU_CAPABILITY=default,
# one thread): another float path, as on another processor, so that a margin tuned on one
# machine's rounding fails here first, not on the next. Side by side because that run is one
# chain of stages (a third of the suite's length) that would otherwise leave a core idle.
test: $(STAMP) chromium
	@echo "the training-outcome tests under ATEN_CPU_CAPABILITY=default run beside the suite (their output follows it)"
	@$(RUN) TOKENIZERS_PARALLELISM=false ATEN_CPU_CAPABILITY=default OMP_NUM_THREADS=1 \
	  python -m pytest -q -p no:cacheprovider -m dynamics > .dynamics-default.log 2>&1 & guard=$$!; \
	$(RUN) TOKENIZERS_PARALLELISM=false python -m pytest -q -n 2; suite=$$?; \
	wait $$guard; portable=$$?; \
	echo "--- the training-outcome tests under ATEN_CPU_CAPABILITY=default:"; cat .dynamics-default.log; rm -f .dynamics-default.log; \
	exit $$((suite || portable))
