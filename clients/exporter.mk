# prometheus-nats-exporter at one pinned version (clients/prometheus-nats-exporter/go.mod), built
# as its release is (CGO off, version stamped) into a directory outside the checkout named after
# the version. The lab's release mirror packs this binary as the official archive; the role
# installs it from there (production: from the GitHub release).
EXPORTER_MODULE_DIR := clients/prometheus-nats-exporter
EXPORTER_VERSION := $(shell awk '$$1 == "require" && $$2 == "github.com/nats-io/prometheus-nats-exporter" {print $$3}' $(EXPORTER_MODULE_DIR)/go.mod)
EXPORTER_DIR := $(HOME)/.cache/cim-nats-infra/prometheus-nats-exporter-$(EXPORTER_VERSION)
EXPORTER_BIN := $(EXPORTER_DIR)/prometheus-nats-exporter

.PHONY: exporter

exporter:
	@command -v $(GO) >/dev/null || { echo "go not found: install Go, or GO=/path/to/go" >&2; exit 1; }
	test -x $(EXPORTER_BIN) || ( cd $(EXPORTER_MODULE_DIR) && CGO_ENABLED=0 GOFLAGS=-mod=mod $(GO) build -trimpath \
	  -ldflags "-s -w -X main.version=$(EXPORTER_VERSION:v%=%)" -o $(EXPORTER_BIN).tmp github.com/nats-io/prometheus-nats-exporter \
	  && mv $(EXPORTER_BIN).tmp $(EXPORTER_BIN) )
	@echo "prometheus-nats-exporter $(EXPORTER_VERSION) at $(EXPORTER_BIN)"
