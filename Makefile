# Two commands do everything on a fresh machine:
#   make demo   set up .venv, calibrate the embedded model (8-19 min on a 2-core CPU, by the day), then plan for
#               TOKENS answer tokens (default 256: the largest size the quick grid measures)
#   make test   set up .venv and run the test suite
VENV ?= .venv
BIN := $(VENV)/bin
TOKENS ?= 256
TARGET_EM ?= 0.99

.PHONY: setup demo test bench

setup:
	@bash scripts/setup.sh

demo: setup
	$(BIN)/memprobe calibrate
	$(BIN)/planner recommend --tokens $(TOKENS) --target-em $(TARGET_EM)

# pytest exits 5 when it collects no test: say so loudly instead of failing on an empty selection
test: setup
	@$(BIN)/python -m pytest -q; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests"; exit 0; fi; exit $$rc
