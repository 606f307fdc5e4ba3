# nats.js (Node) client check: clients/node/cim-check.mjs and its exactly pinned dependencies.
# Included by the top-level Makefile (`include clients/node.mk`); works alone too:
# `make -f clients/node.mk node-client`. npm keeps its download cache where it always does
# (~/.npm), outside the checkout; node_modules/ is ignored by git.
NODE_CLIENT_DIR := clients/node
NPM ?= npm
# npm ci writes node_modules/.package-lock.json: a lock file newer than it means reinstall.
NODE_CLIENT_STAMP := $(NODE_CLIENT_DIR)/node_modules/.package-lock.json

.PHONY: node-client

node-client: $(NODE_CLIENT_STAMP)

$(NODE_CLIENT_STAMP): $(NODE_CLIENT_DIR)/package-lock.json $(NODE_CLIENT_DIR)/package.json
	cd $(NODE_CLIENT_DIR) && $(NPM) ci --no-audit --no-fund
	touch $@
