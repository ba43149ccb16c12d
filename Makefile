# Two commands: `make report` (the main job) and `make test`. Both create the environment if missing.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.zomem-installed
REPORT_DIR ?= out/report

.PHONY: report test clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[test]'
	touch $(STAMP)

report: $(STAMP)
	$(BIN)/zomem report --out $(REPORT_DIR)

test: $(STAMP)
	$(BIN)/python -m pytest

clean:
	rm -rf $(VENV) out
