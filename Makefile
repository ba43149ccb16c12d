# Two commands: `make report` (the main job) and `make test`. Both create the environment if missing.
# `make gpu-check` is the prepared check for a GPU box (DEVICE=cpu: its dry run on opt-tiny, which `make test` runs).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.zomem-installed
REPORT_DIR ?= out/report
# The reference report: every optimizer on a batch of short sequences (sst2) and on one long example (multirc, the task
# of MeZO's memory figure, where gradients outweigh activations); Adam with gradient checkpointing in the largest-fit
# table; one tracked step of each memory pattern in the timeline. squad's 25 cells, where activations dominate, would
# add about 8 minutes on the CPU machine: their report is committed in reports/cpu-squad.
REPORT_ARGS ?= --workloads sst2 multirc --fit-checkpointing adam --timeline inference mezo hizoo adamezo adam lomo
# The benchmark suites on the tiny model: every registered optimizer, one workload, so CI exercises them cheaply.
SUITES_ARGS ?= --zomem-model opt-tiny --zomem-device cpu --zomem-workloads sst2
SUITES_JSON ?= out/suites/opt-tiny.json

# The GPU check runs on whatever interpreter has torch and transformers, this source tree on PYTHONPATH and nothing
# installed, as on an air-gapped cluster node; it leaves one archive and a log in GPU_CHECK_PACK.
DEVICE ?= cuda
GPU_PYTHON ?= $(PYTHON)
GPU_CHECK_OUT ?= out/gpu-check
GPU_CHECK_PACK ?= out
# Pure-Python packages zomem needs that a GPU image may lack (tabulate): `make gpu-wheels` downloads them where there
# is a network, and gpu-check puts every wheel found here on PYTHONPATH (a pure-Python wheel imports as it is).
GPU_WHEELS ?= out/wheels

.PHONY: report test gpu-check gpu-wheels clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[test]'
	touch $(STAMP)

# --resume: an interrupted `make report` finishes only the missing cells when run again
report: $(STAMP)
	$(BIN)/zomem report --resume --out $(REPORT_DIR) $(REPORT_ARGS)

test: $(STAMP)
	$(BIN)/python -m pytest
	mkdir -p $(dir $(SUITES_JSON))
	$(BIN)/python -m pytest suites/ $(SUITES_ARGS) --benchmark-json $(SUITES_JSON)
	rm -rf out/gpu-check-cpu
	$(MAKE) gpu-check DEVICE=cpu GPU_PYTHON=$(BIN)/python GPU_CHECK_OUT=out/gpu-check-cpu GPU_CHECK_PACK=out/gpu-check-cpu

gpu-check:
	@PYTHONPATH=$(CURDIR)$(foreach wheel,$(wildcard $(GPU_WHEELS)/*.whl),:$(abspath $(wheel)))$${PYTHONPATH:+:$$PYTHONPATH} $(GPU_PYTHON) -m zomem gpu-check --device $(DEVICE) \
		--out $(GPU_CHECK_OUT) --pack $(GPU_CHECK_PACK)

gpu-wheels: $(STAMP)
	$(BIN)/pip download --quiet --disable-pip-version-check --no-deps --only-binary :all: -d $(GPU_WHEELS) tabulate

clean:
	rm -rf $(VENV) out
