# natscli, the operators' own tool (the `nats` CLI), at one pinned version: built from its Go
# module (go.sum pins its dependencies) into a directory named after the version, outside the
# checkout. tests/clients.py and the lab's mirror (nats_lab/mirror.py, which packs it as the
# release archive) read NATSCLI_VERSION from this file; roles/natscli installs the same version
# from the release (a test keeps its natscli_version equal to this one without the v).
GO ?= go
NATSCLI_VERSION := v0.5.0
NATSCLI_DIR := $(HOME)/.cache/cim-nats-infra/natscli-$(NATSCLI_VERSION)
NATSCLI_BIN := $(NATSCLI_DIR)/nats

.PHONY: natscli

natscli:
	@command -v $(GO) >/dev/null || { echo "go not found: install Go, or GO=/path/to/go" >&2; exit 1; }
	test -x $(NATSCLI_BIN) || GOBIN=$(NATSCLI_DIR) GOFLAGS=-mod=mod $(GO) install github.com/nats-io/natscli/nats@$(NATSCLI_VERSION)
	@echo "natscli $(NATSCLI_VERSION) at $(NATSCLI_BIN)"
