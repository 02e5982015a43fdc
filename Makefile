# Two commands do everything, set-up included:
#   make report   set up, then run the quick preset and write outputs/report.html
#                 (PRESET=params/cpu for another preset, RUN_ARGS="--rerun retrain" for options)
#   make test     set up, then run the test suite
# Also: make lab (JupyterLab on the notebooks), make clean-outputs.

PRESET  ?= params/quick
RUN_ARGS ?=
PYTHON  ?= $(shell command -v python3.11 || command -v python3)
VENV    := .venv
PY      := $(VENV)/bin/python
STAMP   := $(VENV)/.installed
SYSTEM_PACKAGES := graphviz dataset-fashion-mnist gcc

.PHONY: report test lab setup system-deps clean-outputs

report: setup
	$(PY) -m nbutils run $(PRESET) $(RUN_ARGS)

test: setup
	$(PY) -m pytest -q

lab: setup
	$(VENV)/bin/jupyter lab notebooks

setup: system-deps $(STAMP)

# The virtual environment: torch first (pip takes the pinned wheels), then the project with its
# pins, then the Jupyter kernel registered inside the venv so that papermill finds it.
$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "Python 3.11 or newer is needed, found " + sys.version' 
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install --quiet -e '.[test]'
	$(PY) -m nbutils install-kernel
	touch $(STAMP)

# graphviz's `dot` draws the cells; Debian's dataset-fashion-mnist is the embedded dataset; a C compiler
# builds the fast supernet's batch-norm kernels (nbutils/accel/channels_last_kernels.py) on first use.
system-deps:
	@if command -v dot >/dev/null 2>&1 && [ -d /usr/share/datasets/fashion-mnist ] && command -v cc >/dev/null 2>&1; then exit 0; fi; \
	if command -v apt-get >/dev/null 2>&1; then \
	  if [ "$$(id -u)" = 0 ]; then SUDO=""; elif command -v sudo >/dev/null 2>&1; then SUDO="sudo"; else SUDO=none; fi; \
	  if [ "$$SUDO" != none ]; then \
	    echo "Installing system packages: $(SYSTEM_PACKAGES)"; \
	    $$SUDO apt-get install -y --no-install-recommends $(SYSTEM_PACKAGES) >/dev/null 2>&1 \
	      || { $$SUDO apt-get update -qq && $$SUDO apt-get install -y --no-install-recommends $(SYSTEM_PACKAGES); } \
	      || echo "warning: could not install $(SYSTEM_PACKAGES); install them yourself."; \
	    exit 0; \
	  fi; \
	fi; \
	echo "warning: please install a C compiler (cc), graphviz (the 'dot' program: apt, brew or conda install graphviz) and"; \
	echo "         Fashion-MNIST (Debian: apt install dataset-fashion-mnist; elsewhere set download: true in"; \
	echo "         params/<preset>/grid.yaml, or point NBUTILS_DATA_ROOT at a torchvision data folder)."

clean-outputs:
	find outputs -mindepth 1 -not -name README.md -delete
