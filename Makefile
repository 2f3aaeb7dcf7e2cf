# Two commands do everything on a fresh machine (see README):
#   make demo   set up, build, run the main job
#   make test   set up, build, run the tests
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

# torch derives CUDA_HOME from `which nvcc`, which a wrapper script on PATH
# misleads; point it at the toolkit's standard prefix when there is one.
CUDA_HOME ?= $(firstword $(wildcard /usr/local/cuda))
ifneq ($(CUDA_HOME),)
export CUDA_HOME
endif

SOURCES := setup.py $(shell find csrc kernels -type f -name '*.cpp' -o -type f -name '*.cu' -o -type f -name '*.cuh' -o -type f -name '*.h')

.PHONY: demo test bench build venv check-sm61 clean

# The DRSL pipeline on the built-in synthetic pair: source training, two rounds
# each of DRSL and DRSL+, evaluation (runs/demo/results.md, panels/, rounds.png).
demo: build
	rm -rf runs/demo
	$(PY) -m drsl_fast.cli run --config demo

test: build
	$(PY) -m pytest -q tests

bench: build
	$(PY) -m pip install --quiet -r requirements-bench.txt
	$(PY) bench/bench_mode_distance.py

build: $(VENV)/.built

venv: $(VENV)/.installed

$(VENV)/.installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -r requirements.txt
	touch $@

$(VENV)/.built: $(VENV)/.installed $(SOURCES)
	$(PY) -m pip install --no-build-isolation --no-deps -e .
	touch $@

# Compile the device kernels for sm_61 (GTX 1080 Ti) with a CUDA 11.8 toolkit.
check-sm61:
	bash .ci/check_sm61.sh

clean:
	rm -rf build $(VENV) drsl_fast/_C*.so *.egg-info
