# Two commands do everything on a fresh machine:
#   make demo   create the venv, build the firmware and the C core, run the quickstart plan
#   make test   the same set-up, then ruff, mypy --strict on confplan/, and pytest
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.confplan-installed
# Reinstall (which rebuilds the firmware and the C core) whenever their sources or the packaging change.
BUILD_INPUTS := pyproject.toml setup.py $(wildcard firmware/Makefile firmware/*.ld firmware/*.c firmware/*.h \
                firmware/*/*.c firmware/*/*.h firmware/*/*.S firmware/*.S) $(wildcard confplan/core/*.c confplan/core/*.h)

.PHONY: demo test install lint clean

install: $(STAMP)

$(STAMP): $(BUILD_INPUTS)
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[test]'
	@touch $@

lint: $(STAMP)
	$(BIN)/ruff check confplan tests bench
	$(BIN)/mypy --strict confplan

test: lint
	$(BIN)/pytest -q

# The demo migrates afresh each time (--restart), shows the checkpoint, then stops the migrated guest.
demo: $(STAMP)
	$(BIN)/confplan validate plans/*.yaml
	$(BIN)/confplan apply --restart --yes plans/quickstart.yaml
	$(BIN)/confplan status plans/quickstart.yaml
	$(BIN)/confplan stop plans/quickstart.yaml

clean:
	rm -rf $(VENV) firmware/build confplan/_firmware build *.egg-info
	find confplan -name '*.so' -delete
