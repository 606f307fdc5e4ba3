# The CIM contract client (clients/cim-rust, async-nats at the CIM's 0.33): `include clients/rust.mk`.
# Build output stays outside the checkout, shared by every worktree of this user.
CARGO ?= cargo
CARGO_TARGET_DIR ?= $(HOME)/.cache/cim-nats-infra/cargo-target
export CARGO_TARGET_DIR
CIM_RUST_MANIFEST := clients/cim-rust/Cargo.toml
CIM_RUST_BIN := $(CARGO_TARGET_DIR)/release/cim-contract

.PHONY: rust-client

# --locked: the committed Cargo.lock is used as it is (a stale one fails instead of being rewritten).
rust-client:
	@command -v $(CARGO) >/dev/null || { echo "cargo not found: install Rust (https://rustup.rs), or CARGO=/path/to/cargo" >&2; exit 1; }
	$(CARGO) build --release --locked --manifest-path $(CIM_RUST_MANIFEST)
	@echo "built $(CIM_RUST_BIN)"
