# The two commands: `make lab` (bring up the 3-host lab, deploy, verify) and `make test`.
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
SETUP_STAMP := $(VENV)/.setup-$(shell cat pyproject.toml | sha256sum | cut -c1-12)
# Debian packages the lab needs on the machine (nspawn hosts, base image, partitions).
LAB_APT_PACKAGES := systemd-container debootstrap nftables iproute2 openssh-client libfuse2
# Debian's Prometheus and blackbox exporter, for promtool and the exporter's --config.check (the
# monitoring role's checks and tests); without their recommends (node exporter), and on this
# machine nothing starts them.
TOOL_APT_PACKAGES := prometheus prometheus-blackbox-exporter
LAB_INVENTORY := inventory/lab
export ANSIBLE_CONFIG := $(CURDIR)/ansible.cfg
# rustup installs cargo under ~/.cargo/bin, which a non-login shell (CI) may not have on PATH.
export PATH := $(CURDIR)/$(BIN):$(PATH):$(HOME)/.cargo/bin
# The lab's vaulted secrets open with the lab's own vault password (committed: lab-only secrets).
# Production's vault ids come from the operator (--vault-id phx@prompt).
export ANSIBLE_VAULT_IDENTITY_LIST ?= lab@$(CURDIR)/inventory/lab.vault-password

# The CIM's own client (Rust, async-nats 0.33), the nats.js check and natscli: built outside the checkout.
include clients/rust.mk
include clients/node.mk
include clients/natscli.mk
include clients/exporter.mk

.PHONY: help setup lab-deps clients lab lab-up lab-down deploy health verify test test-unit test-lab lint bench clean

help:
	@echo "make lab       venv, lab up, deploy playbooks/site.yml, verify (the lab stays up: make lab-down)"
	@echo "make test      venv, lint and the whole test suite, the lab included"
	@echo "make lint      ansible-lint (production), yamllint, syntax checks, ruff, mypy"
	@echo "make lab-up | lab-down | deploy | health | bench | clients | clean"

setup: $(SETUP_STAMP)

$(SETUP_STAMP): pyproject.toml
	rm -f $(VENV)/.setup-*
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -e '.[dev]'
	touch $@

# Installs only what is missing, so a prepared machine skips apt entirely.
lab-deps:
	@missing=$$(for p in $(LAB_APT_PACKAGES); do dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q 'ok installed' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  echo "apt: installing $$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	fi
	@missing=$$(for p in $(TOOL_APT_PACKAGES); do dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q 'ok installed' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  echo "apt: installing $$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	fi

# The clients the tests and benchmarks run against the lab, as their users have them.
clients: rust-client node-client natscli exporter

lab-up: setup lab-deps exporter natscli
	$(BIN)/nats-lab up

lab-down: setup
	$(BIN)/nats-lab down

deploy: setup
	$(BIN)/ansible-playbook -i $(LAB_INVENTORY) playbooks/site.yml

health: setup
	$(BIN)/ansible-playbook -i $(LAB_INVENTORY) playbooks/health.yml

lab: lab-up deploy health verify

verify: setup
	$(BIN)/nats-verify -i $(LAB_INVENTORY)

lint: setup
	$(BIN)/yamllint -s .
	$(BIN)/ansible-lint -q
	# Every playbook's --syntax-check against both inventories is a test (tests/test_inventories.py).
	for inv in inventory/phx inventory/lab; do $(BIN)/ansible-inventory -i $$inv --list >/dev/null; done
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(CARGO) fmt --check --manifest-path $(CIM_RUST_MANIFEST)

test-unit: setup
	$(BIN)/pytest -m "not lab"

test-lab: setup lab-deps clients
	$(BIN)/pytest -m lab

# The tests that need no lab run beside the lab's, niced: the lab's tests mostly wait on hosts,
# faults and alerts, and the lab's hosts keep the CPU they need. Both outputs are printed whole,
# the other tests' after the lab's; either failing fails the target.
test: setup lab-deps clients lint
	@mkdir -p build
	trap 'kill $$others 2>/dev/null || true' EXIT; \
	nice -n 10 $(BIN)/pytest -m "not lab" -p no:cacheprovider --durations=20 > build/test-others.log 2>&1 & others=$$!; \
	lab=0; $(BIN)/pytest -m lab --durations=40 || lab=$$?; \
	rest=0; wait $$others || rest=$$?; \
	echo "=== the tests that need no lab (build/test-others.log) ==="; cat build/test-others.log; \
	echo "make test: lab tests exit $$lab, the others exit $$rest"; \
	test $$lab -eq 0 -a $$rest -eq 0

bench: setup lab-deps clients
	$(BIN)/python -m benchmarks.deploy
	$(BIN)/python -m benchmarks.eventstore
	$(BIN)/python -m benchmarks.remediation
	$(BIN)/python -m benchmarks.durability --candidate always
	$(BIN)/python -m benchmarks.sync_local
	$(BIN)/python -m benchmarks.snapshot_load
	$(BIN)/python -m benchmarks.security
	$(BIN)/python -m benchmarks.monitoring

clean: lab-down
	rm -rf build .pytest_cache .mypy_cache .ruff_cache .hypothesis
