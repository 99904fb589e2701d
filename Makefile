# Two commands on a fresh machine (CPU is enough):
#   make demo    set up .venv if needed, then run the main job: accelerate launch recipes/dpo.yaml
#   make test    set up .venv if needed, then run the tests:    python -m pytest -q -n 2 (the
#                training-outcome tests on this CPU's float path and under ATEN_CPU_CAPABILITY=default)
#   make test-latest       the same tests in .venv-latest against the newest releases of every dependency
#                          (torch aside): finds drift on purpose, before a newcomer does
#   make tested-versions   after a green `make test`: write .venv's versions to requirements/tested.txt
# The virtual environment is created once and reused; it is set up again when pyproject.toml or
# requirements/tested.txt changes. It installs exactly the versions in requirements/tested.txt (every
# direct and indirect dependency, the ones the suite last passed with); pyproject.toml keeps ranges for
# people who install the package into an environment of their own.
# torch is pinned to the CPU build so that pip does not pull a CUDA build onto a CPU machine.

PYTHON ?= python3
SHELL := /bin/bash
VENV := .venv
STAMP := $(VENV)/.installed
PINS := requirements/tested.txt
TORCH := torch==2.13.0
LATEST := .venv-latest
RUN := PATH="$(CURDIR)/$(VENV)/bin:$$PATH"

.PHONY: demo test test-latest tested-versions venv chromium

venv: $(STAMP)

$(STAMP): pyproject.toml $(PINS)
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet -c $(PINS) "$(TORCH)" -e ".[test]"
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
define run_tests
	@echo "the training-outcome tests under ATEN_CPU_CAPABILITY=default run beside the suite (their output follows it)"
	@PATH="$(CURDIR)/$(1)/bin:$$PATH" TOKENIZERS_PARALLELISM=false ATEN_CPU_CAPABILITY=default OMP_NUM_THREADS=1 \
	  python -m pytest -q -p no:cacheprovider -m dynamics > .dynamics-default.log 2>&1 & guard=$$!; \
	PATH="$(CURDIR)/$(1)/bin:$$PATH" TOKENIZERS_PARALLELISM=false python -m pytest -q -n 2; suite=$$?; \
	wait $$guard; portable=$$?; \
	echo "--- the training-outcome tests under ATEN_CPU_CAPABILITY=default:"; cat .dynamics-default.log; rm -f .dynamics-default.log; \
	exit $$((suite || portable))
endef

test: $(STAMP) chromium
	$(call run_tests,$(VENV))

# The newest release of every dependency that pyproject.toml's ranges allow (torch stays the pinned CPU
# build: an unpinned torch is a multi-GB CUDA download). Prints how the versions differ from the tested
# ones, then runs the same tests. A failure here is drift to fix before it reaches requirements/tested.txt.
test-latest: chromium
	test -x $(LATEST)/bin/python || $(PYTHON) -m venv $(LATEST)
	$(LATEST)/bin/python -m pip install --quiet --upgrade --upgrade-strategy eager "$(TORCH)" -e ".[test]"
	@echo "--- versions that differ from $(PINS) (< tested, > newest):"
	@$(LATEST)/bin/python -m pip freeze --exclude-editable | sed 's/+cpu$$//' | grep -v '^#' | sort \
	  | diff <(grep -v '^#' $(PINS) | sort) - || true
	$(call run_tests,$(LATEST))

# Run after a green `make test` (or `make test-latest`, with VENV=.venv-latest) to record what it ran with.
tested-versions:
	@{ echo "# The versions the test suite last passed with; make installs exactly these (pip -c)."; \
	  echo "# Regenerate after a green run: make tested-versions   (torch: the CPU build of this version)"; \
	  $(VENV)/bin/python -m pip freeze --exclude-editable | sed 's/+cpu$$//'; } > $(PINS)
	@echo "wrote $(PINS) from $(VENV)"
