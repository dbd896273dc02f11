# Two commands do everything on a fresh machine:
#   make demo   create the venv, build the firmware and the C core, run the quickstart plan
#   make test   the same set-up, then ruff, mypy --strict on confplan/, and pytest (installing first, when
#               root and they are missing, the Debian packages some tests need: see test-deps)
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.confplan-installed
# Reinstall (which rebuilds the firmware and the C core) whenever their sources or the packaging change.
BUILD_INPUTS := pyproject.toml setup.py $(wildcard firmware/Makefile firmware/*.ld firmware/*.c firmware/*.h \
                firmware/*/*.c firmware/*/*.h firmware/*/*.S firmware/*.S) $(wildcard confplan/core/*.c confplan/core/*.h)

.PHONY: demo test install lint test-deps clean

install: $(STAMP)

$(STAMP): $(BUILD_INPUTS)
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[test]'
	@touch $@

lint: $(STAMP)
	$(BIN)/ruff check confplan tests bench
	$(BIN)/mypy --strict confplan

test: lint test-deps
	$(BIN)/pytest -q

# Debian packages some tests need, installed here when missing and we are root (quietly; without one, its
# tests skip and say why): chromium renders the HTML report in a real browser; libsimde-dev runs the 512-bit
# crypto path's logic on a CPU without AVX-512 (firmware/crypto/emul512.h). Each entry: a file it provides,
# then the package.
TEST_DEBS := /usr/bin/chromium:chromium /usr/include/simde/x86/avx512.h:libsimde-dev
test-deps:
	@for dep in $(TEST_DEBS); do file=$${dep%%:*}; pkg=$${dep#*:}; \
	  test -e $$file || test "$$(id -u)" != 0 || ! command -v apt-get >/dev/null || { \
	    echo "installing Debian's $$pkg for the tests (apt-get, once)"; \
	    export DEBIAN_FRONTEND=noninteractive; \
	    { apt-get install -y -qq $$pkg || { apt-get update -qq && apt-get install -y -qq $$pkg; }; } \
	      >/dev/null 2>&1 || echo "could not install $$pkg: the tests that need it will skip"; }; \
	done

# The demo migrates afresh each time (--restart), shows the checkpoint, then stops the migrated guest.
demo: $(STAMP)
	$(BIN)/confplan validate plans/*.yaml
	$(BIN)/confplan apply --restart --yes plans/quickstart.yaml
	$(BIN)/confplan status plans/quickstart.yaml
	$(BIN)/confplan stop plans/quickstart.yaml

clean:
	rm -rf $(VENV) firmware/build confplan/_firmware build *.egg-info
	find confplan -name '*.so' -delete
