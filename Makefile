# uml-ray: `make demo` runs a real search on the embedded default; `make test` runs the tests.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
DEMO := demo_work

.PHONY: venv debian-packages demo lint format test test-unit test-integration test-cluster test-chaos bench clean

venv: $(STAMP)

# torch/torchvision pinned: 2.14.1/0.29.1 install from local files on our machines, and the
# PyPI torchvision does not work beside other torch builds
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install -q -e '.[assets,test]'
	touch $(STAMP)

# the offline real data (docs/data-format.md): Fashion-MNIST idx files and WordNet 3.0, from Debian
DEBIAN_PACKAGES := dataset-fashion-mnist wordnet-base
debian-packages:
	@if [ -f /usr/share/wordnet/data.noun ] && [ -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]; then :; \
	elif [ "$$(id -u)" = 0 ]; then echo "installing Debian packages: $(DEBIAN_PACKAGES)"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(DEBIAN_PACKAGES) >/dev/null; \
	else echo "uml-ray needs the Debian packages $(DEBIAN_PACKAGES): run 'sudo apt-get install $(DEBIAN_PACKAGES)', then make again" >&2; exit 2; fi

# Fashion-MNIST (4-shot) features from the packaged EfficientNet-Lite0 + MiniLM features of
# WordNet glosses and prompt templates → a real UML search of 64 configs (fused 16 per trial) →
# the best config read back from MLflow; the demo's wall time at the end.
demo: $(STAMP) debian-packages
	@start=$$(date +%s); \
	$(BIN)/uml-ray case fashion-mnist --out $(DEMO)/fashion-mnist --shots 4 --split-seed 0 && \
	$(BIN)/uml-ray validate configs/fashion_mnist.yaml data.manifest=$(DEMO)/fashion-mnist/manifest.yaml \
		tracking.uri=sqlite:///$(DEMO)/mlflow.db tracking.storage_path=$(DEMO)/runs \
		--space search_spaces/supervised_linear_probe.yaml && \
	$(BIN)/uml-ray tune configs/fashion_mnist.yaml data.manifest=$(DEMO)/fashion-mnist/manifest.yaml \
		tracking.uri=sqlite:///$(DEMO)/mlflow.db tracking.storage_path=$(DEMO)/runs \
		--space search_spaces/supervised_linear_probe.yaml --trials 64 --name demo-$$(date +%Y%m%d-%H%M%S) && \
	$(BIN)/uml-ray best --experiment fashion-mnist --tracking-uri sqlite:///$(DEMO)/mlflow.db \
		--output $(DEMO)/best_config.yaml && \
	cat $(DEMO)/best_config.yaml && \
	echo "demo wall time: $$(( $$(date +%s) - start )) s (MLflow UI: $(BIN)/mlflow ui --backend-store-uri sqlite:///$(DEMO)/mlflow.db --host 127.0.0.1)"

# ruff (pyproject.toml [tool.ruff]): lint and the formatter's check; `make format` rewrites
LINTED := uml_ray tests benchmarks
lint: $(STAMP)
	$(BIN)/ruff check $(LINTED)
	$(BIN)/ruff format --check $(LINTED)

format: $(STAMP)
	$(BIN)/ruff check --fix $(LINTED)
	$(BIN)/ruff format $(LINTED)

# three tiers, all run by `make test` (CI): unit (no Ray), integration (one shared local Ray,
# real MLflow), cluster (multi-node, job submission, autoscaler)
PYTEST := $(BIN)/python -m pytest -q --timeout 900

test: $(STAMP) debian-packages
	$(PYTEST) --durations=20 tests

test-unit: $(STAMP) debian-packages
	$(PYTEST) -m unit tests

test-integration: $(STAMP) debian-packages
	$(PYTEST) -m integration tests

test-cluster: $(STAMP) debian-packages
	$(PYTEST) -m cluster tests

# the chaos suite (README "Reliability"): workers, trials, the driver, a node and the MLflow server killed mid-run
test-chaos: $(STAMP) debian-packages
	$(PYTEST) -m chaos tests

bench: $(STAMP)
	$(BIN)/python benchmarks/trial_overhead.py
	$(BIN)/python benchmarks/stream_throughput.py

clean:
	rm -rf $(DEMO) uml_runs mlruns mlartifacts mlflow.db
