# The two commands of the README: `make demo` (the daemon on synthetic parts) and `make test`.
# Both build .venv on first use: torch 2.13.0 first, so nothing can pull a second torch. PyPI's torch for Linux
# x86-64 is the CUDA build (it also runs on a CPU); TORCH_INDEX_URL picks another, e.g.
# https://download.pytorch.org/whl/cpu (small, CPU only) or .../whl/cu130 (CUDA 13 driver).
# EXTRAS=dev,gpu also installs TensorRT + cuda-python (CUDA 12 wheels; dev,gpu-cu13 for a CUDA 13 driver).

PYTHON ?= python3
TORCH_INDEX_URL ?=
EXTRAS ?= dev
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# The Python surface of the oldest and newest supported TensorRT bindings, for tests/test_tensorrt_api.py:
# installed as files only (no libnvinfer, never imported by the package), so the check runs on any machine.
TRT_API_VERSIONS := 10.8.0.43 11.4.0.106
TRT_API := $(VENV)/tensorrt-api
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

# `make demo` runs the line until Ctrl-C; `make demo DEMO_ARGS=` inspects 200 parts and stops.
DEMO_ARGS ?= --frames 0

.PHONY: demo test lint system-deps venv clean

venv: $(STAMP) $(TRT_API)/.installed

$(STAMP): pyproject.toml
	[ -x $(BIN)/python ] || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(if $(TORCH_INDEX_URL),--index-url $(TORCH_INDEX_URL)) torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[$(EXTRAS)]'
	touch $(STAMP)

$(TRT_API)/.installed: $(STAMP) Makefile
	for v in $(TRT_API_VERSIONS); do \
		$(BIN)/python -m pip install -q --no-deps --upgrade --target $(TRT_API)/$$v \
			tensorrt-cu12-bindings==$$v || exit 1; \
	done
	touch $@

# Real tools the tests and the demo use: Debian's mosquitto, systemd-analyze for the unit, openssl for the
# broker's test CA, shellcheck for the installer, chromium and its chromedriver for the station page.
system-deps:
	@missing=""; \
	command -v mosquitto >/dev/null || missing="$$missing mosquitto mosquitto-clients"; \
	command -v systemd-analyze >/dev/null || missing="$$missing systemd"; \
	command -v openssl >/dev/null || missing="$$missing openssl"; \
	command -v shellcheck >/dev/null || missing="$$missing shellcheck"; \
	[ -x /usr/bin/chromium ] || missing="$$missing chromium"; \
	[ -x /usr/bin/chromedriver ] || missing="$$missing chromium-driver"; \
	if [ -n "$$missing" ]; then \
		$(SUDO) apt-get update -q && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -q $$missing; \
	fi

lint: $(STAMP)
	$(BIN)/ruff check .

test: $(STAMP) $(TRT_API)/.installed system-deps lint
	$(BIN)/pytest --durations=15

demo: $(STAMP) system-deps
	$(BIN)/inspector demo $(DEMO_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache var
