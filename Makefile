# The two commands of the README:  `make run`  and  `make test`.
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.chainopt-installed
EXPERIMENT ?= experiments/banking77-fewshot.toml

.PHONY: run test install clean

# Set everything up, run the default experiment on the embedded model, and write its HTML report.
run: $(STAMP)
	$(BIN)/chainopt run $(EXPERIMENT)
	$(BIN)/chainopt report $(EXPERIMENT)

# Set everything up and run the whole test suite (real model, real MLflow, real browser).
test: $(STAMP)
	$(BIN)/python -m pytest

install: $(STAMP)

$(STAMP): pyproject.toml requirements.lock scripts/install.sh
	VENV=$(VENV) bash scripts/install.sh
	touch $@

clean:
	rm -rf $(VENV) mlruns mlflow.db reports exports
