# The two commands of the README: `make demo` (the daemon on synthetic parts) and `make test`.
# Both build .venv on first use: torch 2.13.0 (the CPU wheel) first, so nothing can pull a second torch.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

# `make demo` runs the line until Ctrl-C; `make demo DEMO_ARGS=` inspects 200 parts and stops.
DEMO_ARGS ?= --frames 0

.PHONY: demo test lint system-deps venv clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	[ -x $(BIN)/python ] || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

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

test: $(STAMP) system-deps lint
	$(BIN)/pytest --durations=15

demo: $(STAMP) system-deps
	$(BIN)/inspector demo $(DEMO_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache var
