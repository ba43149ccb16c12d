# Two commands: `make report` (the main job) and `make test`. Both create the environment if missing.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.zomem-installed
REPORT_DIR ?= out/report
# The benchmark suites on the tiny model: every registered optimizer, one workload, so CI exercises them cheaply.
SUITES_ARGS ?= --zomem-model opt-tiny --zomem-device cpu --zomem-workloads sst2
SUITES_JSON ?= out/suites/opt-tiny.json

.PHONY: report test clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[test]'
	touch $(STAMP)

# --resume: an interrupted `make report` finishes only the missing cells when run again
report: $(STAMP)
	$(BIN)/zomem report --resume --out $(REPORT_DIR)

test: $(STAMP)
	$(BIN)/python -m pytest
	mkdir -p $(dir $(SUITES_JSON))
	$(BIN)/python -m pytest suites/ $(SUITES_ARGS) --benchmark-json $(SUITES_JSON)

clean:
	rm -rf $(VENV) out
