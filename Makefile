# Two commands do everything on a fresh machine:
#   make demo   create the venv, build the firmware and the C core, run the quickstart plan
#   make test   the same set-up, then ruff, mypy --strict on confplan/, and pytest (installing Debian's
#               chromium first, when root and it is missing, for the HTML report's browser tests)
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.confplan-installed
# Reinstall (which rebuilds the firmware and the C core) whenever their sources or the packaging change.
BUILD_INPUTS := pyproject.toml setup.py $(wildcard firmware/Makefile firmware/*.ld firmware/*.c firmware/*.h \
                firmware/*/*.c firmware/*/*.h firmware/*/*.S firmware/*.S) $(wildcard confplan/core/*.c confplan/core/*.h)

.PHONY: demo test install lint browser clean

install: $(STAMP)

$(STAMP): $(BUILD_INPUTS)
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[test]'
	@touch $@

lint: $(STAMP)
	$(BIN)/ruff check confplan tests bench
	$(BIN)/mypy --strict confplan

test: lint browser
	$(BIN)/pytest -q

# The HTML report's tests render it in a real browser: Debian's chromium, installed here when it is missing
# and we are root (quietly; without it those tests skip and say why).
browser:
	@test -x /usr/bin/chromium || test "$$(id -u)" != 0 || ! command -v apt-get >/dev/null || { \
	  echo "installing Debian's chromium for the HTML report's browser tests (apt-get, once)"; \
	  export DEBIAN_FRONTEND=noninteractive; \
	  { apt-get install -y -qq chromium || { apt-get update -qq && apt-get install -y -qq chromium; }; } \
	    >/dev/null 2>&1 || echo "could not install chromium: the browser tests will skip"; }

# The demo migrates afresh each time (--restart), shows the checkpoint, then stops the migrated guest.
demo: $(STAMP)
	$(BIN)/confplan validate plans/*.yaml
	$(BIN)/confplan apply --restart --yes plans/quickstart.yaml
	$(BIN)/confplan status plans/quickstart.yaml
	$(BIN)/confplan stop plans/quickstart.yaml

clean:
	rm -rf $(VENV) firmware/build confplan/_firmware build *.egg-info
	find confplan -name '*.so' -delete
