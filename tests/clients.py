"""The CIM's own client (clients/cim-rust, async-nats 0.33) and the nats.js check
(clients/node), built and run against a cluster the way their users would run them."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from functools import cache
from pathlib import Path
from typing import Any

from tests.helpers import REPO, run_playbook
from verify.inventory import Cluster

RUST_MANIFEST = REPO / "clients" / "cim-rust" / "Cargo.toml"
NODE_DIR = REPO / "clients" / "node"
# As clients/rust.mk: build output outside the checkout, kept between runs.
CARGO_TARGET_DIR = Path(
    os.environ.get("CARGO_TARGET_DIR") or Path.home() / ".cache" / "cim-nats-infra" / "cargo-target"
)


def _tool(name: str) -> str:
    found = shutil.which(name) or shutil.which(str(Path.home() / ".cargo" / "bin" / name))
    if found is None:
        raise RuntimeError(f"{name} not found (PATH, ~/.cargo/bin): the client checks need it")
    return found


@cache
def cim_contract_binary() -> Path:
    """cim-contract, built as `make rust-client` builds it (release, --locked); a no-op when built."""
    built = subprocess.run(
        [_tool("cargo"), "build", "--release", "--locked", "--manifest-path", str(RUST_MANIFEST)],
        env=os.environ | {"CARGO_TARGET_DIR": str(CARGO_TARGET_DIR)},
        capture_output=True,
        text=True,
        timeout=1800,
        check=False,
    )
    if built.returncode != 0:
        raise RuntimeError(f"cargo build of clients/cim-rust failed:\n{built.stderr[-4000:]}")
    return CARGO_TARGET_DIR / "release" / "cim-contract"


@cache
def node_client_dir() -> Path:
    """clients/node with its pinned packages installed (npm ci, as `make node-client`)."""
    if not (NODE_DIR / "node_modules" / ".package-lock.json").exists():
        installed = subprocess.run(
            [_tool("npm"), "ci", "--no-audit", "--no-fund"],
            cwd=NODE_DIR,
            capture_output=True,
            text=True,
            timeout=600,
            check=False,
        )
        if installed.returncode != 0:
            raise RuntimeError(f"npm ci in clients/node failed:\n{installed.stderr[-4000:]}")
    return NODE_DIR


NATSCLI_MAKEFILE = REPO / "clients" / "natscli.mk"


@cache
def natscli_binary() -> Path:
    """natscli at the version clients/natscli.mk pins, built as `make natscli` builds it; a no-op
    when built."""
    found = re.search(r"^NATSCLI_VERSION := (\S+)$", NATSCLI_MAKEFILE.read_text(), re.MULTILINE)
    if found is None:
        raise RuntimeError(f"no NATSCLI_VERSION in {NATSCLI_MAKEFILE}")
    directory = Path.home() / ".cache" / "cim-nats-infra" / f"natscli-{found.group(1)}"
    if not (directory / "nats").exists():
        built = subprocess.run(
            [_tool("go"), "install", f"github.com/nats-io/natscli/nats@{found.group(1)}"],
            env=os.environ | {"GOBIN": str(directory), "GOFLAGS": "-mod=mod"},
            capture_output=True,
            text=True,
            timeout=1800,
            check=False,
        )
        if built.returncode != 0:
            raise RuntimeError(f"go install of natscli {found.group(1)} failed:\n{built.stderr[-4000:]}")
    return directory / "nats"


BUNDLE_VARIABLES = ("NATS_URL", "NATS_USER", "NATS_PASSWORD", "NATS_CA")


@cache
def bundle_env(inventory: Path, client: str) -> dict[str, str]:
    """The application's bundle as playbooks/client-bundle.yml writes it (controller only), and
    the environment its env file gives, read by a real shell: what the application runs with."""
    directory = REPO / "build" / "test-bundles" / client
    made = run_playbook(
        "client-bundle.yml", inventory, "-e", f"client={client}", "-e", f"client_bundle_dir={directory}"
    )
    if made.returncode != 0:
        raise RuntimeError(f"client-bundle.yml failed:\n{made.stdout[-3000:]}\n{made.stderr[-2000:]}")
    shown = subprocess.run(
        # set -a: whether or not the file exports them, the variables reach `env`.
        ["sh", "-c", 'set -a && . "$0" && env', str(directory / "env")],
        capture_output=True,
        text=True,
        check=True,
        env={"PATH": os.environ.get("PATH", "/usr/bin:/bin")},
    )
    found = dict(line.split("=", 1) for line in shown.stdout.splitlines() if "=" in line)
    return {name: found[name] for name in BUNDLE_VARIABLES}


def bundle_servers_by_name(cluster: Cluster, client: str = "cim") -> list[str]:
    """The bundle's servers-by-name: the members' names, for clients that check names (nats.js)."""
    bundle_env(cluster.inventory, client)
    return (REPO / "build" / "test-bundles" / client / "servers-by-name").read_text().split()


def client_env(cluster: Cluster, client: str = "cim", urls: list[str] | None = None) -> dict[str, str]:
    """The client's bundle env (NATS_URL, NATS_USER, NATS_PASSWORD, NATS_CA); `urls` replaces
    the servers (the members' names for nats.js: the bundle's servers-by-name)."""
    env = dict(bundle_env(cluster.inventory, client))
    if urls:
        env["NATS_URL"] = ",".join(urls)
    return env


def run_json(
    command: list[str], env: dict[str, str], timeout: float, cwd: Path | None = None
) -> tuple[int, dict[str, Any], str]:
    """Runs a client that prints one JSON line; (exit code, that JSON or {}, stderr)."""
    done = subprocess.run(
        command, env=os.environ | env, capture_output=True, text=True, timeout=timeout, check=False, cwd=cwd
    )
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    try:
        report = json.loads(lines[-1]) if lines else {}
    except ValueError:
        report = {}
    return done.returncode, report, done.stderr + done.stdout[-2000:]
